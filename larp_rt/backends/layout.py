"""Where rows, positions and cache slots sit: the one implementation every backend uses.

Row layout. A batch's rows are its requests' rows and, for each request that uses guidance (cfg_scale != 1), a
null-class row. ``RowLayout`` holds the row of each request and its null row (-1 when unguided); a batch that
starts together (``Engine.generate``) puts request i on row i and the null rows after the B request rows, in
request order (``RowLayout.offline``). The sampler reads the requests' rows, then, when any request is guided,
one "uncond" row per request: its null row, or its own row again (cfg_scale 1 mixes to exactly the cond logits).

Positions. Step 0 is the prefill (a class-conditional generator's class token at position 0; a frame-prediction
prefix of P tokens at positions 0 .. P-1, in one run); step k >= 1 feeds the token of step k - 1 at position
``prefix_len - 1 + k`` (``step_position``), prefix_len being the generator's ``cls_token_num``.

Cache slots. The generator's cache holds ``cache_slots(num_positions)`` slots per row (a multiple of 8: the
bundle's ``kv_cache.max_seq``). Runners whose attention reads every bound slot bind the cache in windows: the
smallest multiple of ``cache_window(S)`` above the longest row's position (``window_width``), grown when a row
passes it and halved when the longest row left (``rebind_width``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import find_multiple

__all__ = ["RowLayout", "step_position", "cache_slots", "cache_window", "window_width", "rebind_width"]


@dataclass(frozen=True)
class RowLayout:
    """Request i sits on row ``rows[i]``; its null-class row is ``null_rows[i]`` (-1: unguided)."""

    rows: np.ndarray  # (B,) int64
    null_rows: np.ndarray  # (B,) int64, -1 where the request is unguided

    @classmethod
    def offline(cls, guided: np.ndarray) -> RowLayout:
        """Every request from step 0: request i on row i, the null rows of the guided ones on rows B, B + 1, ...
        in request order. ``guided`` (B,) bool (``params.cfg_scale != 1``)."""
        guided = np.asarray(guided, bool)
        B = len(guided)
        null = np.full(B, -1, np.int64)
        g = np.flatnonzero(guided)
        null[g] = B + np.arange(len(g))
        return cls(np.arange(B, dtype=np.int64), null)

    @property
    def guided(self) -> np.ndarray:
        """(B,) bool: the requests with a null row."""
        return self.null_rows >= 0

    @property
    def any_guided(self) -> bool:
        return bool((self.null_rows >= 0).any())

    @property
    def num_rows(self) -> int:
        """Rows the batch needs: one past the highest used row."""
        hi = int(self.rows.max()) if len(self.rows) else -1
        return max(hi, int(self.null_rows.max()) if len(self.null_rows) else -1) + 1

    @property
    def uncond_rows(self) -> np.ndarray:
        """(B,) the row each request's uncond logits come from: its null row, or its own row when unguided."""
        return np.where(self.null_rows >= 0, self.null_rows, self.rows)

    def sample_rows(self, idx: np.ndarray | None = None) -> np.ndarray:
        """The rows the sampler reads for requests ``idx`` (all by default): their rows, then, when any request
        of the batch is guided, their uncond rows ((2 B,) then, else (B,))."""
        rows, uncond = (self.rows, self.uncond_rows) if idx is None else (self.rows[idx], self.uncond_rows[idx])
        return np.concatenate([rows, uncond]) if self.any_guided else rows

    def row_request(self, capacity: int) -> np.ndarray:
        """(capacity,) int64: the request each row serves (its own row or its null row), -1 for idle rows."""
        out = np.full(capacity, -1, np.int64)
        req = np.arange(len(self.rows), dtype=np.int64)
        out[self.rows] = req
        out[self.null_rows[self.guided]] = req[self.guided]
        return out

    def row_values(self, values: np.ndarray, null_value: int, capacity: int, idle: int = 0) -> np.ndarray:
        """(capacity,) int64: ``values[i]`` on request i's row, ``null_value`` on every null row, ``idle`` on the
        rest (e.g. the prefill tokens: ``vocab + class id`` and ``vocab + null_class``)."""
        out = np.full(capacity, idle, np.int64)
        out[self.rows] = values
        out[self.null_rows[self.guided]] = null_value
        return out


def step_position(step, prefix_len: int):
    """The position step ``step`` feeds (an int, or an array of per-row steps): 0 for step 0 (the prefill's first
    position), ``prefix_len - 1 + step`` for step >= 1 (the token of step - 1, after the prefix)."""
    if isinstance(step, (int, np.integer)):
        return 0 if step == 0 else prefix_len - 1 + int(step)
    k = np.asarray(step, np.int64)
    p = prefix_len - 1 + k
    return p if k.all() else np.where(k == 0, 0, p)


def cache_slots(num_positions: int) -> int:
    """Cache slots per row for ``num_positions`` positions: the next multiple of 8 (the bundle's max_seq)."""
    return find_multiple(num_positions, 8)


def cache_window(slots: int) -> int:
    """The granularity of a windowed cache binding over ``slots`` slots: an eighth of them, at least 16."""
    return max(16, slots // 8)


def window_width(top: int, window: int, slots: int) -> int:
    """Slots to bind for a step whose highest position is ``top``: the smallest multiple of ``window`` above it,
    at most ``slots``."""
    return min(slots, -(-(top + 1) // window) * window)


def rebind_width(top: int, window: int, slots: int, width: int) -> int | None:
    """The new bound width for a step whose highest position is ``top`` when the bound ``width`` must change
    (too narrow, or twice what is needed after the longest row left), else None."""
    need = window_width(top, window, slots)
    return need if need > width or need <= width // 2 else None
