"""Latency of an Engine's three paths, backend against backend, in one run (``larp-rt bench``).

Medians over repeats after a warm-up; per-token latency is a whole generation (prefill + every step +
sampling) divided by the number of tokens. Ends with one machine-readable JSON line.

Also the roofline arithmetic of the benchmarks (pure functions of the configs and measured numbers): bytes of
weights a decode step reads, the weight-read floor and ``floor_ratio``, copy bandwidth, decoder FLOPs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from .config import GeneratorConfig, TokenizerConfig
from .engine import Engine
from .sampling import SamplingParams

__all__ = [
    "machine_name", "time_median", "bench_engine", "generator_step_weight_bytes", "kv_cache_step_bytes",
    "copy_bandwidth", "weight_read_floor", "floor_ratio", "decoder_flops",
]


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


def time_runs(fn: Callable[[], object], repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
    """The median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and every run's seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def time_median(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    return time_runs(fn, repeats, warmup)[0]


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


# --------------------------------------------------------------------------------------------
# roofline arithmetic
# --------------------------------------------------------------------------------------------
def generator_step_weight_bytes(cfg: GeneratorConfig, rows: int, bytes_per_param: int = 2) -> int:
    """Bytes of weights one cached decode step of ``rows`` rows reads: every layer's linear weights (wqkv, wo,
    w1, w3, w2) and its two norms, the final norm and the output head in full; of the token embedding one row
    per row (the token it looks up) and of the position table one row. The class embedding is not read."""
    if rows < 0 or bytes_per_param <= 0:
        raise ValueError(f"rows must be >= 0 and bytes_per_param > 0, got {rows}, {bytes_per_param}")
    D, F = cfg.dim, cfg.ffn_hidden
    per_layer = 3 * D * D + D * D + 3 * D * F + 2 * D  # wqkv, wo, w1 + w3 + w2, attention_norm + ffn_norm
    params = cfg.n_layer * per_layer + D + cfg.vocab_size * D + rows * D + D  # + norm, output, embeddings, abs_pe
    return params * bytes_per_param


def kv_cache_step_bytes(cfg: GeneratorConfig, rows: int, cache_len: int, bytes_per_elem: int = 2) -> int:
    """Bytes of K and V one step reads when attention runs over the whole static cache of ``cache_len``
    positions (masked, as the captured step does): 2 * layers * rows * cache_len * dim elements."""
    return 2 * cfg.n_layer * rows * cache_len * cfg.dim * bytes_per_elem


def copy_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes``: each byte is read once and written once."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return 2.0 * nbytes / seconds


def weight_read_floor(weight_bytes: int, bandwidth: float) -> float:
    """Seconds a step needs at least: its weight bytes read once at ``bandwidth`` bytes/s."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    return weight_bytes / bandwidth


def floor_ratio(step_seconds: float, weight_bytes: int, bandwidth: float) -> float:
    """Measured step time / the weight-read floor (1.0 = at the hardware floor)."""
    return step_seconds / weight_read_floor(weight_bytes, bandwidth)


def decoder_flops(cfg: TokenizerConfig, batch: int = 1) -> int:
    """Matmul FLOPs (2 per multiply-add) of the tokenizer decoder for ``batch`` videos: the code projection
    (16 -> D) on N tokens, ``dec_depth`` ViT blocks over L = N + P tokens (qkv 6LD^2, QK^T and AV 4L^2 D, proj
    2LD^2, MLP 16LD^2) and the output linear on the P patch tokens. Norms, softmax, GELU and biases excluded."""
    N, P, D = cfg.num_tokens, cfg.num_patches, cfg.dec_dim
    L = N + P
    block = 24 * L * D * D + 4 * L * L * D
    return batch * (2 * N * cfg.code_dim * D + cfg.dec_depth * block + 2 * P * D * cfg.patch_dim)
