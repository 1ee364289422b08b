"""The exported computations, as small nn.Modules over a loaded model's weights.

Every graph takes and returns plain tensors with fixed names (see ``IO``); batch is dynamic everywhere.

* encoder: ``video`` (B, C, T, H, W) float32 in [0, 1] -> ``indices`` (B, N) int64 (deterministic SVQ) and
  ``latents`` (B, N, d) float32 (the normalised code-space vectors, for verification and users).
* decoder: ``indices`` (B, N) int64 -> ``video`` (B, C, T, H, W) float32 clamped to [0, 1].
* decode: ``token`` (B, 1) int64 (a video token, or ``vocab_size + class_id`` at ``pos`` 0: the prefill),
  ``pos`` (1,) int64 (= past length: the position of ``token``) and
  ``past_{k,v}_{i}`` (B, h, S, hd) per layer (a static cache of S slots; slots >= pos are ignored) ->
  ``logits`` (B, V) float32 and ``present_{k,v}_{i}`` (B, h, 1, hd): the new entries, which the runtime writes
  into slot ``pos`` of its preallocated cache. The step reads the cache once and never copies it: attention is
  softmax over [past scores | the token's own score], so no concat/scatter of the cache happens in the graph.

In fp16 bundles weights, activations and caches are fp16; ``video`` in/out and ``logits`` stay float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import LARPGenerator, LARPTokenizer


class EncoderGraph(nn.Module):
    def __init__(self, tok: LARPTokenizer):
        super().__init__()
        self.tok = tok
        self.dtype = tok.x_embedder.proj.weight.dtype

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor]:
        z = self.tok.encode_latents(video.to(self.dtype)).float()  # (B, N, d)
        z = F.normalize(z, p=2, dim=-1)
        codes = self.tok.bottleneck.regularizer.codebook().float()  # (K, d), constant-folded
        indices = torch.argmax(z @ codes.t(), dim=-1)  # first max on ties, like torch
        return indices, z


class DecoderGraph(nn.Module):
    def __init__(self, tok: LARPTokenizer):
        super().__init__()
        self.tok = tok

    def forward(self, indices: Tensor) -> Tensor:
        codes = F.embedding(indices, self.tok.bottleneck.regularizer.codebook())  # (B, N, d)
        return self.tok.decode_codes(codes).float().clamp(0.0, 1.0)


def _qkv(layer, x: Tensor, n_head: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    B, L, _ = x.shape
    q, k, v = layer.attention.wqkv(x).view(B, L, 3, n_head, head_dim).permute(2, 0, 3, 1, 4)
    return q, k, v  # each (B, h, L, hd)


class DecodeGraph(nn.Module):
    """One token at position ``pos`` against a static cache of past entries.

    Prefill is the same step at ``pos`` 0 with ``token = vocab_size + class_id``: the graph embeds through
    one table [token embeddings; class embeddings], so a single graph (one copy of the weights, one TensorRT
    engine) serves both.
    """

    def __init__(self, gen: LARPGenerator):
        super().__init__()
        if gen.cls_embedding is None:
            raise ValueError("frame-prediction generators (prefix of video tokens) cannot be exported yet")
        self.gen = gen
        self.scale = gen.config.head_dim**-0.5

    def forward(self, token: Tensor, pos: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        gen, cfg = self.gen, self.gen.config
        table = torch.cat([gen.tok_embeddings.weight, gen.cls_embedding.embedding_table.weight])  # (V + C, D)
        h = F.embedding(token, table) + gen.abs_pe[:, pos]  # (B, 1, D)
        S = past[0].shape[2]
        valid = torch.arange(S, device=token.device) < pos  # (S,) slots written before this step
        presents: list[Tensor] = []
        for i, layer in enumerate(gen.layers):
            past_k, past_v = past[2 * i], past[2 * i + 1]  # (B, h, S, hd)
            q, k, v = _qkv(layer, layer.attention_norm(h), cfg.n_head, cfg.head_dim)  # (B, h, 1, hd)
            # (B, h, S, hd) @ (B, h, hd, 1): transpose the query, never the cache (that would copy it)
            s_past = (past_k @ q.transpose(-1, -2)).transpose(-1, -2).float() * self.scale  # (B, h, 1, S)
            s_past = s_past.masked_fill(~valid, float("-inf"))
            s_self = (q * k).sum(-1, keepdim=True).float() * self.scale  # (B, h, 1, 1)
            att = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1).to(q.dtype)  # (B, h, 1, S + 1)
            y = att[..., :S] @ past_v + att[..., S:] * v  # (B, h, 1, hd)
            B = h.shape[0]
            h = h + layer.attention.wo(y.transpose(1, 2).reshape(B, 1, cfg.dim))
            h = h + layer.feed_forward(layer.ffn_norm(h))
            presents += [k, v]
        logits = gen.output(gen.norm(h[:, -1])).float()
        return (logits, *presents)


def kv_names(prefix: str, n_layer: int) -> list[str]:
    return [f"{prefix}_{kv}_{i}" for i in range(n_layer) for kv in ("k", "v")]
