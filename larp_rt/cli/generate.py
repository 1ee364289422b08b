"""``larp-rt generate`` (class-conditional videos) and ``larp-rt predict`` (frame prediction)."""

from __future__ import annotations

import argparse
import dataclasses

from .common import engine_args, open_engine, sampling_params, video_args, video_out

__all__ = ["VERBS"]


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from ..video import grid, write_video

    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated ints, got {args.classes!r}") from None
    out = video_out(args.out)
    eng = open_engine(args)
    params = sampling_params(args)
    if args.cfg_scale is None:
        params = dataclasses.replace(params, cfg_scale=eng.default_params.cfg_scale)
    print(f"{eng.backend_name}, sampler {eng.sampler_name}: {eng.sampler_reason or 'the backend default'}")
    step = max(1, eng.generator_config.max_seq_len // 10)
    result = eng.generate(classes, params, progress=lambda k, n: print(f"\r  token {k}/{n}", end="", flush=True)
                          if k % step == 0 or k == n else None)
    print()
    if out.suffix.lower() == ".npy":
        np.save(out, result.tokens)  # tokens only
        print(f"wrote tokens {result.tokens.shape} to {out}")
    else:
        videos = eng.decode(result.tokens)
        write_video(out, grid(videos, scale=args.scale), fps=args.fps)
        print(f"wrote {len(classes)} videos (grid) to {out}")
    print(f"seeds: {result.seeds}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from ..sampling import SamplingParams
    from ..video import fit_clip, grid, read_video, write_video

    out = video_out(args.out)
    eng = open_engine(args)
    eng.require_frame_prediction()  # a class-conditional bundle says so before the video is read
    C, T, H, W = eng.tokenizer_config.video_shape
    n = args.cond_frames
    if not 1 <= n <= T:
        raise ValueError(f"--cond-frames must be in [1, {T}] (the model's {T} frames), got {n}")
    frames, fps = read_video(args.video, max_frames=T)
    if len(frames) < n:
        raise ValueError(f"{args.video!r} has {len(frames)} frame(s); --cond-frames {n} needs at least {n}")
    clip, notes = fit_clip(frames, T, H, W)
    for note in notes:
        if not note.startswith("padded"):  # the frames past the conditioning ones are only shown, never read
            print(f"note: {note} (the model takes {T}x{H}x{W})")
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    step = max(1, eng.generator_config.max_seq_len // 10)
    video, gen = eng.predict(clip[None], params, num_cond_frames=n, stochastic_cond=args.stochastic_cond,
                             seed=args.cond_seed,
                             progress=lambda k, t: print(f"\r  token {k}/{t}", end="", flush=True)
                             if k % step == 0 or k == t else None)
    print()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        np.save(out, gen.tokens)
        print(f"wrote the predicted tokens {gen.tokens.shape} to {out}")
    else:
        given = clip[None].transpose(0, 4, 1, 2, 3).astype(np.float32) / np.float32(255.0)
        shown = min(len(frames), T)
        if shown < T:  # frames the input does not have: black on the input's side
            given[:, :, shown:] = 0.0
        write_video(out, grid(np.concatenate([given, video]), cols=2, scale=args.scale), fps=args.fps or fps or 8.0)
        print(f"wrote {out}: the input (left) beside the prediction (right); frames 0..{n - 1} condition it, "
              f"frames {n}..{T - 1} are predicted")
    print(f"seed: {gen.seeds[0]}")
    return 0


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="sample class-conditional videos (or tokens) from a bundle")
    engine_args(g)
    g.add_argument("--classes", required=True, help="comma-separated class ids, e.g. 0,3,5")
    g.add_argument("--out", required=True, help="output .mp4 / .gif (a grid of the videos) or .npy (tokens)")
    g.add_argument("--seed", type=int, default=None, help="seed (default: a fresh one, printed)")
    g.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the bundle's)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    video_args(g)
    g.set_defaults(fn=_cmd_generate)


def add_predict(sub) -> None:
    pr = sub.add_parser("predict", help="frame prediction: a video's first frames -> the whole clip, written beside "
                                        "the input (frame-prediction bundles)")
    engine_args(pr)
    pr.add_argument("video", help="input video file (mp4, avi, ...): its first --cond-frames frames condition")
    pr.add_argument("--cond-frames", type=int, default=5, help="conditioning frames (default 5, the authors')")
    pr.add_argument("--out", required=True, help="output .mp4 / .gif (input | prediction, side by side) or .npy "
                                                 "(the predicted tokens)")
    pr.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one, printed)")
    pr.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    pr.add_argument("--top-k", type=int, default=0)
    pr.add_argument("--top-p", type=float, default=1.0)
    pr.add_argument("--stochastic-cond", action="store_true",
                    help="encode the conditioning with the authors' stochastic SVQ (default: deterministic)")
    pr.add_argument("--cond-seed", type=int, default=None, help="seed of --stochastic-cond's draw")
    pr.add_argument("--fps", type=float, default=None, help="output frame rate (default: the input's)")
    pr.add_argument("--scale", type=int, default=1, help="integer upscaling of the written frames (nearest)")
    pr.set_defaults(fn=_cmd_predict)


# verb -> its sub-parser (the package assembles them in `larp-rt --help` order)
VERBS = {"generate": add_generate, "predict": add_predict}
