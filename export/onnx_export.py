"""Checkpoint folders -> a bundle of ONNX graphs, verified against PyTorch: the orchestrator at the top of
``export/``.

    export_bundle(tokenizer_dir, generator_dir, "bundles/larp", precision="fp32", opset=17)

``export_bundle`` resolves the options (preset, precision, KV cache type, fused sampler, tokenizer precision),
loads the checkpoints and runs each graph family's module in turn, every one of which writes its graphs into the
bundle and verifies them in ONNX Runtime (CPU) against PyTorch:

* ``codec_export``: the tokenizer's encoder / decoder (+ ``codebook.npy``); ``prior_export``: its AR prior;
* ``decode_export``: the generator's decode step; ``prefill_graph``: a frame-prediction generator's prefix prefill;
* ``sampler_export``: the sampler graphs (``sample.onnx``, the fused ``decode_sample.onnx``);
* ``quantize`` / ``quantize_tokenizer``: the int8 / int4 variants, made from the verified float32 graphs.

Shared below them: ``trace`` (tracing, saving, external data) and ``verify`` (tolerances, checks, sessions). Beyond
the stated tolerances the export fails (``ExportError``) and nothing is written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, kernels
from ..bundle import BundleWriter
from ..checkpoint import load_pretrained, read_config, save_pretrained
from ..models import LARPGenerator, LARPTokenizer
from .codec_export import export_codebook, export_codec
from .decode_export import KV_DTYPES, export_decode, generator_entry, narrow_kv, verify_decode
from .prefill_graph import export_prefill
from .presets import resolve_preset
from .prior_export import export_prior
from .quantize import quantize_bundle_graphs, quantizer_available
from .quantize_tokenizer import quantize_tokenizer_graphs, resolve_precision
from .sampler_export import export_samplers, sampler_entry
from .trace import DEFAULT_OPSET, OPSETS, onnx_version
from .verify import TOLERANCES, ExportError, GraphCheck

# the names this module has always offered (tests and users import them from here)
__all__ = ["export_bundle", "ExportError", "GraphCheck", "DEFAULT_OPSET", "OPSETS", "TOLERANCES", "KV_DTYPES"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Options:
    """The export's resolved options (``_resolve_options``)."""

    precision: str  # the generator's weights: fp32 | fp16 | int8 | int4
    kv_dtype: str  # the generator's KV cache
    tokenizer_precision: str
    fused_sampler: bool
    opset: int

    @property
    def dtype(self) -> torch.dtype:  # the graphs' float type (int8 / int4 are traced in float32, then quantized)
        return torch.float16 if self.precision == "fp16" else torch.float32


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
    opts = _resolve_options(tokenizer_dir, generator_dir, revision, printer, precision=precision, opset=opset,
                            fused_sampler=fused_sampler, kv_dtype=kv_dtype, tokenizer_precision=tokenizer_precision,
                            preset=preset)
    tok, gen = _load_models(tokenizer_dir, generator_dir, revision)
    checks: list[GraphCheck] = []
    gen_rng = torch.Generator().manual_seed(seed)
    with BundleWriter(bundle_dir, overwrite=overwrite) as w, torch.no_grad():
        w.manifest.update({
            "precision": opts.precision,
            "created_by": {"larp_rt": __version__, "torch": torch.__version__, "onnx": onnx_version(),
                           "opset": opts.opset},
            "tokenizer": None, "generator": None, "checkpoints": {},
        })
        if tok is not None:
            checks += _write_tokenizer(w, tok, opts, batch, gen_rng, verify, onnx_only)
        if gen is not None:
            checks += _write_generator(w, gen, opts, batch, seed, gen_rng, verify, onnx_only, printer)
        if tok is not None:
            _write_tokenizer_precision(w, tok, opts, batch, seed, verify, printer)
        if verify:
            _record_checks(w.manifest, checks, opts.precision, printer)
        out = w.commit()
    printer(f"bundle written to {out}")
    return out


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------
def _resolve_options(tokenizer_dir, generator_dir, revision: str | None, printer, *, precision: str | None,
                     opset: int, fused_sampler: bool | None, kv_dtype: str | None, tokenizer_precision: str | None,
                     preset: str | None) -> _Options:
    """The preset filled in and every option checked (ValueError saying what is accepted) before anything loads."""
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
        _check_quantized(precision, generator_dir, frame_prediction)
    kv_dtype = _check_kv_dtype(kv_dtype, precision, generator_dir)
    fused_sampler = _resolve_fused(fused_sampler, generator_dir, printer)
    if fused_sampler and generator_dir is None:
        raise ValueError("fused_sampler needs a generator")
    if fused_sampler and kernels.ort_custom_op_library() is None:
        raise ValueError("fused_sampler needs the ONNX Runtime custom-op library (liblarp_rt_ort.so), which this "
                         "install has not built: " + kernels.available()["errors"].get("liblarp_rt_ort.so", "")
                         + ". Reinstall with `pip install -e .`, or export without --fused-sampler")
    tokenizer_precision = resolve_precision(tokenizer_precision, precision, tokenizer_dir is not None)
    return _Options(precision, kv_dtype, tokenizer_precision, fused_sampler, opset)


def _check_quantized(precision: str, generator_dir, frame_prediction: bool) -> None:
    """int8 / int4 weights: a class-conditional generator and ONNX Runtime's quantizer, or ValueError."""
    if generator_dir is None:
        raise ValueError(f"precision {precision!r} quantizes the generator's weights: give a generator")
    if (why := quantizer_available()) is not None:
        raise ValueError(why)
    if frame_prediction:  # prefix_prefill.onnx reads decode.onnx's weight file
        raise ValueError(f"precision {precision!r} is for class-conditional generators so far: a frame-prediction "
                         "generator's prefill graph shares decode.onnx's float weights; export it as fp32 or fp16")


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
    if narrow_kv(kv_dtype, precision) and kernels.ort_custom_op_library() is None:
        raise ValueError(f"kv_dtype {kv_dtype!r} is read by the larp_rt::DecodeAttention op of the ONNX Runtime "
                         "custom-op library (liblarp_rt_ort.so), which this install has not built: "
                         + kernels.available()["errors"].get("liblarp_rt_ort.so", "")
                         + ". Reinstall with `pip install -e .`, or export without --kv-dtype")
    return kv_dtype


def _resolve_fused(fused_sampler: bool | None, generator_dir, printer) -> bool:
    """The default (None): write the fused graph when it can run here; True / False as asked (checked later)."""
    if fused_sampler is not None:
        return bool(fused_sampler)
    if generator_dir is None:
        return False
    if kernels.ort_custom_op_library() is None:
        printer("note: decode_sample.onnx (the fused DecodeAttention + Sample step, the fastest CPU path) is left out: "
                "this install has not built the ONNX Runtime custom-op library ("
                + kernels.available()["errors"].get("liblarp_rt_ort.so", "liblarp_rt_ort.so missing")
                + "); reinstall with `pip install -e .` to get it")
        return False
    return True


def _is_frame_prediction(generator_dir, revision=None) -> bool:
    kind, cfg, _ = read_config(generator_dir, revision=revision)
    return kind == "generator" and cfg.frame_prediction


def _load_models(tokenizer_dir, generator_dir, revision: str | None,
                 ) -> tuple[LARPTokenizer | None, LARPGenerator | None]:
    """The checkpoints (folders, or hub repo ids at ``revision``); ValueError when the pair does not match."""
    hub = {"revision": revision} if revision is not None else {}
    tok = load_pretrained(tokenizer_dir, kind="tokenizer", **hub) if tokenizer_dir is not None else None  # + prior
    gen = load_pretrained(generator_dir, kind="generator", **hub) if generator_dir is not None else None
    if tok is not None and gen is not None:
        t, g = tok.config, gen.config
        if g.vocab_size != t.codebook_size or g.max_seq_len != t.num_tokens:
            raise ValueError(
                f"generator (vocab {g.vocab_size}, {g.max_seq_len} tokens) does not match the tokenizer "
                f"(codebook {t.codebook_size}, {t.num_tokens} tokens)"
            )
    return tok, gen


# ------------------------------------------------------------------------------------------------
# the bundle, family by family (the order fixes the random draws and the manifest's key order)
# ------------------------------------------------------------------------------------------------
def _write_tokenizer(w: BundleWriter, tok: LARPTokenizer, opts: _Options, batch: int, rng: torch.Generator,
                     verify: bool, onnx_only: bool) -> list[GraphCheck]:
    """The codec's graphs + codebook, the prior's graphs when it has one, the PyTorch checkpoint unless
    ``onnx_only``."""
    m, tol = w.manifest, TOLERANCES[opts.precision]
    checks = export_codec(w, tok, opts.dtype, opts.opset, batch, rng, tol, verify)
    m["tokenizer"] = {"config": tok.config.to_dict(), "codebook": export_codebook(w, tok)}  # stochastic SVQ
    m["tokenizer"]["prior"], prior_checks = export_prior(w, tok, opts.dtype, opts.opset, batch, rng, tol, verify)
    checks += prior_checks  # prior.onnx + prior_score.onnx when the tokenizer has a prior, else None
    if not onnx_only:
        _save_checkpoint(w, tok, "tokenizer")
    return checks


def _write_generator(w: BundleWriter, gen: LARPGenerator, opts: _Options, batch: int, seed: int,
                     rng: torch.Generator, verify: bool, onnx_only: bool, printer) -> list[GraphCheck]:
    """decode.onnx (+ the prefix prefill of frame prediction), the samplers, the quantized variant, the manifest's
    generator / sampler entries, the PyTorch checkpoint unless ``onnx_only``."""
    m, tol, cfg = w.manifest, TOLERANCES[opts.precision], gen.config
    step = export_decode(w, gen, opts.dtype, opts.opset, batch, rng, opts.kv_dtype)
    prefill, fp_checks = None, []
    if cfg.frame_prediction:  # the multi-token prefill of the prefix (prefill_graph.py)
        prefill, fp_checks = export_prefill(w, step.gen, opts.dtype, opts.opset, batch, rng, tol, verify)
    checks = verify_decode(w, step, tol) + fp_checks if verify else []
    checks += export_samplers(w, gen, opts.fused_sampler, opts.opset, batch, rng, verify, opts.kv_dtype)
    if opts.precision in ("int8", "int4"):
        m["quantization"] = quantize_bundle_graphs(w, opts.precision, verify=verify, batch=batch, seed=seed,
                                                   printer=printer, kv_dtype=opts.kv_dtype)
    m["generator"] = generator_entry(cfg, opts.kv_dtype, opts.precision, prefill)
    m["sampler"] = sampler_entry(m, opts.fused_sampler, opts.precision)
    m["default_sampling"] = {"cfg_scale": 1.25 if gen.has_null_class else 1.0, "temperature": 1.0,
                             "top_k": 0, "top_p": 1.0}
    if not onnx_only:
        _save_checkpoint(w, gen, "generator")
    return checks


def _write_tokenizer_precision(w: BundleWriter, tok: LARPTokenizer, opts: _Options, batch: int, seed: int,
                               verify: bool, printer) -> None:
    """The tokenizer's precision in the manifest; int8: its graphs quantized (export/quantize_tokenizer.py)."""
    m = w.manifest
    m["tokenizer"]["precision"] = opts.tokenizer_precision
    if opts.tokenizer_precision == "int8":
        m["tokenizer"]["quantization"] = quantize_tokenizer_graphs(
            w, tok, opts.tokenizer_precision, opset=opts.opset, verify=verify, batch=batch, seed=seed,
            printer=printer)
    if isinstance(m.get("quantization"), dict):
        m["quantization"]["tokenizer"] = opts.tokenizer_precision


def _save_checkpoint(w: BundleWriter, model: LARPTokenizer | LARPGenerator, kind: str) -> None:
    """The PyTorch checkpoint under ``torch/<kind>`` (the torch backend's and ``larp-rt info``'s)."""
    save_pretrained(model, w.path(f"torch/{kind}"))
    w.manifest["checkpoints"][kind] = f"torch/{kind}"
    w.add_file(f"torch/{kind}/config.json")
    w.add_file(f"torch/{kind}/model.safetensors")


def _record_checks(m: dict, checks: list[GraphCheck], precision: str, printer) -> None:
    """Print the checks and record them in the manifest; ExportError when one fails (the writer then leaves
    nothing behind)."""
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
