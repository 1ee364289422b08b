"""Weight-only int8 / int4 generators against float32 on ONNX Runtime (`small`, random weights, AMD EPYC Zen 4 here):
whole videos at batch 1 and 8 with CFG, interleaved in one run, as ms per token and as ratios to the float32
weight-read floor and to each variant's own weight bytes, with the read bandwidth probed around every video.

    .venv/bin/python benchmarks/bench_quant.py [--videos 2] [--preset small] [--batches 1,8]

Runtime: about 6 min on a quiet 2-core host (estimate: three exports of `small`, cached under
.benchmarks/bundles, then 3 videos per variant and batch); the default run passed 15 min on the shared host.
`--batches 1 --videos 1` is the quick one. Ends with one
JSON line; --json PATH also writes it (benchmarks/results/quant_speed.json).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from conftest import CACHE, build_bundle, cached_bundle, measure_bandwidth

from larp_rt import Engine, SamplingParams
from larp_rt.bundle import Bundle

GATHERED = ("table", "abs_pe")  # embedding rows gathered per step: not read whole


def variant_bundle(preset: str, precision: str) -> Path:
    base = build_bundle(preset)
    if precision == "fp32":
        return base
    out = CACHE / f"{preset}-{precision}"
    if cached_bundle(out) is not None:
        return out
    from larp_rt.export import export_bundle

    from larp_rt import kernels

    ck = CACHE / f"{preset}-ckpt"
    return export_bundle(ck / "tokenizer", ck / "generator", out, precision=precision, overwrite=True,
                         onnx_only=True, printer=lambda s: None,
                         fused_sampler=kernels.ort_custom_op_library() is not None)


def weight_bytes(bundle: Path) -> int:
    """Bytes of the decode graph's initializers read every step (all but the gathered embedding tables)."""
    import onnx

    b = Bundle(bundle)
    g = onnx.load(str(b.graph_path("decode")), load_external_data=True).graph
    return sum(len(t.raw_data) or t.ByteSize() for t in g.initializer
               if not any(t.name == n or t.name.endswith("." + n) for n in GATHERED) and len(t.raw_data) > 4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=2)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--note", default="", help="how the machine was loaded while measuring (recorded in the JSON)")
    args = ap.parse_args()
    variants = ("fp32", "int8", "int4")
    paths = {v: variant_bundle(args.preset, v) for v in variants}
    nbytes = {v: weight_bytes(paths[v]) for v in variants}
    engines = {v: Engine(paths[v], backend="onnxruntime", device="cpu") for v in variants}
    n = engines["fp32"].generator_config.max_seq_len
    C = engines["fp32"].generator_config.num_classes
    print(f"{args.preset}: {n} tokens per video; weights read per step: "
          + ", ".join(f"{v} {nbytes[v] / 1e6:.1f} MB" for v in variants)
          + "; samplers: " + ", ".join(f"{v} {e.sampler_name}" for v, e in engines.items()), flush=True)
    results = []
    for B in (int(x) for x in args.batches.split(",")):
        for e in engines.values():  # warm-up: sessions, buffers of this batch
            e.generate(list(range(B)), SamplingParams(seed=0, cfg_scale=2.0))
        times = {v: [] for v in variants}
        bws = []
        for i in range(args.videos):
            for v in variants:  # interleaved: the host's swings hit every variant alike
                b0 = measure_bandwidth()
                t = time.perf_counter()
                engines[v].generate([(i + j) % C for j in range(B)], SamplingParams(seed=i, cfg_scale=2.0))
                times[v].append((time.perf_counter() - t) / n)
                bws += [b0, measure_bandwidth()]
        bw = statistics.median(bws) * 1e9
        floor32 = nbytes["fp32"] / bw
        for v in variants:
            step = statistics.median(times[v])
            r = {"preset": args.preset, "batch": B, "cfg_scale": 2.0, "weights": v, "kv": "fp32",
                 "ms_per_step": 1e3 * step, "vs_fp32": step / statistics.median(times["fp32"]),
                 "x_fp32_weight_floor": step / floor32, "x_own_weight_floor": step / (nbytes[v] / bw),
                 "weight_bytes": nbytes[v], "bandwidth_gbs": bw / 1e9}
            results.append(r)
            print(f"batch {B} {v}: {r['ms_per_step']:.2f} ms/step (both CFG rows), x{r['vs_fp32']:.2f} fp32, "
                  f"x{r['x_fp32_weight_floor']:.2f} the fp32 weight floor, x{r['x_own_weight_floor']:.2f} its own "
                  f"bytes' floor (bandwidth {bw / 1e9:.1f} GB/s)", flush=True)
    out = {"bench": "quant_speed", "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
           "cores", "note": args.note, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
