"""The tokenizer's AR prior, one cached step at a time: the computation the runtime's prior step runs.

The prior (LARP.md section 2, the authors' ``calculate_logits_and_ar_pred_cont``): the input at position t is the
normalised code vector of token t; the output at t is a 16-d prediction, L2-normalised; the logits of token t + 1
are ``linear(prediction, normalised codebook) / latent_ce_temperature``. Token 0 is never predicted.

``PriorStep`` runs one position per row against a static KV cache (``token`` (B, 1) int64, ``pos`` (B,) int64,
``past_{k,v}_{i}`` (B, h, S, hd) -> ``logits`` (B, K) of the token at pos + 1, ``present_{k,v}_{i}`` (B, h, 1, hd)):
the PyTorch backend's prior step, and the module ``export/prior_graph.py`` traces into ``prior.onnx`` (its
``PriorStepGraph`` adds the fused-attention variant). ``prior_reference_logits`` is the full causal forward.

Shapes: B batch, N tokens, K codebook, d code dim, E prior width, h heads, hd head dim, S cache slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tokenizer import LARPTokenizer

__all__ = ["PriorStep", "prior_of", "prior_reference_logits", "slot_bias", "accum_dtype"]

def prior_of(tok: LARPTokenizer):
    if tok.prior_model is None:
        raise ValueError("this tokenizer has no AR prior (config.prior is None or its weights were not loaded)")
    return tok.prior_model


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax / normalisation dtype: fp32 for half weights, the weights' own otherwise (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def slot_bias(pos: Tensor, S: int) -> Tensor:
    """(B, 1, 1, S) additive mask over the cache slots: 0 for row b's slots < pos[b] (written before this step),
    -inf for the rest (unwritten, or stale entries of the slot's previous request)."""
    slots = torch.arange(S, device=pos.device).view(1, S)
    return torch.zeros(1, S, dtype=torch.float32, device=pos.device).masked_fill(
        slots >= pos.view(-1, 1), float("-inf")).view(-1, 1, 1, S)


class PriorStep(nn.Module):
    """One prior position per row against a static cache of past entries.

    Like ``DecodeGraph``: weights stored (in, out) so every projection is a plain MatMul; the separate
    key/query/value projections are one (E, 3E) matrix with the softmax scale folded into the query columns (and
    bias); attention is softmax over [past scores (masked per row by ``slot_bias``) | the token's own score], so the
    cache is read once and never concatenated or scattered in the graph. A subclass may replace that attention
    (``attention_bias`` + ``cached_attention``: export's fused ``larp_rt::DecodeAttention`` variant)."""

    def __init__(self, tok: LARPTokenizer):
        super().__init__()
        prior = prior_of(tok)
        cfg = prior.config
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
        bias = self.attention_bias(pos, S)
        acc = accum_dtype(h.dtype)
        presents: list[Tensor] = []
        for i in range(self.n_layer):
            past_k, past_v = past[2 * i], past[2 * i + 1]  # (B, h, S, hd)
            qkv = self.ln1[i](h) @ getattr(self, f"wqkv_{i}") + getattr(self, f"bqkv_{i}")  # (B, 1, 3E), q scaled
            q, k, v = (t.reshape(-1, H, 1, hd) for t in qkv.split(E, dim=-1))  # (B, h, 1, hd) each
            y = self.cached_attention(q, k, v, past_k, past_v, pos, bias)  # (B, h, 1, hd)
            h = h + y.reshape(-1, 1, E) @ getattr(self, f"wo_{i}") + getattr(self, f"bo_{i}")
            m = F.gelu(self.ln2[i](h) @ getattr(self, f"w1_{i}") + getattr(self, f"b1_{i}"))  # (B, 1, 4E)
            h = h + m @ getattr(self, f"w2_{i}") + getattr(self, f"b2_{i}")
            presents += [k, v]
        pred = self.ln_f(h[:, -1]) @ self.w_head + self.b_head  # (B, d)
        pred = F.normalize(pred.to(acc), p=2, dim=-1)
        logits = (pred @ self.codes.to(acc).t()) * self.inv_temperature  # (B, K): logits of token pos + 1
        return (logits, *presents)  # float32 (float64 for a float64 model)

    def attention_bias(self, pos: Tensor, S: int) -> Tensor | None:
        """(B, 1, 1, S): row b sees its cache slots < pos[b]."""
        return slot_bias(pos, S)

    def cached_attention(self, q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, pos: Tensor,
                         bias: Tensor | None) -> Tensor:
        """q, k, v (B, h, 1, hd) of this position, past_{k,v} (B, h, S, hd) -> (B, h, 1, hd): softmax over [the
        past scores, masked by ``bias`` | the position's own score], in ``accum_dtype``."""
        H, hd, S = self.heads, self.head_dim, past_k.shape[2]
        acc = accum_dtype(q.dtype)
        s_past = (past_k @ q.reshape(-1, H, hd, 1)).reshape(-1, H, 1, S).to(acc) + bias  # (B, h, 1, S)
        s_self = (q * k).sum(-1, keepdim=True).to(acc)  # (B, h, 1, 1)
        att = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1).to(q.dtype)  # (B, h, 1, S + 1)
        return att[..., :S] @ past_v + att[..., S:] * v


def prior_reference_logits(tok: LARPTokenizer, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) tokens -> (B, L - 1, K) logits of tokens 1 .. L-1: the PyTorch prior's full causal forward."""
    prior = tok.prior_model
    emb = tok.bottleneck.regularizer.codebook()
    pred = prior.ar_predict(F.embedding(tokens, emb))  # (B, L, d) normalised, slot 0 = the input
    return F.linear(pred.to(torch.promote_types(pred.dtype, torch.float32)),
                    emb.to(torch.promote_types(emb.dtype, torch.float32)))[:, 1:] / prior.config.latent_ce_temperature
