"""Input checks shared by every entry point: ``Engine``, the serving scheduler, the HTTP app and the CLI.

Each check takes the user's value and the config it must fit, and returns a clean array (the dtype and layout
the backends take) or raises a ValueError whose message names the argument, what was expected and what came.
The Engine's ``check_*`` methods are these functions over its bundle's configs. Torch-free: a tensor argument is
converted through its ``.detach().cpu().numpy()`` without importing torch.

Sampling parameters: ``SamplingParams.validate`` / ``resolve_params`` check a request's values and
``check_row_params`` the per-row arrays a sampler gets (``larp_rt.sampling``; one rule per parameter serves both).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .config import GeneratorConfig, TokenizerConfig
from .sampling import SamplingParams, check_row_params, resolve_params

__all__ = ["as_array", "check_video", "check_tokens", "check_class_ids", "check_frames", "check_prefix", "check_seed",
           "check_num_cond_frames", "check_request_args", "check_row_params", "resolve_params"]


def as_array(x, name: str) -> np.ndarray:
    """``x`` as a numpy array (a torch tensor through numpy, without importing torch); ValueError naming ``name``."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from e


def _check_unit_range(x: np.ndarray, what: str) -> None:
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"{what} values must be finite and in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def check_video(video, cfg: TokenizerConfig) -> np.ndarray:
    """A video for the encoder: (B, C, T, H, W) float in [0, 1], or uint8 frames (B, T, H, W, C) -> (B, C, T, H, W)
    float32 in [0, 1], C-contiguous."""
    C, T, H, W = cfg.video_shape
    x = as_array(video, "video")
    if x.dtype == np.uint8:
        if x.ndim != 5 or x.shape[1:] != (T, H, W, C) or x.shape[0] == 0:
            raise ValueError(f"uint8 video must have shape (B, {T}, {H}, {W}, {C}) (frames, channels last), "
                             f"got {x.shape}; use larp_rt.video.fit_clip to resize/crop")
        return np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3), dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"video must be float in [0, 1] (B, {C}, {T}, {H}, {W}) or uint8 (B, {T}, {H}, {W}, {C}), "
                         f"got dtype {x.dtype}")
    if x.ndim != 5 or x.shape[1:] != (C, T, H, W) or x.shape[0] == 0:
        raise ValueError(f"float video must have shape (B, {C}, {T}, {H}, {W}) (channels first), got {x.shape}; "
                         "add a batch axis with video[None] or resize with larp_rt.video.fit_clip")
    x = np.ascontiguousarray(x, dtype=np.float32)
    _check_unit_range(x, "video")
    return x


def check_tokens(tokens, cfg: TokenizerConfig) -> np.ndarray:
    """Tokens for the decoder / the prior: (B, N) integers in [0, codebook) -> int64, C-contiguous."""
    x = as_array(tokens, "tokens")
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[1] != cfg.num_tokens or x.shape[0] == 0:
        raise ValueError(f"tokens must have shape (B, {cfg.num_tokens}), got {x.shape}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= cfg.codebook_size:
        raise ValueError(f"tokens must be in [0, {cfg.codebook_size - 1}] (the codebook), got [{lo}, {hi}]")
    return np.ascontiguousarray(x, dtype=np.int64)


def check_class_ids(class_ids, cfg: GeneratorConfig, *, where: str = "this bundle") -> np.ndarray:
    """Class ids for a class-conditional generator: an int or a non-empty 1-D sequence of ints in
    [0, num_classes) -> (B,) int64. ``where`` names the bundle in the message for a frame-prediction generator."""
    if cfg.frame_prediction:
        raise ValueError(f"{where} holds a frame-prediction generator: it has no classes; "
                         "predict from conditioning frames with Engine.predict (`larp-rt predict`)")
    ids = as_array(class_ids, "class_ids")
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.ndim != 1 or ids.size == 0 or not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
        raise ValueError(f"class_ids must be a non-empty 1-D sequence of ints, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    bad = ids[(ids < 0) | (ids >= cfg.num_classes)]
    if bad.size:
        raise ValueError(f"class_ids must be in [0, {cfg.num_classes - 1}] ({cfg.num_classes} classes), "
                         f"got {bad.tolist()}")
    return ids


def check_num_cond_frames(num_cond_frames, cfg: TokenizerConfig) -> int:
    """Frame prediction's conditioning length: an int in [1, T]."""
    T = cfg.video_shape[1]
    if isinstance(num_cond_frames, bool) or not isinstance(num_cond_frames, (int, np.integer)) or \
            not 1 <= num_cond_frames <= T:
        raise ValueError(f"num_cond_frames must be an int in [1, {T}] (the tokenizer's {T} frames), "
                         f"got {num_cond_frames!r}")
    return int(num_cond_frames)


def _frame_count(x: np.ndarray, cfg: TokenizerConfig) -> int:
    """The t of conditioning frames uint8 (B, t, H, W, C) or float (B, C, t, H, W), their shape checked."""
    C, _, H, W = cfg.video_shape
    if x.dtype == np.uint8:
        if x.ndim != 5 or x.shape[0] == 0 or x.shape[2:] != (H, W, C):
            raise ValueError(f"uint8 frames must have shape (B, t, {H}, {W}, {C}) (channels last), got {x.shape}; "
                             "use larp_rt.video.fit_clip to resize/crop")
        return x.shape[1]
    if np.issubdtype(x.dtype, np.floating):
        if x.ndim != 5 or x.shape[0] == 0 or x.shape[1] != C or x.shape[3:] != (H, W):
            raise ValueError(f"float frames must have shape (B, {C}, t, {H}, {W}) (channels first), got {x.shape}; "
                             "add a batch axis with frames[None] or resize with larp_rt.video.fit_clip")
        return x.shape[2]
    raise ValueError(f"frames must be uint8 (B, t, {H}, {W}, {C}) or float in [0, 1] (B, {C}, t, {H}, {W}), "
                     f"got dtype {x.dtype}")


def check_frames(frames, num_cond_frames: int, cfg: TokenizerConfig) -> np.ndarray:
    """Conditioning frames -> the padded clip (B, C, T, H, W) float32 in [0, 1] the encoder takes: the first
    ``num_cond_frames`` frames, the last of them repeated up to the tokenizer's T (the authors' recipe).
    ``frames``: uint8 (B, t, H, W, C) or float in [0, 1] (B, C, t, H, W) with t >= num_cond_frames."""
    T = cfg.video_shape[1]
    n = check_num_cond_frames(num_cond_frames, cfg)
    x = as_array(frames, "frames")
    t = _frame_count(x, cfg)
    if t < n:
        raise ValueError(f"frames hold {t} frame(s); prediction is conditioned on the first num_cond_frames={n}: "
                         f"give at least {n} frames (or lower num_cond_frames)")
    if x.dtype == np.uint8:
        cond = x[:, :n].transpose(0, 4, 1, 2, 3).astype(np.float32) / np.float32(255.0)
    else:
        cond = np.asarray(x[:, :, :n], np.float32)
        _check_unit_range(cond, "frame")
    pad = np.repeat(cond[:, :, n - 1:n], T - n, axis=2)  # the last conditioning frame, repeated
    return np.ascontiguousarray(np.concatenate([cond, pad], axis=2))


def check_prefix(prefix_tokens, cfg: TokenizerConfig) -> np.ndarray:
    """A prior prefix: (B, P) ints in [0, codebook) with 1 <= P <= N -> int64, C-contiguous."""
    N, K = cfg.num_tokens, cfg.codebook_size
    x = as_array(prefix_tokens, "prefix_tokens")
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"prefix_tokens must be integers, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"prefix_tokens must have shape (B, P) with B >= 1 (a row per video; add a batch axis "
                         f"with tokens[None]), got {x.shape}")
    if x.shape[1] == 0:
        raise ValueError("prefix_tokens is empty: the prior continues a prefix of at least 1 token per row "
                         "(token 0 is never predicted)")
    if x.shape[1] > N:
        raise ValueError(f"prefix_tokens has {x.shape[1]} tokens per row, more than the tokenizer's N = {N}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"prefix_tokens must be in [0, {K - 1}] (the codebook), got [{lo}, {hi}]")
    return np.ascontiguousarray(x, dtype=np.int64)


def check_seed(seed) -> int | None:
    """A seed of a numpy draw (the stochastic SVQ's): None or a non-negative int."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return seed


def check_request_args(params, stream, timeout, on_step: Callable | None) -> None:
    """A served request's arguments beside its input (the scheduler's ``submit`` / ``submit_predict``): params a
    SamplingParams or None, stream an int in [0, 2**64), timeout positive seconds or None, on_step callable."""
    if params is not None and not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams or None, got {type(params).__name__}")
    if isinstance(stream, bool) or not isinstance(stream, (int, np.integer)) or not 0 <= stream < 2**64:
        raise ValueError(f"stream must be an int in [0, 2**64), got {stream!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    if on_step is not None and not callable(on_step):
        raise ValueError("on_step must be callable or None")
