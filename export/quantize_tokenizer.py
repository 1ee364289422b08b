"""An int8 tokenizer (``encoder.onnx`` / ``decoder.onnx``), built on ONNX Runtime's own quantizer.

    export_bundle(tok_dir, gen_dir, "bundles/larp", tokenizer_precision="int8")  # --tokenizer-precision int8

The tokenizer's graphs are first exported and verified against PyTorch in float32 as usual (they stay the
reference). The int8 variant is then made from the same model in two steps, both ONNX Runtime's:

1. the graphs are traced again with each transformer block's attention core as one
   ``com.microsoft::MultiHeadAttention`` node (ONNX Runtime's fused CPU kernel; the standard-ops attention
   materialises the (heads, L, L) scores and runs Softmax over them), q, k and v each from its own MatMul (the
   kernel takes no packed QKV on the CPU, and slicing one qkv output cost ~4% of the int8 graphs), and checked
   against the float32 graphs (same tolerance as the export's). Alone it is x1.05-1.08 for LARP-S; with int8
   MatMuls it is worth ~10%;
2. ``onnxruntime.quantization.quantize_dynamic`` rewrites every weight MatMul into ``MatMulInteger`` with
   int8 weights (per output channel, symmetric) and uint8 activations quantized per call (ONNX Runtime fuses them into
   ``DynamicQuantizeMatMul``: VNNI dot products on AVX-512 VNNI CPUs). Left in float32: the cosine MatMul
   against the codebook before the encoder's ArgMax (the indices are chosen in float32), the bottleneck
   projections into and out of code space (D x code_dim: cheap, and they set the cosines), the patch-embedding
   Conv, LayerNorms, the attention core, the decoder's final clamp.

Every variant in ``VARIANTS`` (quantize_dynamic per tensor / per channel / with the attention MatMuls,
MatMulNBits 8-bit, quantize_static QDQ, each with and without the fused attention, the earlier packed-qkv int8)
was measured by ``benchmarks/bench_quant_tokenizer.py`` (README "int8 tokenizer"); this one was the fastest, with
the best index agreement among the fast ones, all within the 0.5 dB PSNR bound: about x1.85 for LARP-S encode
and decode at batch 1 on the 2-core AVX-512 VNNI host.

Why not 2x (benchmarks/results/quant_tokenizer_notes.md has the profiles): in the int8 graphs the float32 attention
core is ~60% of the time and the int8 MatMuls ~26%. ``MultiHeadAttention`` already runs at ~330 GFLOP/s, about ONNX
Runtime's own float32 GEMM rate on this CPU (~350), so no float32 attention is faster (measured on one block
against it: ``QAttention`` x0.83, float ``Attention`` x0.74, standard ops x0.7-0.8, its flash path off x0.76,
intra-op threads / spinning / ``session.dynamic_block_base`` x0.7-1.02); the int8 MatMuls already run at
``MatMulInteger``'s rate (~1.1 TOPS, 2.9x float32; ``MatMulNBits`` accuracy_level 4 is float32 speed or slower).
With every op but attention and the int8 MatMuls free the graph would be x2.2, so the gap to 2x can only close with
an attention core in narrower arithmetic (bf16 or int8 dot products), which ONNX Runtime's CPU provider does not
have: it would be a kernel of our own (cpp_ext). bf16 is not offered: ONNX Runtime's CPU provider has no bfloat16
MatMul, Gemm or Add kernel (the session refuses the graph), so it cannot run here.

The manifest records ``tokenizer.precision`` ("int8") and ``tokenizer.quantization`` (method, settings, the
nodes kept in float32 and the error measured against the float32 graphs on probe clips: index agreement of the
encoder, PSNR of the decoder's and of the round trip's output). ``Bundle`` refuses a tokenizer whose graphs do
not hold what the manifest claims (``check_graph_precision`` in larp_rt/bundle.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..bundle import BundleWriter
from ..models import LARPTokenizer
from ..models.tokenizer import Attention
from .graphs import DecoderGraph, EncoderGraph
from .quantize import quantize_model
from .trace import save_graph, trace_module
from .verify import ExportError, ort_session

# onnxruntime.quantization is imported where it is used: it is slow to import, and ``quantizer_available`` says
# when it does not import here (instead of this module failing to import).

TOKENIZER_PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZED = ("int8",)
INT8_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")  # what an int8 tokenizer graph holds (check_graph_precision)
FUSED_ATTENTION = "com.microsoft::MultiHeadAttention"
# q, k, v from three MatMuls rather than one qkv MatMul whose (B, L, 3D) output is sliced for MultiHeadAttention
# (whose CPU kernel takes no packed QKV): the three Slice copies were ~4% of the int8 graphs' time
SPLIT_QKV = True
PER_CHANNEL = True  # measured on the tiny pair: index agreement 0.963 vs 0.943 per tensor, PSNR alike, same speed
# the fused (still float32) graphs against the float32 ones: the export's float32 tolerances (export/onnx_export.py)
FUSED_TOL = {"latents": 1e-4, "video": 1e-4}


def resolve_precision(tokenizer_precision: str | None, precision: str, has_tokenizer: bool) -> str:
    """The tokenizer precision an export writes (None: the bundle's ``precision`` for fp16, else fp32); raises
    ValueError with what is accepted for a bad or conflicting value."""
    if tokenizer_precision is None:
        return "fp16" if precision == "fp16" else "fp32"
    if tokenizer_precision not in TOKENIZER_PRECISIONS:
        raise ValueError(f"tokenizer_precision must be one of {', '.join(TOKENIZER_PRECISIONS)} (or None: as "
                         f"precision), got {tokenizer_precision!r}")
    if not has_tokenizer:
        raise ValueError(f"tokenizer_precision {tokenizer_precision!r} is for the tokenizer's graphs: give a tokenizer")
    if (tokenizer_precision == "fp16") != (precision == "fp16"):
        if tokenizer_precision in QUANTIZED:
            raise ValueError(f"tokenizer_precision {tokenizer_precision!r} is quantized from float32 tokenizer graphs: "
                             "export with precision fp32, int8 or int4 (precision fp16 makes every graph fp16)")
        raise ValueError(f"tokenizer_precision {tokenizer_precision!r} with precision {precision!r}: an fp16 tokenizer "
                         "comes only with precision fp16 (the whole bundle in fp16); use fp32 or int8")
    if tokenizer_precision in QUANTIZED:
        why = quantizer_available()
        if why is not None:
            raise ValueError(why)
    return tokenizer_precision


def quantizer_available() -> str | None:
    """None when ONNX Runtime's quantization tools import, else why not (and how to fix it)."""
    try:
        import onnx  # noqa: F401
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401
    except ImportError as e:
        return (f"ONNX Runtime's quantize_dynamic does not import here ({e}); install the export extra: "
                "pip install 'larp_rt[export]'")
    return None


# ------------------------------------------------------------------------------------------------
# step 1: the attention core as ONNX Runtime's fused MultiHeadAttention
# ------------------------------------------------------------------------------------------------
class _MultiHeadAttention:
    """SDPA over (B, L, D) q, k, v split in ``heads``; traced as ``com.microsoft::MultiHeadAttention``."""

    @staticmethod
    def function():
        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, heads):  # noqa: ARG004
                B, L, D = q.shape
                split = lambda t: t.reshape(B, L, heads, D // heads).transpose(1, 2)  # noqa: E731
                return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(B, L, D)

            @staticmethod
            def symbolic(g, q, k, v, heads):
                return g.op(FUSED_ATTENTION, q, k, v, num_heads_i=heads).setType(q.type())

        return Fn


def _fused_forward(fn, split_qkv: bool):
    def forward(self, x):
        if split_qkv:  # three MatMuls on the (q | k | v) row blocks of qkv's weight: no Slice of a (B, L, 3D) output
            q, k, v = (F.linear(x, w) for w in self.qkv.weight.chunk(3, dim=0))
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # qkv's output is (q | k | v), each heads x head_dim
        return self.proj(fn.apply(q, k, v, self.heads))

    return forward


@contextlib.contextmanager
def fused_attention(tok, split_qkv: bool = SPLIT_QKV):
    """Within: the tokenizer's encoder/decoder blocks compute attention with the fused op (same math);
    ``split_qkv``: q, k and v each from its own MatMul (else one qkv MatMul and a split of its output)."""
    fn = _MultiHeadAttention.function()
    mods = [m for body in (tok.encoder, tok.decoder) for m in body.modules() if isinstance(m, Attention)]
    for m in mods:
        m.forward = types.MethodType(_fused_forward(fn, split_qkv), m)
    try:
        yield len(mods)
    finally:
        for m in mods:
            del m.forward  # the class's forward again


def trace_fused(tok, opset: int, batch: int = 1, split_qkv: bool = SPLIT_QKV):
    """(encoder, decoder) ``onnx.ModelProto``s of ``tok`` (float32) with the fused attention op (``split_qkv``:
    as ``fused_attention``)."""
    cfg = tok.config
    C, T, H, W = cfg.video_shape
    video = torch.zeros(batch, C, T, H, W)
    indices = torch.zeros(batch, cfg.num_tokens, dtype=torch.int64)
    ms = {"com.microsoft": 1}
    with fused_attention(tok, split_qkv), torch.no_grad():
        enc = trace_module(EncoderGraph(tok), (video,), ["video"], ["indices", "latents"],
                           {"video": {0: "B"}, "indices": {0: "B"}, "latents": {0: "B"}}, opset, custom_opsets=ms)
        dec = trace_module(DecoderGraph(tok), (indices,), ["indices"], ["video"],
                           {"indices": {0: "B"}, "video": {0: "B"}}, opset, custom_opsets=ms)
    return enc, dec


# ------------------------------------------------------------------------------------------------
# step 2: int8 weight MatMuls (quantize_dynamic)
# ------------------------------------------------------------------------------------------------
def kept_float(model, code_dim: int) -> list[str]:
    """Names of the weight MatMuls left in float32: the one feeding ArgMax (cosines against the codebook) and the
    bottleneck projections (a weight with a ``code_dim`` side)."""
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    keep = []
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        if any(u.op_type == "ArgMax" for u in users.get(n.output[0], [])):
            keep.append(n.name)
        elif n.input[1] in consts and code_dim in consts[n.input[1]]:
            keep.append(n.name)
    return keep


def quantize_int8(model, code_dim: int, *, per_channel: bool = PER_CHANNEL):
    """``model`` with its weight MatMuls (but ``kept_float``'s) as int8 ``MatMulInteger``; (model, kept names)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # optional: see the note at the top

    keep = kept_float(model, code_dim)
    qlog = logging.getLogger()
    level = qlog.level
    qlog.setLevel(logging.ERROR)  # quantize_dynamic warns about pre-processing on every call
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=per_channel,
                             weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                             extra_options={"MatMulConstBOnly": True})
            q = onnx.load(str(out), load_external_data=True)
    finally:
        qlog.setLevel(level)
    return q, keep


# the variants benchmarks/bench_quant_tokenizer.py measures (int8 = "fused+dyn-pc"); all ONNX Runtime's tools
VARIANTS = {
    "fused": "fp32 with the fused MultiHeadAttention only (no quantization)",
    "dyn": "quantize_dynamic, int8 weights per tensor, standard-ops attention",
    "dyn-pc": "quantize_dynamic, int8 weights per channel, standard-ops attention",
    "dyn-all": "quantize_dynamic, per tensor, the attention MatMuls too (MatMulConstBOnly False)",
    "nbits8": "MatMulNBitsQuantizer bits 8, block 32, accuracy_level 4 (int8 compute)",
    "static": "quantize_static, QDQ, int8 activations (MinMax calibration on clips), per-channel weights",
    "fused+dyn": "fused attention + quantize_dynamic per tensor",
    "fused+dyn-pc": "fused attention (q, k, v from three MatMuls) + quantize_dynamic per channel (the shipped int8)",
    "fused+nbits8": "fused attention + MatMulNBitsQuantizer bits 8, block 32, accuracy_level 4",
    "packed+dyn-pc": "the int8 before: fused attention fed by one qkv MatMul + Slice, quantize_dynamic per channel",
}


def build_variant(name: str, plain, fused, code_dim: int, calibration: list[dict] | None = None, packed=None):
    """The ``VARIANTS`` entry ``name`` of one tokenizer graph, from its exported float32 ``plain`` and its
    ``trace_fused`` ``fused`` ModelProto (``packed``: ``trace_fused(..., split_qkv=False)``'s, for the
    ``packed+`` variant); ``calibration``: feeds for quantize_static."""
    from onnxruntime.quantization import (  # optional: see the note at the top
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    base, _, method = name.rpartition("+") if "+" in name else ("", "", name)
    if base == "packed" and packed is None:
        raise ValueError(f"the {name} variant needs the packed-qkv fused graph (packed=)")
    src = {"fused": fused, "packed": packed}.get(base, fused if name == "fused" else plain)
    if name == "fused":
        return fused
    if method == "dyn-pc":
        return quantize_int8(src, code_dim, per_channel=True)[0]
    if method == "dyn":
        return quantize_int8(src, code_dim, per_channel=False)[0]
    keep = kept_float(src, code_dim)
    if method == "nbits8":  # the generator's 8-bit MatMulNBits (block 32, accuracy_level 4)
        return quantize_model(copy.deepcopy(src), "int8", nodes_to_exclude=keep)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        qlog = logging.getLogger()
        level = qlog.level
        qlog.setLevel(logging.ERROR)
        try:
            if method == "dyn-all":
                quantize_dynamic(src, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                                 nodes_to_exclude=keep, extra_options={"MatMulConstBOnly": False})
            else:  # static
                if not calibration:
                    raise ValueError("the static variant needs calibration feeds")

                class Reader(CalibrationDataReader):
                    def __init__(self):
                        self.it = iter(calibration)

                    def get_next(self):
                        return next(self.it, None)

                quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=keep, extra_options={"MatMulConstBOnly": True})
        finally:
            qlog.setLevel(level)
        return onnx.load(str(out), load_external_data=True)


def count_ops(model, ops) -> int:
    return sum(n.op_type in ops for n in model.graph.node)


# ------------------------------------------------------------------------------------------------
# the bundle step
# ------------------------------------------------------------------------------------------------
def quantize_tokenizer_graphs(w: BundleWriter, tok: LARPTokenizer, tokenizer_precision: str, *, opset: int,
                              verify: bool = True, batch: int = 2, seed: int = 0, printer=print) -> dict[str, Any]:
    """Replace ``encoder.onnx`` / ``decoder.onnx`` of an open ``BundleWriter`` (exported and verified in float32)
    by their ``tokenizer_precision`` variant; returns the manifest's ``tokenizer.quantization`` entry. Raises
    ExportError (the writer then leaves nothing behind) when a step fails its check."""
    if tokenizer_precision not in QUANTIZED:
        raise ValueError(f"tokenizer_precision {tokenizer_precision!r} is not a quantized one ({', '.join(QUANTIZED)})")
    graphs = w.manifest["graphs"]
    ref_paths: dict[str, Path] = {}
    fused_paths: dict[str, Path] = {}
    for name in ("encoder", "decoder"):  # the float32 graphs: the reference, until replaced
        ref_paths[name] = w.path(f".{name}_fp32.onnx")
        onnx.save_model(onnx.load(str(w.path(graphs[name]["file"])), load_external_data=True), str(ref_paths[name]))
    try:
        fused, n_fused = _fused_graphs(w, tok, opset, fused_paths)
        probes = _probes(ref_paths, tok.config, batch, seed)
        fused_err = _check_fused(ref_paths, fused_paths, probes)
        bad = {k: v for k, v in fused_err.items() if v > FUSED_TOL["latents" if k == "encoder" else "video"]}
        if bad:
            raise ExportError(f"the fused-attention tokenizer graphs differ from the float32 ones beyond the "
                              f"tolerance ({bad}); nothing was written")
        entry: dict[str, Any] = {
            "method": "onnxruntime.quantization.quantize_dynamic", "weights": "int8", "activations": "uint8 per call",
            "per_channel": PER_CHANNEL, "symmetric_weights": True, "op": "MatMulInteger",
            "attention": FUSED_ATTENTION, "split_qkv": SPLIT_QKV, "graphs": {}}
        for name in ("encoder", "decoder"):
            n_int8, keep = _write_int8(w, name, fused[name], tok.config.code_dim)
            entry["graphs"][name] = {"int8_matmuls": n_int8, "float_matmuls_kept": keep,
                                     "fused_attention": n_fused[name]}
            printer(f"  tokenizer {name:<8} {n_int8} MatMuls -> int8 MatMulInteger (quantize_dynamic), "
                    f"{n_fused[name]} attention cores -> MultiHeadAttention; kept float32: {len(keep)} "
                    "(codebook cosines, bottleneck projections)")
        entry["fused_vs_fp32_max_abs"] = fused_err
        if verify:
            v = entry["verification"] = measure_error(ref_paths, {k: w.path(graphs[k]["file"]) for k in ref_paths},
                                                      probes)
            printer(f"  int8 tokenizer vs float32 on {v['clips']} probe clips: encoder indices agree "
                    f"{v['indices_agreement']:.3f}, decoder PSNR {v['decoder_psnr_db']:.1f} dB, round trip PSNR "
                    f"{v['roundtrip_psnr_db']:.1f} dB")
            if not all(np.isfinite([v["latents_max_abs"], v["decoder_max_abs"]])):
                raise ExportError("the int8 tokenizer graphs give non-finite outputs; nothing was written")
    finally:
        for p in (*ref_paths.values(), *fused_paths.values()):
            p.unlink(missing_ok=True)
    return entry


def _fused_graphs(w: BundleWriter, tok: LARPTokenizer, opset: int, fused_paths: dict[str, Path],
                  ) -> tuple[dict[str, Any], dict[str, int]]:
    """Step 1: the float32 graphs traced with the fused attention op, saved beside the bundle's graphs (their paths
    into ``fused_paths``, which the caller removes); (the models, their MultiHeadAttention counts)."""
    fused = dict(zip(("encoder", "decoder"), trace_fused(tok.float().eval(), opset), strict=True))
    n_fused = {k: count_ops(m, ("MultiHeadAttention",)) for k, m in fused.items()}
    for k, n in n_fused.items():
        if n != len(getattr(tok, k).blocks):
            raise ExportError(f"the fused {k} graph has {n} MultiHeadAttention nodes for "
                              f"{len(getattr(tok, k).blocks)} blocks")
    for k, m in fused.items():
        fused_paths[k] = w.path(f".{k}_fused.onnx")
        onnx.save_model(m, str(fused_paths[k]))
    return fused, n_fused


def _write_int8(w: BundleWriter, name: str, fused, code_dim: int) -> tuple[int, list[str]]:
    """Step 2 for graph ``name``: its fused model quantized (``quantize_int8``) replaces the bundle's graph (and its
    external data); (the int8 MatMuls, the MatMuls kept float32)."""
    info = w.manifest["graphs"][name]
    qmodel, keep = quantize_int8(fused, code_dim)
    n_int8 = count_ops(qmodel, INT8_OPS)
    if n_int8 == 0:
        raise ExportError(f"quantize_dynamic rewrote no MatMul of {info['file']} to int8")
    for rel in info.get("data", []):  # the int8 graph holds its (4x smaller) weights itself when it can
        p = w.path(rel)
        if p.exists():
            p.unlink()
        w.manifest["files"].pop(rel, None)
    info.pop("data", None)
    data = save_graph(qmodel, w.path(info["file"]))
    if data:
        info["data"] = data
        w.add_file(data[0])
    w.add_file(info["file"])
    return n_int8, keep


def _probes(ref_paths, cfg, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Probe inputs: random indices, and the float32 decoder's videos of other random indices (clips the
    tokenizer can represent, so that the encoder's indices are not near-ties everywhere, as on noise)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.codebook_size, (batch, cfg.num_tokens)).astype(np.int64)
    clips = ort_session(ref_paths["decoder"]).run(["video"], {"indices": rng.integers(
        0, cfg.codebook_size, (batch, cfg.num_tokens)).astype(np.int64)})[0]
    return {"indices": idx, "video": clips}


def _check_fused(ref_paths, fused_paths, probes) -> dict[str, float]:
    out = {}
    for k, feed, o in (("encoder", {"video": probes["video"]}, "latents"),
                       ("decoder", {"indices": probes["indices"]}, "video")):
        a = ort_session(ref_paths[k]).run([o], feed)[0].astype(np.float64)
        b = ort_session(fused_paths[k]).run([o], feed)[0].astype(np.float64)
        out[k] = float(np.abs(a - b).max())
    return out


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of ``a`` against ``b``, videos in [0, 1], over all clips (mean of per-clip values)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def measure_error(ref_paths, q_paths, probes) -> dict[str, float]:
    """The variant against the float32 graphs on the probes: encoder index agreement and latent error, decoder and
    round-trip (decode(encode(clip))) PSNR of the variant's output against float32's."""
    ref = {k: ort_session(p) for k, p in ref_paths.items()}
    q = {k: ort_session(p) for k, p in q_paths.items()}
    clips, idx = probes["video"], probes["indices"]
    ri, rz = ref["encoder"].run(["indices", "latents"], {"video": clips})
    qi, qz = q["encoder"].run(["indices", "latents"], {"video": clips})
    rv = ref["decoder"].run(["video"], {"indices": idx})[0]
    qv = q["decoder"].run(["video"], {"indices": idx})[0]
    rr = ref["decoder"].run(["video"], {"indices": ri})[0]
    qr = q["decoder"].run(["video"], {"indices": qi})[0]
    return {"clips": len(clips), "indices_agreement": float((ri == qi).mean()),
            "latents_max_abs": float(np.abs(rz - qz).max()), "decoder_max_abs": float(np.abs(rv - qv).max()),
            "decoder_psnr_db": psnr_db(qv, rv), "roundtrip_psnr_db": psnr_db(qr, rr)}
