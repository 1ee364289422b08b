"""Export presets: named sets of export options, so that a user who does not know the flags gets a tested choice.

    larp-rt export BUNDLE --tokenizer T --generator G --preset fast      # int4 weights, fp16 KV cache, int8 tokenizer
    larp-rt export BUNDLE --tokenizer T --generator G                    # "exact": float32 everywhere (the default)

* ``exact`` (the default): float32 weights, cache and tokenizer. Tokens and videos equal PyTorch's within the
  export tolerances; the reference for every other variant.
* ``fast``: the fastest variant that passes the quality bounds of the project's quality table
  (``benchmarks/results/quant_quality.json``, speed in ``benchmarks/results/quant_speed.json``; a test checks that
  this preset is still the fastest passing variant of the committed tables). Today: int4 weights (ONNX Runtime
  MatMulNBits, block 32) with an fp16 KV cache and the int8 tokenizer. Quality cost, measured on the trained tiny
  pair: class accuracy 99.6% / 98.8% (CFG 2 / no CFG) against 100% / 97.3% for float32, validation loss +0.47%,
  greedy tokens equal to float32's at 42% of positions (the samples differ, their quality does not); tokenizer
  PSNR -0.13 dB. Needs the ONNX Runtime custom-op library where the bundle runs (the fp16 cache is read by
  ``larp_rt::DecodeAttention``); TensorRT cannot build plans from it (``larp-rt build`` says so).

A frame-prediction generator cannot take int4 weights yet (its prefill graph shares the float weights), so
``fast`` gives it float32 weights with the fp16 cache and says so. Options given explicitly win over the preset's.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ExportPreset", "PRESETS", "DEFAULT_PRESET", "resolve_preset"]


@dataclass(frozen=True)
class ExportPreset:
    name: str
    precision: str  # the generator's weights
    kv_dtype: str | None  # the generator's KV cache (None: the weights' float type)
    tokenizer_precision: str | None  # the tokenizer's encoder/decoder (None: the weights' float type)
    summary: str


PRESETS: dict[str, ExportPreset] = {
    "exact": ExportPreset("exact", "fp32", None, None,
                          "float32 weights, cache and tokenizer: equal to PyTorch within the export tolerances"),
    "fast": ExportPreset("fast", "int4", "fp16", "int8",
                         "int4 weights + fp16 KV cache + int8 tokenizer: the fastest variant passing the quality "
                         "table (tiny pair: class accuracy within 1 point of fp32, val loss +0.47%, tokenizer "
                         "PSNR -0.13 dB)"),
}
DEFAULT_PRESET = "exact"


def resolve_preset(name: str | None, *, precision: str | None, kv_dtype: str | None,
                   tokenizer_precision: str | None, has_generator: bool, has_tokenizer: bool,
                   frame_prediction: bool, printer=print) -> tuple[str, str | None, str | None]:
    """(precision, kv_dtype, tokenizer_precision) for preset ``name`` (None: the default) with the explicit options
    (None = not given) taking precedence. Raises ValueError for an unknown preset."""
    if name is None:
        name = DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"unknown export preset {name!r}: choose one of {', '.join(PRESETS)} "
                         "(see `larp-rt export --help`)")
    p = PRESETS[name]
    out_precision = precision if precision is not None else p.precision
    out_kv = kv_dtype if kv_dtype is not None else p.kv_dtype
    out_tok = tokenizer_precision if tokenizer_precision is not None else p.tokenizer_precision
    if not has_generator:  # a tokenizer-only bundle: the generator's options do not apply
        out_kv = kv_dtype
        if precision is None:
            out_precision = "fp32" if p.precision in ("int8", "int4") else p.precision
    if not has_tokenizer:
        out_tok = tokenizer_precision
    if frame_prediction and precision is None and out_precision in ("int8", "int4"):
        printer(f"preset {name!r}: a frame-prediction generator takes no {out_precision} weights yet (its prefill "
                "graph shares the float weights): exporting float32 weights"
                + (f" with the {out_kv} KV cache" if out_kv else ""))
        out_precision = "fp32"
    if name != DEFAULT_PRESET:
        printer(f"preset {name!r}: weights {out_precision}, KV cache {out_kv or 'as the weights'}, tokenizer "
                f"{out_tok or 'as the weights'}")
    return out_precision, out_kv, out_tok
