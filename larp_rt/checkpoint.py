"""Checkpoints: a folder with ``config.json`` + ``model.safetensors`` (never pickle).

Two config.json dialects are read:

* ours: ``{"format": "larp_rt.checkpoint", "format_version": 1, "kind": "tokenizer"|"generator", "config": {...}}``
* the authors' Hugging Face folders (``hywang66/LARP-L-long-tokenizer``, ``...-AR``, ``...-AR-FP``): config.json
  holds the constructor arguments of their ``LARPTokenizer`` / ``LARP_AR`` (``PyTorchModelHubMixin``).

Loading is strict: missing / unexpected keys and shape mismatches are listed in one error. A tokenizer file
may or may not hold the training-only ``prior_model.*`` weights; both load.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, GeneratorConfig, PriorConfig, TokenizerConfig

__all__ = [
    "CheckpointError", "load_pretrained", "save_pretrained", "read_config",
    "tokenizer_config_from_authors", "generator_config_from_authors",
]

log = logging.getLogger(__name__)

FORMAT = "larp_rt.checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
Kind = Literal["tokenizer", "generator"]


class CheckpointError(ValueError):
    """A checkpoint folder is missing, unreadable or does not match its config; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# The authors' config.json -> our configs
# --------------------------------------------------------------------------------------------
# LARPTokenizer.__init__ defaults (hywang66/LARP models/larp_tokenizer.py); a hub config.json may omit them.
_AUTHORS_TOKENIZER_DEFAULTS: dict[str, Any] = {
    "bottleneck_token_num": 1024, "input_size": 128, "frame_num": 16, "temporal_patch_size": 4, "patch_size": 8,
    "decoder_temporal_patch_size": 4, "decoder_patch_size": 8, "in_channels": 3,
    "transformer_name": "transformer_encoder_parallel", "encoder_name": None, "decoder_name": None,
    "latent_pe_scale_factor": 10000, "query_init_std": 0.02, "encoder_hidden_size": 768, "decoder_hidden_size": 768,
    "encoder_num_heads": 12, "decoder_num_heads": 12, "encoder_depth": 6, "decoder_depth": 6,
    "learned_encoder_patch_pe": False, "learned_encoder_latent_query_embed": True, "learned_decoder_latent_pe": False,
    "learned_decoder_patch_query_embed": False, "use_encoder_patch_token_type_embed": False,
    "use_encoder_latent_query_token_type_embed": False, "use_decoder_latent_token_type_embed": False,
    "use_decoder_patch_query_token_type_embed": False, "encoder_query_gaussian_init": True,
}
# the architecture LARP ships (cfgs/larp_tokenizer.yaml); other values build a different network
_AUTHORS_TOKENIZER_REQUIRED: dict[str, Any] = {
    "learned_encoder_patch_pe": False, "learned_encoder_latent_query_embed": True, "learned_decoder_latent_pe": False,
    "learned_decoder_patch_query_embed": False, "use_encoder_patch_token_type_embed": False,
    "use_encoder_latent_query_token_type_embed": False, "use_decoder_latent_token_type_embed": False,
    "use_decoder_patch_query_token_type_embed": True,
}
_GPTC_SIZES = ("gptc-l", "gptc-b", "gptc-m", "gptc-s", "gptc-xs", "gptc-xxs")  # the authors' prior sizes
# LARP_AR ModelArgs defaults (models/larp_ar.py)
_AUTHORS_AR_DEFAULTS: dict[str, Any] = {
    "dim": 4096, "n_layer": 32, "n_head": 32, "n_kv_head": None, "multiple_of": 256, "ffn_dim_multiplier": None,
    "rope_base": 10000, "norm_eps": 1e-5, "initializer_range": 0.02, "token_dropout_p": 0.1, "attn_dropout_p": 0.0,
    "resid_dropout_p": 0.1, "ffn_dropout_p": 0.1, "drop_path_rate": 0.0, "num_classes": 101,
    "class_dropout_prob": 0.1, "model_type": "class_cond", "vocab_size": 8192, "cls_token_num": 1,
    "max_batch_size": 32, "max_seq_len": 1024, "use_fixed_pe": False, "frame_prediction": False,
}


def _unsupported(what: str, value: Any, supported: Any) -> CheckpointError:
    return CheckpointError(
        f"the authors' config sets {what}={value!r}, an architecture larp_rt does not implement "
        f"(supported: {supported!r}); only LARP's released architecture loads"
    )


def _check_unknown(d: Mapping[str, Any], valid: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise CheckpointError(f"unknown key(s) {unknown} in {where}; valid keys are: {', '.join(sorted(valid))}")


def tokenizer_config_from_authors(d: Mapping[str, Any]) -> TokenizerConfig:
    """Their ``LARPTokenizer`` constructor arguments -> TokenizerConfig (prior per their ``prior_model``)."""
    _check_unknown(d, {**_AUTHORS_TOKENIZER_DEFAULTS, "bottleneck": 0, "prior_model": 0}, "the tokenizer config.json")
    if "bottleneck" not in d:
        raise CheckpointError("the authors' tokenizer config.json has no 'bottleneck' entry")
    a = {**_AUTHORS_TOKENIZER_DEFAULTS, **d}
    for key, want in _AUTHORS_TOKENIZER_REQUIRED.items():
        if bool(a[key]) != want:
            raise _unsupported(key, a[key], want)
    for key in ("encoder_name", "decoder_name"):
        name = a[key] if a[key] not in (None, "", "none", "None", "no", "null") else a["transformer_name"]
        if name != "transformer_encoder_parallel":
            raise _unsupported(key, name, "transformer_encoder_parallel")
    if a["temporal_patch_size"] <= 1:
        raise _unsupported("temporal_patch_size", a["temporal_patch_size"], "> 1")
    for enc, dec in (("temporal_patch_size", "decoder_temporal_patch_size"), ("patch_size", "decoder_patch_size")):
        if a[enc] != a[dec]:
            raise _unsupported(dec, a[dec], a[enc])

    bargs = dict(a["bottleneck"].get("args", {}))
    if str(bargs.get("norm") or "none").lower() not in ("none", "no"):
        raise _unsupported("bottleneck.norm", bargs.get("norm"), "none")
    reg = bargs.get("regularizer") or {}
    if str(reg.get("name", "")).lower() != "vq":
        raise _unsupported("bottleneck.regularizer.name", reg.get("name"), "vq")
    rargs = reg.get("args", {})
    if not rargs.get("l2_normalized", False) or not rargs.get("stochastic", False):
        raise _unsupported("bottleneck.regularizer (l2_normalized, stochastic)",
                           (rargs.get("l2_normalized"), rargs.get("stochastic")), (True, True))
    temp = float(rargs.get("stochastic_temperature", 1.0))
    if temp <= 0:
        raise _unsupported("stochastic_temperature", temp, "> 0 (a fixed temperature)")
    if float(rargs.get("entropy_loss_weight", 0.0)) != 0.0:
        warnings.warn("authors' entropy_loss_weight is a training-only option larp_rt does not implement; ignored",
                      stacklevel=3)

    prior = None
    pm = a.get("prior_model") or {}
    pname = str(pm.get("name", "none")).lower()
    if pname not in ("", "none", "no", "null"):
        if pname not in _GPTC_SIZES:
            raise _unsupported("prior_model.name", pm.get("name"), sorted(_GPTC_SIZES))
        pargs = pm.get("args", {})
        dropout = 0.0 if pm.get("no_dropout", False) else float(pargs.get("resid_pdrop", 0.1))
        use_ss = pm.get("use_mix_ss", True)
        ignored = [k for k, good in (("avg_loss_over_rounds", True), ("no_grad_before_last_round", False))
                   if k in pm and bool(pm[k]) != good]
        if not use_ss:
            ignored.append("use_mix_ss=False")
        if ignored:
            warnings.warn(f"authors' prior options {ignored} are training-only variants larp_rt does not implement; "
                          "the prior trains with averaged 2-round scheduled sampling", stacklevel=3)
        prior = PriorConfig.from_name(
            pname,
            max_seq_len=int(pargs.get("max_seq_len", 1024)),
            code_dim=int(bargs["bottleneck_dim"]),
            dropout=dropout,
            latent_ce_temperature=float(pm.get("latent_ce_temperature", 1.0)),
            n_rounds=int(pm.get("n_rounds", 2)),
            ss_max_ratio=float(pm.get("mix_ss_max_ratio", 0.5)),
            ss_peak_steps_ratio=float(pm.get("mix_ss_peak_steps_ratio", 0.3)),
        )
    try:
        return TokenizerConfig(
            num_tokens=int(a["bottleneck_token_num"]), frames=int(a["frame_num"]),
            height=int(a["input_size"]), width=int(a["input_size"]),
            temporal_patch=int(a["temporal_patch_size"]), patch=int(a["patch_size"]), in_channels=int(a["in_channels"]),
            enc_dim=int(a["encoder_hidden_size"]), enc_depth=int(a["encoder_depth"]),
            enc_heads=int(a["encoder_num_heads"]), dec_dim=int(a["decoder_hidden_size"]),
            dec_depth=int(a["decoder_depth"]), dec_heads=int(a["decoder_num_heads"]),
            codebook_size=int(rargs["codebook_size"]), code_dim=int(bargs["bottleneck_dim"]),
            svq_temperature=temp, commitment_weight=float(rargs.get("commitment_loss_weight", 0.25)),
            codebook_weight=float(rargs.get("codebook_loss_weight", 1.0)),
            latent_pe_scale=float(a["latent_pe_scale_factor"]), query_init_std=float(a["query_init_std"]),
            prior=prior,
        )
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"the authors' tokenizer config.json is invalid: {e}") from e


def generator_config_from_authors(d: Mapping[str, Any]) -> GeneratorConfig:
    """Their ``LARP_AR`` ``ModelArgs`` (flat, or nested under "config") -> GeneratorConfig."""
    if "config" in d and isinstance(d["config"], Mapping):
        d = d["config"]
    _check_unknown(d, _AUTHORS_AR_DEFAULTS, "the generator config.json")
    a = {**_AUTHORS_AR_DEFAULTS, **d}
    if a["n_kv_head"] not in (None, a["n_head"]):
        raise _unsupported("n_kv_head", a["n_kv_head"], f"None or n_head={a['n_head']}")
    if a["model_type"] != "class_cond":
        raise _unsupported("model_type", a["model_type"], "class_cond")
    if a["use_fixed_pe"]:
        warnings.warn("use_fixed_pe=True: the fixed position table loads from the weights but larp_rt treats it "
                      "as learned when training", stacklevel=3)
    if float(a["drop_path_rate"]) > 0:
        warnings.warn("drop_path_rate is a training-only option larp_rt does not implement; ignored", stacklevel=3)
    keep = set(GeneratorConfig.field_names())
    try:
        return GeneratorConfig.from_dict({k: v for k, v in a.items() if k in keep})
    except ConfigError as e:
        raise CheckpointError(f"the authors' generator config.json is invalid: {e}") from e


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def require_torch(what: str):
    """Import torch for a PyTorch-only path, or say how to get it."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{what} needs PyTorch, which is not installed: pip install 'larp_rt[torch]' (the ONNX Runtime "
            "engine does not need it)"
        ) from e
    return torch


def _as_dir(path: str | os.PathLike, revision: str | None = None) -> Path:
    from .hub import resolve_checkpoint

    p = resolve_checkpoint(path, revision=revision)  # a hub repo id (owner/name) -> its cached snapshot
    if not p.is_dir():
        raise CheckpointError(
            f"checkpoint folder {str(p)!r} does not exist or is not a directory; expected a folder with "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    return p


def read_config(path: str | os.PathLike, *, revision: str | None = None,
                ) -> tuple[Kind, TokenizerConfig | GeneratorConfig, str]:
    """(kind, config, dialect) of a checkpoint folder (or hub repo id); dialect is "larp_rt" or "authors"."""
    p = _as_dir(path, revision) / CONFIG_FILE
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{str(p)!r} is missing: a checkpoint folder needs {CONFIG_FILE} + {WEIGHTS_FILE}"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(p)!r} is not valid JSON ({e}); re-save the checkpoint") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{str(p)!r} must hold a JSON object, got {type(d).__name__}")
    if d.get("format") == FORMAT:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{str(p)!r} has checkpoint format_version {version!r}; this larp_rt reads version {FORMAT_VERSION}: "
                "upgrade larp_rt or re-save the checkpoint"
            )
        kind = d.get("kind")
        cls = {"tokenizer": TokenizerConfig, "generator": GeneratorConfig}.get(kind)
        if cls is None:
            raise CheckpointError(f"{str(p)!r}: kind must be 'tokenizer' or 'generator', got {kind!r}")
        try:
            return kind, cls.from_dict(d.get("config", {})), "larp_rt"
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{str(p)!r} holds an invalid {kind} config: {e}") from e
    if "bottleneck" in d:
        return "tokenizer", tokenizer_config_from_authors(d), "authors"
    if "n_layer" in d or ("config" in d and isinstance(d["config"], dict) and "n_layer" in d["config"]):
        return "generator", generator_config_from_authors(d), "authors"
    raise CheckpointError(
        f"{str(p)!r} is neither a larp_rt checkpoint config (\"format\": \"{FORMAT}\") nor one of the authors' "
        "LARP configs (a tokenizer's has 'bottleneck', a generator's has 'n_layer')"
    )


def _read_weights(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = folder / WEIGHTS_FILE
    if not f.is_file():
        pickles = [n for n in ("pytorch_model.bin", "model.pt", "model.pth") if (folder / n).exists()]
        hint = ""
        if pickles:
            hint = (f" ({pickles[0]} is a pickle, which larp_rt never loads: convert it to safetensors with "
                    "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors'))")
        raise CheckpointError(f"{str(f)!r} is missing{hint}")
    try:
        return load_file(str(f), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(f)!r} is not a readable safetensors file ({e}); re-download or re-save it") from e


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(expected: Mapping[str, Any], got: Mapping[str, Any], where: str) -> None:
    """Raise CheckpointError listing missing / unexpected keys and shape mismatches (strict loading)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(got)
        if tuple(got[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes)}")
        raise CheckpointError(
            f"{where}: the weights do not match the config: " + "; ".join(parts)
            + ". The config.json and model.safetensors disagree: use the config the weights were trained with."
        )


def load_pretrained(
    path: str | os.PathLike,
    *,
    kind: Kind | None = None,
    with_prior: bool | None = None,
    device: Any = "cpu",
    dtype: Any = None,
    revision: str | None = None,
):
    """Load a tokenizer or generator (ours or the authors' hub folder) strictly into a PyTorch module in eval mode.

    with_prior: for tokenizers, None loads the AR prior iff the file holds ``prior_model.*``; False drops it;
    True requires it. device/dtype: where and in which dtype to place the weights (default: as stored, fp32).
    ``path`` may also be a Hugging Face hub repo id (``hywang66/LARP-L-long-AR-FP``), resolved through the hub's
    cache (``HF_HUB_OFFLINE`` respected) at ``revision`` (see ``larp_rt.hub``).
    """
    torch = require_torch("load_pretrained")
    from .models import build_model

    folder = _as_dir(path, revision)
    found_kind, cfg, dialect = read_config(folder)
    if kind is not None and kind != found_kind:
        raise CheckpointError(f"{str(folder)!r} holds a {found_kind} checkpoint, not a {kind}")
    sd = _read_weights(folder)

    if found_kind == "tokenizer":
        has_prior = any(k.startswith("prior_model.") for k in sd)
        if with_prior is True and not has_prior:
            raise CheckpointError(f"{str(folder)!r}: with_prior=True but the weights hold no prior_model.* tensors")
        if with_prior is False or not has_prior:
            sd = {k: v for k, v in sd.items() if not k.startswith("prior_model.")}
            cfg = cfg.replace(prior=None)
        elif cfg.prior is None:
            # ours never writes prior weights without a prior config; the authors' may name one with prior 'none'
            raise CheckpointError(f"{str(folder)!r}: the weights hold prior_model.* but the config has no prior; "
                                  "load with with_prior=False or add the prior to config.json")

    with torch.device("meta"):
        model = build_model(cfg)
    check_state_dict(model.state_dict(), sd, str(folder))
    model.load_state_dict(sd, strict=True, assign=True)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    log.info("loaded %s %s (%s config) from %s", found_kind, type(model).__name__, dialect, folder)
    return model.eval()


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def config_json(kind: Kind, cfg: TokenizerConfig | GeneratorConfig, extra: Mapping[str, Any] | None = None) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "config": cfg.to_dict(), **(extra or {})}


def save_pretrained(model, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a LARPTokenizer or LARPGenerator.

    Files are written to a temporary folder beside the target and moved in place, so a failure never
    leaves a half-written checkpoint. ``extra`` adds JSON-serialisable metadata to config.json.
    """
    from safetensors.torch import save_file

    from .models import LARPGenerator, LARPTokenizer

    if isinstance(model, LARPTokenizer):
        kind: Kind = "tokenizer"
    elif isinstance(model, LARPGenerator):
        kind = "generator"
    else:
        raise TypeError(f"save_pretrained expects a LARPTokenizer or LARPGenerator, got {type(model).__name__}")
    if extra and set(extra) & {"format", "format_version", "kind", "config"}:
        raise ValueError("extra metadata may not override format, format_version, kind or config")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    cfg_text = json.dumps(config_json(kind, model.config, extra), indent=2, sort_keys=False)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt", "larp_rt_kind": kind})
        Path(tmp, CONFIG_FILE).write_text(cfg_text + "\n")
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # temp files are private; checkpoints are ordinary files
            os.chmod(os.path.join(tmp, name), 0o644)
        os.replace(os.path.join(tmp, WEIGHTS_FILE), out / WEIGHTS_FILE)
        os.replace(os.path.join(tmp, CONFIG_FILE), out / CONFIG_FILE)
    return out
