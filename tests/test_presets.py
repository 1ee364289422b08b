"""Export presets (export/presets.py): `--preset fast` is the fastest variant that passes the committed quality
table, explicit options win over a preset, and the preset exports what it says on the tiny pair."""

import json
from pathlib import Path

import pytest
from larp_rt.export.presets import PRESETS, resolve_preset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOK, GEN = ROOT / "checkpoints/tiny/tokenizer", ROOT / "checkpoints/tiny/generator"


def _resolve(name, **kw):
    args = dict(precision=None, kv_dtype=None, tokenizer_precision=None, has_generator=True, has_tokenizer=True,
                frame_prediction=False, printer=lambda s: None)
    args.update(kw)
    return resolve_preset(name, **args)


def test_fast_is_the_fastest_variant_that_passes_the_quality_table():
    """If a re-run of benchmarks/quant_quality.py or bench_quant.py changes the tables, this says to update the
    preset (its docstring and the README carry its quality cost)."""
    quality = json.loads((RESULTS / "quant_quality.json").read_text())
    speed = json.loads((RESULTS / "quant_speed.json").read_text())
    passing = {(v["weights"], v["kv"]) for v in quality["variants"] if v.get("passes")}
    assert ("fp32", "fp32") in passing
    ms = {(r["weights"], r["kv"]): r["ms_per_token"] for r in speed["results"]
          if r["path"] == "onnxruntime" and r["batch"] == 1}
    fastest = min(passing & set(ms), key=ms.get)
    fast = PRESETS["fast"]
    assert (fast.precision, fast.kv_dtype) == fastest, (
        f"the quality/speed tables say {fastest} is the fastest passing variant; export/presets.py says "
        f"{(fast.precision, fast.kv_dtype)}: update the preset, its docstring and the README")
    tq = json.loads((RESULTS / "quant_tokenizer.json").read_text())
    assert fast.tokenizer_precision == "int8" and tq["psnr_bound_db"] > 0
    exact = PRESETS["exact"]
    assert (exact.precision, exact.kv_dtype, exact.tokenizer_precision) == ("fp32", None, None)


def test_resolution_explicit_options_win_and_unknown_names_are_refused():
    assert _resolve(None) == ("fp32", None, None)
    assert _resolve("exact") == ("fp32", None, None)
    assert _resolve("fast") == ("int4", "fp16", "int8")
    assert _resolve("fast", precision="int8") == ("int8", "fp16", "int8")
    assert _resolve("fast", kv_dtype="int8", tokenizer_precision="fp32") == ("int4", "int8", "fp32")
    assert _resolve("fast", has_generator=False) == ("fp32", None, "int8")  # tokenizer-only bundle
    assert _resolve("fast", has_tokenizer=False) == ("int4", "fp16", None)
    said = []
    assert _resolve("fast", frame_prediction=True, printer=said.append) == ("fp32", "fp16", "int8")
    assert any("frame-prediction" in s and "float32 weights" in s for s in said)
    with pytest.raises(ValueError, match=r"unknown export preset 'quick': choose one of exact, fast"):
        _resolve("quick")


def test_cli_preset_fast_exports_int4_weights_fp16_cache_int8_tokenizer(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from larp_rt.export.quantize import quantizer_available

    from larp_rt import kernels

    if quantizer_available() is not None:
        pytest.skip(quantizer_available())
    if kernels.ort_custom_op_library() is None:
        pytest.skip("the fp16 KV cache needs the built custom-op library")
    if not (TOK.is_dir() and GEN.is_dir()):
        pytest.skip("checkpoints/tiny is missing")
    from larp_rt import Engine, SamplingParams
    from larp_rt.bundle import Bundle
    from larp_rt.cli import main

    out = tmp_path / "fast"
    assert main(["export", str(out), "--tokenizer", str(TOK), "--generator", str(GEN), "--preset", "fast",
                 "--onnx-only", "--no-verify"]) == 0
    b = Bundle(out)
    assert (b.precision, b.kv_cache_spec.dtype, b.manifest["tokenizer"]["precision"]) == ("int4", "fp16", "int8")
    assert b.manifest["sampler"]["fused"] == "decode_sample"
    eng = Engine(out)
    assert eng.sampler_name == "fused"
    tokens = eng.generate([1, 2], SamplingParams(seed=0, temperature=0.0)).tokens
    assert tokens.shape == (2, eng.generator_config.max_seq_len)
    assert eng.decode(tokens).shape[0] == 2
