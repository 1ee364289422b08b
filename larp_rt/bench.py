"""Latency of an Engine's three paths, backend against backend, in one run (``larp-rt bench``).

Medians over repeats after a warm-up; per-token latency is a whole generation (prefill + every step +
sampling) divided by the number of tokens. Ends with one machine-readable JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from .engine import Engine
from .sampling import SamplingParams

__all__ = ["machine_name", "time_median", "bench_engine"]


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def time_median(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_engine(bundle: str, backends=("onnxruntime", "torch"), batches=(1,), repeats: int = 3,
                 cfg_scale: float | None = None, threads: int | None = None, printer=print) -> list[dict]:
    rows = []
    for name in backends:
        eng = Engine(bundle, backend=name, device="cpu", threads=threads)
        tcfg, gcfg = eng.tokenizer_config, eng.generator_config
        for B in batches:
            row = {"backend": name, "batch": B}
            rng = np.random.default_rng(0)
            if tcfg is not None:
                video = rng.random((B, *tcfg.video_shape), dtype=np.float32)
                tokens = rng.integers(0, tcfg.codebook_size, (B, tcfg.num_tokens))
                row["encode_ms"] = 1e3 * time_median(lambda e=eng, v=video: e.encode(v), repeats)
                row["decode_ms"] = 1e3 * time_median(lambda e=eng, t=tokens: e.decode(t), repeats)
            if gcfg is not None:
                cfg = eng.default_params.cfg_scale if cfg_scale is None else cfg_scale
                params = SamplingParams(cfg_scale=cfg, temperature=1.0, seed=0)
                ids = [i % gcfg.num_classes for i in range(B)]
                t = time_median(lambda e=eng, i=ids, p=params: e.generate(i, p), repeats)
                row["cfg_scale"] = cfg
                row["per_token_ms"] = 1e3 * t / gcfg.max_seq_len
                row["generate_s"] = t
            rows.append(row)
        eng.close()
    printer(f"machine: {machine_name()}")
    keys = ["encode_ms", "per_token_ms", "decode_ms", "generate_s"]
    printer(f"{'backend':<12} {'batch':>5} " + " ".join(f"{k:>13}" for k in keys))
    for r in rows:
        printer(f"{r['backend']:<12} {r['batch']:>5} " + " ".join(
            f"{r[k]:>13.3f}" if k in r else f"{'-':>13}" for k in keys))
    printer(json.dumps({"machine": machine_name(), "bundle": str(bundle), "results": rows}))
    return rows
