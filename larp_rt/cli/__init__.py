"""``larp-rt`` command line.

One module per verb family, each with ``VERBS`` (verb -> the function that adds its sub-parser):
``demo`` (demo, bench), ``generate`` (generate, predict), ``codec`` (encode, decode), ``prior`` (score,
prior-generate), ``serve``, ``bundle`` (build, triton), ``info`` (info, presets); ``common`` holds the flags and
the Engine they share. Subsystems add their own verbs: each module named in ``VERB_MODULES`` has
``register(subparsers)``, which adds sub-parsers whose ``fn(args) -> int`` runs the verb. None of these modules
may import torch at import time (the CLI starts without it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from . import bundle, codec, demo, generate, info, prior, serve

__all__ = ["main", "build_parser", "VERB_MODULES"]

# modules that add verbs (register(subparsers)); missing ones are skipped, so a partial install still runs
VERB_MODULES = ("larp_rt.export.cli", "larp_rt.training.cli")
FAMILIES = (demo, generate, codec, prior, serve, bundle, info)
# the order `larp-rt --help` lists the verbs in (before the subsystems' own)
VERB_ORDER = ("demo", "generate", "encode", "predict", "decode", "score", "prior-generate", "bench", "serve", "build",
              "triton", "info", "presets")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larp-rt", description="LARP inference runtime")
    p.add_argument("--version", action="version", version=f"larp_rt {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    adders = {verb: add for family in FAMILIES for verb, add in family.VERBS.items()}
    for verb in (*VERB_ORDER, *(v for v in adders if v not in VERB_ORDER)):  # a new verb is never dropped
        adders[verb](sub)
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
