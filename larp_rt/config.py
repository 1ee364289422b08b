"""Model configurations: one frozen dataclass per model, named presets, strict construction.

No torch here: the runtime (ONNX Runtime / TensorRT) reads these from a bundle manifest.

    >>> TokenizerConfig.from_name("larp-l").num_tokens
    1024
    >>> GeneratorConfig.from_name("ar-lp", num_classes=10).num_classes
    10

Every constructor path (`from_name`, `from_dict`, direct) validates the values; unknown keys raise
with the list of valid ones (never silently dropped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

__all__ = ["ConfigError", "TokenizerConfig", "PriorConfig", "GeneratorConfig", "find_multiple"]

C = TypeVar("C", bound="_Config")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and what is accepted."""


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


class _Config:
    """Shared behaviour of the config dataclasses (presets, strict dict round trip)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def _check_keys(cls, keys, where: str) -> None:
        valid = cls.field_names()
        unknown = sorted(set(keys) - set(valid))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {unknown} in {where}; valid keys are: {', '.join(valid)}"
            )

    @classmethod
    def from_name(cls: type[C], name: str, **overrides: Any) -> C:
        """Build a named preset, optionally overriding some fields (unknown keys raise)."""
        if name not in cls.PRESETS:
            raise ConfigError(
                f"{cls.__name__}: unknown preset {name!r}; valid presets are: {', '.join(sorted(cls.PRESETS))}"
            )
        cls._check_keys(overrides, "overrides")
        return cls.from_dict({**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        if not isinstance(d, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict expects a mapping, got {type(d).__name__}")
        cls._check_keys(d.keys(), "the given dict")
        return cls(**d)  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: C, **changes: Any) -> C:
        self._check_keys(changes, "replace()")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _positive_ints(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be a positive int, got {v!r}")


def _prob(obj: Any, *names: str, closed_top: bool = False) -> None:
    for n in names:
        v = getattr(obj, n)
        ok = isinstance(v, (int, float)) and 0.0 <= v <= 1.0 and (closed_top or v < 1.0)
        if not ok:
            top = "1]" if closed_top else "1)"
            raise ConfigError(f"{type(obj).__name__}.{n} must be a probability in [0, {top}, got {v!r}")


def _heads(obj: Any, dim_name: str, heads_name: str) -> None:
    dim, heads = getattr(obj, dim_name), getattr(obj, heads_name)
    if dim % heads:
        raise ConfigError(
            f"{type(obj).__name__}.{dim_name}={dim} must be divisible by {heads_name}={heads}"
        )


# --------------------------------------------------------------------------------------------
# AR prior (training-time only): a small GPT in the continuous code space (authors' GPTC).
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PriorConfig(_Config):
    dim: int = 384
    depth: int = 12
    heads: int = 6
    max_seq_len: int = 1024  # = tokenizer num_tokens (positions of the prior's input)
    code_dim: int = 16
    dropout: float = 0.1  # embd / resid / attn dropout (authors: 0.1 each)
    latent_ce_temperature: float = 1.0  # logits = cos(pred, codebook) / this
    n_rounds: int = 2  # scheduled-sampling rounds (1 = teacher forcing only)
    ss_max_ratio: float = 0.5  # r ramps 0 -> ss_max_ratio ...
    ss_peak_steps_ratio: float = 0.3  # ... over this fraction of training
    loss_weight: float = 0.06
    lr_mult: float = 50.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # authors' gptc-* sizes (models/gptc.py); "larp" = gptc-S, the one LARP uses (21.7M)
        "larp": {},
        "gptc-s": {},
        "gptc-xs": {"depth": 6},
        "gptc-xxs": {"dim": 256, "depth": 6, "heads": 4},
        "gptc-m": {"dim": 512, "heads": 8},
        "gptc-b": {"dim": 768, "heads": 12},
        "gptc-l": {"dim": 1024, "depth": 24, "heads": 16},
        "tiny": {"dim": 64, "depth": 2, "heads": 4, "max_seq_len": 64},
    }

    def __post_init__(self) -> None:
        _positive_ints(self, "dim", "depth", "heads", "max_seq_len", "code_dim", "n_rounds")
        _heads(self, "dim", "heads")
        _prob(self, "dropout", "ss_max_ratio")
        if not (0.0 < self.ss_peak_steps_ratio <= 1.0):
            raise ConfigError(f"PriorConfig.ss_peak_steps_ratio must be in (0, 1], got {self.ss_peak_steps_ratio!r}")
        if not self.latent_ce_temperature > 0:
            raise ConfigError(
                f"PriorConfig.latent_ce_temperature must be > 0, got {self.latent_ce_temperature!r}"
            )
        if self.loss_weight < 0 or self.lr_mult <= 0:
            raise ConfigError("PriorConfig.loss_weight must be >= 0 and lr_mult > 0")

    def ss_ratio(self, step: int, max_steps: int) -> float:
        """Scheduled-sampling replacement probability r at ``step``: linear ramp, then flat."""
        if max_steps <= 0:
            raise ValueError(f"max_steps must be > 0, got {max_steps}")
        r = step / (max_steps * self.ss_peak_steps_ratio) * self.ss_max_ratio
        return float(min(max(r, 0.0), self.ss_max_ratio))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerConfig(_Config):
    num_tokens: int = 1024  # N holistic query tokens (authors: bottleneck_token_num)
    frames: int = 16  # T
    height: int = 128  # H
    width: int = 128  # W
    temporal_patch: int = 4
    patch: int = 8
    in_channels: int = 3
    enc_dim: int = 768
    enc_depth: int = 12
    enc_heads: int = 12
    dec_dim: int = 768
    dec_depth: int = 12
    dec_heads: int = 12
    codebook_size: int = 8192
    code_dim: int = 16
    svq_temperature: float = 0.03  # p = softmax(cos / svq_temperature)
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    latent_pe_scale: float = 10000.0  # base of the decoder's 1-D sincos over token positions
    query_init_std: float = 0.02
    prior: PriorConfig | None = field(default=None)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # the authors' sizes (paper Table / cfgs); all 1024 tokens, codebook 8192, code dim 16
        "larp-s": {"enc_dim": 512, "enc_depth": 6, "enc_heads": 8, "dec_dim": 512, "dec_depth": 6, "dec_heads": 8},
        "larp-b": {"enc_dim": 768, "enc_depth": 8, "enc_heads": 12, "dec_dim": 768, "dec_depth": 8, "dec_heads": 12},
        "larp-l": {},
        # CPU benchmarks use the authors' smallest tokenizer
        "small": {"enc_dim": 512, "enc_depth": 6, "enc_heads": 8, "dec_dim": 512, "dec_depth": 6, "dec_heads": 8},
        # trainable on 2 CPU cores: 8x32x32 clips, 2x4x4 patches (4x8x8 = 256 patch tokens), 64 tokens
        "tiny": {
            "num_tokens": 64, "frames": 8, "height": 32, "width": 32, "temporal_patch": 2, "patch": 4,
            "enc_dim": 128, "enc_depth": 2, "enc_heads": 4, "dec_dim": 128, "dec_depth": 2, "dec_heads": 4,
            "codebook_size": 1024,
        },
    }

    def __post_init__(self) -> None:
        if isinstance(self.prior, Mapping):  # from_dict / JSON round trip
            object.__setattr__(self, "prior", PriorConfig.from_dict(self.prior))
        _positive_ints(
            self, "num_tokens", "frames", "height", "width", "temporal_patch", "patch", "in_channels",
            "enc_dim", "enc_depth", "enc_heads", "dec_dim", "dec_depth", "dec_heads", "codebook_size", "code_dim",
        )
        _heads(self, "enc_dim", "enc_heads")
        _heads(self, "dec_dim", "dec_heads")
        for size, p in (("frames", "temporal_patch"), ("height", "patch"), ("width", "patch")):
            if getattr(self, size) % getattr(self, p):
                raise ConfigError(
                    f"TokenizerConfig.{size}={getattr(self, size)} must be divisible by {p}={getattr(self, p)}"
                )
        for d in ("enc_dim", "dec_dim"):
            # the fixed sin-cos embeddings split the width in 2 (h, w) halves of sin/cos pairs
            if getattr(self, d) % 4:
                raise ConfigError(f"TokenizerConfig.{d}={getattr(self, d)} must be divisible by 4 (sin-cos embedding)")
        if not self.svq_temperature > 0:
            raise ConfigError(f"TokenizerConfig.svq_temperature must be > 0, got {self.svq_temperature!r}")
        if self.prior is not None:
            if not isinstance(self.prior, PriorConfig):
                raise ConfigError(f"TokenizerConfig.prior must be a PriorConfig, a dict or None, got {self.prior!r}")
            if self.prior.code_dim != self.code_dim:
                raise ConfigError(
                    f"prior.code_dim={self.prior.code_dim} must equal the tokenizer's code_dim={self.code_dim}"
                )
            if self.prior.max_seq_len < self.num_tokens:
                raise ConfigError(
                    f"prior.max_seq_len={self.prior.max_seq_len} must be >= num_tokens={self.num_tokens}"
                )

    def with_prior(self, prior: PriorConfig | str | None = "larp", **overrides: Any) -> TokenizerConfig:
        """This config with an AR prior (a preset name or a PriorConfig), sized to ``num_tokens``."""
        if prior is None:
            return self.replace(prior=None)
        if isinstance(prior, str):
            sized = {"max_seq_len": self.num_tokens, "code_dim": self.code_dim}
            prior = PriorConfig.from_name(prior, **{**sized, **overrides})
        return self.replace(prior=prior)

    # derived sizes -------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid (t, h, w)."""
        return (self.frames // self.temporal_patch, self.height // self.patch, self.width // self.patch)

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        return self.temporal_patch * self.patch * self.patch * self.in_channels

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video."""
        return (self.in_channels, self.frames, self.height, self.width)


# --------------------------------------------------------------------------------------------
# Class-conditional AR generator (Llama-style, learned absolute positions)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratorConfig(_Config):
    # field names follow the authors' ModelArgs (models/larp_ar.py) where they exist
    dim: int = 1280
    n_layer: int = 30
    n_head: int = 20
    vocab_size: int = 8192
    max_seq_len: int = 1024  # generated tokens per video (= tokenizer num_tokens)
    num_classes: int = 101  # the null class (for CFG) is index num_classes
    cls_token_num: int = 1  # prefix length (1 class token; frame prediction: cond tokens + separator)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    frame_prediction: bool = False  # prefix = video tokens + separator (index vocab_size); no classes/CFG

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "ar-lp": {},  # 632M, the released generator (llama-abs-LP)
        "ar-l": {"dim": 1024, "n_layer": 24, "n_head": 16},  # 326M (llama-abs-L; the paper says 343M)
        "ar-b": {"dim": 768, "n_layer": 12, "n_head": 12},  # llama-abs-B
        "small": {"dim": 512, "n_layer": 8, "n_head": 8},  # CPU benchmark size, ~36M
        "tiny": {"dim": 128, "n_layer": 2, "n_head": 4, "vocab_size": 1024, "max_seq_len": 64, "num_classes": 8},
    }

    def __post_init__(self) -> None:
        _positive_ints(self, "dim", "n_layer", "n_head", "vocab_size", "max_seq_len", "num_classes",
                       "cls_token_num", "multiple_of")
        _heads(self, "dim", "n_head")
        _prob(self, "class_dropout_prob", "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p")
        if not self.norm_eps > 0:
            raise ConfigError(f"GeneratorConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.frame_prediction and self.cls_token_num != 1:
            raise ConfigError("GeneratorConfig.cls_token_num must be 1 for class-conditional generation")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size: round_up(int(2/3 * 4 * dim) [* multiplier], multiple_of) (authors')."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table: prefix + generated tokens - 1 (the last is never fed)."""
        return self.max_seq_len + self.cls_token_num - 1

    @property
    def input_vocab(self) -> int:
        """Rows of tok_embeddings (+1 separator token in frame prediction)."""
        return self.vocab_size + int(self.frame_prediction)
