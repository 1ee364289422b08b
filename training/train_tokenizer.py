"""Train the LARP tokenizer with its AR prior.

    loss = l1_weight * |recon - video| + vq_weight * loss_q + prior.loss_weight * loss_prior
           [+ gan_weight * GAN (non-saturating, ViT discriminator)] [+ perceptual_weight * LPIPS]

Signal initialisation (``bottleneck_init``, on by default): with the authors' init, a small tokenizer's residual
streams are dominated by the fixed sin-cos position embeddings. Code vectors come out nearly identical for every
slot and clip (cosine ~0.99), and the decoder learns the mean clip and ignores its tokens for thousands of steps
(it learns to attend by position only). Before the first step the trainer therefore scales the patch embedding by
``patch_embed_gain`` and every block's output projections (attn.proj, mlp.fc2) by ``residual_gain`` so that the
content dominates, centres and scales ``in_linear`` on the first batch (codes spread over the sphere) and rescales
``out_linear`` to weight std ``code_gain``. Resumed runs keep their weights.

Quantizer warm-up (``quantizer_warmup`` steps, 0 = off): the first steps train encoder and decoder as a continuous
auto-encoder on the L2-normalised latents (no SVQ, no prior); at the switch the codebook is re-initialised from
encoder latents of the next batches, so every code starts where the encoder puts its vectors (no dead codes,
no single-code collapse), then training continues with the full loss.

The prior's parameters form their own AdamW group at ``lr * prior.lr_mult``; its 2-round scheduled sampling
ratio follows ``PriorConfig.ss_ratio(step, steps)``. One process, one GPU, or DDP under torchrun.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..checkpoint import save_pretrained
from ..config import TokenizerConfig
from ..models import LARPTokenizer
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
from .config import TokenizerTrainConfig
from .data import StepBatchSampler, build_datasets, collate

__all__ = ["train_tokenizer", "tokenizer_config_for", "init_bottleneck"]

log = logging.getLogger(__name__)


def tokenizer_config_for(cfg: TokenizerTrainConfig) -> TokenizerConfig:
    """The model config a training config describes (preset + overrides [+ prior preset + overrides])."""
    tcfg = TokenizerConfig.from_name(cfg.model, **cfg.model_overrides)
    if cfg.prior is not None:
        tcfg = tcfg.with_prior(cfg.prior, **cfg.prior_overrides)
    elif cfg.prior_overrides:
        raise ValueError("prior_overrides given but prior is None; set prior to a PriorConfig preset (e.g. 'tiny')")
    return tcfg


@torch.no_grad()
def init_bottleneck(model: LARPTokenizer, video: torch.Tensor, code_gain: float, patch_embed_gain: float = 1.0,
                    residual_gain: float = 1.0) -> None:
    """Signal init (see the module docstring): content gains, then in_linear outputs zero-mean and unit-std over
    ``video``'s slots, and out_linear weight std = ``code_gain``."""
    cfg = model.config
    model.x_embedder.proj.weight.mul_(patch_embed_gain)
    for block in [*model.encoder.blocks, *model.decoder.blocks]:
        block.attn.proj.weight.mul_(residual_gain)
        block.mlp.fc2.weight.mul_(residual_gain)
    x = model.x_embedder(video) + model.encoder_patch_pe  # (B, P, D)
    q = model.encoder_latent_query_embed.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, N, D)
    h = model.encoder(x, q).reshape(-1, cfg.enc_dim)  # (B*N, D)
    lin = model.bottleneck.in_linear
    y = h @ lin.weight.t()  # (B*N, d)
    mu, sd = y.mean(0), y.std(0).clamp_min(1e-6)
    lin.weight.div_(sd[:, None])
    lin.bias.copy_(-mu / sd)
    out_w = model.bottleneck.out_linear.weight  # (D, d)
    out_w.mul_(code_gain / out_w.std())


@torch.no_grad()
def init_codebook_from_latents(model: LARPTokenizer, videos: list[torch.Tensor], generator: torch.Generator) -> None:
    """Codebook rows <- distinct normalised encoder latents of ``videos`` (+ small noise), drawn with ``generator``."""
    z = torch.cat([F.normalize(model.encode_latents(v), dim=-1).reshape(-1, model.config.code_dim) for v in videos])
    K = model.config.codebook_size
    pick = torch.randperm(len(z), generator=generator, device=generator.device)[:K] if len(z) >= K else \
        torch.randint(len(z), (K,), generator=generator, device=generator.device)
    noise = torch.randn(K, z.shape[1], generator=generator, device=generator.device) * 0.02
    model.bottleneck.regularizer.embedding.weight.copy_(F.normalize(z[pick] + noise, dim=-1))


class _TrainForward(torch.nn.Module):
    """The training forward under one module (so DDP sees every path): full LARP loss or the continuous warm-up."""

    def __init__(self, model: LARPTokenizer):
        super().__init__()
        self.model = model

    def forward(self, video, *, ss_ratio: float, generator: torch.Generator, continuous: bool) -> dict:
        if continuous:
            z = F.normalize(self.model.encode_latents(video), dim=-1)  # (B, N, d)
            zero = z.new_zeros(())
            return {"recon": self.model.decode_codes(z), "loss_q": zero}
        return self.model(video, ss_ratio=ss_ratio, generator=generator)


def train_tokenizer(cfg: TokenizerTrainConfig, out: str | Path, *, resume: bool = True, stop_after: int | None = None,
                    device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) into ``out``; returns {"history": [per-step logs], "steps_done", "wall_s", "val": {...}}.

    ``stop_after``: stop once this many steps are done (a resumable state is saved there), e.g. to split a
    long run into sessions. The final model is written to ``out`` (config.json + model.safetensors).
    """
    out = Path(out)
    d = setup_dist(device)
    try:
        return _train(cfg, out, d, resume=resume, stop_after=stop_after, progress=progress)
    finally:
        d.close()


@dataclass
class _Run:
    """One tokenizer run as ``_setup`` builds it: the model (and its DDP wrapper), optimisers, losses, data."""

    cfg: TokenizerTrainConfig
    tcfg: TokenizerConfig
    out: Path
    d: Any  # common.Dist
    model: LARPTokenizer
    net: torch.nn.Module  # _TrainForward, under DDP when distributed
    opt: torch.optim.Optimizer
    optimizers: dict[str, torch.optim.Optimizer]  # "main" [+ "disc"]
    modules: dict[str, torch.nn.Module]  # saved beside the model in resume states ("disc")
    disc: torch.nn.Module | None
    disc_net: torch.nn.Module | None  # disc, under DDP when distributed
    lpips: torch.nn.Module | None
    prior_w: float
    gen: torch.Generator  # this rank's stream: SVQ sampling, scheduled sampling, GAN labels
    start: int
    train_ds: Any
    val_ds: Any
    loader: DataLoader
    autocast: Callable[[], Any]
    scaler: Any  # GradScaler (fp16) or None
    meta_out: dict[str, Any] = field(default_factory=dict)


def _train(cfg: TokenizerTrainConfig, out: Path, d, *, resume: bool, stop_after: int | None,
           progress: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    run = _setup(cfg, out, d, resume=resume)
    bar = Progress(cfg.steps, run.start, "tokenizer", enabled=d.main and progress,
                   log_path=out / "train_log.jsonl" if d.main else None)

    history: list[dict[str, float]] = []
    run.model.train()
    step = run.start
    for step, (video, _) in zip(range(run.start, cfg.steps), run.loader, strict=False):
        if stop_after is not None and step >= stop_after:
            break
        rec = _train_step(run, step, video.to(d.device, non_blocking=True))  # (B, 3, T, H, W)
        history.append({"step": step, **rec})
        done = step + 1
        bar.update(done, rec, write=(done % cfg.log_every == 0) or done == cfg.steps)
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.steps:
            _save_resume(run, done)
            d.barrier()
        step = done
    bar.close()

    result: dict[str, Any] = {"history": history, "steps_done": step, "out": str(out), "config": run.tcfg.to_dict()}
    if step < cfg.steps:  # interrupted on purpose: leave a resumable state
        if history:
            _save_resume(run, step)
        d.barrier()
        result["wall_s"] = time.perf_counter() - t_start
        return result
    val = _finish(run, step, ran_steps=bool(history), t_start=t_start)
    result.update(val=val, wall_s=time.perf_counter() - t_start)
    return result


def _setup(cfg: TokenizerTrainConfig, out: Path, d, *, resume: bool) -> _Run:
    """Model, optimisers and losses, this rank's RNG (+ the resumed state), data, signal init, DDP wrappers."""
    dev = d.device
    tcfg = tokenizer_config_for(cfg)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)

    # model, optimiser (prior in its own group at lr * lr_mult) -------------------------------------
    torch.manual_seed(cfg.seed)  # same init on every rank
    model = LARPTokenizer(tcfg).to(dev)
    groups = param_groups(model, cfg.lr, cfg.weight_decay, exclude="prior_model", name="tokenizer")
    prior_w = 0.0
    if model.prior_model is not None:
        prior_w = tcfg.prior.loss_weight
        groups += param_groups(model.prior_model, cfg.lr * tcfg.prior.lr_mult, cfg.weight_decay, name="prior")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    optimizers: dict[str, torch.optim.Optimizer] = {"main": opt}
    modules: dict[str, torch.nn.Module] = {}
    disc, lpips = _extra_losses(cfg, tcfg, dev, optimizers, modules)

    # gen: SVQ sampling, scheduled sampling, GAN labels; the global stream: dropout
    gen, start = seed_and_resume(out, cfg, d, resume=resume, model=model, optimizers=optimizers, modules=modules)

    # data ------------------------------------------------------------------------------------------
    train_ds, val_ds = build_datasets(cfg, frames=tcfg.frames, height=tcfg.height, width=tcfg.width)
    sampler = StepBatchSampler(len(train_ds), global_batch=cfg.batch_size, steps=cfg.steps, start_step=start,
                               rank=d.rank, world_size=d.world_size, seed=cfg.data_seed)
    # own generator: creating the iterator must not draw from the global RNG (exact resume)
    loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        persistent_workers=False, pin_memory=dev.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))

    if start == 0 and cfg.bottleneck_init:  # the global first batch, so every rank computes the same weights
        first = StepBatchSampler(len(train_ds), global_batch=cfg.batch_size, steps=1, seed=cfg.data_seed).batch(0)
        init_bottleneck(model, collate([train_ds[i] for i, _ in first])[0].to(dev), cfg.code_gain,
                        cfg.patch_embed_gain, cfg.residual_gain)
    step_fn = _TrainForward(model)
    net = DDP(step_fn, device_ids=[dev.index] if dev.type == "cuda" else None,
              find_unused_parameters=cfg.quantizer_warmup > 0) if d.enabled else step_fn
    disc_net = DDP(disc, device_ids=[dev.index] if dev.type == "cuda" else None) if (d.enabled and disc) else disc
    autocast, scaler = autocast_for(dev, cfg.precision)
    return _Run(cfg=cfg, tcfg=tcfg, out=out, d=d, model=model, net=net, opt=opt, optimizers=optimizers,
                modules=modules, disc=disc, disc_net=disc_net, lpips=lpips, prior_w=prior_w, gen=gen, start=start,
                train_ds=train_ds, val_ds=val_ds, loader=loader, autocast=autocast, scaler=scaler,
                meta_out={"training": cfg.to_dict(), "world_size": d.world_size})


def _extra_losses(cfg: TokenizerTrainConfig, tcfg: TokenizerConfig, dev: torch.device,
                  optimizers: dict[str, torch.optim.Optimizer], modules: dict[str, torch.nn.Module]):
    """(discriminator or None, LPIPS or None); the discriminator's optimiser and module join the run's dicts."""
    disc = None
    if cfg.gan_weight > 0:
        from .losses import VideoDiscriminator

        disc = VideoDiscriminator(tcfg, cfg.disc_dim, cfg.disc_depth, cfg.disc_heads).to(dev)
        opt_d = torch.optim.AdamW(param_groups(disc, cfg.lr, cfg.weight_decay, name="disc"), lr=cfg.lr,
                                  betas=tuple(cfg.betas))
        optimizers["disc"] = opt_d
        modules["disc"] = disc
    lpips = None
    if cfg.perceptual_weight > 0:
        from .losses import LPIPS

        lpips = LPIPS(cfg.perceptual_weights).to(dev)
    return disc, lpips


def _train_step(run: _Run, step: int, video: torch.Tensor) -> dict[str, float]:
    """One optimisation step (LR, quantizer switch, losses, backward [+ discriminator step]); the logs averaged
    over the ranks."""
    cfg, tcfg = run.cfg, run.tcfg
    mult = cosine_lr(step, steps=cfg.steps, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio)
    for o in run.optimizers.values():
        for g in o.param_groups:
            g["lr"] = g["base_lr"] * mult
    ss = tcfg.prior.ss_ratio(step, cfg.steps) if tcfg.prior is not None else 0.0
    if cfg.quantizer_warmup and step == cfg.quantizer_warmup:
        _switch_quantizer(run, step)
    use_gan = run.disc is not None and step >= cfg.gan_start

    loss, recon, logs = _losses(run, video, ss=ss, continuous=step < cfg.quantizer_warmup, use_gan=use_gan)
    run.opt.zero_grad(set_to_none=True)
    backward_step(loss, run.opt, run.model.parameters(), cfg.grad_clip, run.scaler)

    if use_gan and (step - cfg.gan_start) % cfg.disc_every == 0:
        with run.autocast():
            d_loss = _d_loss(run.disc_net(video), run.disc_net(recon.detach()), run.gen)
        run.optimizers["disc"].zero_grad(set_to_none=True)
        backward_step(d_loss, run.optimizers["disc"], run.disc.parameters(), cfg.grad_clip, run.scaler)
        logs["d_loss"] = d_loss.detach()

    logs["loss"] = loss.detach()
    rec = {k: float(run.d.mean(v.float())) for k, v in logs.items()}
    rec["lr"], rec["ss_ratio"] = cfg.lr * mult, ss
    return rec


def _switch_quantizer(run: _Run, step: int) -> None:
    """End of the quantizer warm-up: codebook <- latents of the next global batches (the same on every rank)."""
    cfg, dev = run.cfg, run.d.device
    nxt = StepBatchSampler(len(run.train_ds), global_batch=cfg.batch_size, steps=step + 4, seed=cfg.data_seed)
    vids = [collate([run.train_ds[i] for i, _ in nxt.batch(s)])[0].to(dev) for s in range(step, step + 4)]
    cb_gen = torch.Generator(device=dev)
    cb_gen.manual_seed(cfg.seed + 99)
    init_codebook_from_latents(run.model, vids, cb_gen)


def _losses(run: _Run, video: torch.Tensor, *, ss: float, continuous: bool,
            use_gan: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, reconstruction (B, 3, T, H, W) unclamped, detached terms to log) under autocast."""
    cfg = run.cfg
    with run.autocast():
        o_ = run.net(video, ss_ratio=ss, generator=run.gen, continuous=continuous)
        recon = o_["recon"].float()  # (B, 3, T, H, W) unclamped
        l1 = (recon - video).abs().mean()
        loss = cfg.l1_weight * l1 + cfg.vq_weight * o_["loss_q"]
        logs = {"l1": l1.detach(), "vq": o_["loss_q"].detach()}
        if "loss_prior" in o_:
            loss = loss + run.prior_w * o_["loss_prior"]
            logs["prior"], logs["prior_acc"] = o_["loss_prior"].detach(), o_["prior_acc"]
        if run.lpips is not None:
            lp = run.lpips(recon.clamp(0, 1), video)
            loss = loss + cfg.perceptual_weight * lp
            logs["lpips"] = lp.detach()
        if use_gan:
            run.disc.requires_grad_(False)
            g_adv = _g_loss(run.disc_net(recon))
            run.disc.requires_grad_(True)
            loss = loss + cfg.gan_weight * g_adv
            logs["g_adv"] = g_adv.detach()
    return loss, recon, logs


def _save_resume(run: _Run, step: int) -> None:
    """Rank 0 writes the resumable state, with every rank's RNG streams (a collective: every rank calls it)."""
    rng = gather_rng(run.gen, run.d)
    if run.d.main:
        save_state(run.out, step, model=run.model, optimizers=run.optimizers, generator=run.gen, modules=run.modules,
                   meta=run.meta_out, rng=rng)


def _finish(run: _Run, step: int, *, ran_steps: bool, t_start: float) -> dict[str, float]:
    """Final model + held-out reconstruction metrics (rank 0 writes; every rank waits for it)."""
    cfg, d, out = run.cfg, run.d, run.out
    run.model.eval()
    val: dict[str, float] = {}
    if d.main:
        from .evaluate import reconstruction_metrics

        val = reconstruction_metrics(run.model, run.val_ds, batch_size=max(1, min(64, cfg.batch_size)),
                                     device=d.device)
        wall = time.perf_counter() - t_start
        save_pretrained(run.model, out, extra={"training": cfg.to_dict(), "steps": cfg.steps, "val": val,
                                               "train_wall_s": round(wall, 1), "world_size": d.world_size})
    if cfg.keep_resume and ran_steps:  # (a finished run resumed again keeps its state as it was)
        _save_resume(run, step)
    elif not cfg.keep_resume and d.main:
        shutil.rmtree(out / "resume", ignore_errors=True)
    if d.main:
        log.info("tokenizer saved to %s: val %s", out, val)
    d.barrier()
    return val


def _g_loss(logits):
    from .losses import g_loss_nonsaturating

    return g_loss_nonsaturating(logits)


def _d_loss(real, fake, gen):
    from .losses import d_loss_nonsaturating

    return d_loss_nonsaturating(real, fake, generator=gen if gen.device.type == "cpu" else None)


