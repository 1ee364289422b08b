"""End-to-end recipes: the tiny synthetic pair (tokenizer + generator + classifier + metrics.json), evaluation of a
trained pair, and the prior vs no-prior comparison.

``train_tiny(out)`` is what ``larp-rt train tiny --out checkpoints/tiny`` runs (see training/README.md).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..sampling import SamplingParams
from .config import ClassifierTrainConfig, GeneratorTrainConfig, TokenizerTrainConfig

__all__ = ["TINY_TOKENIZER", "TINY_GENERATOR", "TINY_CLASSIFIER", "train_tiny", "evaluate_pair",
           "train_eval_classifier", "run_prior_comparison"]

log = logging.getLogger(__name__)

# The tiny pair's settings (recorded in each checkpoint's config.json under "training").
TINY_TOKENIZER: dict[str, Any] = {
    "model": "tiny", "model_overrides": {"temporal_patch": 2, "patch": 8},  # 4x4x4 = 64 patches of 2x8x8
    "prior": "tiny", "prior_overrides": {"lr_mult": 5.0},
    "steps": 5500, "batch_size": 16, "lr": 2e-3, "warmup_steps": 30, "min_lr_ratio": 0.05,
    "quantizer_warmup": 1000, "val_size": 256, "log_every": 20, "ckpt_every": 500, "keep_resume": False,
}
TINY_GENERATOR: dict[str, Any] = {
    "model": "tiny", "token_clips": 6000, "steps": 1500, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100,
    "val_size": 512, "log_every": 20, "ckpt_every": 1000, "keep_resume": False,
}
TINY_CLASSIFIER: dict[str, Any] = {"steps": 250, "batch_size": 32, "lr": 2e-3, "val_size": 256}
TINY_SAMPLING = {"cfg_scale": 2.0, "temperature": 1.0}


_GEN_KEYS = ("steps", "warmup_steps", "ckpt_every", "token_clips")


def _scaled(d: dict[str, Any], scale: float, keys=("steps", "quantizer_warmup", "warmup_steps", "ckpt_every")):
    out = dict(d)
    for k in keys:
        if k in out and out[k]:
            out[k] = max(1 if k != "token_clips" else 64, int(round(out[k] * scale)))
    return out


def train_eval_classifier(cfg: ClassifierTrainConfig, out: str | Path, *, device=None, progress=True) -> dict:
    """Train the synthetic-class classifier and save it (config.json + model.safetensors) in ``out``."""
    from .data import build_datasets
    from .evaluate import ClassifierSpec, save_classifier, train_classifier

    if cfg.data != "synthetic":
        raise ValueError("the classifier is trained on synthetic clips (data='synthetic'); for real videos plug an "
                         "external feature extractor (e.g. I3D) into larp_rt.training.evaluate.frechet_distance")
    dev = torch.device(device or "cpu")
    train_ds, val_ds = build_datasets(cfg, frames=cfg.frames, height=cfg.height, width=cfg.width)
    spec = ClassifierSpec(cfg.num_classes, cfg.frames, cfg.height, cfg.width, cfg.width_mult)
    model, info = train_classifier(train_ds, val_ds, spec, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                   seed=cfg.seed, device=dev, progress=progress)
    save_classifier(model, out, extra={"training": cfg.to_dict(), **info})
    return info


def evaluate_pair(tokenizer: str | Path, generator: str | Path, classifier: str | Path, *, per_class: int = 32,
                  cfg_scale: float = TINY_SAMPLING["cfg_scale"], temperature: float = 1.0, seed: int = 0,
                  device=None, val_clips: int = 256, data_seed: int | None = None) -> dict[str, Any]:
    """Reconstruction PSNR/SSIM on held-out synthetic clips, and class accuracy + Fréchet distance of generated
    clips with CFG (``cfg_scale``) and without (cfg 1)."""
    from ..checkpoint import load_pretrained
    from .data import SyntheticVideos
    from .evaluate import generation_metrics, load_classifier, real_frechet_floor, recon_frechet, reconstruction_metrics

    dev = torch.device(device or "cpu")
    tok = load_pretrained(tokenizer, kind="tokenizer", with_prior=False, device=dev)
    gen = load_pretrained(generator, kind="generator", device=dev)
    clf = load_classifier(classifier, device=dev)
    tc = tok.config
    train_meta = json.loads((Path(tokenizer) / "config.json").read_text()).get("training", {})
    seed0 = int(train_meta.get("data_seed", 0)) if data_seed is None else data_seed
    nc = gen.config.num_classes
    # held-out clips: data_seed + 1 (the trainers' validation set); the second real set for the noise floor: + 2
    held = SyntheticVideos(max(val_clips, nc * per_class), frames=tc.frames, height=tc.height, width=tc.width,
                           num_classes=nc, seed=seed0 + 1)
    other = SyntheticVideos(nc * per_class, frames=tc.frames, height=tc.height, width=tc.width, num_classes=nc,
                            seed=seed0 + 2)
    t0 = time.perf_counter()
    m: dict[str, Any] = {"reconstruction": reconstruction_metrics(tok, held, n=val_clips, device=dev)}
    m["reconstruction"]["frechet_distance"] = recon_frechet(tok, clf.features, held, nc * per_class, device=dev)
    for name, scale in (("generation_cfg", cfg_scale), ("generation_no_cfg", 1.0)):
        m[name] = generation_metrics(tok, gen, clf, held, per_class=per_class, device=dev,
                                     params=SamplingParams(cfg_scale=scale, temperature=temperature, seed=seed))
    m["real_vs_real_frechet_distance"] = real_frechet_floor(clf.features, held, other, nc * per_class)
    m["classifier_accuracy_on_real"] = json.loads((Path(classifier) / "config.json").read_text()).get("val_accuracy")
    m["eval_wall_s"] = round(time.perf_counter() - t0, 1)
    return m


def _done(folder: Path, cfg) -> bool:
    """A finished checkpoint of exactly this training config is already in ``folder`` (so re-running skips it)."""
    f = folder / "config.json"
    if not (f.is_file() and (folder / "model.safetensors").is_file()):
        return False
    saved = json.loads(f.read_text()).get("training")
    return saved == json.loads(json.dumps(cfg.to_dict()))


def run_prior_comparison(work: str | Path, *, scale: float = 1.0, device=None, progress=True,
                         main: str | Path | None = None) -> dict[str, Any]:
    """Generator validation loss on tokens of a tokenizer trained with the prior vs with prior weight 0.

    Both arms use the tiny recipe at ``scale`` x its step budgets and the same seeds; the "no prior" tokenizer is
    built without the prior module (for its weights the same as loss weight 0; it also skips the prior's compute).
    With ``scale == 1`` and ``main`` (a finished ``train_tiny`` folder), the main pair is the prior arm.
    """
    from .train_generator import train_generator
    from .train_tokenizer import train_tokenizer

    work = Path(work)
    res: dict[str, Any] = {"scale": scale}
    t0 = time.perf_counter()
    arms = {"prior": dict(TINY_TOKENIZER), "no_prior": {**TINY_TOKENIZER, "prior": None, "prior_overrides": {}}}
    for arm, traw in arms.items():
        tcfg = TokenizerTrainConfig.from_dict(_scaled(traw, scale))
        tok_dir, gen_dir = work / arm / "tokenizer", work / arm / "generator"
        if arm == "prior" and main is not None and scale == 1.0 and _done(Path(main) / "tokenizer", tcfg):
            tok_dir, gen_dir = Path(main) / "tokenizer", Path(main) / "generator"
        elif not _done(tok_dir, tcfg):
            train_tokenizer(tcfg, tok_dir, device=device, progress=progress)
        gcfg = GeneratorTrainConfig.from_dict({**_scaled(TINY_GENERATOR, scale, keys=_GEN_KEYS),
                                               "tokenizer": str(tok_dir),
                                               "token_cache": str(work / arm / "tokens.npz")})
        if gen_dir == work / arm / "generator" and not _done(gen_dir, gcfg):
            train_generator(gcfg, gen_dir, device=device, progress=progress)
        tok_meta = json.loads((tok_dir / "config.json").read_text())
        gen_meta = json.loads((gen_dir / "config.json").read_text())
        res[arm] = {"generator_val_loss": gen_meta["val"]["loss"], "tokenizer_val": tok_meta.get("val", {}),
                    "tokenizer_steps": tok_meta.get("steps"), "generator_steps": gen_meta.get("steps")}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def train_tiny(out: str | Path = "checkpoints/tiny", *, scale: float = 1.0, compare_prior: bool = False,
               compare_scale: float = 0.5, device=None, progress: bool = True) -> dict[str, Any]:
    """Train the tiny tokenizer (with prior), its generator and the scoring classifier into ``out``; evaluate;
    write ``out/metrics.json`` and ``out/train_config.json``."""
    from .train_generator import train_generator
    from .train_tokenizer import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tcfg = TokenizerTrainConfig.from_dict(_scaled(TINY_TOKENIZER, scale))
    gcfg = GeneratorTrainConfig.from_dict({**_scaled(TINY_GENERATOR, scale, keys=_GEN_KEYS),
                                           "tokenizer": str(out / "tokenizer"),
                                           "token_cache": str(out / "_work" / "tokens.npz")})
    ccfg = ClassifierTrainConfig.from_dict(_scaled(TINY_CLASSIFIER, scale, keys=("steps",)))
    (out / "train_config.json").write_text(json.dumps(
        {"command": f"larp-rt train tiny --out {out}" + (f" --scale {scale}" if scale != 1 else ""),
         "tokenizer": tcfg.to_dict(), "generator": gcfg.to_dict(), "classifier": ccfg.to_dict(),
         "sampling": TINY_SAMPLING}, indent=2) + "\n")

    times: dict[str, float] = {}
    s = time.perf_counter()
    new_tokenizer = not _done(out / "tokenizer", tcfg)
    if new_tokenizer:
        train_tokenizer(tcfg, out / "tokenizer", device=device, progress=progress)
    times["tokenizer_s"] = time.perf_counter() - s
    s = time.perf_counter()
    # A generator is only reusable if it was trained on this very tokenizer's tokens.
    if new_tokenizer or not _done(out / "generator", gcfg):
        gres = train_generator(gcfg, out / "generator", device=device, progress=progress)
        gen_val, times["token_extraction_s"] = gres["val_loss"], gres["token_wall_s"]
    else:
        gen_val = float(json.loads((out / "generator" / "config.json").read_text())["val"]["loss"])
    times["generator_s"] = time.perf_counter() - s
    s = time.perf_counter()
    cinfo = train_eval_classifier(ccfg, out / "classifier", device=device, progress=progress)
    times["classifier_s"] = time.perf_counter() - s
    s = time.perf_counter()
    metrics = evaluate_pair(out / "tokenizer", out / "generator", out / "classifier", device=device,
                            cfg_scale=TINY_SAMPLING["cfg_scale"], temperature=TINY_SAMPLING["temperature"])
    times["evaluation_s"] = time.perf_counter() - s
    times["total_s"] = time.perf_counter() - t0
    metrics["generator_val_loss"] = gen_val
    metrics["classifier"] = cinfo
    metrics["times"] = {k: round(v, 1) for k, v in times.items()}
    metrics["machine"] = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "torch": torch.__version__, "device": str(device or "cpu")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if compare_prior:
        metrics["prior_comparison"] = run_prior_comparison(out / "_compare", scale=compare_scale * scale,
                                                           device=device, progress=progress, main=out)
    shutil.rmtree(out / "_work", ignore_errors=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
