"""``larp-rt demo`` (export the tiny pair, generate, time it) and ``larp-rt bench`` (backend against backend)."""

from __future__ import annotations

import argparse

__all__ = ["VERBS"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    if args.predict:  # frame prediction: the committed tiny FP generator on held-out clips
        from ..demo_predict import run_predict_demo

        run_predict_demo(args.out, args.tokenizer, args.generator, seed=args.seed, scale=args.scale)
        print("demo ok")
        return 0
    run_demo(args.out, args.tokenizer, args.generator, seed=args.seed, scale=args.scale)
    print("demo ok")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import bench_engine

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise ValueError(f"--batch must be comma-separated ints, got {args.batch!r}") from None
    backends = tuple(b.strip() for b in args.backends.split(","))
    bench_engine(args.bundle, backends=backends, batches=batches, repeats=args.repeats, cfg_scale=args.cfg_scale,
                 threads=args.threads)
    return 0


def add_demo(sub) -> None:
    d = sub.add_parser("demo", help="export the tiny pair, generate a video grid with ONNX Runtime, time it")
    d.add_argument("--out", default="out/demo", help="output folder (bundle, samples.mp4, samples.gif)")
    d.add_argument("--tokenizer", help="tokenizer checkpoint (default: the committed tiny one)")
    d.add_argument("--generator", help="generator checkpoint (default: the committed tiny one)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scale", type=int, default=4, help="upscaling of the written grid")
    d.add_argument("--predict", action="store_true", help="frame prediction instead: the tiny FP generator "
                   "(checkpoints/tiny/fp_generator) predicts held-out clips from their first frames")
    d.set_defaults(fn=_cmd_demo)


def add_bench(sub) -> None:
    b = sub.add_parser("bench", help="latency of encode / per-token / decode, backend against backend")
    b.add_argument("bundle")
    b.add_argument("--backends", default="onnxruntime,torch")
    b.add_argument("--batch", default="1", help="comma-separated batch sizes")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--cfg-scale", type=float, default=None)
    b.add_argument("--threads", type=int, default=None)
    b.set_defaults(fn=_cmd_bench)


# verb -> its sub-parser (the package assembles them in `larp-rt --help` order)
VERBS = {"demo": add_demo, "bench": add_bench}
