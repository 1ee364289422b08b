"""The sampler graphs: ``sample.onnx`` always, ``decode_sample.onnx`` (the fused decode step + sampler) when asked,
exported beside ``decode.onnx`` and verified against the reference sampler (``larp_rt/sampling.py``).

    checks = export_samplers(writer, gen, fused, opset, batch, rng, verify, kv_dtype)
    manifest["sampler"] = sampler_entry(writer.manifest, fused, precision)

The graphs themselves are built in ``sampler_graph.py``. The fused graph is the decode step with the custom ops:
``larp_rt::DecodeAttention`` per layer (float32 bundles: one node instead of ~15 standard ones, the cache read once)
and ``larp_rt::Sample`` on the logits. Its weights are the decode graph's: with external data it points into
``decode.onnx.data``; float32 bundles pack its projections for ``larp_rt::PackedMatMul`` (weights of its own).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from .. import sampling as S
from ..bundle import BundleWriter
from ..config import GeneratorConfig, find_multiple
from ..models import LARPGenerator
from .graphs import DecodeGraph, decode_names
from .sampler_graph import FUSED_EXTRA_INPUTS, SAMPLER_INPUTS, build_sampler_model, fuse_decode_sample, pack_matmuls
from .trace import save_graph, share_external_data, trace_module
from .verify import (
    TOLERANCES,
    ExportError,
    GraphCheck,
    cache_feeds,
    compare,
    dequantized_presents,
    io_spec,
    narrow_step,
    ort_session,
)

__all__ = ["export_samplers", "verify_fused", "sampler_entry"]


def export_samplers(w: BundleWriter, gen: LARPGenerator, fused: bool, opset: int, batch: int, rng: torch.Generator,
                    verify: bool, kv_dtype: str = "fp32") -> list[GraphCheck]:
    """``sample.onnx`` always; ``decode_sample.onnx`` with ``fused``. Both verified against the reference sampler:
    token ids must be equal, logprobs within 1e-9 (see ``verify_fused`` for the fused graph)."""
    cfg = gen.config
    V = cfg.vocab_size
    onnx.save_model(build_sampler_model(), str(w.path("sample.onnx")))
    w.add_graph("sample", "sample.onnx", [io_spec("logits", "float32", ["R", V])]
                + [io_spec(n, t, ["B"]) for n, t in SAMPLER_INPUTS],
                [io_spec("tokens", "int64", ["B"]), io_spec("logprobs", "float64", ["B"])])
    fp32 = gen.tok_embeddings.weight.dtype == torch.float32
    # float32 weights: the fused step's projections become larp_rt::PackedMatMul over weights packed in panels
    # (int8/int4 bundles quantize these MatMuls afterwards, fp16 ones keep ONNX Runtime's)
    pack = fused and fp32 and w.precision == "fp32"
    if fused:
        _write_fused(w, gen, opset, batch, kv_dtype, fp32, pack)
    if not verify:
        return []
    seeder = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    np_rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=seeder)))
    params = S.RowParams(
        cfg_scale=np.array([1.0, 2.0] * batch, np.float32)[:batch], temperature=np.array([1.0, 0.0, 0.7] * batch,
                                                                                        np.float32)[:batch],
        top_k=np.array([0, 5, V] * batch, np.int64)[:batch], top_p=np.array([0.9, 1.0] * batch, np.float32)[:batch],
        seed=np_rng.integers(0, 2**63, batch).astype(np.uint64), stream=np.arange(batch, dtype=np.uint64))
    checks = [_verify_sample(w, V, params, batch, np_rng)]
    if fused:
        checks += verify_fused(w, cfg, params, batch, np_rng, TOLERANCES[w.precision],
                               exact_prefill=not pack)
    return checks


def _write_fused(w: BundleWriter, gen: LARPGenerator, opset: int, batch: int, kv_dtype: str, fp32: bool,
                 pack: bool) -> None:
    """``decode_sample.onnx``: decode.onnx (or, float32 with a float32 cache, the step traced again with the fused
    attention op) with ``larp_rt::Sample`` on its logits; ``pack``: its projections as ``larp_rt::PackedMatMul``."""
    cfg = gen.config
    decode_info = w.graph("decode")
    if fp32 and kv_dtype != "fp32":  # decode.onnx already reads its narrow cache through the fused op
        dec = onnx.load(str(w.path("decode.onnx")), load_external_data=pack)
    elif fp32:  # trace again with the fused attention op
        S_ = find_multiple(cfg.num_positions, 8)
        args = (torch.zeros(batch, 1, dtype=torch.int64), torch.ones(batch, dtype=torch.int64),
                *[torch.zeros(batch, cfg.n_head, S_, cfg.head_dim) for _ in range(2 * cfg.n_layer)])
        dec = trace_module(DecodeGraph(gen, fused_attention=True), args, *decode_names(cfg.n_layer), opset,
                           custom_opsets={"larp_rt": 1})
    else:  # fp16: the standard attention (the custom op is float32); initializers stay external
        dec = onnx.load(str(w.path("decode.onnx")), load_external_data=False)
    fused_model = fuse_decode_sample(dec)
    data = list(decode_info.data or [])
    if pack:  # its own (packed) weights: embedded, or one external file of its own when large
        w.manifest.setdefault("sampler", {})["packed_matmuls"] = pack_matmuls(fused_model)
        data = save_graph(fused_model, w.path("decode_sample.onnx"))
    else:
        if fp32 and kv_dtype == "fp32" and decode_info.data:
            share_external_data(fused_model, w.path("decode.onnx"))
        onnx.save_model(fused_model, str(w.path("decode_sample.onnx")))
    w.add_graph("decode_sample", "decode_sample.onnx",
                [*decode_info.inputs] + [io_spec(n, t, ["R_req" if n == "sample_rows" else "B_req"])
                                         for n, t in FUSED_EXTRA_INPUTS],
                [io_spec("tokens", "int64", ["B_req"]), io_spec("logprobs", "float64", ["B_req"])]
                + [*decode_info.outputs[1:]], data)


def _verify_sample(w: BundleWriter, V: int, params: S.RowParams, batch: int, rng: np.random.Generator,
                   ) -> GraphCheck:
    """sample.onnx against the reference sampler on random guided logits: tokens equal, logprobs within 1e-9."""
    logits = (rng.standard_normal((2 * batch, V)) * 3).astype(np.float32)
    u = S.uniform(params.seed, params.stream, 7)
    sess = ort_session(w.path("sample.onnx"))
    tokens, logp = sess.run(None, {"logits": logits, "cfg_scale": params.cfg_scale, "temperature": params.temperature,
                                   "top_k": params.top_k, "top_p": params.top_p, "uniform": u})
    want_t, want_l = S.sample(logits[:batch], logits[batch:], params, 7, return_logprobs=True)
    if not np.array_equal(tokens, want_t):
        raise ExportError(f"sample.onnx drew {tokens.tolist()} where the reference sampler draws {want_t.tolist()}")
    return compare("sample", "logprobs", logp, want_l, 1e-9)


def verify_fused(w: BundleWriter, cfg: GeneratorConfig, params: S.RowParams, batch: int, rng: np.random.Generator,
                 tol: dict, exact_prefill: bool = True) -> list[GraphCheck]:
    """decode_sample.onnx against decode.onnx + the reference sampler, 2B rows (guided), in two steps:

    * the prefill (empty cache, every row at position 0, every request at sample step 0): tokens equal,
      logprobs to 1e-9 (``exact_prefill``: the same MatMuls as decode.onnx), else within the logits tolerance (the
      packed projections of larp_rt::PackedMatMul sum in another order than ONNX Runtime's MatMul);
    * a continuous-batch step: rows at their own positions (1..7) over 8 random cache slots (row b must ignore
      its slots >= pos[b]), one row joining at position 0 with its class token, the requests' rows and null rows
      shuffled in the step's rows (``sample_rows`` picks them), each request at its own sample step: tokens equal,
      the new cache entries of every layer within the kv tolerance (they carry the attention of the layers
      below), logprobs within the logits tolerance."""
    info = w.graph("decode")
    fused = ort_session(w.path("decode_sample.onnx"), custom_ops=True)
    plain = ort_session(w.path("decode.onnx"), custom_ops=True)
    present = info.output_names[1:]
    checks = []
    R = 2 * batch
    # step-0 tokens: a class token (vocab + class id), or for frame prediction any token of its table (the video
    # tokens and the separator: its prefix runs through prefix_prefill.onnx, the decode steps after it)
    first = (lambda n: rng.integers(0, cfg.vocab_size + 1, n)) if cfg.frame_prediction else \
        (lambda n: cfg.vocab_size + rng.integers(0, cfg.num_classes, n))
    for name in ("fused", "fused@mix"):
        if name == "fused":
            token = first(R)
            pos = np.zeros(R, np.int64)
            rows = np.arange(R)  # request b in row b, its null row in row B + b
            steps = np.zeros(batch, np.int64)
        else:
            token = rng.integers(0, cfg.vocab_size, R)
            pos = rng.integers(1, 8, R)
            token[0], pos[0] = int(first(1)[0]), 0  # a joining request
            rows = rng.permutation(R)
            steps = rng.integers(0, 1000, batch)
        feeds = {"token": token.astype(np.int64).reshape(-1, 1), "pos": pos.astype(np.int64),
                 **cache_feeds(info.inputs, R, 8, rng, zeros=name == "fused")[0]}
        logits, *kv = plain.run(["logits", *present], feeds)
        if not np.isfinite(logits).all():  # decode.onnx's own checks fail already; the sampler cannot be compared
            checks.append(GraphCheck(name, "logits", float("inf"), float("inf"), tol["logits"]))
            return checks
        extra = {"sample_rows": rows.astype(np.int64), "cfg_scale": params.cfg_scale,
                 "temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                 "seed": params.seed.view(np.int64), "stream": params.stream.view(np.int64),
                 "sample_step": steps.astype(np.int64)}
        tokens, logp, *kv_f = fused.run(["tokens", "logprobs", *present], {**feeds, **extra})
        want_t, want_l = S.sample(logits[rows[:batch]], logits[rows[batch:]], params, steps, return_logprobs=True)
        if not np.array_equal(tokens, want_t):
            raise ExportError(f"decode_sample.onnx drew {tokens.tolist()} ({name}) where decode.onnx + the "
                              f"reference sampler draw {want_t.tolist()}")
        checks.append(compare(name, "logprobs", logp, want_l,
                              1e-9 if name == "fused" and exact_prefill else tol["logits"]))
        if name != "fused":
            ref = dequantized_presents(present, kv)
            step = 0.0 if exact_prefill else narrow_step(present, kv)
            checks.append(compare(name, "present", dequantized_presents(present, kv_f), ref, tol["kv"] + step))
    return checks


def sampler_entry(manifest: dict[str, Any], fused: bool, precision: str) -> dict[str, Any]:
    """The manifest's ``sampler`` entry (after ``export_samplers``, which records the packed MatMuls there)."""
    attention = ("larp_rt::DecodeAttention" if precision != "fp16" else "standard") if fused else None
    packed = (manifest.get("sampler") or {}).get("packed_matmuls", 0)
    return {"graph": "sample", "fused": "decode_sample" if fused else None, "fused_attention": attention,
            "fused_matmul": "larp_rt::PackedMatMul" if packed else None, "packed_matmuls": packed,
            "custom_op_domain": "larp_rt", "custom_op_library": "liblarp_rt_ort.so"}
