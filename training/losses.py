"""Optional tokenizer losses: a small ViT discriminator (non-saturating GAN) and LPIPS(VGG16) from local weights.

Both are off by default. Nothing is ever downloaded: the perceptual loss reads a local safetensors file and
fails with a clear message when it is missing or incomplete.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TokenizerConfig
from ..models.tokenizer import Block, sincos_3d

__all__ = ["VideoDiscriminator", "d_loss_nonsaturating", "g_loss_nonsaturating", "LPIPS", "PerceptualError"]


# --------------------------------------------------------------------------------------------
# GAN
# --------------------------------------------------------------------------------------------
class VideoDiscriminator(nn.Module):
    """ViT on the tokenizer's (pt, p, p) patches + a CLS token -> one real/fake logit per clip.

    The authors use width 512 and 12 layers on 4x8x8 patches; the default here is small for CPU training.
    """

    def __init__(self, cfg: TokenizerConfig, dim: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        t, h, w = cfg.grid
        k = (cfg.temporal_patch, cfg.patch, cfg.patch)
        self.embed = nn.Conv3d(cfg.in_channels, dim, kernel_size=k, stride=k)
        self.register_buffer("pe", sincos_3d(dim, t, h, w).float()[None], persistent=False)  # (1, P, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, video: Tensor) -> Tensor:
        x = self.embed(video * 2 - 1).flatten(2).transpose(1, 2) + self.pe  # (B, P, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + P, dim)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x[:, 0])).squeeze(-1)  # (B,)


def d_loss_nonsaturating(real_logits: Tensor, fake_logits: Tensor, generator: torch.Generator | None = None,
                         smooth: float = 0.1) -> Tensor:
    """Discriminator BCE with noisy one-sided labels: real targets ~ U(1 - smooth, 1), fake targets 0."""
    real_t = 1.0 - smooth * torch.rand(real_logits.shape, generator=generator, device="cpu").to(real_logits.device)
    return (F.binary_cross_entropy_with_logits(real_logits.float(), real_t)
            + F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits.float())))


def g_loss_nonsaturating(fake_logits: Tensor) -> Tensor:
    """-log D(fake) = softplus(-logit)."""
    return F.softplus(-fake_logits.float()).mean()


# --------------------------------------------------------------------------------------------
# LPIPS (VGG16) from local weights
# --------------------------------------------------------------------------------------------
class PerceptualError(ValueError):
    """The perceptual loss was requested but its local weights are missing or incomplete."""


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # indices (in torchvision's vgg16.features) of relu1_2 .. relu5_3
_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS with a VGG16 trunk, per frame, averaged over frames and pixels.

    Weights file (safetensors): ``features.{i}.{weight,bias}`` with torchvision's ``vgg16().features`` numbering
    and ``lin{k}.weight`` (1, C_k, 1, 1) for k = 0..4 (the ``lpips`` package's ``lin{k}.model.1.weight``).
    Build it once where the weights can be downloaded; see training/README.md.
    """

    def __init__(self, weights: str | Path):
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise PerceptualError(
                f"perceptual loss requested but its weights {str(path)!r} do not exist; nothing is downloaded here. "
                "Create the file as described in training/README.md (VGG16 features + LPIPS linear layers as "
                "safetensors) or train with --perceptual-weight 0"
            )
        from safetensors.torch import load_file

        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in _CHANNELS])
        sd = load_file(str(path))
        want = {f"features.{k}" for k in self.features.state_dict()} | {f"lin{k}.weight" for k in range(5)}
        missing = sorted(want - set(sd))
        if missing:
            raise PerceptualError(f"{str(path)!r} lacks {len(missing)} tensor(s) ({', '.join(missing[:5])}...); "
                                  "see training/README.md for the expected names")
        self.features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
        for k in range(5):
            self.lins[k].data.copy_(sd[f"lin{k}.weight"].reshape(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        x = ((x * 2 - 1) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)
            if i >= _TAPS[-1]:
                break
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        # a, b: (B, 3, T, H, W) in [0, 1] -> scalar mean LPIPS over clips and frames
        fa = self._taps(a.transpose(1, 2).flatten(0, 1))  # frames (B*T, 3, H, W)
        fb = self._taps(b.transpose(1, 2).flatten(0, 1))
        total = 0.0
        for k, (x, y) in enumerate(zip(fa, fb, strict=True)):
            x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((x - y) ** 2 * self.lins[k]).sum(1).mean()
        return total
