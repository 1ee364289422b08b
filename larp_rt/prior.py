"""The tokenizer's AR prior loops over a backend's prior step (``Backend.prior_runner``): scoring a sequence step by
step and continuing a prefix. ``Engine.prior_logprobs`` / ``prior_generate`` check the arguments and call these.

Token t is fed at position t (the prior has no prefix positions of its own: a given prefix is fed token by token,
its steps only fill the cache), and the logits of that step are those of token t + 1. Sampling draws token t with
the Philox step counter t (its index in the video), so the draw for a position does not depend on the prefix
length. Each call runs on a runner (caches) of its own, closed when it ends.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from .backends.base import Backend, StepEvent
from .sampling import RowParams

__all__ = ["logprobs_steps", "sample_iter"]


def logprobs_steps(backend: Backend, tokens: np.ndarray) -> np.ndarray:
    """Tokens (B, N) int64 -> (B, N - 1) float32 ``log p(token t | tokens < t)``, t = 1 .. N-1, through N - 1
    cached steps of the prior (as generation runs them); the log-softmax in float64."""
    B, N = tokens.shape
    out = np.empty((B, N - 1), np.float32)
    runner = backend.prior_runner(B)
    try:
        for t in range(N - 1):
            z = runner.run(tokens[:, t], np.full(B, t, np.int64)).astype(np.float64)  # logits of token t + 1
            zmax = z.max(axis=1, keepdims=True)
            lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
            out[:, t] = z[np.arange(B), tokens[:, t + 1]] - lse
    finally:
        runner.close()
    return out


def sample_iter(backend: Backend, prefix: np.ndarray, params: RowParams,
                num_tokens: int) -> Generator[StepEvent, None, np.ndarray]:
    """Continue ``prefix`` (B, P) int64 to ``num_tokens`` tokens with the backend's prior sampler and ``params``
    (B rows): yields a StepEvent per sampled token (``.step`` = its index P .. N-1); returns the (B, N) int64
    sequences, prefix included."""
    B, P = prefix.shape
    N = num_tokens
    out = np.empty((B, N), np.int64)
    out[:, :P] = prefix
    if P < N:
        sampler = backend.prior_sampler
        runner = backend.prior_runner(B)
        pos = np.zeros(B, np.int64)
        try:
            for t in range(N - 1):  # feed token t at position t: the logits of token t + 1
                pos[:] = t
                logits = runner.run(out[:, t], pos)
                if t + 1 < P:
                    continue  # a prefix position: its cache entries are what the step was for
                out[:, t + 1] = sampler(logits, None, params, t + 1)  # token index = the Philox step counter
                yield StepEvent(t + 1, N, out[:, t + 1].copy())
        finally:
            runner.close()
    return out
