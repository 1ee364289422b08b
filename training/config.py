"""Training configurations: strict dataclasses (unknown keys raise), JSON round trip, CLI flags derived from fields.

No torch here: ``larp-rt train --help`` builds its flags from these classes without importing torch.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from ..config import ConfigError

__all__ = ["TokenizerTrainConfig", "GeneratorTrainConfig", "ClassifierTrainConfig", "DataOptions", "load_config"]


@dataclass(frozen=True)
class _TrainConfig:
    HELP: ClassVar[dict[str, str]] = {}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        if not isinstance(d, Mapping):
            raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys are: "
                              f"{', '.join(cls.field_names())}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"{type(self).__name__}: unknown key(s) {unknown}; valid keys are: "
                              f"{', '.join(self.field_names())}")
        return dataclasses.replace(self, **changes)

    def _check(self) -> None:
        for name in ("steps", "batch_size", "log_every", "seed_data_size"):
            if hasattr(self, name):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ConfigError(f"{type(self).__name__}.{name} must be a positive int, got {v!r}")
        for name in ("lr",):
            if hasattr(self, name) and not getattr(self, name) > 0:
                raise ConfigError(f"{type(self).__name__}.{name} must be > 0, got {getattr(self, name)!r}")
        if hasattr(self, "warmup_steps") and not 0 <= self.warmup_steps:
            raise ConfigError(f"{type(self).__name__}.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if hasattr(self, "min_lr_ratio") and not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{type(self).__name__}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if hasattr(self, "ckpt_every") and self.ckpt_every < 0:
            raise ConfigError(f"{type(self).__name__}.ckpt_every must be >= 0 (0 = only at the end)")
        if hasattr(self, "precision") and self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"{type(self).__name__}.precision must be auto, fp32, bf16 or fp16, "
                              f"got {self.precision!r}")
        if hasattr(self, "betas") and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"{type(self).__name__}.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass(frozen=True)
class DataOptions(_TrainConfig):
    """Where clips come from (shared by the trainers and the evaluation)."""

    data: str = "synthetic"  # "synthetic" or "folder"
    data_root: str | None = None  # folder: root/<class>/<video>
    data_csv: str | None = None  # folder: CSV of path,label (instead of data_root)
    num_classes: int = 8  # synthetic classes
    data_seed: int = 0  # synthetic: clip i of the training set = f(data_seed, i); held-out clips use data_seed + 1
    train_size: int = 100_000  # synthetic training clips (indices); ignored for folders
    val_size: int = 256  # held-out clips used for validation metrics
    val_fraction: float = 0.05  # folder: fraction of videos held out (deterministic by data_seed)
    num_workers: int = 0  # DataLoader workers

    def check_data(self) -> None:
        if self.data not in ("synthetic", "folder"):
            raise ConfigError(f"data must be 'synthetic' or 'folder', got {self.data!r}")
        if self.data == "folder" and (self.data_root is None) == (self.data_csv is None):
            raise ConfigError("data='folder' needs exactly one of data_root (root/<class>/<video>) or data_csv "
                              "(path,label lines)")
        if self.data == "folder":
            p = Path(self.data_root if self.data_root is not None else self.data_csv)
            if not p.exists():
                raise ConfigError(f"data path {str(p)!r} does not exist; pass --data-root DIR (UCF101 layout) or "
                                  "--data-csv FILE")
        for name in ("num_classes", "train_size", "val_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class TokenizerTrainConfig(DataOptions):
    """Tokenizer training: L1 + 0.1 VQ + prior (PriorConfig.loss_weight) [+ GAN] [+ perceptual]."""

    model: str = "tiny"  # TokenizerConfig preset
    model_overrides: dict = field(default_factory=dict)  # e.g. {"num_tokens": 64}
    prior: str | None = "tiny"  # PriorConfig preset, or None for no prior
    prior_overrides: dict = field(default_factory=dict)  # e.g. {"lr_mult": 10}
    steps: int = 2000
    batch_size: int = 32  # global (split across processes)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)  # authors: (0.5, 0.9) with the GAN
    grad_clip: float = 1.0  # 0 = off
    bottleneck_init: bool = True  # data-dependent init of in/out_linear on the first batch (see train_tokenizer)
    code_gain: float = 3.0  # std of out_linear weights after bottleneck_init (codes vs the fixed position embedding)
    patch_embed_gain: float = 5.0  # x_embedder weights x this at init (video content vs the fixed position embedding)
    residual_gain: float = 4.0  # attn.proj / mlp.fc2 weights of every encoder/decoder block x this at init
    quantizer_warmup: int = 0  # first steps decode the continuous latents (no SVQ / prior); then codebook <- latents
    l1_weight: float = 1.0
    vq_weight: float = 0.1
    gan_weight: float = 0.0  # authors: 0.3; 0 = off
    gan_start: int = 0  # step at which the GAN loss starts
    disc_every: int = 5  # discriminator update every n-th step (authors: 5)
    disc_dim: int = 128
    disc_depth: int = 2
    disc_heads: int = 4
    perceptual_weight: float = 0.0  # LPIPS(VGG16); needs perceptual_weights
    perceptual_weights: str | None = None  # local safetensors with VGG16 + LPIPS linear layers
    precision: str = "auto"  # auto = bf16 (or fp16) autocast on CUDA, fp32 on CPU
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500  # 0 = only at the end
    keep_resume: bool = True  # keep resume states after finishing

    def __post_init__(self) -> None:
        self._check()
        self.check_data()
        if self.gan_weight < 0 or self.perceptual_weight < 0 or self.l1_weight < 0 or self.vq_weight < 0:
            raise ConfigError("loss weights must be >= 0")
        if not 0 <= self.quantizer_warmup < self.steps:
            raise ConfigError(f"quantizer_warmup must be in [0, steps), got {self.quantizer_warmup!r}")
        if self.disc_every <= 0:
            raise ConfigError(f"disc_every must be a positive int, got {self.disc_every!r}")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ConfigError(
                "perceptual_weight > 0 needs perceptual_weights: a local safetensors file with VGG16 features and "
                "LPIPS linear layers (nothing is downloaded); see training/README.md, or set perceptual_weight 0"
            )
        if not isinstance(self.model_overrides, dict) or not isinstance(self.prior_overrides, dict):
            raise ConfigError("model_overrides and prior_overrides must be JSON objects")


@dataclass(frozen=True)
class GeneratorTrainConfig(DataOptions):
    """Generator training on token sequences extracted once with the deterministic tokenizer."""

    tokenizer: str = ""  # tokenizer checkpoint folder (required)
    model: str = "tiny"  # GeneratorConfig preset; vocab/sequence/classes are taken from the tokenizer and data
    model_overrides: dict = field(default_factory=dict)
    token_clips: int = 20_000  # training clips to tokenize (synthetic; folders: every video once)
    token_cache: str | None = None  # .npz cache (default: <out>/tokens.npz)
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_resume: bool = True
    val_every: int = 0  # validation loss every n steps (0 = only at the end)

    def __post_init__(self) -> None:
        self._check()
        self.check_data()
        if not self.tokenizer:
            raise ConfigError("tokenizer: give the tokenizer checkpoint folder (--tokenizer DIR)")
        if self.token_clips <= 0:
            raise ConfigError(f"token_clips must be a positive int, got {self.token_clips!r}")


@dataclass(frozen=True)
class ClassifierTrainConfig(DataOptions):
    """The small 3-D conv classifier that scores generated synthetic clips."""

    frames: int = 8
    height: int = 32
    width: int = 32
    width_mult: int = 32  # channels of the first conv
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        self._check()
        self.check_data()


def load_config(cls, path: str | Path | None, overrides: Mapping[str, Any]):
    """A config from an optional JSON file plus explicit overrides (both strict)."""
    base: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            base = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid JSON: {e}") from e
        if isinstance(base, dict) and "training" in base and isinstance(base["training"], dict):
            base = base["training"]  # a checkpoint's config.json
    try:
        return cls.from_dict({**base, **dict(overrides)})
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def field_types(cls) -> dict[str, Any]:
    """Resolved field annotations (for CLI flag parsing)."""
    return typing.get_type_hints(cls)
