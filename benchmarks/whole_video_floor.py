"""Whole `small` videos on ONNX Runtime (Engine.generate, batch 1, CFG): seconds, ms per token and the ratio to
the weight-read floor, with the read bandwidth probed before and after each video (this host's swings).

    .venv/bin/python benchmarks/whole_video_floor.py [--videos 4] [--preset small]
"""

import argparse
import time

from conftest import CACHE, build_bundle, measure_bandwidth

from larp_rt import Engine, SamplingParams, load_pretrained

GATHERED = {"tok_embeddings.weight", "cls_embedding.embedding_table.weight", "abs_pe"}  # one row per step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    bundle = build_bundle(args.preset)
    gen = load_pretrained(CACHE / f"{args.preset}-ckpt" / "generator")
    read = sum(p.numel() * p.element_size() for n, p in gen.named_parameters() if n not in GATHERED)
    every = sum(p.numel() * p.element_size() for p in gen.parameters())
    del gen
    eng = Engine(bundle, backend="onnxruntime", device="cpu")
    n = eng.generator_config.max_seq_len
    print(f"{args.preset}: sampler {eng.sampler_name}, weights read per step {read / 1e6:.0f} MB, "
          f"all parameters {every / 1e6:.0f} MB, {n} tokens per video")
    eng.generate([0], SamplingParams(seed=0, cfg_scale=1.25))  # warm-up: sessions, buffers
    for i in range(args.videos):
        b0 = measure_bandwidth()
        t = time.perf_counter()
        eng.generate([i % eng.generator_config.num_classes], SamplingParams(seed=i, cfg_scale=1.25))
        dt = time.perf_counter() - t
        b1 = measure_bandwidth()
        step, bw = dt / n, (b0 + b1) / 2 * 1e9
        print(f"video {i}: {dt:.2f} s = {1e3 * step:.2f} ms/token, bandwidth {b0:.1f}/{b1:.1f} GB/s, "
              f"x{step / (read / bw):.2f} the weights-read floor, x{step / (every / bw):.2f} the all-parameter floor",
              flush=True)


if __name__ == "__main__":
    main()
