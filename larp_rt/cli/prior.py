"""The tokenizer's AR prior: ``larp-rt score`` (NLL per video) and ``larp-rt prior-generate`` (continue a
video's tokens)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .common import engine_args, open_engine, sampling_params, video_args, video_out

__all__ = ["VERBS"]


def _video_tokens(eng, path: str):
    """A video file (encoded, fitted to the model's T/H/W) or a tokens .npy ((B, N) or (N,)) -> (B, N) tokens."""
    import numpy as np

    from ..video import fit_clip, read_video

    if Path(path).suffix.lower() == ".npy":
        try:
            tokens = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read tokens from {path!r}: {e}") from e
        return tokens[None] if tokens.ndim == 1 else tokens, None
    C, T, H, W = eng.tokenizer_config.video_shape
    frames, _ = read_video(path)
    clip, notes = fit_clip(frames, T, H, W)
    for n in notes:
        print(f"note: {path}: {n} (the model takes {T}x{H}x{W})")
    return eng.encode(clip[None]), clip


def _cmd_score(args: argparse.Namespace) -> int:
    import math

    eng = open_engine(args)
    eng.require_prior()  # a clear error before any video is read
    K = eng.tokenizer_config.codebook_size
    rows = []
    for path in args.inputs:
        tokens, _ = _video_tokens(eng, path)
        for i, nll in enumerate(eng.prior_nll(tokens)):
            rows.append({"input": path, "video": i, "nll": float(nll), "bits": float(nll) / math.log(2)})
    if args.json:
        print(json.dumps({"log_codebook": math.log(K), "videos": rows}))
        return 0
    for r in rows:
        print(f"{r['input']}[{r['video']}]: {r['nll']:.4f} nats/token ({r['bits']:.3f} bits)")
    print(f"(a uniform guess: log {K} = {math.log(K):.4f} nats/token)")
    return 0


def _cmd_prior_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from ..video import grid, write_video

    out = video_out(args.out)
    eng = open_engine(args)
    eng.require_prior()
    N = eng.tokenizer_config.num_tokens
    keep = N // 2 if args.keep is None else args.keep
    if not 1 <= keep <= N:
        raise ValueError(f"--keep must be in [1, {N}] (the tokenizer's {N} tokens), got {keep}")
    tokens, clip = _video_tokens(eng, args.video)
    params = sampling_params(args)
    if params.cfg_scale is None:
        params = dataclasses.replace(params, cfg_scale=1.0)
    result = eng.prior_generate(tokens[:, :keep], params)
    if out.suffix.lower() == ".npy":
        np.save(out, result.tokens)
        print(f"wrote tokens {result.tokens.shape} (the first {keep} kept) to {out}")
    else:
        cont = eng.decode(result.tokens)  # (B, C, T, H, W)
        orig = (clip.transpose(3, 0, 1, 2)[None].astype(np.float32) / 255.0) if clip is not None \
            else eng.decode(tokens)  # a tokens input: its own decoding stands for the original
        pairs = np.stack([v for pair in zip(orig, cont, strict=True) for v in pair])  # original | continuation
        write_video(out, grid(pairs, cols=2, scale=args.scale), fps=args.fps)
        print(f"wrote original | continuation (first {keep} of {N} tokens kept) to {out}")
    print(f"seeds: {result.seeds}")
    return 0


def add_score(sub) -> None:
    sc = sub.add_parser("score", help="the tokenizer's AR prior: NLL per video (nats/token) of videos or tokens")
    engine_args(sc)
    sc.add_argument("inputs", nargs="+", help="video files (encoded first) and/or tokens .npy of (B, N) or (N,)")
    sc.add_argument("--json", action="store_true", help="one JSON line instead of text")
    sc.set_defaults(fn=_cmd_score)


def add_prior_generate(sub) -> None:
    pg = sub.add_parser("prior-generate", help="encode a video, keep its first tokens, continue them with the "
                                               "tokenizer's AR prior, write original | continuation")
    engine_args(pg)
    pg.add_argument("video", help="input video file (or a tokens .npy)")
    pg.add_argument("--keep", type=int, default=None, help="tokens kept from the video (default: half of N)")
    pg.add_argument("--out", required=True, help="output .mp4 / .gif (side by side) or .npy (tokens)")
    pg.add_argument("--seed", type=int, default=None, help="seed (default: a fresh one, printed)")
    pg.add_argument("--cfg-scale", type=float, default=None, help=argparse.SUPPRESS)  # must be 1: a clear error
    pg.add_argument("--temperature", type=float, default=1.0)
    pg.add_argument("--top-k", type=int, default=0)
    pg.add_argument("--top-p", type=float, default=1.0)
    video_args(pg)
    pg.set_defaults(fn=_cmd_prior_generate)


# verb -> its sub-parser (the package assembles them in `larp-rt --help` order)
VERBS = {"score": add_score, "prior-generate": add_prior_generate}
