"""The small interface every backend implements, and the generation loop most of them share.

A backend runs three computations of a bundle: ``encode`` (video -> indices), ``decode`` (indices -> video)
and the generator's cached step. ``Backend.generate`` owns the loop: it builds the rows (the requests' class
tokens, then one null-class row for each request that uses guidance), prefills, and for every position runs
one step and draws with the sampler. Backends that keep tokens on a device override ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .. import sampling
from ..config import GeneratorConfig, TokenizerConfig
from ..sampling import RowParams

__all__ = ["Backend", "CfgRows", "StepEvent", "NON_FINITE"]

Sampler = Callable[..., np.ndarray]
# raised when a device sampler marked a row whose logits were NaN/Inf (token -1)
NON_FINITE = "logits contain NaN/Inf: the model produced non-finite values; check the weights and the precision"


@dataclass(frozen=True)
class StepEvent:
    """One generation step: ``tokens`` (B,) were drawn for position ``step`` of ``total``."""

    step: int
    total: int
    tokens: np.ndarray


@dataclass(frozen=True)
class CfgRows:
    """Row layout of a guided batch: rows [0, B) are the requests, rows B.. the null rows of ``guided``."""

    class_ids: np.ndarray  # (R,) int64 prefill ids: the requests' classes, then null classes
    guided: np.ndarray  # (G,) indices of the requests that use CFG, in row order after B

    @staticmethod
    def build(class_ids: np.ndarray, params: RowParams, null_class: int) -> CfgRows:
        guided = np.flatnonzero(params.cfg_scale != 1.0)
        ids = np.concatenate([class_ids, np.full(len(guided), null_class, np.int64)])
        return CfgRows(ids.astype(np.int64), guided)

    @property
    def rows(self) -> int:
        return len(self.class_ids)

    def split(self, logits: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(R, V) -> cond (B, V) and uncond (B, V) (cond itself in rows without guidance), or None."""
        cond = logits[:batch]
        if not len(self.guided):
            return cond, None
        uncond = cond.copy()
        uncond[self.guided] = logits[batch:]
        return cond, uncond


class Backend:
    """Base class: subclasses implement encode/decode and ``_begin`` / ``_step`` (or override generate)."""

    name = "base"

    def __init__(self, tokenizer_config: TokenizerConfig | None, generator_config: GeneratorConfig | None):
        self.tokenizer_config = tokenizer_config
        self.generator_config = generator_config
        self.sampler: Sampler = sampling.sample  # the engine may swap in a fused kernel with the same semantics
        self.sampler_takes_uniform = True  # the sampler accepts u= (the whole video's uniforms drawn at once)
        self.sampler_name = "reference"

    # tokenizer -------------------------------------------------------------------------------
    def encode(self, video: np.ndarray) -> np.ndarray:
        """(B, C, T, H, W) float32 in [0, 1] -> (B, N) int64."""
        raise NotImplementedError

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """(B, N) int64 -> (B, C, T, H, W) float32 in [0, 1]."""
        raise NotImplementedError

    # generator -------------------------------------------------------------------------------
    def _begin(self, class_ids: np.ndarray) -> np.ndarray:
        """Allocate/reuse caches for len(class_ids) rows, run the prefill; return (R, V) float32 logits."""
        raise NotImplementedError

    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """One cached step for all rows: tokens (R,) int64 at position ``pos`` -> (R, V) float32 logits."""
        raise NotImplementedError

    def generate_iter(self, class_ids: np.ndarray, params: RowParams) -> Iterator[StepEvent]:
        cfg = self.generator_config
        assert cfg is not None
        B, N = len(class_ids), cfg.max_seq_len
        layout = CfgRows.build(class_ids, params, cfg.null_class)
        # the reference sampler takes the whole video's uniforms, drawn once; a fused kernel draws its own
        table = sampling.uniform_table(params, N) if self.sampler_takes_uniform else None
        logits = self._begin(layout.class_ids)
        rows_tokens = np.empty(layout.rows, np.int64)
        for k in range(N):
            if k:
                logits = self._step(rows_tokens, cfg.cls_token_num + k - 1)
            cond, uncond = layout.split(logits, B)
            if table is not None:
                tokens = self.sampler(cond, uncond, params, k, u=table[:, k])
            else:
                tokens = self.sampler(cond, uncond, params, k)
            rows_tokens[:B] = tokens
            rows_tokens[B:] = tokens[layout.guided]
            yield StepEvent(k, N, tokens)

    def close(self) -> None:
        """Release sessions and buffers."""
