"""Train the class-conditional AR generator on token sequences of a trained tokenizer.

Tokens are extracted once with the deterministic tokenizer (``tok.encode(video)`` -> (B, N) int64) and cached
in an ``.npz`` (reused when the tokenizer weights and data settings match). Training is teacher-forced
cross-entropy: ``gen(cond, tokens[:, :-1])`` -> (B, N, V) logits predicting tokens 0..N-1; the model's
LabelEmbedder drops the class (-> null class) with ``class_dropout_prob`` in train mode, which CFG needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ..checkpoint import load_pretrained, save_pretrained
from ..config import GeneratorConfig
from ..models import LARPGenerator
from .common import (
    Progress,
    autocast_for,
    backward_step,
    cosine_lr,
    gather_rng,
    param_groups,
    save_state,
    seed_and_resume,
    setup_dist,
)
from .config import GeneratorTrainConfig
from .data import StepBatchSampler, build_datasets, collate

__all__ = ["train_generator", "extract_tokens", "generator_config_for", "validation_loss"]

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def _encode_all(tok, dataset, n: int, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    toks, labels = [], []
    for s in range(0, n, batch_size):
        video, label = collate([dataset[i] for i in range(s, min(n, s + batch_size))])
        toks.append(tok.encode(video.to(device)).cpu().numpy().astype(np.int32))  # (b, N)
        labels.append(label.numpy())
    return np.concatenate(toks), np.concatenate(labels).astype(np.int64)


def extract_tokens(cfg: GeneratorTrainConfig, cache: Path, *, device="cpu") -> dict[str, np.ndarray]:
    """Train / held-out token arrays for ``cfg`` (from ``cache`` when it matches, else extracted and cached)."""
    tok_dir = Path(cfg.tokenizer)
    key = {
        "tokenizer_sha256": _sha256(tok_dir / "model.safetensors") if (tok_dir / "model.safetensors").is_file()
        else None,
        "data": {k: getattr(cfg, k) for k in ("data", "data_root", "data_csv", "num_classes", "data_seed",
                                              "val_size", "val_fraction")},
        "token_clips": cfg.token_clips,
    }
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if json.loads(str(z["meta"])) == key:
                log.info("using cached tokens %s", cache)
                return {k: z[k] for k in ("train_tokens", "train_labels", "val_tokens", "val_labels")}
        log.info("token cache %s was made with other settings: re-extracting", cache)
    tok = load_pretrained(tok_dir, kind="tokenizer", with_prior=False, device=device)
    tc = tok.config
    opts = cfg.replace(train_size=cfg.token_clips) if cfg.data == "synthetic" else cfg
    train_ds, val_ds = build_datasets(opts, frames=tc.frames, height=tc.height, width=tc.width)
    if cfg.data == "folder":  # one deterministic clip per video (middle, no flip)
        train_ds.train = False
    t0 = time.perf_counter()
    n_train = len(train_ds) if cfg.data == "folder" else cfg.token_clips
    tr_t, tr_l = _encode_all(tok, train_ds, n_train, 64, device)
    va_t, va_l = _encode_all(tok, val_ds, min(len(val_ds), cfg.val_size), 64, device)
    log.info("tokenized %d + %d clips in %.1f s", len(tr_t), len(va_t), time.perf_counter() - t0)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, train_tokens=tr_t, train_labels=tr_l, val_tokens=va_t, val_labels=va_l,
                        meta=np.array(json.dumps(key)))
    tmp.replace(cache)
    return {"train_tokens": tr_t, "train_labels": tr_l, "val_tokens": va_t, "val_labels": va_l}


def generator_config_for(cfg: GeneratorTrainConfig, tok_cfg, num_classes: int) -> GeneratorConfig:
    """Preset + overrides, with vocabulary / sequence length from the tokenizer and classes from the data."""
    fixed = {"vocab_size": tok_cfg.codebook_size, "max_seq_len": tok_cfg.num_tokens, "num_classes": num_classes}
    for k, v in fixed.items():
        if k in cfg.model_overrides and cfg.model_overrides[k] != v:
            raise ValueError(f"model_overrides[{k!r}]={cfg.model_overrides[k]!r} contradicts the tokenizer/data "
                             f"({k} = {v}); drop it: it is set automatically")
    return GeneratorConfig.from_name(cfg.model, **{**cfg.model_overrides, **fixed})


@torch.no_grad()
def validation_loss(gen: LARPGenerator, tokens: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
                    device="cpu") -> float:
    """Mean teacher-forced cross-entropy (nats/token) on held-out sequences, eval mode (no class dropout)."""
    was = gen.training
    gen.eval()
    total, count = 0.0, 0
    for s in range(0, len(tokens), batch_size):
        t = torch.from_numpy(tokens[s:s + batch_size]).long().to(device)  # (b, N)
        c = torch.from_numpy(labels[s:s + batch_size]).long().to(device)  # (b,)
        logits = gen(c, t[:, :-1]).float()  # (b, N, V)
        total += float(F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum"))
        count += t.numel()
    gen.train(was)
    return total / max(1, count)


def train_generator(cfg: GeneratorTrainConfig, out: str | Path, *, resume: bool = True, stop_after: int | None = None,
                    device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Extract tokens (once), then train (or resume) into ``out``; returns history, val_loss, wall time."""
    out = Path(out)
    tok_dir = Path(cfg.tokenizer)
    if not (tok_dir / "config.json").is_file():
        raise FileNotFoundError(f"tokenizer checkpoint {str(tok_dir)!r} has no config.json; train one first with "
                                "`larp-rt train tokenizer --out DIR`")
    d = setup_dist(device)
    try:
        return _train(cfg, out, d, resume=resume, stop_after=stop_after, progress=progress)
    finally:
        d.close()


def _train(cfg: GeneratorTrainConfig, out: Path, d, *, resume: bool, stop_after: int | None,
           progress: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    dev = d.device
    data = _tokens(cfg, out, d)
    t_tokens = time.perf_counter() - t_start
    from ..checkpoint import read_config

    _, tok_cfg, _ = read_config(cfg.tokenizer)
    num_classes = cfg.num_classes if cfg.data == "synthetic" else int(data["train_labels"].max()) + 1
    gcfg = generator_config_for(cfg, tok_cfg, num_classes)

    torch.manual_seed(cfg.seed)
    model = LARPGenerator(gcfg).to(dev)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, name="generator"), lr=cfg.lr,
                            betas=tuple(cfg.betas))
    # gen: class dropout; the global stream: token / residual dropout
    gen, start = seed_and_resume(out, cfg, d, resume=resume, model=model, optimizers={"main": opt})

    train_t = torch.from_numpy(data["train_tokens"]).long()  # (M, N)
    train_l = torch.from_numpy(data["train_labels"]).long()  # (M,)
    sampler = StepBatchSampler(len(train_t), global_batch=cfg.batch_size, steps=cfg.steps, start_step=start,
                               rank=d.rank, world_size=d.world_size, seed=cfg.seed + 101)
    net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None) if d.enabled else model
    autocast, scaler = autocast_for(dev, cfg.precision)
    meta_out = {"training": cfg.to_dict(), "world_size": d.world_size}
    bar = Progress(cfg.steps, start, "generator", enabled=d.main and progress,
                   log_path=out / "train_log.jsonl" if d.main else None)

    history: list[dict[str, float]] = []
    model.train()
    step = start
    for step in range(start, cfg.steps):
        if stop_after is not None and step >= stop_after:
            break
        idx = torch.tensor([i for i, _ in sampler.batch(step)])
        tokens, labels = train_t[idx].to(dev), train_l[idx].to(dev)  # (B, N), (B,)
        mult = cosine_lr(step, steps=cfg.steps, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        loss = _train_step(cfg, net, model, opt, tokens, labels, gen, autocast, scaler)
        done = step + 1
        rec = {"loss": float(d.mean(loss.detach())), "lr": cfg.lr * mult}
        if cfg.val_every and done % cfg.val_every == 0 and d.main:
            rec["val_loss"] = validation_loss(model, data["val_tokens"], data["val_labels"], device=dev)
        history.append({"step": step, **rec})
        bar.update(done, rec, write=(done % cfg.log_every == 0) or done == cfg.steps or "val_loss" in rec)
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
            _save_resume(out, done, d, model, opt, gen, meta_out)
            d.barrier()
        step = done
    bar.close()

    result: dict[str, Any] = {"history": history, "steps_done": step, "out": str(out), "config": gcfg.to_dict(),
                              "token_wall_s": t_tokens}
    if step < cfg.steps:
        if history:
            _save_resume(out, step, d, model, opt, gen, meta_out)
        d.barrier()
        result["wall_s"] = time.perf_counter() - t_start
        return result

    val_loss = None
    if d.main:
        val_loss = _save_final(cfg, out, d, model, data, t_start)
    if cfg.keep_resume and history:
        _save_resume(out, step, d, model, opt, gen, meta_out)
    elif not cfg.keep_resume and d.main:
        shutil.rmtree(out / "resume", ignore_errors=True)
    if d.main:
        log.info("generator saved to %s: val loss %.4f", out, val_loss)
    d.barrier()
    result.update(val_loss=val_loss, wall_s=time.perf_counter() - t_start)
    return result


def _train_step(cfg: GeneratorTrainConfig, net: torch.nn.Module, model: LARPGenerator, opt: torch.optim.Optimizer,
                tokens: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, autocast, scaler) -> torch.Tensor:
    """Teacher-forced cross-entropy on (B, N) ``tokens`` of class ``labels``, backward, step; returns the loss."""
    with autocast():
        logits = net(labels, tokens[:, :-1], generator=gen)  # (B, N, V): row j predicts token j
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    opt.zero_grad(set_to_none=True)
    backward_step(loss, opt, model.parameters(), cfg.grad_clip, scaler)
    return loss


def _save_resume(out: Path, step: int, d, model: LARPGenerator, opt: torch.optim.Optimizer, gen: torch.Generator,
                 meta: dict[str, Any]) -> None:
    """Rank 0 writes the resumable state, with every rank's RNG streams (a collective: every rank calls it)."""
    rng = gather_rng(gen, d)
    if d.main:
        save_state(out, step, model=model, optimizers={"main": opt}, generator=gen, meta=meta, rng=rng)


def _tokens(cfg: GeneratorTrainConfig, out: Path, d) -> dict[str, np.ndarray]:
    """The token arrays: rank 0 extracts (or reads) the cache, then the other ranks read what it wrote."""
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.token_cache) if cfg.token_cache else out / "tokens.npz"
    if d.main:
        data = extract_tokens(cfg, cache, device=d.device)
    d.barrier()
    if not d.main:
        data = extract_tokens(cfg, cache, device=d.device)  # reads the cache rank 0 wrote
    return data


def _save_final(cfg: GeneratorTrainConfig, out: Path, d, model: LARPGenerator, data: dict[str, np.ndarray],
                t_start: float) -> float:
    """Held-out loss, then the final checkpoint with it (rank 0); returns the loss."""
    val_loss = validation_loss(model, data["val_tokens"], data["val_labels"], device=d.device)
    wall = time.perf_counter() - t_start
    save_pretrained(model, out, extra={"training": cfg.to_dict(), "steps": cfg.steps,
                                       "val": {"loss": val_loss, "clips": int(len(data["val_tokens"]))},
                                       "train_wall_s": round(wall, 1), "world_size": d.world_size})
    return val_loss
