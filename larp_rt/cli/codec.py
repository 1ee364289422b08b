"""``larp-rt encode`` (a video -> tokens) and ``larp-rt decode`` (tokens -> a video)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import engine_args, open_engine, video_args

__all__ = ["VERBS"]


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from ..video import fit_clip, read_video

    eng = open_engine(args)
    cfg = eng.tokenizer_config
    if cfg is None:
        raise ValueError(f"bundle {args.bundle!r} has no tokenizer")
    frames, _ = read_video(args.video)
    C, T, H, W = cfg.video_shape
    clip, notes = fit_clip(frames, T, H, W)
    for n in notes:
        print(f"note: {n} (the model takes {T}x{H}x{W})")
    tokens = eng.encode(clip[None])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, tokens)
    print(f"wrote tokens {tokens.shape} to {out}")
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from ..video import grid, write_video

    try:
        tokens = np.load(args.tokens, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tokens from {args.tokens!r}: {e}") from e
    eng = open_engine(args)
    if tokens.ndim == 1:
        tokens = tokens[None]
    videos = eng.decode(tokens)
    write_video(args.out, grid(videos, scale=args.scale), fps=args.fps)
    print(f"wrote {videos.shape[0]} video(s) to {args.out}")
    return 0


def add_encode(sub) -> None:
    e = sub.add_parser("encode", help="video file -> tokens .npy (resized/cropped to the model's T/H/W)")
    engine_args(e)
    e.add_argument("video", help="input video file (mp4, avi, ...)")
    e.add_argument("--out", required=True, help="output .npy of (1, N) int64 tokens")
    e.set_defaults(fn=_cmd_encode)


def add_decode(sub) -> None:
    dd = sub.add_parser("decode", help="tokens .npy -> video file")
    engine_args(dd)
    dd.add_argument("tokens", help=".npy of (B, N) or (N,) token ids")
    dd.add_argument("--out", required=True, help="output .mp4 / .gif / .npy")
    video_args(dd)
    dd.set_defaults(fn=_cmd_decode)


# verb -> its sub-parser (the package assembles them in `larp-rt --help` order)
VERBS = {"encode": add_encode, "decode": add_decode}
