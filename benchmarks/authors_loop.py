"""A faithful eager re-creation of the authors' sampling step (hywang66/LARP ``ar/generate.py``), for benchmarks.

What it reproduces, step by step: the static KV cache of the model (gpt-fast style, bool mask over the whole
cache), CFG by doubling the batch (``torch.cat([x, x])``, one forward for cond and null rows), the split and
``uncond + (cond - uncond) * cfg_scale`` mix, ``logits / max(temperature, 1e-5)``, top-k / top-p filtering
that writes -inf into the logits, ``softmax`` in float32 and ``torch.multinomial`` from the global RNG, and the
``clone`` of every new token. Written from their algorithm against our ``LARPGenerator`` (same layers and
names), not copied. Their per-step ``torch.backends.cuda.sdp_kernel`` context is CUDA-only and omitted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        logits[logits < torch.topk(logits, k)[0][..., -1, None]] = -float("inf")
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(1, sorted_idx, remove)] = -float("inf")
    return logits


def authors_sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = _filter(logits, top_k, top_p)
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1), probs


def authors_decode_one_token(model, x: torch.Tensor, input_pos: torch.Tensor, cfg_scale: float, **sampling):
    """x: (B, 1) tokens; the model's caches hold 2B rows when cfg_scale > 1 (cond rows, then null rows)."""
    if cfg_scale > 1.0:
        logits = model.decode_one_token(torch.cat([x, x]), input_pos)
        cond, uncond = torch.split(logits, len(logits) // 2, dim=0)
        logits = uncond + (cond - uncond) * cfg_scale
    else:
        logits = model.decode_one_token(x, input_pos)
    token, probs = authors_sample(logits, **sampling)
    return token.clone(), probs.clone()
