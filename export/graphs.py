"""The exported computations, as small nn.Modules over a loaded model's weights.

Every graph takes and returns plain tensors with fixed names (see ``IO``); batch is dynamic everywhere.

* encoder: ``video`` (B, C, T, H, W) float32 in [0, 1] -> ``indices`` (B, N) int64 (deterministic SVQ) and
  ``latents`` (B, N, d) float32 (the normalised code-space vectors, for verification and users).
* decoder: ``indices`` (B, N) int64 -> ``video`` (B, C, T, H, W) float32 clamped to [0, 1].
* decode: ``token`` (B, 1) int64 (a video token, or ``vocab_size + class_id`` at ``pos`` 0: the prefill),
  ``pos`` (B,) int64, one per row (= that row's past length: the position of its ``token``; rows of one step may
  sit at different positions, so requests join and leave a running batch at step boundaries) and
  ``past_{k,v}_{i}`` (B, h, S, hd) per layer (a static cache of S slots; row b ignores its slots >= pos[b]) ->
  ``logits`` (B, V) float32 and ``present_{k,v}_{i}`` (B, h, 1, hd): the new entries, which the runtime writes
  into slot ``pos[b]`` of row b of its preallocated cache. The step reads the cache once and never copies it:
  attention is softmax over [past scores | the token's own score], so no concat/scatter of the cache happens in the
  graph.

In fp16 bundles weights, activations and caches are fp16; ``video`` in/out and ``logits`` stay float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import LARPGenerator, LARPTokenizer
from ..models.prior_step import slot_bias


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


class _CacheAttention(torch.autograd.Function):
    """One-token attention over [the first ``pos`` cache slots | the token's own entry], exported as the custom
    op ``larp_rt::DecodeAttention`` (cpp_ext attention_cpu.h); the forward is the same math in torch (used when
    tracing and for verification). q (pre-scaled), k, v, y: (B, h, 1, hd) float32; past_k/v: (B, h, S, hd) float32,
    float16 or int8 (then ``scales`` = k_scale, v_scale (B, h, S) float32: slot j holds scale_j * int8 row); pos (B,).
    The cache is read in its own type (the op widens each element as it reads it)."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, pos, *scales):  # noqa: ARG004
        S = past_k.shape[2]
        past_k, past_v = dequantize_cache(past_k, scales[0] if scales else None), \
            dequantize_cache(past_v, scales[1] if scales else None)
        bias = slot_bias(pos, S)  # (B, 1, 1, S)
        s_past = (past_k @ q.transpose(-1, -2)).transpose(-1, -2).float() + bias  # (B, h, 1, S)
        s_self = (q * k).sum(-1, keepdim=True).float()
        att = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1).to(q.dtype)
        return att[..., :S] @ past_v + att[..., S:] * v

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, pos, *scales):
        return g.op("larp_rt::DecodeAttention", q, k, v, past_k, past_v, pos, *scales).setType(q.type())


def cache_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, pos: Tensor,
                    *scales: Tensor) -> Tensor:
    """``_CacheAttention`` for the other graph families (the prior's step): one ``larp_rt::DecodeAttention`` node
    when traced, the same math in torch otherwise. Shapes and dtypes as ``_CacheAttention``."""
    return _CacheAttention.apply(q, k, v, past_k, past_v, pos, *scales)


KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def dequantize_cache(c: Tensor, scale: Tensor | None) -> Tensor:
    """A narrow cache (float16, or int8 with per-slot scales (..., S)) as float32; a float32 cache as it is."""
    if c.dtype == torch.int8:
        return c.float() * scale.unsqueeze(-1)
    return c.float() if c.dtype != torch.float32 else c


def quantize_entry(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 of new cache entries (B, h, 1, hd) with one float32 scale per (row, head): scale = max|x| /
    127 (1 for an all-zero entry), q = round_half_even(x / scale) in [-127, 127] -> (q int8, scale (B, h, 1)).
    ``larp_rt.kernels.quantize_kv`` is the same arithmetic in numpy (host-written entries: the prefix prefill)."""
    amax = x.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(x / scale.unsqueeze(-1)).clamp(-127.0, 127.0).to(torch.int8), scale


class DecodeGraph(nn.Module):
    """One token at position ``pos`` against a static cache of past entries.

    Prefill is the same step at ``pos`` 0 with ``token = vocab_size + class_id``: the graph embeds through
    one table [token embeddings; class embeddings], so a single graph (one copy of the weights, one TensorRT
    engine) serves both.

    Written for a one-token step (the hot loop of generation runs it ~1000 times per video): with L = 1 the
    head split/merge layouts (B, 1, h, hd) <-> (B, h, 1, hd) are the same memory, so they are reshapes, never
    transposes; the softmax scale is folded into the query rows of ``wqkv``; ``w1`` and ``w3`` are one matrix
    (one MatMul reads both). Weights are stored (in, out) so that every projection is a plain MatMul.
    """

    def __init__(self, gen: LARPGenerator, *, fused_attention: bool = False, kv_dtype: str = "fp32"):
        super().__init__()
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(KV_DTYPES)}, got {kv_dtype!r}")
        if kv_dtype != "fp32" and not fused_attention:
            raise ValueError("a narrow KV cache is read by the fused attention op: pass fused_attention=True")
        self.gen = gen
        self.fused_attention = fused_attention  # one larp_rt::DecodeAttention node per layer (float32 activations)
        self.kv_dtype = kv_dtype  # the cache's element type: "fp32", "fp16", "int8" (+ per-slot float32 scales)
        cfg = gen.config
        D, scale = cfg.dim, cfg.head_dim**-0.5
        # (V + C, D); frame prediction: the token table (V + 1 rows, the separator last), no classes
        table = (gen.tok_embeddings.weight if gen.cls_embedding is None else
                 torch.cat([gen.tok_embeddings.weight, gen.cls_embedding.embedding_table.weight]))
        self.register_buffer("table", table.detach().clone())
        for i, layer in enumerate(gen.layers):
            wqkv = layer.attention.wqkv.weight.detach().clone()  # (3D, D)
            wqkv[:D] *= scale
            ff = layer.feed_forward
            self.register_buffer(f"wqkv_{i}", wqkv.t().contiguous())  # (D, 3D)
            self.register_buffer(f"wo_{i}", layer.attention.wo.weight.detach().t().contiguous())
            w13 = torch.cat([ff.w1.weight, ff.w3.weight]).detach()  # (2F, D)
            self.register_buffer(f"w13_{i}", w13.t().contiguous())  # (D, 2F)
            self.register_buffer(f"w2_{i}", ff.w2.weight.detach().t().contiguous())  # (F, D)
        self.register_buffer("w_out", gen.output.weight.detach().t().contiguous())  # (D, V)

    def forward(self, token: Tensor, pos: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """token (B, 1) int64, pos (B,) int64, past_k_0, past_v_0, ... (B, h, S, hd) -> logits, present_k_0, ...

        kv_dtype "int8": past_k_0, past_v_0, ..., then past_k_scale_0, past_v_scale_0, ... (B, h, S) ->
        logits, present_k_0, ... (B, h, 1, hd) int8, then present_k_scale_0, ... (B, h, 1) float32."""
        gen, cfg = self.gen, self.gen.config
        n_cache = 2 * cfg.n_layer
        scales = past[n_cache:] if self.kv_dtype == "int8" else ()
        past = past[:n_cache]
        H, hd, D, Fh = cfg.n_head, cfg.head_dim, cfg.dim, cfg.ffn_hidden  # batch stays symbolic: reshapes use -1
        h = F.embedding(token, self.table) + F.embedding(pos.view(-1, 1), gen.abs_pe[0])  # (B, 1, D): own positions
        S = past[0].shape[2]
        bias = slot_bias(pos, S)  # (B, 1, 1, S)
        presents: list[Tensor] = []
        for i, layer in enumerate(gen.layers):
            past_k, past_v = past[2 * i], past[2 * i + 1]  # (B, h, S, hd)
            qkv = layer.attention_norm(h) @ getattr(self, f"wqkv_{i}")  # (B, 1, 3D), q pre-scaled
            q, k, v = (t.reshape(-1, H, 1, hd) for t in qkv.split(D, dim=-1))  # (B, h, 1, hd) each
            if self.fused_attention:
                y = _CacheAttention.apply(q, k, v, past_k, past_v, pos, *scales[2 * i:2 * i + 2])
            else:
                # (B, h, S, hd) @ (B, h, hd, 1): the query as a column, never a transposed cache (a copy)
                s_past = (past_k @ q.reshape(-1, H, hd, 1)).reshape(-1, H, 1, S).float() + bias  # (B, h, 1, S)
                s_self = (q * k).sum(-1, keepdim=True).float()  # (B, h, 1, 1)
                att = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1).to(q.dtype)  # (B, h, 1, S + 1)
                y = att[..., :S] @ past_v + att[..., S:] * v  # (B, h, 1, hd)
            h = h + y.reshape(-1, 1, D) @ getattr(self, f"wo_{i}")
            gu = layer.ffn_norm(h) @ getattr(self, f"w13_{i}")  # (B, 1, 2F)
            g, u = gu.split(Fh, dim=-1)
            h = h + (F.silu(g) * u) @ getattr(self, f"w2_{i}")
            presents += [k, v]
        logits = (gen.norm(h[:, -1]) @ self.w_out).float()
        if self.kv_dtype == "fp16":
            return (logits, *(p.half() for p in presents))
        if self.kv_dtype == "int8":
            q8 = [quantize_entry(p) for p in presents]
            return (logits, *(q for q, _ in q8), *(sc for _, sc in q8))
        return (logits, *presents)


def kv_names(prefix: str, n_layer: int, suffix: str = "") -> list[str]:
    """past_k_0, past_v_0, past_k_1, ... (``suffix`` "_scale": past_k_scale_0, ...: an int8 cache's scales)."""
    return [f"{prefix}_{kv}{suffix}_{i}" for i in range(n_layer) for kv in ("k", "v")]


def decode_names(n_layer: int, kv_dtype: str = "fp32") -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes of a one-token step against a static cache (decode.onnx, the
    fused graph's trace, the prior's step graphs); an int8 cache adds its scales (past_k_scale_0, ... after the
    caches; present_k_scale_0, ... likewise)."""
    past, present = kv_names("past", n_layer), kv_names("present", n_layer)
    if kv_dtype == "int8":
        past, present = past + kv_names("past", n_layer, "_scale"), present + kv_names("present", n_layer, "_scale")
    dynamic = {"token": {0: "B"}, "pos": {0: "B"}, "logits": {0: "B"}, **{n: {0: "B", 2: "S"} for n in past},
               **{n: {0: "B"} for n in present}}
    return ["token", "pos", *past], ["logits", *present], dynamic
