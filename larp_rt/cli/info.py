"""``larp-rt info`` (a bundle or a checkpoint) and ``larp-rt presets`` (model presets and their sizes)."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import GeneratorConfig, PriorConfig, TokenizerConfig
from .common import param_count

__all__ = ["VERBS"]


def _cmd_info(args: argparse.Namespace) -> int:
    from ..bundle_info import is_bundle

    if is_bundle(args.checkpoint):
        return _info_bundle(args)
    if args.verify:
        raise ValueError(f"--verify checks a bundle's files against its manifest.json, and {args.checkpoint!r} is no "
                         "bundle; info loads a checkpoint strictly, which checks its weights against its config")
    from ..checkpoint import load_pretrained, read_config

    kind, cfg, dialect = read_config(args.checkpoint, revision=args.revision)
    model = load_pretrained(args.checkpoint, revision=args.revision)  # strict: proves the weights match the config
    info = {"kind": kind, "dialect": dialect, "params": param_count(model), "config": cfg.to_dict()}
    if kind == "tokenizer":
        info["has_prior"] = model.prior_model is not None
    print(json.dumps(info, indent=2))
    return 0


def _info_bundle(args: argparse.Namespace) -> int:
    from ..bundle_info import bundle_info, format_info

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


def _cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from ..models import LARPGenerator, LARPPrior, LARPTokenizer

    rows = []
    for cls, model_cls, what in ((TokenizerConfig, LARPTokenizer, "tokenizer"), (PriorConfig, LARPPrior, "prior"),
                                 (GeneratorConfig, LARPGenerator, "generator")):
        for name in cls.PRESETS:
            cfg = cls.from_name(name)
            with torch.device("meta"):  # shapes only: no memory, instant
                n = param_count(model_cls(cfg))
            rows.append({"model": what, "preset": name, "params_M": round(n / 1e6, 2)})
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'model':<10} {'preset':<10} {'params (M)':>10}")
        for r in rows:
            print(f"{r['model']:<10} {r['preset']:<10} {r['params_M']:>10.2f}")
    return 0


def add_info(sub) -> None:
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


def add_presets(sub) -> None:
    r = sub.add_parser("presets", help="list model presets with parameter counts")
    r.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    r.set_defaults(fn=_cmd_presets)


# verb -> its sub-parser (the package assembles them in `larp-rt --help` order)
VERBS = {"info": add_info, "presets": add_presets}
