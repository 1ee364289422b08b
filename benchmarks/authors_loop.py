"""A faithful eager re-creation of the authors' sampling step (hywang66/LARP ``ar/generate.py``), for benchmarks.

What it reproduces, step by step: the static KV cache of the model (gpt-fast style, bool mask over the whole
cache), CFG by doubling the batch (``torch.cat([x, x])``, one forward for cond and null rows), the split and
``uncond + (cond - uncond) * cfg_scale`` mix, ``logits / max(temperature, 1e-5)``, top-k / top-p filtering
that writes -inf into the logits, ``softmax`` in float32 and ``torch.multinomial`` from the global RNG, and the
``clone`` of every new token. Written from their algorithm against our ``LARPGenerator`` (same layers and
names), not copied. ``authors_decode_one_token`` omits their per-step SDPA-backend context (CUDA-only);
``authors_generate`` (the whole loop: caches allocated per call, prefill, one eager step per token, tokens kept
as a list and concatenated at the end) enters it on CUDA, as their ``decode_n_tokens`` does (math backend).
"""

from __future__ import annotations

import contextlib

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


def _math_sdpa():
    """Their per-step context: flash and memory-efficient attention off, the math backend on."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@torch.no_grad()
def authors_generate(model, cond: torch.Tensor, max_new_tokens: int, cfg_scale: float = 1.0, *, on_step=None,
                     math_sdpa: bool | None = None, **sampling) -> torch.Tensor:
    """Their ``generate``: cond (B,) class ids -> (B, max_new_tokens) tokens.

    Caches for the batch (doubled with CFG: cond rows, then null-class rows) are allocated on every call, for
    prefix + new tokens rounded up to 8; the prefill draws the first token, then one eager step per token.
    ``on_step(i)`` is called before step i (i = 0 is the prefill) and with i = max_new_tokens at the end
    (benchmarks record CUDA events there). ``math_sdpa`` (default: on CUDA) enters their SDPA-backend context
    around every step. Positions are int64 here (our cache's index_copy_ needs them; theirs are int32).
    """
    cfg = model.config
    T = cfg.cls_token_num
    math_sdpa = cond.device.type == "cuda" if math_sdpa is None else math_sdpa
    hook = on_step or (lambda i: None)
    guided = cfg_scale > 1.0
    rows = torch.cat([cond, torch.full_like(cond, cfg.null_class)]) if guided else cond
    model.setup_caches(len(rows), -(-(T + max_new_tokens) // 8) * 8, dtype=model.tok_embeddings.weight.dtype)
    hook(0)
    logits = model.prefill(rows)
    if guided:
        c, u = torch.split(logits, len(logits) // 2, dim=0)
        logits = u + (c - u) * cfg_scale
    token, _ = authors_sample(logits, **sampling)  # (B, 1)
    new_tokens = [token.clone()]
    input_pos = torch.tensor([T], device=cond.device, dtype=torch.int64)
    cur = token.view(-1, 1)
    for i in range(1, max_new_tokens):
        hook(i)
        with _math_sdpa() if math_sdpa else contextlib.nullcontext():
            token, _ = authors_decode_one_token(model, cur, input_pos, cfg_scale, **sampling)
        input_pos += 1
        new_tokens.append(token.clone())
        cur = token.view(-1, 1)
    hook(max_new_tokens)
    return torch.cat(new_tokens, dim=1)
