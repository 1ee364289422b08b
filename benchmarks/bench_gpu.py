"""GPU generation fast path against the authors' eager loop and the hardware floor, side by side in one run.

    python benchmarks/bench_gpu.py --json benchmarks/results/gpu_generation.json   # CUDA: ar-lp bf16, larp-l fp16
    python benchmarks/bench_gpu.py --device cpu --preset tiny --batches 1,2         # CPU smoke run (fp32)

Random weights of the presets' shapes (no checkpoint files). For every batch (CFG --cfg-scale 1.25, temperature
1, top_k 0, top_p 1):

  fast     larp_rt's path (``larp_rt.backends.torch.fast.FastGenerator``): static KV cache, one decode step with the
           fused sampler, captured as a CUDA graph per batch bucket. step_ms p50/p90: CUDA events around every
           replay of a whole generation, after a warm-up generation (which captures). ttft_ms: prefill + first
           sample (wall, synced, best of 3). tokens_per_s, s_per_video: a whole generation (one sync at the end)
           plus the tokenizer decode of its tokens (wall, synced).
  authors  a faithful eager re-creation of the authors' loop (``authors_loop.authors_generate``) on the same model
           and device: step_ms from CUDA events between its steps, the same end-to-end numbers.

Roofline: weight_bytes = the weights one step reads (``larp_rt.bench.generator_step_weight_bytes``: all linear
weights, norms, the output head, one embedding row per row); bandwidth = a device-to-device copy of --bw-mib MiB
measured in this run (read + write bytes, best of several); floor_ms = weight_bytes / bandwidth; floor_ratio =
step p50 / floor; achieved_GBps = weight_bytes / step p50. The step also reads the whole static K/V cache (masked
attention): kv_bytes and floor_ratio_with_kv are reported beside. Tokenizer decode at --decode-batch: time and
TFLOP/s (``larp_rt.bench.decoder_flops``) against --peak-tflops (default 989: H100 SXM dense bf16/fp16).

Writes --json after every case (a cut-off run keeps what it measured); ends with one machine-readable JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # authors_loop

from authors_loop import authors_generate  # noqa: E402

from larp_rt import GeneratorConfig, SamplingParams, TokenizerConfig  # noqa: E402
from larp_rt.backends.torch.fast import FastGenerator, bucket_size, use_kernel_sampler  # noqa: E402
from larp_rt.bench import (  # noqa: E402
    copy_bandwidth,
    decoder_flops,
    floor_ratio,
    generator_step_weight_bytes,
    kv_cache_step_bytes,
    machine_name,
    weight_read_floor,
)
from larp_rt.models import LARPGenerator, LARPTokenizer  # noqa: E402
from larp_rt.sampling import resolve_params  # noqa: E402


class Clock:
    """Timestamps on the device timeline: CUDA events on CUDA, perf_counter on the CPU."""

    def __init__(self, device: torch.device, n: int = 0):
        self.cuda = device.type == "cuda"
        self.marks: list = [None] * n
        if self.cuda:
            self.marks = [torch.cuda.Event(enable_timing=True) for _ in range(n)]

    def record(self, i: int) -> None:
        if self.cuda:
            self.marks[i].record()
        else:
            self.marks[i] = time.perf_counter()

    def seconds(self, i: int, j: int) -> float:
        """Seconds from mark i to mark j (call sync() first on CUDA)."""
        if self.cuda:
            return self.marks[i].elapsed_time(self.marks[j]) / 1e3
        return self.marks[j] - self.marks[i]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 7) -> dict:
    """Device-to-device copy of ``nbytes`` (best of ``repeats`` after a warm-up); read + write bytes counted."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    clock = Clock(device, 2)
    best = float("inf")
    for _ in range(repeats):
        clock.record(0)
        dst.copy_(src)
        clock.record(1)
        clock.sync()
        best = min(best, clock.seconds(0, 1))
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes": nbytes, "best_s": best, "GBps": copy_bandwidth(nbytes, best) / 1e9, "repeats": repeats}


def build_models(gen_preset: str, tok_preset: str, device: torch.device, seed: int = 0):
    """Random-weight generator (bf16 on CUDA) and tokenizer (fp16 on CUDA), built on the device; fp32 on the CPU."""
    cuda = device.type == "cuda"
    torch.manual_seed(seed)
    with torch.device(device):
        gen = LARPGenerator(GeneratorConfig.from_name(gen_preset))
        torch.nn.init.normal_(gen.output.weight, std=0.02)  # the authors zero it; a live head gives real draws
        tok = LARPTokenizer(TokenizerConfig.from_name(tok_preset))
        torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.02)
    gen = gen.to(torch.bfloat16 if cuda else torch.float32).eval()
    tok = tok.to(torch.float16 if cuda else torch.float32).eval()
    return gen, tok


def dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e3
    return {"step_ms_p50": float(np.percentile(a, 50)), "step_ms_p90": float(np.percentile(a, 90)),
            "step_ms_mean": float(a.mean()), "steps_timed": len(xs)}


def roofline(step_s: float, weight_bytes: int, kv_bytes: int, bandwidth: float) -> dict:
    return {"achieved_GBps": weight_bytes / step_s / 1e9, "floor_ms": 1e3 * weight_read_floor(weight_bytes, bandwidth),
            "floor_ratio": floor_ratio(step_s, weight_bytes, bandwidth),
            "floor_ratio_with_kv": floor_ratio(step_s, weight_bytes + kv_bytes, bandwidth)}


def decode_seconds(tok, tokens: torch.Tensor, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        tok.decode(tokens)
    sync(device)
    return time.perf_counter() - t0


def bench_fast(gen, tok, ids: np.ndarray, rp, device: torch.device, cuda_graphs: bool) -> dict:
    N = gen.config.max_seq_len
    B = len(ids)
    fg = FastGenerator(gen, cuda_graphs=cuda_graphs)
    sync(device)
    t0 = time.perf_counter()
    fg.generate(ids, rp)  # warm-up: caches, buckets, capture
    sync(device)
    warm_s = time.perf_counter() - t0
    ttft = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        fg.begin(ids, rp)
        sync(device)
        ttft.append(time.perf_counter() - t0)
    # per step: events around every replay of one whole generation
    clock = Clock(device, N)
    b = fg.begin(ids, rp)
    clock.record(0)
    while b.done < N:
        fg.advance(b)
        clock.record(b.done - 1)
    clock.sync()
    steps = [clock.seconds(i, i + 1) for i in range(N - 1)]
    fg.tokens(b)  # raises on NaN/Inf
    # end to end: one generation (one sync at the end) + the tokenizer decode of its tokens
    sync(device)
    t0 = time.perf_counter()
    tokens = fg.generate(ids, rp)
    gen_s = time.perf_counter() - t0
    dec_s = decode_seconds(tok, torch.from_numpy(tokens).to(device), device)
    out = {"path": "fast", "cuda_graphs": fg.cuda_graphs, "captures": fg.captures,
           "sampler": "kernel" if use_kernel_sampler(device) else "reference",
           "rows": (2 if rp.uses_cfg else 1) * bucket_size(B), "cache_len": gen.cache_shape[1],
           "warmup_generation_s": warm_s, "ttft_ms": 1e3 * min(ttft), **percentiles(steps),
           "generate_s": gen_s, "decode_s": dec_s, "tokens_per_s": B * N / gen_s, "s_per_video": (gen_s + dec_s) / B}
    fg.release()
    return out


def bench_authors(gen, tok, ids: np.ndarray, cfg_scale: float, device: torch.device) -> dict:
    N = gen.config.max_seq_len
    B = len(ids)
    cond = torch.as_tensor(ids, device=device)
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    authors_generate(gen, cond, min(16, N), cfg_scale, **sampling)  # warm-up
    clock = Clock(device, N + 1)
    sync(device)
    t0 = time.perf_counter()
    tokens = authors_generate(gen, cond, N, cfg_scale, on_step=clock.record, **sampling)
    sync(device)
    gen_s = time.perf_counter() - t0
    steps = [clock.seconds(i, i + 1) for i in range(1, N)]
    dec_s = decode_seconds(tok, tokens, device)
    gen.clear_caches()
    cache_len = -(-(gen.config.cls_token_num + N) // 8) * 8  # what authors_generate allocated
    return {"path": "authors", "rows": 2 * B if cfg_scale > 1.0 else B, "cache_len": cache_len,
            "ttft_ms": 1e3 * clock.seconds(0, 1),
            **percentiles(steps), "generate_s": gen_s, "decode_s": dec_s, "tokens_per_s": B * N / gen_s,
            "s_per_video": (gen_s + dec_s) / B}


def bench_decode(tok, batch: int, device: torch.device, repeats: int, peak_tflops: float) -> dict:
    cfg = tok.config
    idx = torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens), device=device)
    for _ in range(2):
        decode_seconds(tok, idx, device)
    clock = Clock(device, 2)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            clock.record(0)
            tok.decode(idx)
            clock.record(1)
            clock.sync()
            times.append(clock.seconds(0, 1))
    t = float(np.median(times))
    flops = decoder_flops(cfg, batch)
    tflops = flops / t / 1e12
    return {"batch": batch, "ms": 1e3 * t, "flops": flops, "tflops": tflops, "peak_tflops": peak_tflops,
            "fraction_of_peak": tflops / peak_tflops, "repeats": repeats, "dtype": dtype_name(tok)}


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu --preset tiny for a smoke run")
    gen_preset = args.gen_preset or ("tiny" if args.preset == "tiny" else "ar-lp")
    tok_preset = args.tok_preset or ("tiny" if args.preset == "tiny" else "larp-l")
    batches = [int(b) for b in args.batches.split(",")]
    res: dict = {
        "bench": "gpu_generation", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else machine_name(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
        "generator_preset": gen_preset,
        "tokenizer_preset": tok_preset, "cfg_scale": args.cfg_scale, "cases": [],
    }
    t_start = time.time()

    def save():
        res["wall_s"] = round(time.time() - t_start, 1)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1) + "\n")

    bw = measure_bandwidth(device, args.bw_mib << 20)
    res["bandwidth"] = bw
    bandwidth = bw["GBps"] * 1e9
    print(f"{res['device_name']}: copy bandwidth {bw['GBps']:.0f} GB/s", file=sys.stderr, flush=True)
    gen, tok = build_models(gen_preset, tok_preset, device)
    gcfg = gen.config
    elem = gen.tok_embeddings.weight.element_size()
    res["generator"] = {"params": sum(p.numel() for p in gen.parameters()), "dtype": dtype_name(gen),
                        "steps": gcfg.max_seq_len}
    res["tokenizer"] = {"params": sum(p.numel() for p in tok.parameters()), "dtype": dtype_name(tok)}
    save()
    for B in batches:
        ids = np.arange(B) % gcfg.num_classes
        rp = resolve_params(SamplingParams(cfg_scale=args.cfg_scale, temperature=1.0, top_k=0, top_p=1.0, seed=0), B,
                            gcfg.vocab_size)
        case: dict = {"batch": B}
        for name in ("fast", "authors"):
            if name == "authors" and args.skip_authors:
                continue
            if name == "fast":
                r = bench_fast(gen, tok, ids, rp, device, not args.no_graphs)
            else:
                r = bench_authors(gen, tok, ids, args.cfg_scale, device)
            wb = generator_step_weight_bytes(gcfg, r["rows"], elem)
            kv = kv_cache_step_bytes(gcfg, r["rows"], r["cache_len"], elem)
            r.update({"weight_bytes": wb, "kv_bytes": kv, **roofline(r["step_ms_p50"] / 1e3, wb, kv, bandwidth)})
            case[name] = r
            print(f"B={B:3d} {name:8s} step p50 {r['step_ms_p50']:8.3f} ms  p90 {r['step_ms_p90']:8.3f} ms  "
                  f"ttft {r['ttft_ms']:8.2f} ms  {r['tokens_per_s']:9.1f} tok/s  {r['s_per_video']:7.3f} s/video  "
                  f"{r['achieved_GBps']:7.1f} GB/s  floor x{r['floor_ratio']:.2f}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "authors" in case:
            case["speedup_step"] = case["authors"]["step_ms_p50"] / case["fast"]["step_ms_p50"]
            case["speedup_tokens_per_s"] = case["fast"]["tokens_per_s"] / case["authors"]["tokens_per_s"]
        res["cases"].append(case)
        save()
    res["decode"] = bench_decode(tok, args.decode_batch, device, args.decode_repeats, args.peak_tflops)
    d = res["decode"]
    print(f"decode B={d['batch']}: {d['ms']:.2f} ms, {d['tflops']:.1f} TFLOP/s ({100 * d['fraction_of_peak']:.1f}% of "
          f"{d['peak_tflops']:.0f})", file=sys.stderr, flush=True)
    if device.type == "cuda":
        res["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    save()
    return res


def summary(res: dict) -> dict:
    cases = {str(c["batch"]): c for c in res["cases"]}
    return {
        "bench": "gpu_generation", "device_name": res["device_name"], "torch": res["torch"],
        "bandwidth_GBps": round(res["bandwidth"]["GBps"], 1),
        "fast_step_ms_p50": {b: round(c["fast"]["step_ms_p50"], 4) for b, c in cases.items()},
        "floor_ratio": {b: round(c["fast"]["floor_ratio"], 3) for b, c in cases.items()},
        "speedup_step": {b: round(c["speedup_step"], 2) for b, c in cases.items() if "speedup_step" in c},
        "tokens_per_s": {b: round(c["fast"]["tokens_per_s"], 1) for b, c in cases.items()},
        "decode_tflops": round(res["decode"]["tflops"], 2), "wall_s": res["wall_s"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", choices=["authors", "tiny"], default="authors",
                    help="authors: generator ar-lp + tokenizer larp-l; tiny: both tiny (smoke runs)")
    ap.add_argument("--gen-preset", default=None, help="override the generator preset")
    ap.add_argument("--tok-preset", default=None, help="override the tokenizer preset")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--cfg-scale", type=float, default=1.25)
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--decode-repeats", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16/fp16 peak (H100 SXM: 989)")
    ap.add_argument("--bw-mib", type=int, default=None, help="copy size for the bandwidth (default 2048 CUDA, 64 CPU)")
    ap.add_argument("--no-graphs", action="store_true", help="run the fast step eagerly (no CUDA graph)")
    ap.add_argument("--skip-authors", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (a small shared CPU: 1 keeps timings sane)")
    ap.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = ap.parse_args(argv)
    if args.bw_mib is None:
        args.bw_mib = 2048 if args.device == "cuda" else 64
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    try:
        res = run(args)
    finally:  # callers (the tests) keep their own settings
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
    line = summary(res)
    print(json.dumps(line))
    return res


if __name__ == "__main__":
    main()
