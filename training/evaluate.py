"""Evaluation: reconstruction PSNR / SSIM, a 3-D conv classifier for generated synthetic clips, Fréchet distance.

* :func:`reconstruction_metrics` encodes and decodes held-out clips with the deterministic tokenizer.
* :class:`VideoClassifier` (trained by :func:`train_classifier` on the synthetic classes) scores generated
  samples (class accuracy) and provides features for :func:`frechet_distance`.
* :func:`features` / :func:`frechet_distance` take any extractor ``callable(video (B,3,T,H,W) in [0,1]) ->
  (B, F)``: plug in I3D to get FVD-style numbers.
* :func:`sample_tokens` is the plain sampling loop (static KV cache, CFG rows, the reference sampler).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sampling import SamplingParams, resolve_params
from ..sampling_torch import DeviceRowParams, sample

__all__ = [
    "psnr", "ssim", "reconstruction_metrics", "VideoClassifier", "train_classifier", "save_classifier",
    "load_classifier", "features", "frechet_distance", "sample_tokens", "generation_metrics",
]


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------
def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-clip PSNR (dB) of videos in [0, 1]: (B, C, T, H, W) x2 -> (B,)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gauss(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, *, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-clip SSIM (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03) averaged over frames
    and channels, valid region only. (B, C, T, H, W) x2 in [0, 1] -> (B,)."""
    B, C, T, H, W = a.shape
    window = min(window, H, W)
    x = a.float().transpose(1, 2).reshape(B * T * C, 1, H, W)
    y = b.float().transpose(1, 2).reshape(B * T * C, 1, H, W)
    g = _gauss(window, sigma).to(x.device)
    kx, ky = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)
    blur = lambda z: F.conv2d(F.conv2d(z, kx), ky)  # noqa: E731 separable Gaussian, valid
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.reshape(B, T * C, -1).mean(dim=(1, 2))


def _batches(dataset, n: int, batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    for s in range(0, n, batch_size):
        items = [dataset[i] for i in range(s, min(n, s + batch_size))]
        yield torch.stack([v for v, _ in items]), torch.tensor([int(lab) for _, lab in items])


@torch.no_grad()
def reconstruction_metrics(tokenizer, dataset, *, n: int | None = None, batch_size: int = 32,
                           device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean PSNR / SSIM of deterministic encode -> decode over the first ``n`` clips of ``dataset``."""
    was_training = tokenizer.training
    tokenizer.eval()
    n = len(dataset) if n is None else min(n, len(dataset))
    ps, ss = [], []
    for video, _ in _batches(dataset, n, batch_size):
        video = video.to(device)
        recon = tokenizer.decode(tokenizer.encode(video))
        ps.append(psnr(recon, video).cpu())
        ss.append(ssim(recon, video).cpu())
    tokenizer.train(was_training)
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()), "clips": n}


# --------------------------------------------------------------------------------------------
# classifier (features for accuracy and Fréchet distance)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifierSpec:
    num_classes: int
    frames: int
    height: int
    width: int
    width_mult: int = 32


class VideoClassifier(nn.Module):
    """Small 3-D conv net: 3 conv stages (3x3x3, GroupNorm, SiLU, stride-2 pooling) -> global mean -> linear.

    ``features(video)`` (B, 4*width_mult) is the penultimate layer (used for the Fréchet distance).
    """

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        self.spec = spec
        c = spec.width_mult

        def stage(cin, cout):
            return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv3d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.stages = nn.ModuleList([stage(3, c), stage(c, 2 * c), stage(2 * c, 4 * c)])
        self.head = nn.Linear(4 * c, spec.num_classes)

    def features(self, video: Tensor) -> Tensor:
        x = video * 2 - 1  # (B, 3, T, H, W)
        for i, s in enumerate(self.stages):
            x = s(x)
            if i < len(self.stages) - 1:
                x = F.avg_pool3d(x, kernel_size=2, ceil_mode=True)
        return x.mean(dim=(2, 3, 4))  # (B, 4c)

    def forward(self, video: Tensor) -> Tensor:
        return self.head(self.features(video))  # (B, classes)


def train_classifier(train_ds, val_ds, spec: ClassifierSpec, *, steps: int = 400, batch_size: int = 32,
                     lr: float = 2e-3, seed: int = 0, device: torch.device | str = "cpu",
                     progress: bool = True) -> tuple[VideoClassifier, dict[str, float]]:
    """Train on ``train_ds`` clips (step-indexed, seeded) and report held-out accuracy on ``val_ds``."""
    from .common import Progress, cosine_lr
    from .data import StepBatchSampler, collate

    torch.manual_seed(seed)
    model = VideoClassifier(spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sampler = StepBatchSampler(len(train_ds), global_batch=batch_size, steps=steps, seed=seed + 11)
    bar = Progress(steps, 0, "classifier", enabled=progress, log_path=None)
    t0 = time.perf_counter()
    model.train()
    for step, idx in enumerate(sampler):
        video, label = collate([train_ds[i] for i in idx])
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, steps=steps, warmup=min(50, steps // 10), min_ratio=0.05)
        loss = F.cross_entropy(model(video.to(device)), label.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        logs = {"loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"]}
        bar.update(step + 1, logs, write=(step + 1) % 10 == 0)
    bar.close()
    model.eval()
    acc = classify_accuracy(model, val_ds, device=device)
    return model, {"val_accuracy": acc, "steps": steps, "wall_s": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def classify_accuracy(model: VideoClassifier, dataset, *, batch_size: int = 64, device="cpu") -> float:
    correct, n = 0, 0
    for video, label in _batches(dataset, len(dataset), batch_size):
        correct += int((model(video.to(device)).argmax(-1).cpu() == label).sum())
        n += len(label)
    return correct / max(1, n)


def save_classifier(model: VideoClassifier, folder: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.safetensors").chmod(0o644)  # safetensors writes private files; checkpoints are ordinary
    spec = model.spec
    (folder / "config.json").write_text(json.dumps(
        {"format": "larp_rt.video_classifier", "spec": spec.__dict__, **(extra or {})}, indent=2) + "\n")
    return folder


def load_classifier(folder: str | Path, device="cpu") -> VideoClassifier:
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"classifier folder {str(folder)!r} has no config.json; train one with "
                                "`larp-rt train classifier --out DIR`")
    d = json.loads(cfg_path.read_text())
    if d.get("format") != "larp_rt.video_classifier":
        raise ValueError(f"{str(cfg_path)!r} is not a larp_rt video classifier config")
    model = VideoClassifier(ClassifierSpec(**d["spec"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Fréchet distance over any feature extractor
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def features(extractor: Callable[[Tensor], Tensor], videos: Iterable[Tensor]) -> np.ndarray:
    """Stack ``extractor(batch)`` over batches of videos (B, 3, T, H, W) in [0, 1] -> (M, F) float64."""
    return np.concatenate([extractor(v).detach().double().cpu().numpy() for v in videos], axis=0)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (M, F)."""
    from scipy import linalg

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (M, F) with the same F, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples per feature set for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    def sqrtm(m: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # near-singular products warn; the result is checked below
            warnings.simplefilter("ignore")
            r = linalg.sqrtm(m)
        return r[0] if isinstance(r, tuple) else r

    covmean = sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # singular product: regularise (as the reference FID code)
        eps = np.eye(len(s_a)) * 1e-6
        covmean = sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_tokens(gen, class_ids: Tensor | list[int], params: SamplingParams) -> Tensor:
    """Sample (B, N) token ids for class ids (B,) with the static KV cache and the reference sampler.

    CFG (cfg_scale != 1): the batch is B cond rows followed by B null-class rows; token k sits at position
    cls_token_num + k and uses sampler step k.
    """
    cfg = gen.config
    dev = gen.tok_embeddings.weight.device
    cls = torch.as_tensor(class_ids, dtype=torch.int64, device=dev).view(-1)  # (B,)
    B = cls.shape[0]
    rows = resolve_params(params, B, cfg.vocab_size)
    dparams = DeviceRowParams(rows, dev)
    use_cfg = rows.uses_cfg
    if use_cfg and not gen.has_null_class:
        raise ValueError("cfg_scale != 1 needs a generator trained with class dropout (a null class)")
    cond = torch.cat([cls, torch.full_like(cls, cfg.null_class)]) if use_cfg else cls  # (B or 2B,)
    gen.eval()
    gen.setup_caches(cond.shape[0])
    try:
        logits = gen.prefill(cond)  # (rows, V)
        out = torch.empty(B, cfg.max_seq_len, dtype=torch.int64, device=dev)
        for k in range(cfg.max_seq_len):
            if k > 0:
                tok = out[:, k - 1:k]  # (B, 1)
                pos = torch.tensor([cfg.cls_token_num + k - 1], device=dev)
                logits = gen.decode_one_token(torch.cat([tok, tok]) if use_cfg else tok, pos)
            c, u = (logits[:B], logits[B:]) if use_cfg else (logits, None)
            out[:, k] = sample(c, u, dparams, k)
    finally:
        gen.clear_caches()
    return out


@torch.no_grad()
def generation_metrics(tokenizer, gen, classifier: VideoClassifier, real_ds, *, per_class: int = 32,
                       params: SamplingParams, batch_size: int = 128, device="cpu",
                       extractor: Callable[[Tensor], Tensor] | None = None) -> dict[str, Any]:
    """Class accuracy of generated clips (by ``classifier``) and Fréchet distance to ``real_ds`` clips.

    ``extractor`` (default: the classifier's penultimate features) maps videos to features for the distance.
    """
    nc = gen.config.num_classes
    labels = torch.arange(nc).repeat_interleave(per_class)  # (nc * per_class,)
    extractor = extractor or classifier.features
    correct, gen_feats, t0 = 0, [], time.perf_counter()
    base_seed = 0 if params.seed is None else int(params.seed)
    for s in range(0, len(labels), batch_size):
        lab = labels[s:s + batch_size]
        p = SamplingParams(cfg_scale=params.cfg_scale, temperature=params.temperature, top_k=params.top_k,
                           top_p=params.top_p, seed=base_seed + s)
        tokens = sample_tokens(gen, lab, p)
        video = tokenizer.decode(tokens.to(device))  # (b, 3, T, H, W) in [0, 1]
        correct += int((classifier(video).argmax(-1).cpu() == lab).sum())
        gen_feats.append(extractor(video).double().cpu().numpy())
    real = features(extractor, (v.to(device) for v, _ in _batches(real_ds, min(len(real_ds), len(labels)), 64)))
    fd = frechet_distance(real, np.concatenate(gen_feats))
    return {"class_accuracy": correct / len(labels), "frechet_distance": fd, "samples": len(labels),
            "chance": 1.0 / nc, "cfg_scale": params.cfg_scale, "temperature": params.temperature,
            "wall_s": round(time.perf_counter() - t0, 1)}


def real_frechet_floor(extractor: Callable[[Tensor], Tensor], ds_a, ds_b, n: int) -> float:
    """Fréchet distance between two sets of real clips (the noise floor at this sample size)."""
    fa = features(extractor, (v for v, _ in _batches(ds_a, min(n, len(ds_a)), 64)))
    fb = features(extractor, (v for v, _ in _batches(ds_b, min(n, len(ds_b)), 64)))
    return frechet_distance(fa, fb)


def recon_frechet(tokenizer, extractor: Callable[[Tensor], Tensor], ds, n: int, device="cpu") -> float:
    """Fréchet distance between real clips and their reconstructions (rFD)."""
    real, rec = [], []
    with torch.no_grad():
        for v, _ in _batches(ds, min(n, len(ds)), 64):
            v = v.to(device)
            real.append(extractor(v).double().cpu().numpy())
            rec.append(extractor(tokenizer.decode(tokenizer.encode(v))).double().cpu().numpy())
    return frechet_distance(np.concatenate(real), np.concatenate(rec))

