"""What is built from a bundle: ``larp-rt build`` (TensorRT plans) and ``larp-rt triton`` (a Triton model
repository)."""

from __future__ import annotations

import argparse

__all__ = ["VERBS"]


def _cmd_build(args: argparse.Namespace) -> int:
    from ..export.trt_build import build_plans

    build_plans(args.bundle_dir, trt=args.trt, precision=args.precision, batch=args.batch, max_seq=args.max_seq,
                compute_capability=args.compute_capability, strip_weights=args.strip_weights)
    return 0


def _cmd_triton(args: argparse.Namespace) -> int:
    from ..triton import write_repository

    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    write_repository(args.bundle, args.repo, instances=args.instances, kind=args.kind, max_batch=args.max_batch,
                     max_queue_delay_us=args.max_queue_delay_us, native=args.native, copy_bundle=args.copy_bundle,
                     force=args.force, threads=args.threads, gpus=gpus, stream_every=args.stream_every)
    return 0


def add_build(sub) -> None:
    bp = sub.add_parser("build", help="TensorRT plans for a bundle's graphs (TensorRT-RTX ahead of time on any "
                                      "machine, or datacenter TensorRT on its GPU)",
                        description="Build TensorRT plans from the bundle's ONNX graphs into BUNDLE_DIR/plans and "
                                    "record them in its manifest (replacing earlier plans). A failed build leaves "
                                    "the bundle unchanged.")
    bp.add_argument("bundle_dir")
    bp.add_argument("--trt", choices=["auto", "rtx", "tensorrt"], default="auto",
                    help="builder: rtx = TensorRT-RTX (no GPU needed; RTX GPUs), tensorrt = datacenter TensorRT "
                         "(builds on its GPU); auto = rtx when installed")
    bp.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                    help="must match the bundle's graphs (strongly typed networks; default: the bundle's)")
    bp.add_argument("--batch", default="1,2,4,8,16", help="batch buckets, one optimisation profile each")
    bp.add_argument("--max-seq", type=int, default=None, help="largest KV-cache length (default: the bundle's)")
    bp.add_argument("--compute-capability", default=None,
                    help="target GPUs, e.g. 8.6,8.9 or 'current' (rtx; default: its portable set); datacenter "
                         "TensorRT targets the GPU it builds on")
    bp.add_argument("--strip-weights", action="store_true",
                    help="weight-stripped plans, refitted at load from the bundle's ONNX weights")
    bp.set_defaults(fn=_cmd_build)


def add_triton(sub) -> None:
    tr = sub.add_parser("triton", help="write a Triton Inference Server model repository serving a bundle")
    tr.add_argument("bundle")
    tr.add_argument("repo", help="the repository folder to write (refused when non-empty, unless --force)")
    tr.add_argument("--instances", type=int, default=1, help="instances of each model (per GPU with --kind gpu)")
    tr.add_argument("--kind", choices=["cpu", "gpu"], default="cpu")
    tr.add_argument("--gpus", default=None, help="comma-separated GPU ids for --kind gpu (default: all visible)")
    tr.add_argument("--max-batch", type=int, default=8, help="Triton's max_batch_size (requests per execute)")
    tr.add_argument("--max-queue-delay-us", type=int, default=1000, help="dynamic batching's queue delay")
    tr.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per instance")
    tr.add_argument("--stream-every", type=int, default=16, help="larp_generate_stream: a partial response "
                                                                  "every this many tokens")
    tr.add_argument("--native", action="store_true", help="larp_encode / larp_decode as onnxruntime platform "
                                                          "models over the bundle's .onnx files (no larp_video)")
    tr.add_argument("--copy-bundle", action="store_true", help="copy the bundle into REPO/bundle")
    tr.add_argument("--force", action="store_true", help="replace a non-empty REPO")
    tr.set_defaults(fn=_cmd_triton)


# verb -> its sub-parser (the package assembles them in `larp-rt --help` order)
VERBS = {"build": add_build, "triton": add_triton}
