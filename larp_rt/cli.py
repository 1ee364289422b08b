"""``larp-rt`` command line.

Verbs defined here: ``demo``, ``info`` (a bundle: ``larp_rt.bundle_info``; a checkpoint), ``presets``. Subsystems
add their own verbs: each module named in
``VERB_MODULES`` has ``register(subparsers)``, which adds sub-parsers whose ``fn(args) -> int`` runs the verb.
Those modules must not import torch at import time (the CLI starts without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

from . import __version__
from .config import GeneratorConfig, PriorConfig, TokenizerConfig


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from .models import LARPGenerator, LARPPrior, LARPTokenizer

    rows = []
    for cls, model_cls, what in ((TokenizerConfig, LARPTokenizer, "tokenizer"), (PriorConfig, LARPPrior, "prior"),
                                 (GeneratorConfig, LARPGenerator, "generator")):
        for name in cls.PRESETS:
            cfg = cls.from_name(name)
            with torch.device("meta"):  # shapes only: no memory, instant
                n = _param_count(model_cls(cfg))
            rows.append({"model": what, "preset": name, "params_M": round(n / 1e6, 2)})
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'model':<10} {'preset':<10} {'params (M)':>10}")
        for r in rows:
            print(f"{r['model']:<10} {r['preset']:<10} {r['params_M']:>10.2f}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .bundle_info import is_bundle

    if is_bundle(args.checkpoint):
        return _info_bundle(args)
    if args.verify:
        raise ValueError(f"--verify checks a bundle's files against its manifest.json, and {args.checkpoint!r} is no "
                         "bundle; info loads a checkpoint strictly, which checks its weights against its config")
    from .checkpoint import load_pretrained, read_config

    kind, cfg, dialect = read_config(args.checkpoint, revision=args.revision)
    model = load_pretrained(args.checkpoint, revision=args.revision)  # strict: proves the weights match the config
    info = {"kind": kind, "dialect": dialect, "params": _param_count(model), "config": cfg.to_dict()}
    if kind == "tokenizer":
        info["has_prior"] = model.prior_model is not None
    print(json.dumps(info, indent=2))
    return 0


def _info_bundle(args: argparse.Namespace) -> int:
    from .bundle_info import bundle_info, format_info

    if args.revision is not None:
        raise ValueError(f"--revision is for hub repo ids; {args.checkpoint!r} is a bundle folder")
    info = bundle_info(args.checkpoint, verify=args.verify)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    v = info.get("verify")
    if v is not None and not v["ok"]:
        bad = ", ".join(p["file"] for p in v["problems"])
        print(f"larp-rt info: {args.checkpoint}: {v['summary']} ({bad}); the fixes are listed above", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.predict:  # frame prediction: the committed tiny FP generator on held-out clips
        from .demo_predict import run_predict_demo

        run_predict_demo(args.out, args.tokenizer, args.generator, seed=args.seed, scale=args.scale)
        print("demo ok")
        return 0
    run_demo(args.out, args.tokenizer, args.generator, seed=args.seed, scale=args.scale)
    print("demo ok")
    return 0


def _params(args: argparse.Namespace):
    from .sampling import SamplingParams

    return SamplingParams(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)


def _engine(args: argparse.Namespace, **kw):
    from .engine import Engine

    return Engine(args.bundle, backend=args.backend, device=args.device, threads=args.threads,
                  sampler=getattr(args, "sampler", "auto"), **kw)


def _cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from .video import grid, write_video

    try:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated ints, got {args.classes!r}") from None
    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif", ".npy"):
        raise ValueError(f"--out must end in .mp4, .gif or .npy, got {args.out!r}")
    eng = _engine(args)
    params = _params(args)
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


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from .video import fit_clip, read_video

    eng = _engine(args)
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


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from .sampling import SamplingParams
    from .video import fit_clip, grid, read_video, write_video

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif", ".npy"):
        raise ValueError(f"--out must end in .mp4, .gif or .npy, got {args.out!r}")
    eng = _engine(args)
    eng._need_fp()  # a class-conditional bundle says so before the video is read
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


def _cmd_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from .video import grid, write_video

    try:
        tokens = np.load(args.tokens, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read tokens from {args.tokens!r}: {e}") from e
    eng = _engine(args)
    if tokens.ndim == 1:
        tokens = tokens[None]
    videos = eng.decode(tokens)
    write_video(args.out, grid(videos, scale=args.scale), fps=args.fps)
    print(f"wrote {videos.shape[0]} video(s) to {args.out}")
    return 0


def _video_tokens(eng, path: str):
    """A video file (encoded, fitted to the model's T/H/W) or a tokens .npy ((B, N) or (N,)) -> (B, N) tokens."""
    import numpy as np

    from .video import fit_clip, read_video

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

    eng = _engine(args)
    eng._need_prior()  # a clear error before any video is read
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

    from .video import grid, write_video

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif", ".npy"):
        raise ValueError(f"--out must end in .mp4, .gif or .npy, got {args.out!r}")
    eng = _engine(args)
    eng._need_prior()
    N = eng.tokenizer_config.num_tokens
    keep = N // 2 if args.keep is None else args.keep
    if not 1 <= keep <= N:
        raise ValueError(f"--keep must be in [1, {N}] (the tokenizer's {N} tokens), got {keep}")
    tokens, clip = _video_tokens(eng, args.video)
    params = _params(args)
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


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_engine

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise ValueError(f"--batch must be comma-separated ints, got {args.batch!r}") from None
    backends = tuple(b.strip() for b in args.backends.split(","))
    bench_engine(args.bundle, backends=backends, batches=batches, repeats=args.repeats, cfg_scale=args.cfg_scale,
                 threads=args.threads)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .export.trt_build import build_plans

    build_plans(args.bundle_dir, trt=args.trt, precision=args.precision, batch=args.batch, max_seq=args.max_seq,
                compute_capability=args.compute_capability, strip_weights=args.strip_weights)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress
    import os

    try:
        from .serving.app import build_server
    except ModuleNotFoundError as e:
        raise ValueError(f"larp-rt serve needs the [serve] extra ({e.name} is missing): "
                         "pip install 'larp_rt[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    for flag, v in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    for flag, v in (("--max-body-mb", args.max_body_mb), ("--max-video-mpixels", args.max_video_mpixels),
                    ("--max-upload-mpixels", args.max_upload_mpixels), ("--header-timeout", args.header_timeout),
                    ("--body-timeout", args.body_timeout)):
        if not v > 0:
            raise ValueError(f"{flag} must be > 0, got {v}")
    for flag, v in (("--max-media-jobs", args.max_media_jobs), ("--max-connections", args.max_connections)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LARP_RT_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key must not be empty (leave it out for no authentication)")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and api_key is None:
        print(f"note: listening on {args.host} without an API key: anyone who reaches port {args.port} can use "
              "the server (set --api-key or LARP_RT_API_KEY)", file=sys.stderr)
    eng = _engine(args, preallocate=0)  # the scheduler owns (and pre-faults) the caches it serves from
    server = build_server(eng, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                          request_timeout=args.request_timeout, max_body_bytes=int(args.max_body_mb * 2**20),
                          api_key=api_key, allowed_hosts=args.allowed_hosts, log_level=args.log_level,
                          max_connections=args.max_connections, header_timeout=args.header_timeout,
                          max_video_pixels=max(1, int(args.max_video_mpixels * 1e6)),
                          max_upload_pixels=max(1, int(args.max_upload_mpixels * 1e6)),
                          max_media_jobs=args.max_media_jobs, body_timeout=args.body_timeout)
    print(f"serving {args.bundle} ({eng.backend_name}, sampler {eng.sampler_name}) on http://{args.host}:{args.port}"
          f" (max batch {args.max_batch}, queue {args.max_queue}{', API key required' if api_key else ''})",
          flush=True)
    server.run()  # until SIGTERM / SIGINT: stops accepting, finishes the requests in flight, drains the scheduler
    return 0


def _cmd_triton(args: argparse.Namespace) -> int:
    from .triton import write_repository

    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    write_repository(args.bundle, args.repo, instances=args.instances, kind=args.kind, max_batch=args.max_batch,
                     max_queue_delay_us=args.max_queue_delay_us, native=args.native, copy_bundle=args.copy_bundle,
                     force=args.force, threads=args.threads, gpus=gpus, stream_every=args.stream_every)
    return 0


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory (from `larp-rt export`)")
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt", "torch"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    p.add_argument("--sampler", choices=["auto", "fused", "kernel", "graph", "reference"], default="auto",
                   help="how tokens are drawn (the same tokens in each; auto = the fastest available)")


def _video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--scale", type=int, default=1, help="integer upscaling of the written frames (nearest)")


# modules that add verbs (register(subparsers)); missing ones are skipped, so a partial install still runs
VERB_MODULES = ("larp_rt.export.cli", "larp_rt.training.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larp-rt", description="LARP inference runtime")
    p.add_argument("--version", action="version", version=f"larp_rt {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="export the tiny pair, generate a video grid with ONNX Runtime, time it")
    d.add_argument("--out", default="out/demo", help="output folder (bundle, samples.mp4, samples.gif)")
    d.add_argument("--tokenizer", help="tokenizer checkpoint (default: the committed tiny one)")
    d.add_argument("--generator", help="generator checkpoint (default: the committed tiny one)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--scale", type=int, default=4, help="upscaling of the written grid")
    d.add_argument("--predict", action="store_true", help="frame prediction instead: the tiny FP generator "
                   "(checkpoints/tiny/fp_generator) predicts held-out clips from their first frames")
    d.set_defaults(fn=_cmd_demo)

    g = sub.add_parser("generate", help="sample class-conditional videos (or tokens) from a bundle")
    _engine_args(g)
    g.add_argument("--classes", required=True, help="comma-separated class ids, e.g. 0,3,5")
    g.add_argument("--out", required=True, help="output .mp4 / .gif (a grid of the videos) or .npy (tokens)")
    g.add_argument("--seed", type=int, default=None, help="seed (default: a fresh one, printed)")
    g.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the bundle's)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    _video_args(g)
    g.set_defaults(fn=_cmd_generate)

    e = sub.add_parser("encode", help="video file -> tokens .npy (resized/cropped to the model's T/H/W)")
    _engine_args(e)
    e.add_argument("video", help="input video file (mp4, avi, ...)")
    e.add_argument("--out", required=True, help="output .npy of (1, N) int64 tokens")
    e.set_defaults(fn=_cmd_encode)

    pr = sub.add_parser("predict", help="frame prediction: a video's first frames -> the whole clip, written beside "
                                        "the input (frame-prediction bundles)")
    _engine_args(pr)
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

    dd = sub.add_parser("decode", help="tokens .npy -> video file")
    _engine_args(dd)
    dd.add_argument("tokens", help=".npy of (B, N) or (N,) token ids")
    dd.add_argument("--out", required=True, help="output .mp4 / .gif / .npy")
    _video_args(dd)
    dd.set_defaults(fn=_cmd_decode)

    sc = sub.add_parser("score", help="the tokenizer's AR prior: NLL per video (nats/token) of videos or tokens")
    _engine_args(sc)
    sc.add_argument("inputs", nargs="+", help="video files (encoded first) and/or tokens .npy of (B, N) or (N,)")
    sc.add_argument("--json", action="store_true", help="one JSON line instead of text")
    sc.set_defaults(fn=_cmd_score)

    pg = sub.add_parser("prior-generate", help="encode a video, keep its first tokens, continue them with the "
                                               "tokenizer's AR prior, write original | continuation")
    _engine_args(pg)
    pg.add_argument("video", help="input video file (or a tokens .npy)")
    pg.add_argument("--keep", type=int, default=None, help="tokens kept from the video (default: half of N)")
    pg.add_argument("--out", required=True, help="output .mp4 / .gif (side by side) or .npy (tokens)")
    pg.add_argument("--seed", type=int, default=None, help="seed (default: a fresh one, printed)")
    pg.add_argument("--cfg-scale", type=float, default=None, help=argparse.SUPPRESS)  # must be 1: a clear error
    pg.add_argument("--temperature", type=float, default=1.0)
    pg.add_argument("--top-k", type=int, default=0)
    pg.add_argument("--top-p", type=float, default=1.0)
    _video_args(pg)
    pg.set_defaults(fn=_cmd_prior_generate)

    b = sub.add_parser("bench", help="latency of encode / per-token / decode, backend against backend")
    b.add_argument("bundle")
    b.add_argument("--backends", default="onnxruntime,torch")
    b.add_argument("--batch", default="1", help="comma-separated batch sizes")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--cfg-scale", type=float, default=None)
    b.add_argument("--threads", type=int, default=None)
    b.set_defaults(fn=_cmd_bench)

    s = sub.add_parser("serve", help="HTTP server (generate / predict / encode / decode / score; OpenAPI at /docs, "
                                     "a playground at /) over one continuously batched loop")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8,
                   help="rows generated together per step (a request with CFG takes two)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for rows; beyond it 429")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a generation may take from submission, then 504 (default: no limit)")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (413 beyond it)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but / and /health "
                        "(default: $LARP_RT_API_KEY)")
    s.add_argument("--max-video-mpixels", type=float, default=16.777216, metavar="M",
                   help="one video response's budget, rows x frames x height x width x scale^2 in millions of pixels "
                        "(a GIF counts 4x; default 16.8): beyond it 413")
    s.add_argument("--max-upload-mpixels", type=float, default=8.388608, metavar="M",
                   help="largest uploaded frame, width x height in millions of pixels (default 8.4, 4K fits): beyond "
                        "it 400, before decoding")
    s.add_argument("--max-media-jobs", type=int, default=8,
                   help="encode / decode / upload jobs in flight at once (default 8): beyond it 429")
    s.add_argument("--max-connections", type=int, default=256,
                   help="connections + tasks uvicorn serves at once (limit_concurrency; default 256): beyond it 503")
    s.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a connection may take to send a request's headers (default 10): then it is closed")
    s.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a request body may stall between chunks (default 30): then 408")
    s.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                   help="comma-separated Host names the server answers to ('*' any, '*.example.com' a domain; "
                        "default: any with an API key, else loopback and --host): other hosts get 400")
    s.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    s.set_defaults(fn=_cmd_serve)

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

    i = sub.add_parser("info", help="inspect a bundle (graphs, configs, plans; --verify re-hashes every file) or a "
                                    "checkpoint folder (ours or the authors'; loads it strictly)")
    i.add_argument("checkpoint", metavar="BUNDLE_OR_CHECKPOINT",
                   help="bundle folder (manifest.json), folder with config.json + model.safetensors, or a Hugging "
                        "Face repo id (hywang66/LARP-L-long-AR-FP; resolved through the hub's cache)")
    i.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a repo id")
    i.add_argument("--json", action="store_true", help="a bundle: one JSON document instead of text (a checkpoint's "
                                                       "info is JSON already)")
    i.add_argument("--verify", action="store_true",
                   help="a bundle: re-hash every file and plan against manifest.json and check the plans against the "
                        "TensorRT installed here (no GPU needed); exits 1 naming each bad file and the larp-rt "
                        "build / export command that fixes it")
    i.set_defaults(fn=_cmd_info)

    r = sub.add_parser("presets", help="list model presets with parameter counts")
    r.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    r.set_defaults(fn=_cmd_presets)

    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but one of its imports is missing: a real error
                raise
            continue
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # our errors are ValueErrors with actionable text
        print(f"larp-rt {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
