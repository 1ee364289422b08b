"""The multi-token prefill of frame-prediction generators: ``prefix_prefill.onnx``.

A frame-prediction generator (the authors' ``LARP-L-long-AR-FP``) is conditioned on a prefix of
``cls_token_num`` tokens (the tokens of the conditioning frames + the separator, 1025 for the released model).
Running that prefix as 1025 single-token decode steps would cost as much as generating the video, so the prefix
runs as one graph over all its tokens at once:

* inputs: ``tokens`` (B, P) int64 in [0, vocab_size] (the separator is index vocab_size), ``pos`` (B, P) int64,
  the positions of the tokens (a row's tokens sit at increasing positions; token j attends to the tokens of its
  row at positions <= its own: causal by position);
* outputs: ``logits`` (B, V) float32 of the last prefix position (the distribution of video token 0) and
  ``present_{k,v}_{i}`` (B, h, P, hd) per layer: the P new cache entries, which the runtime writes into slots
  ``pos[b, :]`` of row b of its preallocated cache (the decode step then continues at position P).

Dynamic axes: ``B`` (batch) and ``P`` (prefix length) on the inputs, ``B`` on logits, ``B`` and ``P`` on the
presents. The weights are the decode graph's (same buffers, same layout: with external data the prefill graph
points into ``decode.onnx.data``, so a bundle holds the weights once).

    entry, checks = export_prefill(writer, gen, dtype, opset, batch, rng, tol, verify)

Verification (like every graph's): ONNX Runtime against the PyTorch model's own cached prefill (its KV caches
and the logits of the last prefix position) on random prefixes, fp32 and fp16 at the export's tolerances.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor

from ..bundle import BundleWriter
from ..models import LARPGenerator
from . import trace
from .graphs import DecodeGraph, kv_names
from .trace import share_external_data, trace_module
from .verify import GraphCheck, compare, io_spec, ort_session

__all__ = ["PrefillGraph", "export_prefill", "prefill_names", "PREFILL_GRAPH", "reference_prefill"]

PREFILL_GRAPH = "prefix_prefill"


class PrefillGraph(DecodeGraph):
    """P tokens at once (no past): tokens (B, P), pos (B, P) -> logits (B, V), present_k_0, present_v_0, ...

    The weights are DecodeGraph's (scale folded into the query rows of ``wqkv``, ``w1|w3`` as one matrix, every
    projection a plain MatMul); attention is the causal softmax over the prefix itself."""

    def __init__(self, gen: LARPGenerator):
        super().__init__(gen, fused_attention=False)

    def forward(self, tokens: Tensor, pos: Tensor) -> tuple[Tensor, ...]:
        gen, cfg = self.gen, self.gen.config
        H, hd, D, Fh = cfg.n_head, cfg.head_dim, cfg.dim, cfg.ffn_hidden  # batch and P stay symbolic
        P = tokens.shape[1]
        h = F.embedding(tokens, self.table) + F.embedding(pos, gen.abs_pe[0])  # (B, P, D)
        # (B, 1, P, P) additive mask: query i sees key j of its row iff pos[j] <= pos[i]
        allowed = pos.unsqueeze(1) <= pos.unsqueeze(2)  # (B, P_q, P_k)
        acc = torch.promote_types(self.table.dtype, torch.float32)  # float32 (float64 in the parity tests)
        bias = torch.zeros_like(allowed, dtype=acc).masked_fill(~allowed, float("-inf")).unsqueeze(1)
        presents: list[Tensor] = []
        for i, layer in enumerate(gen.layers):
            qkv = layer.attention_norm(h) @ getattr(self, f"wqkv_{i}")  # (B, P, 3D), q pre-scaled
            q, k, v = (t.reshape(-1, P, H, hd).transpose(1, 2) for t in qkv.split(D, dim=-1))  # (B, h, P, hd)
            s = (q @ k.transpose(-1, -2)).to(acc) + bias  # (B, h, P, P)
            y = torch.softmax(s, dim=-1).to(q.dtype) @ v  # (B, h, P, hd)
            h = h + y.transpose(1, 2).reshape(-1, P, D) @ getattr(self, f"wo_{i}")
            gu = layer.ffn_norm(h) @ getattr(self, f"w13_{i}")  # (B, P, 2F)
            g, u = gu.split(Fh, dim=-1)
            h = h + (F.silu(g) * u) @ getattr(self, f"w2_{i}")
            presents += [k, v]
        logits = (gen.norm(h[:, -1]) @ self.w_out).to(acc)  # (B, V) float32
        return (logits, *presents)


def prefill_names(n_layer: int) -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes (B = batch, P = prefix length) of the prefill graph."""
    present = kv_names("present", n_layer)
    dynamic = {"tokens": {0: "B", 1: "P"}, "pos": {0: "B", 1: "P"}, "logits": {0: "B"},
               **{n: {0: "B", 2: "P"} for n in present}}
    return ["tokens", "pos"], ["logits", *present], dynamic


def reference_prefill(gen: LARPGenerator, prefix: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The PyTorch model's own cached prefill of ``prefix`` (B, P = cls_token_num): the logits of the last prefix
    position (B, V) and the cache entries it wrote, [k_0, v_0, k_1, ...] each (B, h, P, hd)."""
    B, P = prefix.shape
    saved = [layer.attention.kv_cache for layer in gen.layers], gen.causal_mask
    gen.setup_caches(B, P, dtype=gen.tok_embeddings.weight.dtype)
    try:
        logits = gen.prefill(prefix)
        kv: list[Tensor] = []
        for layer in gen.layers:
            c = layer.attention.kv_cache
            kv += [c.k_cache[:B, :, :P].clone(), c.v_cache[:B, :, :P].clone()]
    finally:
        for layer, c in zip(gen.layers, saved[0], strict=True):
            layer.attention.kv_cache = c
        gen.causal_mask = saved[1]
    return logits, kv


def export_prefill(w: BundleWriter, gen: LARPGenerator, dtype: torch.dtype, opset: int, batch: int,
                   rng: torch.Generator, tol: dict, verify: bool) -> tuple[dict[str, Any], list[GraphCheck]]:
    """Write ``prefix_prefill.onnx`` for the frame-prediction generator ``gen`` (already in ``dtype``, eval) beside
    its ``decode.onnx``; returns (the manifest's ``generator.prefill`` entry, the verification checks)."""
    cfg = gen.config
    if not cfg.frame_prediction:
        raise ValueError("the prefix prefill graph is for frame-prediction generators (a prefix of video tokens)")
    H, hd, L, V, P = cfg.n_head, cfg.head_dim, cfg.n_layer, cfg.vocab_size, cfg.cls_token_num
    kv_dtype = "float16" if dtype == torch.float16 else "float32"
    prefix = _random_prefix(cfg, batch, rng)
    pos = torch.arange(P).expand(batch, P).contiguous()
    graph = PrefillGraph(gen)
    names = prefill_names(L)
    model = trace_module(graph, (prefix, pos), *names, opset)
    onnx.checker.check_model(model, full_check=False)
    path = w.path(f"{PREFILL_GRAPH}.onnx")
    decode = w.graph("decode")
    data = list(decode.data or [])
    if data:  # the decode graph's weights file holds these tensors: point at it instead of a second copy
        share_external_data(model, w.path(decode.file))
        left = sum(t.ByteSize() for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
        if left > trace.EXTERNAL_DATA_BYTES:
            raise RuntimeError(f"the prefill graph shares too few weights with decode.onnx ({left} bytes left)")
    onnx.save_model(model, str(path))
    w.add_graph(PREFILL_GRAPH, path.name,
                [io_spec("tokens", "int64", ["B", "P"]), io_spec("pos", "int64", ["B", "P"])],
                [io_spec("logits", "float32", ["B", V])]
                + [io_spec(n, kv_dtype, ["B", H, "P", hd]) for n in names[1][1:]], data)
    entry = {"graph": PREFILL_GRAPH, "prefix_tokens": P, "separator": V}
    if not verify:
        return entry, []
    checks: list[GraphCheck] = []
    sess = ort_session(path)
    # the full prefix, and a shorter one (the dynamic P axis), against the model's cached prefill
    for label, n in (("prefill", P), ("prefill@P", max(1, P // 2 + 1))):
        x = prefix if n == P else _random_prefix(cfg, batch, rng)[:, :n].contiguous()
        out = sess.run(None, {"tokens": x.numpy(), "pos": np.broadcast_to(np.arange(n), (batch, n)).copy()})
        if n == P:
            ref_logits, ref_kv = reference_prefill(gen, x)
        else:
            sub = _shorter(gen, n)
            ref_logits, ref_kv = reference_prefill(sub, x)
        checks.append(compare(label, "logits", out[0], ref_logits.float().numpy(), tol["logits"]))
        checks.append(compare(label, "present", np.stack(out[1:]).astype(np.float32),
                              torch.stack(ref_kv).float().numpy(), tol["kv"]))
    return entry, checks


def _random_prefix(cfg, batch: int, rng) -> Tensor:
    """(batch, cls_token_num) int64: random video tokens, the separator (index vocab_size) last."""
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.cls_token_num), generator=rng)
    x[:, -1] = cfg.vocab_size
    return x


def _shorter(gen: LARPGenerator, n: int) -> LARPGenerator:
    """A view of ``gen`` whose prefix is ``n`` tokens (the same modules and weights; only its config differs), so
    its cached prefill checks the graph at another prefix length."""
    sub = copy.copy(gen)  # shallow: shares the parameters and layers
    sub.config = gen.config.replace(cls_token_num=n)
    return sub

