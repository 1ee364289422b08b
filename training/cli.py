"""``larp-rt train ...`` verbs: tokenizer, generator, classifier, evaluate, tiny.

Every field of the training dataclasses is a flag (``--batch-size 32``, ``--model-overrides '{"num_tokens": 64}'``);
``--config FILE.json`` supplies a base (a JSON object of fields, or a checkpoint's config.json). Nothing here imports
torch at module import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from typing import Any

from .config import ClassifierTrainConfig, GeneratorTrainConfig, TokenizerTrainConfig, field_types

__all__ = ["register"]


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parser_for(tp: Any):
    """An argparse ``type`` for a dataclass field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _parser_for(args[0])
        return lambda s: None if s.strip().lower() in ("none", "null", "") else inner(s)
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if tp is dict or origin is dict:
        def parse_json(s: str) -> dict:
            try:
                v = json.loads(s)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({e})") from None
            if not isinstance(v, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
            return v
        return parse_json
    if tp is tuple or origin is tuple:
        return lambda s: tuple(float(x) for x in s.split(","))
    return str


def _add_fields(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    g = p.add_argument_group(f"{cls.__name__} fields (defaults in parentheses)")
    defaults = cls.__dataclass_fields__
    for name, tp in field_types(cls).items():
        if name in skip or name.isupper():
            continue
        f = defaults[name]
        default = f.default if f.default is not f.default_factory else None
        if callable(f.default_factory):  # type: ignore[arg-type]
            default = f.default_factory()  # type: ignore[misc]
        shown = ",".join(str(x) for x in default) if isinstance(default, tuple) else json.dumps(default)
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"f_{name}", type=_parser_for(tp),
                       default=argparse.SUPPRESS, metavar=name.split("_")[-1].upper(), help=f"({shown})")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[2:]: v for k, v in vars(args).items() if k.startswith("f_")}


def _setup_logging() -> None:
    import os

    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def _common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--out", required=out_required, help="output folder (checkpoint + train_log.jsonl + resume/)")
    p.add_argument("--config", default=None, help="JSON file of training fields (flags override it)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds a resumable state")
    p.add_argument("--stop-after", type=int, default=None, help="stop (resumably) after this many steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to train_log.jsonl)")


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train_tokenizer import train_tokenizer

    _setup_logging()
    cfg = load_config(TokenizerTrainConfig, args.config, _overrides(args))
    r = train_tokenizer(cfg, args.out, resume=not args.no_resume, stop_after=args.stop_after, device=args.device,
                        progress=not args.no_progress)
    _report({"tokenizer": args.out, "steps_done": r["steps_done"], "val": r.get("val"), "wall_s": r["wall_s"]})
    return 0


def _cmd_generator(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train_generator import train_generator

    _setup_logging()
    cfg = load_config(GeneratorTrainConfig, args.config, _overrides(args))
    r = train_generator(cfg, args.out, resume=not args.no_resume, stop_after=args.stop_after, device=args.device,
                        progress=not args.no_progress)
    _report({"generator": args.out, "steps_done": r["steps_done"], "val_loss": r.get("val_loss"),
             "wall_s": r["wall_s"]})
    return 0


def _cmd_classifier(args: argparse.Namespace) -> int:
    from .config import load_config
    from .recipes import train_eval_classifier

    _setup_logging()
    cfg = load_config(ClassifierTrainConfig, args.config, _overrides(args))
    info = train_eval_classifier(cfg, args.out, device=args.device, progress=not args.no_progress)
    _report({"classifier": args.out, **info})
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .recipes import evaluate_pair

    _setup_logging()
    m = evaluate_pair(args.tokenizer, args.generator, args.classifier, per_class=args.per_class,
                      cfg_scale=args.cfg_scale, temperature=args.temperature, seed=args.seed, device=args.device,
                      val_clips=args.val_clips)
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).write_text(json.dumps(m, indent=2) + "\n")
    _report(m)
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from .recipes import train_tiny

    _setup_logging()
    m = train_tiny(args.out, compare_prior=args.compare_prior, compare_scale=args.compare_scale,
                   scale=args.scale, device=args.device, progress=not args.no_progress)
    _report(m)
    return 0


def _cmd_compare_prior(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from .recipes import run_prior_comparison

    _setup_logging()
    main = Path(args.main)
    work = Path(args.work) if args.work else main / "_compare"
    res = run_prior_comparison(work, scale=args.scale, device=args.device, progress=not args.no_progress, main=main)
    metrics_file = main / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        m["prior_comparison"] = res
        metrics_file.write_text(json.dumps(m, indent=2) + "\n")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    _report(res)
    return 0


def _report(d: dict) -> None:
    """The verb's JSON result on stdout, from rank 0 only under torchrun (the others have no metrics to report)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(d, default=float))


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train the tokenizer / generator (synthetic clips or video folders)")
    sub = train.add_subparsers(dest="train_cmd", required=True)

    t = sub.add_parser("tokenizer", help="train the LARP tokenizer with its AR prior",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(t)
    _add_fields(t, TokenizerTrainConfig)
    t.set_defaults(fn=_cmd_tokenizer)

    g = sub.add_parser("generator", help="train the class-conditional AR generator on a tokenizer's tokens")
    _common(g)
    _add_fields(g, GeneratorTrainConfig)
    g.set_defaults(fn=_cmd_generator)

    c = sub.add_parser("classifier", help="train the 3-D conv classifier used to score generated synthetic clips")
    c.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    c.add_argument("--config", default=None, help="JSON file of fields (flags override it)")
    c.add_argument("--device", default=None)
    c.add_argument("--no-progress", action="store_true")
    _add_fields(c, ClassifierTrainConfig)
    c.set_defaults(fn=_cmd_classifier)

    e = sub.add_parser("evaluate", help="PSNR/SSIM, class accuracy of generated clips, Fréchet distance")
    e.add_argument("--tokenizer", required=True)
    e.add_argument("--generator", required=True)
    e.add_argument("--classifier", required=True)
    e.add_argument("--per-class", type=int, default=32, help="generated samples per class")
    e.add_argument("--cfg-scale", type=float, default=1.25)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--val-clips", type=int, default=256, help="held-out clips for reconstruction metrics")
    e.add_argument("--device", default=None)
    e.add_argument("--json-out", default=None, help="also write the metrics to this file")
    e.set_defaults(fn=_cmd_evaluate)

    y = sub.add_parser("tiny", help="the tiny synthetic pair: tokenizer + generator + classifier + metrics.json")
    y.add_argument("--out", default="checkpoints/tiny", help="folder for tokenizer/, generator/, classifier/")
    y.add_argument("--scale", type=float, default=1.0, help="multiply every step budget (0.1 = a quick smoke run)")
    y.add_argument("--compare-prior", action="store_true",
                   help="also train a no-prior tokenizer + generators (in OUT/_compare) and compare generator val loss")
    y.add_argument("--compare-scale", type=float, default=1.0,
                   help="step budget of the comparison runs relative to the main run (1 reuses the main pair)")
    y.add_argument("--device", default=None)
    y.add_argument("--no-progress", action="store_true")
    y.set_defaults(fn=_cmd_tiny)

    cp = sub.add_parser("compare-prior", help="generator val loss: tokenizer trained with the prior vs prior weight 0")
    cp.add_argument("--main", default="checkpoints/tiny", help="a `train tiny` folder (its pair is the prior arm "
                    "at --scale 1; the result is added to its metrics.json)")
    cp.add_argument("--work", default=None, help="folder for the comparison runs (default MAIN/_compare, removed "
                    "afterwards unless --keep)")
    cp.add_argument("--scale", type=float, default=1.0, help="step budget relative to the tiny recipe")
    cp.add_argument("--keep", action="store_true")
    cp.add_argument("--device", default=None)
    cp.add_argument("--no-progress", action="store_true")
    cp.set_defaults(fn=_cmd_compare_prior)
