"""Videos/min through Triton (larp_video: generate on the Scheduler + decode, BLS) against the in-process Engine.

    python benchmarks/bench_triton.py [--preset tiny|small] [--videos 16] [--clients 1,4] [--replicas 2]

Random weights (the preset's tokenizer + generator), CFG 1.25, seeds 0..V-1. Cases, each in one run:
  engine      Engine.generate_video, one video at a time, in this process
  triton cN   one tritonserver (1 instance of each model), N concurrent HTTP clients (TritonClient.video)
  replicas    R tritonservers (1 instance each, ONNX Runtime threads = cores / R), clients spread round-robin
Every Triton video's tokens are checked against the Engine's for the same seed. Ends with one JSON line and writes
benchmarks/results/triton_cpu_PRESET.json (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def build_bundle(preset: str, root: Path) -> Path:
    import torch
    from larp_rt.export import export_bundle

    from larp_rt import GeneratorConfig, TokenizerConfig, save_pretrained
    from larp_rt.models import LARPGenerator, LARPTokenizer

    torch.manual_seed(0)
    tok_preset = {"tiny": "tiny", "small": "larp-s"}[preset]
    save_pretrained(LARPTokenizer(TokenizerConfig.from_name(tok_preset)).eval(), root / "tok")
    save_pretrained(LARPGenerator(GeneratorConfig.from_name(preset)).eval(), root / "gen")
    return export_bundle(root / "tok", root / "gen", root / "bundle", printer=lambda s: None, onnx_only=True,
                         verify=False)


def run_clients(urls: list[str], videos: int, clients: int, params: dict, ref_tokens: np.ndarray) -> dict:
    from larp_rt.triton_client import TritonClient

    lat = []

    def one(i):
        with TritonClient(urls[i % len(urls)], timeout=3600) as c:
            t0 = time.perf_counter()
            _, g = c.video([i % 8], seed=i, **params)
            lat.append(time.perf_counter() - t0)
            return g.tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        toks = list(ex.map(one, range(videos)))
    wall = time.perf_counter() - t0
    same = all(np.array_equal(t[0], ref_tokens[i]) for i, t in enumerate(toks))
    return {"videos": videos, "clients": clients, "servers": len(urls), "seconds": round(wall, 3),
            "videos_per_min": round(60 * videos / wall, 2), "p50_latency_s": round(float(np.median(lat)), 3),
            "tokens_equal_engine": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/triton_cpu_PRESET.json")
    a = ap.parse_args()
    a.out = a.out or str(Path(__file__).parent / "results" / f"triton_cpu_{a.preset}.json")
    os.environ.setdefault("LARP_RT_ORT_SPIN", "0")
    from larp_rt import Engine
    from larp_rt.triton import LocalServer, write_repository

    cores = os.cpu_count() or 1
    sampling = {"cfg_scale": 1.25}
    results = {"machine": f"{platform.processor() or platform.machine()}, {cores} cores", "preset": a.preset,
               "date": time.strftime("%Y-%m-%d"), "cases": {}}
    with tempfile.TemporaryDirectory(prefix="bench_triton_") as tmp:
        root = Path(tmp)
        bundle = build_bundle(a.preset, root)
        eng = Engine(bundle, backend="onnxruntime")
        base = dataclasses.replace(eng.default_params, **sampling)
        ids = [i % 8 for i in range(a.videos)]
        eng.generate_video([0], dataclasses.replace(base, seed=0))  # warm-up
        t0 = time.perf_counter()
        ref = np.concatenate([eng.generate_video([c], dataclasses.replace(base, seed=i))[1].tokens
                              for i, c in enumerate(ids)])
        wall = time.perf_counter() - t0
        results["cases"]["engine"] = {"videos": a.videos, "seconds": round(wall, 3),
                                      "videos_per_min": round(60 * a.videos / wall, 2)}
        eng.close()
        print(results["cases"]["engine"], flush=True)
        repo = write_repository(bundle, root / "repo", max_batch=8, printer=lambda s: None)
        with LocalServer(repo) as srv:
            run_clients([srv.http_url], 2, 1, sampling, ref)  # warm-up
            for c in (int(x) for x in a.clients.split(",")):
                r = run_clients([srv.http_url], a.videos, c, sampling, ref)
                results["cases"][f"triton_c{c}"] = r
                print(f"triton c{c}", r, flush=True)
        if a.replicas > 1:
            threads = max(1, cores // a.replicas)
            repo_r = write_repository(bundle, root / "repo_r", max_batch=8, threads=threads, printer=lambda s: None)
            servers = [LocalServer(repo_r) for _ in range(a.replicas)]
            try:
                for s in servers:
                    s.start(timeout=120)
                urls = [s.http_url for s in servers]
                run_clients(urls, a.replicas, a.replicas, sampling, ref)  # warm-up
                c = max(int(x) for x in a.clients.split(","))
                r = run_clients(urls, a.videos, c, sampling, ref)
                r["threads_per_replica"] = threads
                results["cases"][f"replicas{a.replicas}_c{c}"] = r
                print(f"replicas {a.replicas}", r, flush=True)
            finally:
                for s in servers:
                    s.close()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
