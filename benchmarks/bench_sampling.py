"""Fused sampling kernel vs the usual torch chain, side by side in one run.

    python benchmarks/bench_sampling.py                # CPU (writes benchmarks/results/sampling_cpu.json)
    python benchmarks/bench_sampling.py --device cuda  # GPU, CUDA events (writes results/sampling_gpu.json)

Grid: rows R in {1, 2, 64, 256}, vocabulary V in {8192, 16384, 65536}, top_k in {0, 50, 2000, V} (temperature
1, top_p 1), plus top_p = 0.9 with top_k = 0. Per case: median time after warm-up of
  kernel  the larp_rt::sample op (CPU: the C++ kernel through the torch op; CUDA: the CUDA kernel), and
  torch   the reference chain: softmax (after topk for 0 < k < V) + multinomial + gather; top-p by sort +
          cumsum + mask + multinomial (torch's own RNG, float32 softmax as usual in inference code).
GB/s = logits bytes read once (R * V * 4) / median time. Both sides use --threads CPU threads (default 1: on a
small shared machine torch's thread pool otherwise dominates its timings). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from larp_rt import kernels as K
from larp_rt.sampling import RowParams
from larp_rt.sampling_torch import DeviceRowParams

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (1, 2, 64, 256)
VOCABS = (8192, 16384, 65536)


def machine_name() -> str:
    try:
        from larp_rt.bench import machine_name as name

        return name()
    except ImportError:
        cpu = platform.machine()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def torch_chain(logits: torch.Tensor, k: int, p: float, gen: torch.Generator) -> torch.Tensor:
    V = logits.shape[-1]
    if 0 < k < V:
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(vals, dim=-1)
        return torch.gather(idx, 1, torch.multinomial(probs, 1, generator=gen)).view(-1)
    if p < 1.0:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(vals, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        probs = probs.masked_fill(cum - probs >= p, 0.0)
        return torch.gather(idx, 1, torch.multinomial(probs, 1, generator=gen)).view(-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).view(-1)


def time_cpu(fn, budget_s: float) -> tuple[float, int]:
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    n = int(min(50, max(3, budget_s / max(once, 1e-9))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), n


def time_cuda(fn, budget_s: float) -> tuple[float, int]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = start.elapsed_time(end) / 1e3
    n = int(min(200, max(5, budget_s / max(once, 1e-9))))
    ts = []
    for _ in range(n):
        start.record()
        fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return statistics.median(ts), n


def run(device: str, budget_s: float, quick: bool, threads: int) -> dict:
    op = K.register_torch_op()
    torch.set_num_threads(threads)
    K.set_num_threads(threads)
    load_before = os.getloadavg()
    if device == "cuda":
        if not torch.cuda.is_available() or K.cuda_library() is None:
            raise SystemExit("--device cuda needs a CUDA GPU and the CUDA kernels (pip install -e . with nvcc)")
        machine = torch.cuda.get_device_name()
        timer = time_cuda
    else:
        if K.cpu_library() is None:
            raise SystemExit(f"CPU kernels not built: {K.available()['errors']}")
        machine = f"{machine_name()}, torch {torch.__version__}, {threads} thread(s) for both sides"
        timer = time_cpu
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for V in VOCABS if not quick else VOCABS[:1]:
        for R in ROWS if not quick else ROWS[:2]:
            logits = torch.randn(R, V, generator=torch.Generator().manual_seed(R * V)).mul_(3.0).to(device)
            step = torch.zeros((), dtype=torch.int64, device=device)
            for k, p in [(0, 1.0), (50, 1.0), (2000, 1.0), (V, 1.0), (0, 0.9)]:
                params = RowParams(
                    cfg_scale=np.ones(R, np.float32), temperature=np.ones(R, np.float32),
                    top_k=np.full(R, k, np.int64), top_p=np.full(R, p, np.float32),
                    seed=np.arange(R, dtype=np.uint64), stream=np.zeros(R, np.uint64))
                dp = DeviceRowParams(params, device)
                top_p32 = dp.top_p.float()

                def kernel(logits=logits, dp=dp, top_p32=top_p32, step=step):
                    return op(logits, None, dp.cfg_scale, dp.temperature, dp.top_k, top_p32, dp.seed, dp.stream,
                              step)

                def chain(logits=logits, k=k, p=p):
                    return torch_chain(logits, k, p, gen)

                budget = budget_s if R * V <= 64 * 16384 else budget_s / 2
                tk, nk = timer(kernel, budget)
                tt, nt = timer(chain, budget)
                gb = R * V * 4 / 1e9
                row = {"R": R, "V": V, "top_k": k, "top_p": p, "kernel_us": tk * 1e6, "torch_us": tt * 1e6,
                       "kernel_GBps": gb / tk, "torch_GBps": gb / tt, "speedup": tt / tk, "repeats": [nk, nt]}
                rows.append(row)
                print(f"R={R:4d} V={V:6d} k={k:6d} p={p:.1f}  kernel {tk * 1e6:10.1f} us ({gb / tk:6.2f} GB/s)  "
                      f"torch {tt * 1e6:10.1f} us ({gb / tt:6.2f} GB/s)  x{tt / tk:5.2f}", file=sys.stderr, flush=True)
    info = K.available()
    return {"machine": machine, "device": device, "exp_impl": info["exp_impl"], "torch": torch.__version__,
            "threads": threads, "loadavg_before_after": [load_before[0], os.getloadavg()[0]], "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"machine: {res['machine']} (load average before/after: {res['loadavg_before_after']})", "",
             "| R | V | top_k | top_p | kernel µs | kernel GB/s | torch chain µs | torch GB/s | speedup |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        lines.append(f"| {r['R']} | {r['V']} | {r['top_k']} | {r['top_p']} | {r['kernel_us']:.1f} | "
                     f"{r['kernel_GBps']:.2f} | {r['torch_us']:.1f} | {r['torch_GBps']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timed runs per case and side")
    ap.add_argument("--quick", action="store_true", help="a few cases only (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (torch and the kernel)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/sampling_<device>.json)")
    args = ap.parse_args(argv)
    t0 = time.time()
    res = run(args.device, args.budget, args.quick, args.threads)
    res["wall_s"] = round(time.time() - t0, 1)
    out = args.out or RESULTS / f"sampling_{args.device}.json"
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    speed = [r["speedup"] for r in res["rows"]]
    print(json.dumps({"bench": "sampling", "device": args.device, "machine": res["machine"], "cases": len(speed),
                      "median_speedup": statistics.median(speed), "min_speedup": min(speed),
                      "max_speedup": max(speed), "wall_s": res["wall_s"]}))


if __name__ == "__main__":
    main()
