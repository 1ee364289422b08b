"""What the verb modules share: the engine's and the video's flags, the Engine and SamplingParams they make."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["engine_args", "video_args", "open_engine", "sampling_params", "param_count"]


def engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory (from `larp-rt export`)")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt", "torch"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    p.add_argument("--sampler", choices=["auto", "fused", "kernel", "graph", "reference"], default="auto",
                   help="how tokens are drawn (the same tokens in each; auto = the fastest available)")


def video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--scale", type=int, default=1, help="integer upscaling of the written frames (nearest)")


def open_engine(args: argparse.Namespace, **kw):
    from ..engine import Engine

    return Engine(args.bundle, backend=args.backend, device=args.device, threads=args.threads,
                  sampler=getattr(args, "sampler", "auto"), **kw)


def sampling_params(args: argparse.Namespace):
    from ..sampling import SamplingParams

    return SamplingParams(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def video_out(out: str) -> Path:
    """``--out`` of a verb that writes videos or tokens: a path ending in .mp4, .gif or .npy."""
    path = Path(out)
    if path.suffix.lower() not in (".mp4", ".gif", ".npy"):
        raise ValueError(f"--out must end in .mp4, .gif or .npy, got {out!r}")
    return path
