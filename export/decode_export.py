"""The generator's decode step: ``decode.onnx``, exported and verified against PyTorch, and its manifest entry.

    step = export_decode(writer, gen, dtype, opset, batch, rng, kv_dtype)   # writes decode.onnx
    checks = verify_decode(writer, step, tol)                               # ONNX Runtime against PyTorch

One graph serves the prefill (the class token at position 0) and every step after it, each row at its own
position (see ``graphs.DecodeGraph``). ``kv_dtype`` ("fp32", "fp16" or "int8") is the KV cache's element type; a
cache narrower than the activations is read by the custom ``larp_rt::DecodeAttention`` op in the graph itself.
A frame-prediction generator's prefix runs through ``prefix_prefill.onnx`` (``prefill_graph.py``), written between
the two calls above (the orchestrator's order, which the random draws follow).

Verification: a step mid-sequence with every row at its own position against the model's own cached step (SDPA
over a cache holding the same past; a narrow cache's dequantized values); for class-conditional generators also
the prefill (class tokens at position 0) and a joining request (row 0 prefills in a step of rows mid-sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..bundle import BundleWriter
from ..config import GeneratorConfig, find_multiple
from ..models import LARPGenerator
from .graphs import DecodeGraph, decode_names, kv_names
from .trace import export_module
from .verify import GraphCheck, cache_feeds, compare, dequantized_presents, io_spec, ort_session

__all__ = ["KV_DTYPES", "DecodeStep", "export_decode", "verify_decode", "decode_io", "narrow_kv", "generator_entry"]

KV_DTYPES = ("fp32", "fp16", "int8")  # the decode graphs' KV cache element type (--kv-dtype)


def narrow_kv(kv_dtype: str, precision: str) -> bool:
    """A cache narrower than the activations: read by the fused attention op in decode.onnx itself."""
    return kv_dtype != ("fp16" if precision == "fp16" else "fp32")


def decode_io(cfg: GeneratorConfig, kv_dtype: str, float_dtype: str) -> tuple[list[dict], list[dict]]:
    """The manifest's input and output lists of decode.onnx."""
    H, hd, L, V = cfg.n_head, cfg.head_dim, cfg.n_layer, cfg.vocab_size
    cache = {"fp32": "float32", "fp16": "float16", "int8": "int8"}[kv_dtype] if kv_dtype != "fp32" else float_dtype
    inputs = ([io_spec("token", "int64", ["B", 1]), io_spec("pos", "int64", ["B"])]
              + [io_spec(n, cache, ["B", H, "S", hd]) for n in kv_names("past", L)])
    outputs = ([io_spec("logits", "float32", ["B", V])]
               + [io_spec(n, cache, ["B", H, 1, hd]) for n in kv_names("present", L)])
    if kv_dtype == "int8":
        inputs += [io_spec(n, "float32", ["B", H, "S"]) for n in kv_names("past", L, "_scale")]
        outputs += [io_spec(n, "float32", ["B", H, 1]) for n in kv_names("present", L, "_scale")]
    return inputs, outputs


@dataclass
class DecodeStep:
    """What ``export_decode`` traced with, which ``verify_decode`` checks against."""

    gen: LARPGenerator
    kv_dtype: str
    narrow: bool
    token: torch.Tensor  # (B, 1)
    pos: torch.Tensor  # (B,)
    caches: list[torch.Tensor]  # the reference's (dequantized) caches, (B, h, S, hd) each
    feeds_c: dict[str, np.ndarray]  # the same caches as the graph's feeds (in the cache type; int8: + scales)
    rng: torch.Generator
    batch: int


def export_decode(w: BundleWriter, gen: LARPGenerator, dtype: torch.dtype, opset: int, batch: int,
                  rng: torch.Generator, kv_dtype: str = "fp32") -> DecodeStep:
    """Write ``decode.onnx`` of ``gen`` (cast to ``dtype``) with a ``kv_dtype`` cache; returns its example inputs."""
    cfg = gen.config
    gen = gen.to(dtype).eval()
    H, hd, L, V = cfg.n_head, cfg.head_dim, cfg.n_layer, cfg.vocab_size
    S = find_multiple(cfg.num_positions, 8)
    float_dtype = "float16" if dtype == torch.float16 else "float32"
    narrow = narrow_kv(kv_dtype, "fp16" if dtype == torch.float16 else "fp32")
    past = kv_names("past", L)
    token = torch.randint(0, V, (batch, 1), generator=rng)
    pos = torch.randint(1, cfg.num_positions, (batch,), generator=rng)  # a position per row
    caches = [torch.randn(batch, H, S, hd, generator=rng).to(dtype) for _ in past]
    inputs, outputs = decode_io(cfg, kv_dtype, float_dtype)
    if narrow:  # the cache in its own type (int8: + scales), read by the fused attention op
        feeds_c, floats = cache_feeds(inputs, batch, S, np.random.default_rng(int(torch.randint(0, 2**31, (1,),
                                                                                                generator=rng))))
        trace_caches = [torch.from_numpy(feeds_c[io["name"]]) for io in inputs[2:]]
        caches = [torch.from_numpy(f) for f in floats]  # the reference's (dequantized) caches
        dec = DecodeGraph(gen, fused_attention=True, kv_dtype=kv_dtype)
        files = export_module(dec, (token, pos, *trace_caches), w.path("decode.onnx"), *decode_names(L, kv_dtype),
                              opset, custom_opsets={"larp_rt": 1})
    else:
        feeds_c = {n: c.numpy() for n, c in zip(past, caches, strict=True)}
        dec = DecodeGraph(gen)
        files = export_module(dec, (token, pos, *caches), w.path("decode.onnx"), *decode_names(L), opset)
    w.add_graph("decode", files[0], inputs, outputs, files[1:])
    return DecodeStep(gen, kv_dtype, narrow, token, pos, caches, feeds_c, rng, batch)


def verify_decode(w: BundleWriter, step: DecodeStep, tol: dict) -> list[GraphCheck]:
    """decode.onnx in ONNX Runtime against the PyTorch model (see the module's docstring)."""
    gen, cfg = step.gen, step.gen.config
    V, kv_dtype, narrow = cfg.vocab_size, step.kv_dtype, step.narrow
    sess = ort_session(w.path("decode.onnx"), custom_ops=narrow)
    present = w.graph("decode").output_names[1:]
    checks = []

    def kv_tol(ref_kv: np.ndarray) -> float:  # + the rounding of the narrow entry (int8: up to 1.5 steps)
        if kv_dtype == "int8":
            return tol["kv"] + 1.5 * float(np.abs(ref_kv).max(-1).max()) / 127
        return tol["kv"] + (float(np.abs(ref_kv).max()) * 2.0**-11 if narrow else 0.0)

    def check(graph: str, tokens: np.ndarray, pos: np.ndarray, ref_logits: torch.Tensor, ref_kv: np.ndarray):
        out = sess.run(None, {"token": tokens, "pos": pos, **step.feeds_c})
        checks.append(compare(graph, "logits", out[0], ref_logits.float().numpy(), tol["logits"]))
        checks.append(compare(graph, "present", dequantized_presents(present, out[1:]), ref_kv, kv_tol(ref_kv)))

    # a step mid-sequence with every row at its own position, against the model's own cached step (SDPA over a
    # cache holding the same past; a narrow cache's dequantized values)
    token, pos = step.token, step.pos
    check("decode", token.numpy(), pos.numpy(), *_model_step(gen, token.view(-1), pos, step.caches))
    if cfg.frame_prediction:  # no class tokens: the prefix runs through prefix_prefill.onnx (checked there)
        return checks
    # the prefill: class tokens at position 0, against the model's prefill
    hi = cfg.num_classes + int(gen.has_null_class)
    class_ids = torch.randint(0, hi, (step.batch,), generator=step.rng)
    zeros = np.zeros(step.batch, np.int64)
    check("prefill", (V + class_ids).view(-1, 1).numpy(), zeros, *_model_prefill(gen, class_ids, step.caches))
    # a joining request: row 0 prefills (class token at position 0) in the same step as rows mid-sequence
    mixed_tok, mixed_pos = token.view(-1).clone(), pos.clone()
    mixed_tok[0], mixed_pos[0] = V + int(class_ids[0]), 0
    check("join", mixed_tok.view(-1, 1).numpy(), mixed_pos.numpy(), *_model_step(gen, mixed_tok, mixed_pos,
                                                                                 step.caches))
    return checks


def _cache_slot(gen: LARPGenerator, pos: torch.Tensor) -> np.ndarray:
    """(2L, B, h, 1, hd) float32: the model's cache entries of row b at slot pos[b], in graph output order."""
    rows = torch.arange(len(pos))
    kv = []
    for layer in gen.layers:
        c = layer.attention.kv_cache
        kv += [c.k_cache[rows, :, pos].unsqueeze(2), c.v_cache[rows, :, pos].unsqueeze(2)]
    return torch.stack(kv).float().numpy()


def _model_step(gen: LARPGenerator, tokens, pos, caches) -> tuple[torch.Tensor, np.ndarray]:
    """The PyTorch model's per-row step (``LARPGenerator.step``: tokens (B,), pos (B,)) with its KV cache holding
    ``caches`` (the reference)."""
    B, _, S, _ = caches[0].shape
    gen.setup_caches(B, S, dtype=caches[0].dtype)
    try:
        for i, layer in enumerate(gen.layers):
            layer.attention.kv_cache.k_cache.copy_(caches[2 * i])
            layer.attention.kv_cache.v_cache.copy_(caches[2 * i + 1])
        return gen.step(tokens, pos), _cache_slot(gen, pos)
    finally:
        gen.clear_caches()


def _model_prefill(gen: LARPGenerator, class_ids: torch.Tensor, caches) -> tuple[torch.Tensor, np.ndarray]:
    """The PyTorch model's prefill of ``class_ids`` (B,) on fresh caches shaped like ``caches`` (the reference)."""
    B, _, S, _ = caches[0].shape
    gen.setup_caches(B, S, dtype=caches[0].dtype)
    try:
        return gen.prefill(class_ids), _cache_slot(gen, torch.zeros(B, dtype=torch.int64))
    finally:
        gen.clear_caches()


def generator_entry(cfg: GeneratorConfig, kv_dtype: str, precision: str, prefill: dict[str, Any] | None = None,
                    ) -> dict[str, Any]:
    """The manifest's ``generator`` entry: config, KV cache and (frame prediction) the prefix prefill graph's."""
    entry: dict[str, Any] = {
        "config": cfg.to_dict(),
        "kv_cache": {"layers": cfg.n_layer, "heads": cfg.n_head, "head_dim": cfg.head_dim,
                     "max_seq": find_multiple(cfg.num_positions, 8), "dtype": kv_dtype,
                     "attention": "larp_rt::DecodeAttention" if narrow_kv(kv_dtype, precision) else "standard"},
    }
    if kv_dtype == "int8":
        entry["kv_cache"]["scales"] = {"granularity": "per (row, head, slot)", "dtype": "float32",
                                       "symmetric": True, "qmax": 127, "inputs": "past_{k,v}_scale_{layer}: (B, h, S)"}
    if prefill is not None:  # the prefix (cond tokens + separator) runs through one multi-token graph
        entry["prefill"] = prefill
    return entry
