"""The tokenizer's AR prior as exported computations (small nn.Modules over a loaded tokenizer's weights).

The prior (LARP.md section 2, the authors' ``calculate_logits_and_ar_pred_cont``): the input at position t is the
normalised code vector of token t; the output at t is a 16-d prediction, L2-normalised; the logits of token t + 1
are ``linear(prediction, normalised codebook) / latent_ce_temperature``. Token 0 is never predicted.

* prior (one step against a static KV cache, like ``decode.onnx``): ``token`` (B, 1) int64 (a codebook index),
  ``pos`` (B,) int64, one per row (= the token's index in its video; row b reads its cache slots < pos[b]) and
  ``past_{k,v}_{i}`` (B, h, S, hd) per block -> ``logits`` (B, K) float32, the logits of the token at pos + 1,
  and ``present_{k,v}_{i}`` (B, h, 1, hd), which the runtime writes into slot ``pos[b]`` of row b.
  ``fused_attention`` (float32 priors): the same I/O, each layer's attention one ``larp_rt::DecodeAttention`` node
  (the generator's op, ``export.graphs.cache_attention``), which reads only row b's first pos[b] slots.
* prior_score (the whole sequence at once, for scoring): ``tokens`` (B, N) int64 -> ``logprobs`` (B, N - 1)
  float32, ``log p(token t | tokens < t)`` for t = 1 .. N - 1 (log-softmax over the codebook, in the graph, so
  the (B, N - 1, K) logits never leave it).

Shapes: B batch, N tokens, K codebook, d code dim, E prior width, h heads, hd head dim, S cache slots.
In fp16 bundles weights, activations and caches are fp16; ``logits`` / ``logprobs`` stay float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import LARPTokenizer
from ..models.prior_step import PriorStep, accum_dtype, prior_of
from .graphs import cache_attention

__all__ = ["PriorStepGraph", "PriorScoreGraph", "prior_of"]


class PriorStepGraph(PriorStep):
    """``larp_rt.models.prior_step.PriorStep`` as exported: ``fused_attention`` makes each layer's attention one
    ``larp_rt::DecodeAttention`` node (float32 weights only, like the generator's fused graph: the op computes in
    float32), which reads only row b's first pos[b] slots."""

    def __init__(self, tok: LARPTokenizer, *, fused_attention: bool = False):
        dtype = prior_of(tok).input_proj.weight.dtype
        if fused_attention and dtype != torch.float32:
            raise ValueError(f"fused_attention needs a float32 prior (larp_rt::DecodeAttention computes in float32), "
                             f"got {dtype}: cast the tokenizer with .float(), or pass fused_attention=False")
        super().__init__(tok)
        self.fused_attention = fused_attention

    def attention_bias(self, pos: Tensor, S: int) -> Tensor | None:
        return None if self.fused_attention else super().attention_bias(pos, S)

    def cached_attention(self, q, k, v, past_k, past_v, pos, bias):
        if self.fused_attention:  # one node: reads row b's slots < pos[b] only
            return cache_attention(q, k, v, past_k, past_v, pos)
        return super().cached_attention(q, k, v, past_k, past_v, pos, bias)


class PriorScoreGraph(nn.Module):
    """The prior's full causal forward over a whole token sequence (the model's modules; attention written out
    with the scores and softmax in float32 for half weights, instead of the fused SDPA, whose export mixes fp16 and
    fp32), reduced to the log-probability of every token t >= 1 given the tokens before it."""

    def __init__(self, tok: LARPTokenizer):
        super().__init__()
        self.prior = prior_of(tok)
        cfg = self.prior.config
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.inv_temperature = 1.0 / cfg.latent_ce_temperature
        self.register_buffer("codes", tok.bottleneck.regularizer.codebook().detach().clone())  # (K, d)
        L = tok.config.num_tokens - 1
        self.register_buffer("causal", torch.zeros(L, L).masked_fill(
            torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")))  # (L, L) additive mask

    def _attend(self, attn, x: Tensor) -> Tensor:
        B, L, E = x.shape
        split = lambda t: t.reshape(-1, L, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731 (B, h, L, hd)
        q, k, v = split(attn.query(x)), split(attn.key(x)), split(attn.value(x))
        acc = accum_dtype(x.dtype)
        s = (q @ k.transpose(-1, -2)).to(acc) * self.head_dim**-0.5 + self.causal[:L, :L]  # (B, h, L, L)
        y = torch.softmax(s, dim=-1).to(x.dtype) @ v  # (B, h, L, hd)
        return attn.proj(y.transpose(1, 2).reshape(-1, L, E))

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, N) int64 -> logprobs (B, N - 1) float32."""
        p = self.prior
        x = F.embedding(tokens[:, :-1], self.codes)  # (B, N-1, d) inputs: tokens 0 .. N-2
        h = p.input_proj(x) + p.pos_emb[:, : x.shape[1]]  # (B, N-1, E)
        for b in p.blocks:
            h = h + self._attend(b.attn, b.ln1(h))
            h = h + b.mlp(b.ln2(h))
        acc = accum_dtype(x.dtype)
        pred = F.normalize(p.head(p.ln_f(h)).to(acc), p=2, dim=-1)  # (B, N-1, d): predictions of tokens 1 .. N-1
        logits = (pred @ self.codes.to(acc).t()) * self.inv_temperature  # (B, N-1, K)
        target = torch.gather(logits, -1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, N-1)
        return target - torch.logsumexp(logits, dim=-1)  # float32 (float64 for a float64 model)
