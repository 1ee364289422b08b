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
from .graphs import cache_attention, slot_bias

__all__ = ["PriorStepGraph", "PriorScoreGraph", "prior_of"]


def prior_of(tok: LARPTokenizer):
    if tok.prior_model is None:
        raise ValueError("this tokenizer has no AR prior (config.prior is None or its weights were not loaded)")
    return tok.prior_model


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax / normalisation dtype: fp32 for half weights, the weights' own otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class PriorStepGraph(nn.Module):
    """One prior position per row against a static cache of past entries.

    Like ``DecodeGraph``: weights stored (in, out) so every projection is a plain MatMul; the separate
    key/query/value projections are one (E, 3E) matrix with the softmax scale folded into the query columns (and
    bias); attention is softmax over [past scores (masked per row by ``slot_bias``) | the token's own score], so the
    cache is read once and never concatenated or scattered in the graph.

    ``fused_attention``: that attention is one ``larp_rt::DecodeAttention`` node per layer (float32 weights only,
    like the generator's fused graph: the op computes in float32)."""

    def __init__(self, tok: LARPTokenizer, *, fused_attention: bool = False):
        super().__init__()
        prior = prior_of(tok)
        cfg = prior.config
        dtype = prior.input_proj.weight.dtype
        if fused_attention and dtype != torch.float32:
            raise ValueError(f"fused_attention needs a float32 prior (larp_rt::DecodeAttention computes in float32), "
                             f"got {dtype}: cast the tokenizer with .float(), or pass fused_attention=False")
        self.fused_attention = fused_attention
        self.heads, self.dim = cfg.heads, cfg.dim
        self.head_dim = cfg.dim // cfg.heads
        self.inv_temperature = 1.0 / cfg.latent_ce_temperature  # the authors multiply by 1 / temperature
        scale = self.head_dim**-0.5
        det = lambda t: t.detach().clone()  # noqa: E731
        self.register_buffer("codes", det(tok.bottleneck.regularizer.codebook()))  # (K, d) normalised
        self.register_buffer("w_in", det(prior.input_proj.weight.t()).contiguous())  # (d, E)
        self.register_buffer("b_in", det(prior.input_proj.bias))
        self.register_buffer("pos_emb", det(prior.pos_emb[0]))  # (P, E)
        self.ln1 = nn.ModuleList([b.ln1 for b in prior.blocks])
        self.ln2 = nn.ModuleList([b.ln2 for b in prior.blocks])
        for i, b in enumerate(prior.blocks):
            a = b.attn
            w = torch.cat([a.query.weight * scale, a.key.weight, a.value.weight]).detach()  # (3E, E)
            bias = torch.cat([a.query.bias * scale, a.key.bias, a.value.bias]).detach()
            self.register_buffer(f"wqkv_{i}", w.t().contiguous())  # (E, 3E)
            self.register_buffer(f"bqkv_{i}", bias.clone())
            self.register_buffer(f"wo_{i}", det(a.proj.weight.t()).contiguous())
            self.register_buffer(f"bo_{i}", det(a.proj.bias))
            self.register_buffer(f"w1_{i}", det(b.mlp[0].weight.t()).contiguous())  # (E, 4E)
            self.register_buffer(f"b1_{i}", det(b.mlp[0].bias))
            self.register_buffer(f"w2_{i}", det(b.mlp[2].weight.t()).contiguous())  # (4E, E)
            self.register_buffer(f"b2_{i}", det(b.mlp[2].bias))
        self.n_layer = len(prior.blocks)
        self.ln_f = prior.ln_f
        self.register_buffer("w_head", det(prior.head.weight.t()).contiguous())  # (E, d)
        self.register_buffer("b_head", det(prior.head.bias))

    def forward(self, token: Tensor, pos: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """token (B, 1) int64, pos (B,) int64, past_k_0, past_v_0, ... (B, h, S, hd) -> logits (B, K), present..."""
        H, hd, E = self.heads, self.head_dim, self.dim  # batch stays symbolic: reshapes use -1
        x = F.embedding(token, self.codes)  # (B, 1, d): the normalised code of the token
        h = x @ self.w_in + self.b_in + F.embedding(pos.view(-1, 1), self.pos_emb)  # (B, 1, E)
        S = past[0].shape[2]
        bias = None if self.fused_attention else slot_bias(pos, S)  # (B, 1, 1, S): row b sees slots < pos[b]
        acc = _acc(h.dtype)
        presents: list[Tensor] = []
        for i in range(self.n_layer):
            past_k, past_v = past[2 * i], past[2 * i + 1]  # (B, h, S, hd)
            qkv = self.ln1[i](h) @ getattr(self, f"wqkv_{i}") + getattr(self, f"bqkv_{i}")  # (B, 1, 3E), q scaled
            q, k, v = (t.reshape(-1, H, 1, hd) for t in qkv.split(E, dim=-1))  # (B, h, 1, hd) each
            if self.fused_attention:  # one node: reads row b's slots < pos[b] only
                y = cache_attention(q, k, v, past_k, past_v, pos)
            else:
                s_past = (past_k @ q.reshape(-1, H, hd, 1)).reshape(-1, H, 1, S).to(acc) + bias  # (B, h, 1, S)
                s_self = (q * k).sum(-1, keepdim=True).to(acc)  # (B, h, 1, 1)
                att = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1).to(q.dtype)  # (B, h, 1, S + 1)
                y = att[..., :S] @ past_v + att[..., S:] * v  # (B, h, 1, hd)
            h = h + y.reshape(-1, 1, E) @ getattr(self, f"wo_{i}") + getattr(self, f"bo_{i}")
            m = F.gelu(self.ln2[i](h) @ getattr(self, f"w1_{i}") + getattr(self, f"b1_{i}"))  # (B, 1, 4E)
            h = h + m @ getattr(self, f"w2_{i}") + getattr(self, f"b2_{i}")
            presents += [k, v]
        pred = self.ln_f(h[:, -1]) @ self.w_head + self.b_head  # (B, d)
        pred = F.normalize(pred.to(acc), p=2, dim=-1)
        logits = (pred @ self.codes.to(acc).t()) * self.inv_temperature  # (B, K): logits of token pos + 1
        return (logits, *presents)  # float32 (float64 for a float64 model)


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
        acc = _acc(x.dtype)
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
        acc = _acc(x.dtype)
        pred = F.normalize(p.head(p.ln_f(h)).to(acc), p=2, dim=-1)  # (B, N-1, d): predictions of tokens 1 .. N-1
        logits = (pred @ self.codes.to(acc).t()) * self.inv_temperature  # (B, N-1, K)
        target = torch.gather(logits, -1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, N-1)
        return target - torch.logsumexp(logits, dim=-1)  # float32 (float64 for a float64 model)
