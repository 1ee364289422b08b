"""Checkpoint folders -> a bundle of ONNX graphs, verified against PyTorch.

    export_bundle(tokenizer_dir, generator_dir, "bundles/larp", precision="fp32", opset=17)

The graphs (see ``graphs.py``) are traced with the TorchScript-based exporter, which gives plain standard-op
graphs that ONNX Runtime and TensorRT both take. Default opset 17 (LayerNormalization as one op; TensorRT 8.6+
reads it); any opset in ``OPSETS`` can be chosen. Weights above ``EXTERNAL_DATA_BYTES`` go to one external
data file per graph (``<graph>.onnx.data``). Every graph is run in ONNX Runtime (CPU) on random inputs and
compared with PyTorch; beyond the stated tolerances the export fails and nothing is written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..bundle import BundleWriter
from ..checkpoint import load_pretrained, save_pretrained
from ..config import find_multiple
from ..models import LARPGenerator, LARPTokenizer
from .graphs import DecodeGraph, DecoderGraph, EncoderGraph, kv_names
from .prefill_graph import PREFILL_GRAPH, export_codebook, export_prefill
from .presets import resolve_preset
from .prior_export import export_prior

log = logging.getLogger(__name__)

OPSETS = range(14, 21)
DEFAULT_OPSET = 17
EXTERNAL_DATA_BYTES = 256 << 20
# max |ort - torch| allowed, by precision; indices must agree except at near-ties (checked separately)
TOLERANCES = {
    "fp32": {"latents": 1e-4, "video": 1e-4, "logits": 1e-3, "kv": 1e-4},
    "fp16": {"latents": 2e-2, "video": 2e-2, "logits": 5e-2, "kv": 2e-2},
}
# weight-only int8/int4 (export/quantize.py): traced and verified in float32, then quantized
TOLERANCES["int8"] = TOLERANCES["int4"] = TOLERANCES["fp32"]


class ExportError(RuntimeError):
    """Export or its verification failed; nothing was written."""


@dataclass
class GraphCheck:
    graph: str
    output: str
    max_abs: float
    max_rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tol

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        return (f"  {self.graph:<8} {self.output:<12} max abs {self.max_abs:.3e}  max rel {self.max_rel:.3e}  "
                f"(tol {self.tol:.0e}) {status}")


def _io(name: str, dtype: str, shape: list) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def _trace(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str],
           dynamic: dict[str, dict[int, str]], opset: int, custom_opsets: dict[str, int] | None = None):
    """Trace ``module`` to an in-memory ``onnx.ModelProto`` (weights loaded)."""
    import onnx

    module.eval()  # wrappers start in train mode, and the exporter restores the mode it found (dropout!)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        raw = os.path.join(tmp, "g.onnx")
        torch.onnx.export(module, args, raw, input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=opset, do_constant_folding=True, dynamo=False,
                          custom_opsets=custom_opsets or {})
        return onnx.load(raw, load_external_data=True)


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]], opset: int, custom_opsets: dict[str, int] | None = None) -> list[str]:
    """Trace ``module`` to ``path``; returns the files written (graph [+ external data])."""
    import onnx

    model = _trace(module, args, inputs, outputs, dynamic, opset, custom_opsets)
    onnx.checker.check_model(model, full_check=False)
    return [path.name, *_save(model, path)]


def _save(model, path: Path) -> list[str]:
    """Save ``model`` to ``path``: its weights embedded, or above ``EXTERNAL_DATA_BYTES`` in one file beside it
    (``<graph>.onnx.data``). Returns the external data files written ([] or [the .data name])."""
    import onnx

    if sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [data]
    onnx.save_model(model, str(path))
    return []


def _ort_session(path: Path, custom_ops: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom_ops:  # graphs with larp_rt::DecodeAttention / Sample nodes
        from .. import kernels

        so.register_custom_ops_library(kernels.ort_custom_op_library())
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


KV_DTYPES = ("fp32", "fp16", "int8")  # the decode graphs' KV cache element type (--kv-dtype)
_KV_NP = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def _scale_name(cache_name: str) -> str:
    """past_k_3 -> past_k_scale_3 (the per-slot scales of an int8 cache)."""
    base, i = cache_name.rsplit("_", 1)
    return f"{base}_scale_{i}"


def cache_feeds(inputs: list[dict], rows: int, slots: int, rng: np.random.Generator, *, zeros: bool = False,
                ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Random (or zero) cache feeds for a decode graph's ``past_*`` inputs (the manifest's io list), in each
    input's dtype (int8 caches come with their ``past_*_scale_*`` inputs), and the same caches as float32 (the
    dequantized values, in input order) for a float reference."""
    from .. import kernels

    feeds, floats = {}, []
    for io in inputs:
        name = io["name"]
        if not name.startswith("past_") or "_scale_" in name:
            continue
        _, H, _, hd = io["shape"]
        x = np.zeros((rows, H, slots, hd), np.float32) if zeros else rng.standard_normal((rows, H, slots, hd))
        x = x.astype(np.float32)
        if io["dtype"] == "int8":
            q, sc = kernels.quantize_kv(x)
            feeds[name], feeds[_scale_name(name)] = q, sc
            floats.append(q.astype(np.float32) * sc[..., None])
        else:
            feeds[name] = x.astype(_KV_NP[io["dtype"]])
            floats.append(feeds[name].astype(np.float32))
    return feeds, floats


def dequantized_presents(names: list[str], values: list[np.ndarray]) -> np.ndarray:
    """(2L, B, h, 1, hd) float32 of a decode graph's ``present_*`` outputs (int8 entries times their scales)."""
    out = dict(zip(names, values, strict=True))
    cache = [n for n in names if "_scale_" not in n]
    return np.stack([out[n].astype(np.float32) * out[_scale_name(n)][..., None] if out[n].dtype == np.int8
                     else out[n].astype(np.float32) for n in cache])


def _compare(graph: str, output: str, ours: np.ndarray, ref: np.ndarray, tol: float) -> GraphCheck:
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = max_abs / max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)  # relative to the output's scale
    return GraphCheck(graph, output, max_abs, max_rel, tol)


def _check_indices(idx_ort: np.ndarray, z_ref: np.ndarray, codes: np.ndarray, idx_ref: np.ndarray, tol: float):
    """Indices may differ only where the top-2 cosines are within the latent tolerance (a near-tie)."""
    bad = idx_ort != idx_ref
    if not bad.any():
        return 0
    cos = z_ref[bad] @ codes.T  # (M, K)
    gap = np.abs(np.take_along_axis(cos, idx_ort[bad][:, None], 1) - np.take_along_axis(cos, idx_ref[bad][:, None], 1))
    if (gap > 4 * tol).any():
        raise ExportError(f"encoder indices disagree with PyTorch beyond near-ties (max cosine gap {gap.max():.2e})")
    return int(bad.sum())


def export_bundle(
    tokenizer_dir: str | os.PathLike | None,
    generator_dir: str | os.PathLike | None,
    bundle_dir: str | os.PathLike,
    *,
    precision: str | None = None,
    opset: int = DEFAULT_OPSET,
    onnx_only: bool = False,
    verify: bool = True,
    overwrite: bool = False,
    batch: int = 2,
    seed: int = 0,
    fused_sampler: bool | None = None,
    printer=print,
    revision: str | None = None,
    kv_dtype: str | None = None,
    tokenizer_precision: str | None = None,
    preset: str | None = None,
) -> Path:
    """Export a tokenizer and/or a generator checkpoint folder (ours or the authors') to a verified bundle.

    A generator brings ``decode.onnx`` (standard ONNX ops: the portable graph, for GPU providers, TensorRT and
    machines without the kernels) and the standard-ops sampler ``sample.onnx``; ``fused_sampler`` adds
    ``decode_sample.onnx``: the decode step with the custom ops ``larp_rt::DecodeAttention`` (float32 caches: it
    reads only each row's written slots) and ``larp_rt::Sample``, the fastest CPU path, which the Engine picks
    whenever the bundle has it and the kernels are built where it runs. ``fused_sampler=None`` (the default)
    writes it whenever this install has built the custom-op library (else it says why it was left out); frame-
    prediction generators get it too (their prefix runs through prefix_prefill.onnx, the steps after it fused);
    True requires it, False leaves it out.

    ``kv_dtype`` ("fp32", "fp16" or "int8"; default: the weights' float type) is the KV cache's element type. A
    narrow cache under float32 activations (fp32 / int8 / int4 weights) is read by the custom
    ``larp_rt::DecodeAttention`` op in every decode graph (needs the built kernels; ONNX Runtime CPU); int8
    caches carry one float32 scale per (row, head, slot) for keys and for values.
    ``tokenizer_precision`` "int8" quantizes the tokenizer's encoder/decoder (export/quantize_tokenizer.py); None
    keeps them at ``precision``'s float type.
    ``preset`` ("exact", the default, or "fast": export/presets.py) fills the precision, KV and tokenizer options
    that are left None; ``precision`` None means the preset's ("fp32" for "exact").
    """
    if tokenizer_dir is None and generator_dir is None:
        raise ValueError("give a tokenizer and/or a generator checkpoint folder")
    frame_prediction = generator_dir is not None and _is_frame_prediction(generator_dir, revision)
    precision, kv_dtype, tokenizer_precision = resolve_preset(
        preset, precision=precision, kv_dtype=kv_dtype, tokenizer_precision=tokenizer_precision,
        has_generator=generator_dir is not None, has_tokenizer=tokenizer_dir is not None,
        frame_prediction=frame_prediction, printer=printer)
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {sorted(TOLERANCES)}, got {precision!r}")
    if opset not in OPSETS:
        raise ValueError(f"opset must be in [{OPSETS.start}, {OPSETS.stop - 1}], got {opset}")
    if precision in ("int8", "int4"):
        from .quantize import quantizer_available

        if generator_dir is None:
            raise ValueError(f"precision {precision!r} quantizes the generator's weights: give a generator")
        if (why := quantizer_available()) is not None:
            raise ValueError(why)
        if frame_prediction:  # prefix_prefill.onnx reads decode.onnx's weight file
            raise ValueError(f"precision {precision!r} is for class-conditional generators so far: a frame-prediction "
                             "generator's prefill graph shares decode.onnx's float weights; export it as fp32 or fp16")
    kv_dtype = _check_kv_dtype(kv_dtype, precision, generator_dir)
    fused_sampler = _resolve_fused(fused_sampler, generator_dir, revision, printer)
    if fused_sampler and generator_dir is None:
        raise ValueError("fused_sampler needs a generator")
    if fused_sampler:
        from .. import kernels

        if kernels.ort_custom_op_library() is None:
            raise ValueError("fused_sampler needs the ONNX Runtime custom-op library (liblarp_rt_ort.so), which this "
                             "install has not built: " + kernels.available()["errors"].get("liblarp_rt_ort.so", "")
                             + ". Reinstall with `pip install -e .`, or export without --fused-sampler")
    from .quantize_tokenizer import resolve_precision

    tokenizer_precision = resolve_precision(tokenizer_precision, precision, tokenizer_dir is not None)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    tol = TOLERANCES[precision]
    hub = {"revision": revision} if revision is not None else {}  # folders, or hub repo ids at this revision
    tok = load_pretrained(tokenizer_dir, kind="tokenizer", **hub) if tokenizer_dir is not None else None  # + prior
    gen = load_pretrained(generator_dir, kind="generator", **hub) if generator_dir is not None else None
    if tok is not None and gen is not None:
        t, g = tok.config, gen.config
        if g.vocab_size != t.codebook_size or g.max_seq_len != t.num_tokens:
            raise ValueError(
                f"generator (vocab {g.vocab_size}, {g.max_seq_len} tokens) does not match the tokenizer "
                f"(codebook {t.codebook_size}, {t.num_tokens} tokens)"
            )
    checks: list[GraphCheck] = []
    gen_rng = torch.Generator().manual_seed(seed)
    with BundleWriter(bundle_dir, overwrite=overwrite) as w, torch.no_grad():
        m = w.manifest
        m.update({
            "precision": precision,
            "created_by": {"larp_rt": __version__, "torch": torch.__version__, "onnx": _onnx_version(), "opset": opset},
            "tokenizer": None, "generator": None, "checkpoints": {},
        })
        if tok is not None:
            checks += _export_tokenizer(w, tok, dtype, opset, batch, gen_rng, tol, verify)
            m["tokenizer"] = {"config": tok.config.to_dict(), "codebook": export_codebook(w, tok)}  # stochastic SVQ
            m["tokenizer"]["prior"], prior_checks = export_prior(w, tok, dtype, opset, batch, gen_rng, tol, verify)
            checks += prior_checks  # prior.onnx + prior_score.onnx when the tokenizer has a prior, else None
            if not onnx_only:
                save_pretrained(tok, w.path("torch/tokenizer"))
                m["checkpoints"]["tokenizer"] = "torch/tokenizer"
                w.add_file("torch/tokenizer/config.json")
                w.add_file("torch/tokenizer/model.safetensors")
        if gen is not None:
            checks += _export_generator(w, gen, dtype, opset, batch, gen_rng, tol, verify, kv_dtype)
            checks += _export_samplers(w, gen, fused_sampler, opset, batch, gen_rng, verify, kv_dtype)
            if precision in ("int8", "int4"):
                from .quantize import quantize_bundle_graphs

                m["quantization"] = quantize_bundle_graphs(w, precision, verify=verify, batch=batch, seed=seed,
                                                           printer=printer, kv_dtype=kv_dtype)
            cfg = gen.config
            m["generator"] = {
                "config": cfg.to_dict(),
                "kv_cache": {"layers": cfg.n_layer, "heads": cfg.n_head, "head_dim": cfg.head_dim,
                             "max_seq": find_multiple(cfg.num_positions, 8), "dtype": kv_dtype,
                             "attention": ("larp_rt::DecodeAttention" if _narrow_kv(kv_dtype, precision)
                                           else "standard")},
            }
            if kv_dtype == "int8":
                m["generator"]["kv_cache"]["scales"] = {"granularity": "per (row, head, slot)", "dtype": "float32",
                                                        "symmetric": True, "qmax": 127,
                                                        "inputs": "past_{k,v}_scale_{layer}: (B, h, S)"}
            attention = ("larp_rt::DecodeAttention" if precision != "fp16" else "standard") if fused_sampler else None
            if cfg.frame_prediction:  # the prefix (cond tokens + separator) runs through one multi-token graph
                m["generator"]["prefill"] = {"graph": PREFILL_GRAPH, "prefix_tokens": cfg.cls_token_num,
                                             "separator": cfg.vocab_size}
            packed = (m.get("sampler") or {}).get("packed_matmuls", 0)
            m["sampler"] = {"graph": "sample", "fused": "decode_sample" if fused_sampler else None,
                            "fused_attention": attention,
                            "fused_matmul": "larp_rt::PackedMatMul" if packed else None, "packed_matmuls": packed,
                            "custom_op_domain": "larp_rt", "custom_op_library": "liblarp_rt_ort.so"}
            m["default_sampling"] = {"cfg_scale": 1.25 if gen.has_null_class else 1.0, "temperature": 1.0,
                                     "top_k": 0, "top_p": 1.0}
            if not onnx_only:
                save_pretrained(gen, w.path("torch/generator"))
                m["checkpoints"]["generator"] = "torch/generator"
                w.add_file("torch/generator/config.json")
                w.add_file("torch/generator/model.safetensors")
        if tok is not None:  # the tokenizer's precision; int8: its graphs quantized (export/quantize_tokenizer.py)
            m["tokenizer"]["precision"] = tokenizer_precision
            if tokenizer_precision == "int8":
                from .quantize_tokenizer import quantize_tokenizer_graphs

                m["tokenizer"]["quantization"] = quantize_tokenizer_graphs(
                    w, tok, tokenizer_precision, opset=opset, verify=verify, batch=batch, seed=seed, printer=printer)
            if isinstance(m.get("quantization"), dict):
                m["quantization"]["tokenizer"] = tokenizer_precision
        if verify:
            printer(f"verification against PyTorch ({precision}, ONNX Runtime CPU):")
            for c in checks:
                printer(c.line())
            m["verification"] = [{"graph": c.graph, "output": c.output, "max_abs": c.max_abs, "max_rel": c.max_rel,
                                  "tol": c.tol} for c in checks]
            failed = [c for c in checks if not c.ok]
            if failed:
                raise ExportError(
                    "verification failed for " + ", ".join(f"{c.graph}.{c.output}" for c in failed)
                    + " (errors above the tolerance); nothing was written. Pass --no-verify to write it anyway."
                )
        out = w.commit()
    printer(f"bundle written to {out}")
    return out


def _narrow_kv(kv_dtype: str, precision: str) -> bool:
    """A cache narrower than the activations: read by the fused attention op in decode.onnx itself."""
    return kv_dtype != ("fp16" if precision == "fp16" else "fp32")


def _check_kv_dtype(kv_dtype: str | None, precision: str, generator_dir) -> str:
    """The cache type to export (default: the weights' float type), or ValueError saying what is accepted."""
    default = "fp16" if precision == "fp16" else "fp32"
    if kv_dtype is None:
        return default
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    if generator_dir is None and kv_dtype != default:
        raise ValueError(f"kv_dtype {kv_dtype!r} is the generator's KV cache: give a generator")
    if precision == "fp16" and kv_dtype != "fp16":
        raise ValueError(f"an fp16 bundle keeps an fp16 KV cache; kv_dtype {kv_dtype!r} goes with float32 "
                         "activations: export with --precision fp32, int8 or int4")
    if _narrow_kv(kv_dtype, precision):
        from .. import kernels

        if kernels.ort_custom_op_library() is None:
            raise ValueError(f"kv_dtype {kv_dtype!r} is read by the larp_rt::DecodeAttention op of the ONNX Runtime "
                             "custom-op library (liblarp_rt_ort.so), which this install has not built: "
                             + kernels.available()["errors"].get("liblarp_rt_ort.so", "")
                             + ". Reinstall with `pip install -e .`, or export without --kv-dtype")
    return kv_dtype


def _resolve_fused(fused_sampler: bool | None, generator_dir, revision, printer) -> bool:
    """The default (None): write the fused graph when it can run here; True / False as asked (checked later)."""
    if fused_sampler is not None:
        return bool(fused_sampler)
    if generator_dir is None:
        return False
    from .. import kernels

    if kernels.ort_custom_op_library() is None:
        printer("note: decode_sample.onnx (the fused DecodeAttention + Sample step, the fastest CPU path) is left out: "
                "this install has not built the ONNX Runtime custom-op library ("
                + kernels.available()["errors"].get("liblarp_rt_ort.so", "liblarp_rt_ort.so missing")
                + "); reinstall with `pip install -e .` to get it")
        return False
    return True


def _is_frame_prediction(generator_dir, revision=None) -> bool:
    from ..checkpoint import read_config

    kind, cfg, _ = read_config(generator_dir, revision=revision)
    return kind == "generator" and cfg.frame_prediction


def _onnx_version() -> str:
    import onnx

    return onnx.__version__


def _export_tokenizer(w: BundleWriter, tok: LARPTokenizer, dtype, opset, batch, rng, tol, verify) -> list[GraphCheck]:
    cfg = tok.config
    tok = tok.to(dtype).eval()
    C, T, H, W = cfg.video_shape
    N, d = cfg.num_tokens, cfg.code_dim
    video = torch.rand(batch, C, T, H, W, generator=rng)
    enc = EncoderGraph(tok)
    files = _export(enc, (video,), w.path("encoder.onnx"), ["video"], ["indices", "latents"],
                    {"video": {0: "B"}, "indices": {0: "B"}, "latents": {0: "B"}}, opset)
    w.add_graph("encoder", files[0], [_io("video", "float32", ["B", C, T, H, W])],
                [_io("indices", "int64", ["B", N]), _io("latents", "float32", ["B", N, d])], files[1:])
    indices = torch.randint(0, cfg.codebook_size, (batch, N), generator=rng)
    dec = DecoderGraph(tok)
    files = _export(dec, (indices,), w.path("decoder.onnx"), ["indices"], ["video"],
                    {"indices": {0: "B"}, "video": {0: "B"}}, opset)
    w.add_graph("decoder", files[0], [_io("indices", "int64", ["B", N])],
                [_io("video", "float32", ["B", C, T, H, W])], files[1:])
    if not verify:
        return []
    checks = []
    idx_ref, z_ref = enc(video)
    idx_ort, z_ort = _ort_session(w.path("encoder.onnx")).run(None, {"video": video.numpy()})
    checks.append(_compare("encoder", "latents", z_ort, z_ref.numpy(), tol["latents"]))
    codes = tok.bottleneck.regularizer.codebook().float().numpy()
    _check_indices(idx_ort, z_ref.numpy(), codes, idx_ref.numpy(), tol["latents"])
    (vid_ort,) = _ort_session(w.path("decoder.onnx")).run(None, {"indices": indices.numpy()})
    checks.append(_compare("decoder", "video", vid_ort, dec(indices).numpy(), tol["video"]))
    return checks


def _decode_names(n_layer: int, kv_dtype: str = "fp32") -> tuple[list[str], list[str], dict[str, dict[int, str]]]:
    """Input names, output names and dynamic axes of the decode step (decode.onnx and the fused graph's trace);
    an int8 cache adds its scales (past_k_scale_0, ... after the caches; present_k_scale_0, ... likewise)."""
    past, present = kv_names("past", n_layer), kv_names("present", n_layer)
    if kv_dtype == "int8":
        past, present = past + kv_names("past", n_layer, "_scale"), present + kv_names("present", n_layer, "_scale")
    dynamic = {"token": {0: "B"}, "pos": {0: "B"}, "logits": {0: "B"}, **{n: {0: "B", 2: "S"} for n in past},
               **{n: {0: "B"} for n in present}}
    return ["token", "pos", *past], ["logits", *present], dynamic


def _decode_io(cfg, kv_dtype: str, float_dtype: str) -> tuple[list[dict], list[dict]]:
    """The manifest's input and output lists of decode.onnx."""
    H, hd, L, V = cfg.n_head, cfg.head_dim, cfg.n_layer, cfg.vocab_size
    cache = {"fp32": "float32", "fp16": "float16", "int8": "int8"}[kv_dtype] if kv_dtype != "fp32" else float_dtype
    inputs = ([_io("token", "int64", ["B", 1]), _io("pos", "int64", ["B"])]
              + [_io(n, cache, ["B", H, "S", hd]) for n in kv_names("past", L)])
    outputs = [_io("logits", "float32", ["B", V])] + [_io(n, cache, ["B", H, 1, hd]) for n in kv_names("present", L)]
    if kv_dtype == "int8":
        inputs += [_io(n, "float32", ["B", H, "S"]) for n in kv_names("past", L, "_scale")]
        outputs += [_io(n, "float32", ["B", H, 1]) for n in kv_names("present", L, "_scale")]
    return inputs, outputs


def _export_generator(w: BundleWriter, gen: LARPGenerator, dtype, opset, batch, rng, tol, verify,
                      kv_dtype: str = "fp32") -> list[GraphCheck]:
    cfg = gen.config
    gen = gen.to(dtype).eval()
    H, hd, L, V = cfg.n_head, cfg.head_dim, cfg.n_layer, cfg.vocab_size
    S = find_multiple(cfg.num_positions, 8)
    float_dtype = "float16" if dtype == torch.float16 else "float32"
    narrow = _narrow_kv(kv_dtype, "fp16" if dtype == torch.float16 else "fp32")
    past, present = kv_names("past", L), kv_names("present", L)
    token = torch.randint(0, V, (batch, 1), generator=rng)
    pos = torch.randint(1, cfg.num_positions, (batch,), generator=rng)  # a position per row
    caches = [torch.randn(batch, H, S, hd, generator=rng).to(dtype) for _ in past]
    inputs, outputs = _decode_io(cfg, kv_dtype, float_dtype)
    if narrow:  # the cache in its own type (int8: + scales), read by the fused attention op
        feeds_c, floats = cache_feeds(inputs, batch, S, np.random.default_rng(int(torch.randint(0, 2**31, (1,),
                                                                                                generator=rng))))
        trace_caches = [torch.from_numpy(feeds_c[io["name"]]) for io in inputs[2:]]
        caches = [torch.from_numpy(f) for f in floats]  # the reference's (dequantized) caches
        dec = DecodeGraph(gen, fused_attention=True, kv_dtype=kv_dtype)
        files = _export(dec, (token, pos, *trace_caches), w.path("decode.onnx"), *_decode_names(L, kv_dtype), opset,
                        custom_opsets={"larp_rt": 1})
    else:
        feeds_c = {n: c.numpy() for n, c in zip(past, caches, strict=True)}
        dec = DecodeGraph(gen)
        files = _export(dec, (token, pos, *caches), w.path("decode.onnx"), *_decode_names(L), opset)
    w.add_graph("decode", files[0], inputs, outputs, files[1:])
    present = [o["name"] for o in outputs[1:]]
    fp_checks = []
    if cfg.frame_prediction:  # the multi-token prefill of the prefix (prefill_graph.py)
        _, fp_checks = export_prefill(w, gen, dtype, opset, batch, rng, tol, verify)
    if not verify:
        return []
    sess = _ort_session(w.path("decode.onnx"), custom_ops=narrow)
    checks = []

    def kv_tol(ref_kv: np.ndarray) -> float:  # + the rounding of the narrow entry (int8: up to 1.5 steps)
        if kv_dtype == "int8":
            return tol["kv"] + 1.5 * float(np.abs(ref_kv).max(-1).max()) / 127
        return tol["kv"] + (float(np.abs(ref_kv).max()) * 2.0**-11 if narrow else 0.0)

    def check(graph: str, out, ref_logits, ref_kv):
        checks.append(_compare(graph, "logits", out[0], ref_logits.float().numpy(), tol["logits"]))
        checks.append(_compare(graph, "present", dequantized_presents(present, out[1:]), ref_kv, kv_tol(ref_kv)))

    # a step mid-sequence with every row at its own position, against the model's own cached step (SDPA over a
    # cache holding the same past; a narrow cache's dequantized values)
    feeds = {"token": token.numpy(), "pos": pos.numpy(), **feeds_c}
    out = sess.run(None, feeds)
    check("decode", out, *_model_step(gen, token.view(-1), pos, caches))
    if cfg.frame_prediction:  # no class tokens: the prefix runs through prefix_prefill.onnx (checked there)
        return checks + fp_checks
    # the prefill: class tokens at position 0, against the model's prefill
    hi = cfg.num_classes + int(gen.has_null_class)
    class_ids = torch.randint(0, hi, (batch,), generator=rng)
    feeds = {"token": (V + class_ids).view(-1, 1).numpy(), "pos": np.zeros(batch, np.int64), **feeds_c}
    out = sess.run(None, feeds)
    gen.setup_caches(batch, S, dtype=caches[0].dtype)
    try:
        ref = gen.prefill(class_ids)
        ref_kv = _cache_slot(gen, torch.zeros(batch, dtype=torch.int64))
    finally:
        gen.clear_caches()
    check("prefill", out, ref, ref_kv)
    # a joining request: row 0 prefills (class token at position 0) in the same step as rows mid-sequence
    mixed_tok, mixed_pos = token.view(-1).clone(), pos.clone()
    mixed_tok[0], mixed_pos[0] = V + int(class_ids[0]), 0
    feeds = {"token": mixed_tok.view(-1, 1).numpy(), "pos": mixed_pos.numpy(), **feeds_c}
    out = sess.run(None, feeds)
    check("join", out, *_model_step(gen, mixed_tok, mixed_pos, caches))
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


def _export_samplers(w: BundleWriter, gen: LARPGenerator, fused: bool, opset: int, batch: int, rng,
                     verify: bool, kv_dtype: str = "fp32") -> list[GraphCheck]:
    """``sample.onnx`` always; ``decode_sample.onnx`` with ``fused``. Both verified against the reference sampler:
    token ids must be equal, logprobs within 1e-9.

    The fused graph is the decode step with the custom ops: ``larp_rt::DecodeAttention`` per layer (float32
    bundles: one node instead of ~15 standard ones, the cache read once) and ``larp_rt::Sample`` on the logits.
    Its weights are the decode graph's: with external data it points into ``decode.onnx.data``."""
    import onnx

    from .. import sampling as S
    from .sampler_graph import (
        FUSED_EXTRA_INPUTS,
        SAMPLER_INPUTS,
        build_sampler_model,
        fuse_decode_sample,
        pack_matmuls,
        share_external_data,
    )

    cfg = gen.config
    V = cfg.vocab_size
    onnx.save_model(build_sampler_model(), str(w.path("sample.onnx")))
    w.add_graph("sample", "sample.onnx", [_io("logits", "float32", ["R", V])]
                + [_io(n, t, ["B"]) for n, t in SAMPLER_INPUTS],
                [_io("tokens", "int64", ["B"]), _io("logprobs", "float64", ["B"])])
    decode_info = w.manifest["graphs"]["decode"]
    fp32 = gen.tok_embeddings.weight.dtype == torch.float32
    # float32 weights: the fused step's projections become larp_rt::PackedMatMul over weights packed in panels
    # (int8/int4 bundles quantize these MatMuls afterwards, fp16 ones keep ONNX Runtime's)
    pack = fused and fp32 and w.manifest["precision"] == "fp32"
    if fused:
        if fp32 and kv_dtype != "fp32":  # decode.onnx already reads its narrow cache through the fused op
            dec = onnx.load(str(w.path("decode.onnx")), load_external_data=pack)
        elif fp32:  # trace again with the fused attention op
            S_ = find_multiple(cfg.num_positions, 8)
            args = (torch.zeros(batch, 1, dtype=torch.int64), torch.ones(batch, dtype=torch.int64),
                    *[torch.zeros(batch, cfg.n_head, S_, cfg.head_dim) for _ in range(2 * cfg.n_layer)])
            dec = _trace(DecodeGraph(gen, fused_attention=True), args, *_decode_names(cfg.n_layer), opset,
                         custom_opsets={"larp_rt": 1})
        else:  # fp16: the standard attention (the custom op is float32); initializers stay external
            dec = onnx.load(str(w.path("decode.onnx")), load_external_data=False)
        fused_model = fuse_decode_sample(dec)
        data = decode_info.get("data", [])
        if pack:  # its own (packed) weights: embedded, or one external file of its own when large
            w.manifest.setdefault("sampler", {})["packed_matmuls"] = pack_matmuls(fused_model)
            data = _save(fused_model, w.path("decode_sample.onnx"))
        else:
            if fp32 and kv_dtype == "fp32" and decode_info.get("data"):
                share_external_data(fused_model, w.path("decode.onnx"))
            onnx.save_model(fused_model, str(w.path("decode_sample.onnx")))
        w.add_graph("decode_sample", "decode_sample.onnx",
                    decode_info["inputs"] + [_io(n, t, ["R_req" if n == "sample_rows" else "B_req"])
                                             for n, t in FUSED_EXTRA_INPUTS],
                    [_io("tokens", "int64", ["B_req"]), _io("logprobs", "float64", ["B_req"])]
                    + decode_info["outputs"][1:], data)
    if not verify:
        return []
    checks = []
    seeder = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    np_rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=seeder)))
    params = S.RowParams(
        cfg_scale=np.array([1.0, 2.0] * batch, np.float32)[:batch], temperature=np.array([1.0, 0.0, 0.7] * batch,
                                                                                        np.float32)[:batch],
        top_k=np.array([0, 5, V] * batch, np.int64)[:batch], top_p=np.array([0.9, 1.0] * batch, np.float32)[:batch],
        seed=np_rng.integers(0, 2**63, batch).astype(np.uint64), stream=np.arange(batch, dtype=np.uint64))
    logits = (np_rng.standard_normal((2 * batch, V)) * 3).astype(np.float32)
    u = S.uniform(params.seed, params.stream, 7)
    sess = _ort_session(w.path("sample.onnx"))
    tokens, logp = sess.run(None, {"logits": logits, "cfg_scale": params.cfg_scale, "temperature": params.temperature,
                                   "top_k": params.top_k, "top_p": params.top_p, "uniform": u})
    want_t, want_l = S.sample(logits[:batch], logits[batch:], params, 7, return_logprobs=True)
    if not np.array_equal(tokens, want_t):
        raise ExportError(f"sample.onnx drew {tokens.tolist()} where the reference sampler draws {want_t.tolist()}")
    checks.append(_compare("sample", "logprobs", logp, want_l, 1e-9))
    if fused:
        checks += _verify_fused(w, cfg, params, batch, np_rng, TOLERANCES[w.manifest["precision"]],
                                exact_prefill=not pack)
    return checks


def _verify_fused(w: BundleWriter, cfg, params, batch: int, rng, tol: dict, exact_prefill: bool = True,
                  ) -> list[GraphCheck]:
    """decode_sample.onnx against decode.onnx + the reference sampler, 2B rows (guided), in two steps:

    * the prefill (empty cache, every row at position 0, every request at sample step 0): tokens equal,
      logprobs to 1e-9 (``exact_prefill``: the same MatMuls as decode.onnx), else within the logits tolerance (the
      packed projections of larp_rt::PackedMatMul sum in another order than ONNX Runtime's MatMul);
    * a continuous-batch step: rows at their own positions (1..7) over 8 random cache slots (row b must ignore
      its slots >= pos[b]), one row joining at position 0 with its class token, the requests' rows and null rows
      shuffled in the step's rows (``sample_rows`` picks them), each request at its own sample step: tokens equal,
      the new cache entries of every layer within the kv tolerance (they carry the attention of the layers
      below), logprobs within the logits tolerance."""
    import onnxruntime as ort

    from .. import kernels
    from .. import sampling as S

    info = w.manifest["graphs"]["decode"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(kernels.ort_custom_op_library())
    fused = ort.InferenceSession(str(w.path("decode_sample.onnx")), so, providers=["CPUExecutionProvider"])
    plain = _ort_session(w.path("decode.onnx"), custom_ops=True)
    present = [o["name"] for o in info["outputs"][1:]]
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
                 **cache_feeds(info["inputs"], R, 8, rng, zeros=name == "fused")[0]}
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
        checks.append(_compare(name, "logprobs", logp, want_l,
                               1e-9 if name == "fused" and exact_prefill else tol["logits"]))
        if name != "fused":
            ref = dequantized_presents(present, kv)
            step = 0.0 if exact_prefill else _narrow_step(present, kv)
            checks.append(_compare(name, "present", dequantized_presents(present, kv_f), ref, tol["kv"] + step))
    return checks


def _narrow_step(names: list[str], values: list[np.ndarray]) -> float:
    """The largest rounding step of narrow cache entries (float16: 2^-10 of the largest magnitude, int8: the largest
    scale; 0 for float32): two graphs whose float32 entries differ by float32 rounding (PackedMatMul against
    ONNX Runtime's MatMul) may store entries one such step apart."""
    out = dict(zip(names, values, strict=True))
    steps = [0.0]
    for n, v in out.items():
        if v.dtype == np.float16:
            steps.append(float(np.abs(v.astype(np.float32)).max()) * 2.0**-10)
        elif v.dtype == np.int8:
            steps.append(float(out[_scale_name(n)].max()))
    return max(steps)
