"""``larp-rt`` command line.

Verbs defined here: ``demo``, ``info``, ``presets``. Subsystems add their own verbs: each module named in
``VERB_MODULES`` has ``register(subparsers)``, which adds sub-parsers whose ``fn(args) -> int`` runs the verb.
Those modules must not import torch at import time (the CLI starts without it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

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
    from .checkpoint import load_pretrained, read_config

    kind, cfg, dialect = read_config(args.checkpoint)
    model = load_pretrained(args.checkpoint)  # strict: proves the weights match the config
    info = {"kind": kind, "dialect": dialect, "params": _param_count(model), "config": cfg.to_dict()}
    if kind == "tokenizer":
        info["has_prior"] = model.prior_model is not None
    print(json.dumps(info, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Smoke run: build the tiny tokenizer + generator (random init), round-trip a random video, generate tokens."""
    import torch

    from .models import LARPGenerator, LARPTokenizer

    torch.manual_seed(args.seed)
    tcfg, gcfg = TokenizerConfig.from_name("tiny"), GeneratorConfig.from_name("tiny")
    print(f"larp_rt {__version__} demo (PyTorch, CPU). NOTE: randomly initialised tiny models, not trained ones: "
          "outputs are noise; this checks the pipeline end to end.")
    tok, gen = LARPTokenizer(tcfg).eval(), LARPGenerator(gcfg).eval()
    torch.nn.init.normal_(tok.final_layer.linear.weight, std=0.02)  # authors' init zeroes the output layers
    torch.nn.init.normal_(gen.output.weight, std=0.02)
    print(f"tokenizer: {_param_count(tok) / 1e6:.2f}M params, video {tcfg.video_shape} -> {tcfg.num_tokens} tokens "
          f"(codebook {tcfg.codebook_size}); generator: {_param_count(gen) / 1e6:.2f}M params")

    video = torch.rand(args.batch, *tcfg.video_shape)
    t0 = time.perf_counter()
    tokens = tok.encode(video)
    t1 = time.perf_counter()
    recon = tok.decode(tokens)
    t2 = time.perf_counter()
    print(f"encode {tuple(video.shape)} -> tokens {tuple(tokens.shape)} in {1e3 * (t1 - t0):.1f} ms; "
          f"decode -> {tuple(recon.shape)} in [{recon.min():.3f}, {recon.max():.3f}] in {1e3 * (t2 - t1):.1f} ms")

    with torch.inference_mode():
        gen.setup_caches(args.batch)
        classes = torch.arange(args.batch) % gcfg.num_classes
        t0 = time.perf_counter()
        nxt = gen.prefill(classes).argmax(-1, keepdim=True)
        out = [nxt]
        for k in range(1, gcfg.max_seq_len):
            nxt = gen.decode_one_token(nxt, torch.tensor([gcfg.cls_token_num + k - 1])).argmax(-1, keepdim=True)
            out.append(nxt)
        dt = time.perf_counter() - t0
    seq = torch.cat(out, dim=1)
    video_out = tok.decode(seq)
    print(f"greedy generation of {tuple(seq.shape)} tokens for classes {classes.tolist()}: "
          f"{1e3 * dt / gcfg.max_seq_len:.2f} ms/token; decoded to {tuple(video_out.shape)}")
    print("demo ok")
    return 0


# modules that add verbs (register(subparsers)); missing ones are skipped, so a partial install still runs
VERB_MODULES = ("larp_rt.training.cli",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larp-rt", description="LARP inference runtime")
    p.add_argument("--version", action="version", version=f"larp_rt {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="smoke run: tiny models, random video round trip, greedy generation")
    d.add_argument("--batch", type=int, default=2, help="videos per batch (default 2)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)

    i = sub.add_parser("info", help="inspect a checkpoint folder (ours or the authors'); loads it strictly")
    i.add_argument("checkpoint", help="folder with config.json + model.safetensors")
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
    if getattr(args, "batch", 1) < 1:
        print("larp-rt: error: --batch must be >= 1", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:  # CheckpointError / ConfigError are ValueErrors with actionable text
        print(f"larp-rt {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
