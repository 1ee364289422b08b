"""The int8 tokenizer (export/quantize_tokenizer.py) on the trained tiny tokenizer: export, manifest, load through
Engine, reconstruction quality on the held-out clips against float32, and refusal of mislabelled bundles."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

import torch  # noqa: E402

from larp_rt import Engine  # noqa: E402
from larp_rt.bundle import Bundle, BundleError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "checkpoints/tiny/tokenizer"

# measured on the 256 held-out clips (training recipe's synthetic val set, seed data_seed + 1), int8 vs fp32:
# PSNR 27.155 -> 27.029 dB (drop 0.126), SSIM 0.8495 -> 0.8390, int8 reconstruction vs fp32's 42.7 dB, encoder
# indices agree on 0.963 of the tokens. Held to (with margin for other ONNX Runtime builds / CPUs):
MAX_PSNR_DROP_DB = 0.25  # the bound for a recommended variant is 0.5 dB
MAX_SSIM_DROP = 0.02
MIN_PSNR_VS_FP32_DB = 39.0
MIN_INDEX_AGREEMENT = 0.94


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from larp_rt.export import export_bundle
    from larp_rt.export.quantize_tokenizer import quantizer_available

    if quantizer_available() is not None:
        pytest.skip(quantizer_available())
    if not TOK.is_dir():
        pytest.skip("checkpoints/tiny is missing")
    root = tmp_path_factory.mktemp("qtok")
    return {p: export_bundle(TOK, None, root / p, tokenizer_precision=p, onnx_only=True, verify=p == "int8",
                             printer=lambda *a: None) for p in ("fp32", "int8")}


@pytest.fixture(scope="module")
def val_clips():
    from larp_rt.training.data import SyntheticVideos

    cfg = json.loads((ROOT / "checkpoints/tiny/train_config.json").read_text())["tokenizer"]
    ds = SyntheticVideos(cfg["val_size"], seed=cfg["data_seed"] + 1, frames=8, height=32, width=32,
                         num_classes=cfg["num_classes"])
    return np.stack([ds[i][0].numpy() for i in range(len(ds))])


def _ops(path):
    import onnx

    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_manifest_and_graphs(bundles):
    import onnx

    b, b32 = Bundle(bundles["int8"]), Bundle(bundles["fp32"])
    assert (b.tokenizer_precision, b32.tokenizer_precision) == ("int8", "fp32")
    assert b.precision == "fp32"  # the bundle's (generator) precision is untouched
    q = b.manifest["tokenizer"]["quantization"]
    assert q["method"] == "onnxruntime.quantization.quantize_dynamic" and q["weights"] == "int8"
    assert q["per_channel"] is True and q["attention"] == "com.microsoft::MultiHeadAttention"
    assert q["split_qkv"] is True
    assert "quantization" not in b32.manifest["tokenizer"]
    for g in ("encoder", "decoder"):
        ops = _ops(b.graph_path(g))
        blocks = 2  # the tiny tokenizer: 2 encoder and 2 decoder blocks
        assert ops.count("MatMulInteger") == q["graphs"][g]["int8_matmuls"] > 0
        assert ops.count("MultiHeadAttention") == blocks and "Softmax" not in ops
        assert "MatMulInteger" not in _ops(b32.graph_path(g))
        assert b.graph_path(g).stat().st_size < 0.5 * b32.graph_path(g).stat().st_size
        assert q["fused_vs_fp32_max_abs"][g] < 1e-4  # the fused attention alone changes nothing
    # the cosines against the codebook (ArgMax's input) and the bottleneck projections stay float32
    m = onnx.load(str(b.graph_path("encoder")), load_external_data=False).graph
    producer = {o: n for n in m.node for o in n.output}
    argmax = next(n for n in m.node if n.op_type == "ArgMax")
    assert producer[argmax.input[0]].op_type == "MatMul"
    assert producer[argmax.input[0]].name in q["graphs"]["encoder"]["float_matmuls_kept"]
    kept = {g: len(q["graphs"][g]["float_matmuls_kept"]) for g in ("encoder", "decoder")}
    assert kept == {"encoder": 2, "decoder": 1}  # encoder: cosines + in_linear; decoder: out_linear
    v = q["verification"]  # export-time probes (the fp32 decoder's clips of random tokens)
    assert v["indices_agreement"] >= 0.9 and v["decoder_psnr_db"] >= 35 and v["roundtrip_psnr_db"] >= 35


def _source(producer, name):
    """The node behind tensor ``name`` through the int8 MatMul's rescaling (Cast, Mul, bias Add)."""
    n = producer[name]
    while n.op_type in ("Mul", "Cast", "Add"):
        n = producer[n.input[0]]
    return n


def test_attention_inputs_come_from_their_own_matmuls(bundles):
    """q, k and v of every MultiHeadAttention come from three int8 MatMuls, not from slices of one qkv output."""
    import onnx

    for g in ("encoder", "decoder"):
        m = onnx.load(str(Bundle(bundles["int8"]).graph_path(g)), load_external_data=False).graph
        producer = {o: n for n in m.node for o in n.output}
        mha = [n for n in m.node if n.op_type == "MultiHeadAttention"]
        srcs = [[_source(producer, i) for i in n.input[:3]] for n in mha]
        assert all(s.op_type == "MatMulInteger" for row in srcs for s in row)
        assert all(len({s.name for s in row}) == 3 for row in srcs)
        assert not any(n.op_type == "Split" for n in m.node)


def test_split_and_packed_qkv_trace_alike():
    """The fused graphs traced with three q/k/v MatMuls and with one qkv MatMul + Slice compute the same."""
    import onnxruntime as ort
    from larp_rt.export.quantize_tokenizer import count_ops, trace_fused

    from larp_rt import load_pretrained

    if not TOK.is_dir():
        pytest.skip("checkpoints/tiny is missing")
    tok = load_pretrained(TOK, kind="tokenizer").eval()
    split, packed = trace_fused(tok, 17), trace_fused(tok, 17, split_qkv=False)
    C, T, H, W = tok.config.video_shape
    rng = np.random.default_rng(0)
    feeds = ({"video": rng.random((1, C, T, H, W), dtype=np.float32)},
             {"indices": rng.integers(0, tok.config.codebook_size, (1, tok.config.num_tokens)).astype(np.int64)})
    for a, b, feed, body in zip(split, packed, feeds, (tok.encoder, tok.decoder), strict=True):
        assert count_ops(a, ("MatMul",)) == count_ops(b, ("MatMul",)) + 2 * len(body.blocks)
        ya, yb = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
                  for m in (a, b))
        for u, v in zip(ya, yb, strict=True):
            if u.dtype == np.float32:
                assert np.abs(u - v).max() < 1e-5


def test_int8_quality_on_held_out_clips(bundles, val_clips):
    from larp_rt.training.evaluate import psnr, ssim

    out = {}
    for p in ("fp32", "int8"):
        eng = Engine(bundles[p], backend="onnxruntime")
        idx = eng.encode(val_clips)
        out[p] = idx, torch.from_numpy(eng.decode(idx))
    gt = torch.from_numpy(val_clips)
    (i32, r32), (i8, r8) = out["fp32"], out["int8"]
    assert r8.shape == r32.shape and float(r8.min()) >= 0.0 and float(r8.max()) <= 1.0  # the clamp holds
    drop = float(psnr(r32, gt).mean() - psnr(r8, gt).mean())
    assert drop <= MAX_PSNR_DROP_DB, f"int8 loses {drop:.3f} dB PSNR against fp32"
    assert float(ssim(r32, gt).mean() - ssim(r8, gt).mean()) <= MAX_SSIM_DROP
    assert float(psnr(r8, r32).mean()) >= MIN_PSNR_VS_FP32_DB
    agree = float((i8 == i32).mean())
    assert agree >= MIN_INDEX_AGREEMENT, f"int8 encoder indices agree with fp32 on {agree:.4f} of the tokens"
    # the decoder alone, on the same (fp32) tokens, is within the same bound
    r8_same = torch.from_numpy(Engine(bundles["int8"], backend="onnxruntime").decode(i32))
    assert float(psnr(r8_same, r32).mean()) >= MIN_PSNR_VS_FP32_DB


def _relabel(src: Path, dst: Path, precision) -> Path:
    shutil.copytree(src, dst)
    mp = dst / "manifest.json"
    m = json.loads(mp.read_text())
    if precision is None:
        m["tokenizer"].pop("precision")
    else:
        m["tokenizer"]["precision"] = precision
    mp.write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize(("src", "claim", "msg"), [
    ("int8", "fp32", "holds .* quantized"),     # int8 files claimed float
    ("int8", None, "holds .* quantized"),       # no claim: float32 (bundles written before tokenizer precisions)
    ("int8", "fp16", "holds .* quantized"),
    ("fp32", "int8", "no int8"),                # float files claimed int8
    ("fp32", "int4", "unknown tokenizer precision"),
])
def test_mislabelled_tokenizer_is_refused(bundles, tmp_path, src, claim, msg):
    bad = _relabel(bundles[src], tmp_path / "bad", claim)
    with pytest.raises(BundleError, match=msg):
        Bundle(bad)
    with pytest.raises(BundleError, match="re-export"):
        Engine(bad)


def test_bad_arguments_write_nothing(tmp_path):
    from larp_rt.export import export_bundle

    gen = ROOT / "checkpoints/tiny/generator"
    cases = [
        ({"tokenizer_precision": "int4"}, TOK, None, "tokenizer_precision must be one of fp32, fp16, int8"),
        ({"tokenizer_precision": "int8"}, None, gen, "give a tokenizer"),
        ({"tokenizer_precision": "int8", "precision": "fp16"}, TOK, None, "quantized from float32"),
        ({"tokenizer_precision": "fp16"}, TOK, None, "only with precision fp16"),
    ]
    for i, (kw, tok, g, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            export_bundle(tok, g, tmp_path / f"b{i}", **kw)
    assert list(tmp_path.iterdir()) == []


def test_failed_quantization_leaves_no_bundle(tmp_path, monkeypatch):
    from larp_rt.export import export_bundle
    from larp_rt.export import quantize_tokenizer as QT
    from larp_rt.export.onnx_export import ExportError

    monkeypatch.setattr(QT, "quantize_int8", lambda model, code_dim, **kw: (model, []))  # rewrites nothing
    with pytest.raises(ExportError, match="rewrote no MatMul"):
        export_bundle(TOK, None, tmp_path / "b", tokenizer_precision="int8", onnx_only=True, verify=False,
                      printer=lambda *a: None)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging directory


def test_cli_flag(tmp_path, capsys):
    from larp_rt.cli import main

    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "b"), "--tokenizer", str(TOK), "--tokenizer-precision", "bf16"])
    assert "invalid choice: 'bf16'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_tensorrt_build_refuses_int8_tokenizer_graphs(bundles):
    from larp_rt.export.trt_build import build_plans

    with pytest.raises(ValueError, match="int8 tokenizer"):  # before any TensorRT import
        build_plans(bundles["int8"], graphs=["encoder"], printer=lambda *a: None)


def test_with_an_int8_generator(tmp_path):
    """Everything narrow in one bundle (int8 weights, int8 KV cache where the kernels are built, int8 tokenizer):
    the manifest says so, Engine generates and decodes."""
    from larp_rt.export import export_bundle

    from larp_rt import SamplingParams, kernels

    gen = ROOT / "checkpoints/tiny/generator"
    if not gen.is_dir():
        pytest.skip("checkpoints/tiny is missing")
    kv = "int8" if kernels.ort_custom_op_library() is not None else "fp32"
    path = export_bundle(TOK, gen, tmp_path / "b", precision="int8", tokenizer_precision="int8", onnx_only=True,
                         kv_dtype=kv, verify=False, printer=lambda *a: None)
    b = Bundle(path)
    assert (b.precision, b.tokenizer_precision, b.manifest["quantization"]["tokenizer"]) == ("int8", "int8", "int8")
    assert b.kv_cache_spec.dtype == kv
    eng = Engine(path, backend="onnxruntime")
    out = eng.generate([1, 5], SamplingParams(temperature=1.0, cfg_scale=2.0, seed=0))
    video = eng.decode(np.asarray(out.tokens))
    assert video.shape == (2, *b.tokenizer_config.video_shape) and np.isfinite(video).all()
