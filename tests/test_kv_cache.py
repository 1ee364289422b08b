"""The narrow KV cache (``--kv-dtype fp16|int8``): the DecodeAttention kernel over float16 / int8 (+ per-slot
scales) caches against a float64 reference of the dequantized cache, the int8 entry quantizer (numpy == the
graph's torch arithmetic), the ONNX Runtime op, and bundles on the trained tiny pair: export, manifest, load,
generate (fused and kernel samplers, a Scheduler join, frame prediction), greedy agreement with float32, and
refusal of mislabelled bundles and of what cannot run a narrow cache."""

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from larp_rt import kernels as K

pytestmark = pytest.mark.skipif(not K.available()["cpu"], reason="the CPU kernels are not built")

ROOT = Path(__file__).resolve().parents[1]
TOK, GEN, FP = (ROOT / "checkpoints/tiny" / n for n in ("tokenizer", "generator", "fp_generator"))
CLASSES = list(range(8)) * 2
# Greedy tokens vs the float32 cache on the tiny pair, 16 clips x 64 tokens at CFG 2.0 (measured: fp16 1.00,
# int8 1.00 (a flipped position changes the rest of its clip, so a bound below 1); int8 weights + int8 cache 0.88)
MIN_AGREEMENT = {"fp16": 0.95, "int8": 0.85, "int8+int8": 0.70}


def reference(q, k, v, pk, pv, pos, q_keys=None):
    """float64: softmax over [q_keys.past_k[:pos] | q.k] then the weighted values (pk, pv: the dequantized cache;
    q_keys: the query the cache's keys are scored with, default q)."""
    qk = q if q_keys is None else q_keys
    if np.ndim(pos):
        return np.concatenate([reference(*(a[b:b + 1] for a in (q, k, v, pk, pv)), int(p), qk[b:b + 1])
                               for b, p in enumerate(pos)])
    n = min(pos, pk.shape[2])
    q64, k64, v64 = (a[:, :, 0].astype(np.float64) for a in (q, k, v))
    s = np.concatenate([np.einsum("bhsd,bhd->bhs", pk[:, :, :n].astype(np.float64), qk[:, :, 0].astype(np.float64)),
                        np.einsum("bhd,bhd->bh", k64, q64)[..., None]], -1)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    return (np.einsum("bhs,bhsd->bhd", a[..., :n], pv[:, :, :n].astype(np.float64)) + a[..., n:] * v64)[:, :, None]


def int16_grid(q: np.ndarray) -> np.ndarray:
    """q (B, H, 1, hd) rounded as the int8 kernel's key scoring rounds it: per (row, head) qscale = max|q| / 32767
    in float32, qi = round_half_even(q * float32(1 / qscale)), back as qi * qscale (float64)."""
    amax = np.abs(q).max(-1, keepdims=True).astype(np.float32)
    qscale = np.where(amax > 0, amax / np.float32(32767), np.float32(1)).astype(np.float32)
    inv = (np.float32(1) / qscale).astype(np.float32)
    return np.rint((q * inv).astype(np.float32)).astype(np.float64) * qscale.astype(np.float64)


def narrow(kv: str, x: np.ndarray):
    """(cache, scale or None, dequantized float64) of a float32 cache."""
    if kv == "fp16":
        h = x.astype(np.float16)
        return h, None, h.astype(np.float64)
    q, s = K.quantize_kv(x)
    return q, s, q.astype(np.float64) * s[..., None].astype(np.float64)


SHAPES = [(2, 8, 640, 64, 512), (1, 3, 20, 5, 7), (3, 2, 33, 40, (0, 33, 10)), (1, 2, 300, 96, 257),
          (4, 3, 40, 64, (40, 3, 3, 17)), (2, 5, 50, 72, (49, 2))]


@pytest.mark.parametrize("kv", ["fp16", "int8"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_narrow_cache_matches_float64_reference_of_the_dequantized_cache(kv, shape, threads):
    B, H, S, hd, pos = shape
    pos = np.array(pos, np.int64) if isinstance(pos, tuple) else pos
    rng = np.random.default_rng(zlib.crc32(repr((kv, shape)).encode()))  # hash() of a str changes per process
    q, k, v = (rng.standard_normal((B, H, 1, hd)).astype(np.float32) for _ in range(3))
    pk, pv = (rng.standard_normal((B, H, S, hd)).astype(np.float32) * 2 for _ in range(2))
    (ck, sk, dk), (cv, sv, dv) = narrow(kv, pk), narrow(kv, pv)
    if kv == "int8":  # slots at and after a row's pos are never read: poison their scales
        sk, sv = sk.copy(), sv.copy()
        for b in range(B):
            p = int(pos[b]) if np.ndim(pos) else pos
            sk[b, :, p:] = np.nan
            sv[b, :, p:] = np.nan
    else:
        ck = ck.copy()
        for b in range(B):
            ck[b, :, (int(pos[b]) if np.ndim(pos) else pos):] = np.nan
    y = K.decode_attention(q, k, v, ck, cv, pos, num_threads=threads, k_scale=sk, v_scale=sv)
    exact = reference(q, k, v, dk, dv, pos)
    scale = max(1.0, float(np.abs(exact).max()))
    # int8 keys on AVX2 are scored in integers: q on an int16 grid per (row, head) (attention_cpu.cc score_keys);
    # the reference takes the same rounded q for the keys (the self score and the values use q, v as they are)
    qk = int16_grid(q) if kv == "int8" and K.attention_isa() == "avx2" and hd % 16 == 0 and hd <= 256 else q
    want = reference(q, k, v, dk, dv, pos, q_keys=qk)
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5 * scale)
    np.testing.assert_allclose(y, exact, rtol=0, atol=3e-3 * scale)  # the int16 grid costs at most this here
    # every split of the (row, head) tasks gives the same bits
    np.testing.assert_array_equal(K.decode_attention(q, k, v, ck, cv, pos, num_threads=1, k_scale=sk, v_scale=sv), y)


def test_quantize_kv_equals_the_graph_quantizer_and_bounds_the_error():
    torch = pytest.importorskip("torch")
    from larp_rt.export.graphs import quantize_entry

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 4, 1, 64)) * rng.uniform(0.01, 30, (3, 4, 1, 1))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero entry: scale 1, zeros
    x[1, 1, 0, :4] = [127 / 2, -127 / 2, 0.5, 1.5]  # exact halves: round half to even in both
    q, s = K.quantize_kv(x)
    tq, ts = quantize_entry(torch.from_numpy(x))
    np.testing.assert_array_equal(q, tq.numpy())
    np.testing.assert_array_equal(s, ts.numpy())
    assert q.dtype == np.int8 and s.dtype == np.float32 and s[0, 0, 0] == 1 and not q[0, 0].any()
    assert np.abs(q).max() <= 127
    err = np.abs(q.astype(np.float64) * s[..., None] - x)
    assert (err <= s[..., None] * (0.5 + 1e-6)).all()


def test_narrow_cache_arguments_are_checked():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 1, 8)).astype(np.float32)
    c8, s8 = K.quantize_kv(rng.standard_normal((1, 2, 5, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="int8 cache needs k_scale and v_scale"):
        K.decode_attention(q, q, q, c8, c8, 3)
    with pytest.raises(ValueError, match=r"k_scale/v_scale must have shape \(1, 2, 5\)"):
        K.decode_attention(q, q, q, c8, c8, 3, k_scale=s8[:, :1], v_scale=s8)
    with pytest.raises(ValueError, match="are for int8 caches"):
        K.decode_attention(q, q, q, c8.astype(np.float16), c8.astype(np.float16), 3, k_scale=s8, v_scale=s8)
    with pytest.raises(ValueError, match="float32, float16 or int8"):
        K.decode_attention(q, q, q, c8.astype(np.float64), c8.astype(np.float64), 3)


def _op_model(kv: str):
    from onnx import TensorProto as TP
    from onnx import helper as h

    t = {"fp16": TP.FLOAT16, "int8": TP.INT8}[kv]
    ins = [h.make_tensor_value_info(n, TP.FLOAT, ["B", "H", 1, "D"]) for n in ("q", "k", "v")]
    ins += [h.make_tensor_value_info(n, t, ["B", "H", "S", "D"]) for n in ("pk", "pv")]
    ins += [h.make_tensor_value_info("pos", TP.INT64, ["B"])]
    names = ["q", "k", "v", "pk", "pv", "pos"]
    if kv == "int8":
        ins += [h.make_tensor_value_info(n, TP.FLOAT, ["B", "H", "S"]) for n in ("ks", "vs")]
        names += ["ks", "vs"]
    node = h.make_node("DecodeAttention", names, ["y"], domain="larp_rt")
    g = h.make_graph([node], "g", ins, [h.make_tensor_value_info("y", TP.FLOAT, ["B", "H", 1, "D"])])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("larp_rt", 1)])


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_ort_op_reads_the_narrow_cache(kv):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if K.ort_custom_op_library() is None:
        pytest.skip("the ONNX Runtime custom-op library is not built")
    so = ort.SessionOptions()
    so.register_custom_ops_library(K.ort_custom_op_library())
    sess = ort.InferenceSession(_op_model(kv).SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    B, H, S, hd = 3, 4, 37, 64
    q, k, v = (rng.standard_normal((B, H, 1, hd)).astype(np.float32) for _ in range(3))
    (ck, sk, _), (cv, sv, _) = (narrow(kv, rng.standard_normal((B, H, S, hd)).astype(np.float32)) for _ in range(2))
    pos = np.array([0, 20, 37], np.int64)
    feeds = {"q": q, "k": k, "v": v, "pk": ck, "pv": cv, "pos": pos}
    if kv == "int8":
        feeds |= {"ks": sk, "vs": sv}
    (y,) = sess.run(None, feeds)
    np.testing.assert_array_equal(y, K.decode_attention(q, k, v, ck, cv, pos, k_scale=sk, v_scale=sv))
    if kv == "int8":  # wrong scale shape: the op names it
        with pytest.raises(Exception, match="k_scale and v_scale must have shape"):
            sess.run(None, feeds | {"ks": sk[:, :, :5].copy()})


# ------------------------------------------------------------------------------------------------------------
# bundles on the tiny pair
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    from larp_rt.export import export_bundle

    if not (TOK.is_dir() and GEN.is_dir()):
        pytest.skip("checkpoints/tiny is missing")
    if K.ort_custom_op_library() is None:
        pytest.skip("the ONNX Runtime custom-op library is not built")
    root = tmp_path_factory.mktemp("kv")
    out = {}
    for name, precision, kv in (("fp32", "fp32", None), ("fp16", "fp32", "fp16"), ("int8", "fp32", "int8"),
                                ("int8+int8", "int8", "int8")):
        out[name] = export_bundle(None if name != "int8" else TOK, GEN, root / name, precision=precision,
                                  kv_dtype=kv, onnx_only=True, verify=name in ("fp16", "int8"), fused_sampler=True,
                                  printer=lambda *a: None)
    return out


def _greedy(bundle, sampler="auto"):
    from larp_rt import Engine, SamplingParams

    out = Engine(bundle, sampler=sampler).generate(CLASSES, SamplingParams(temperature=0.0, cfg_scale=2.0, seed=0))
    return np.asarray(out.tokens)


def test_manifest_and_graph_inputs(bundles):
    import onnx

    from larp_rt.bundle import Bundle

    for name, want in (("fp16", 10), ("int8", 3), ("int8+int8", 3)):
        b = Bundle(bundles[name])
        kv = b.kv_cache_spec
        assert kv.dtype == name.split("+")[-1] and kv.attention == "larp_rt::DecodeAttention"
        for graph in ("decode", "decode_sample"):
            g = onnx.load(str(b.graph_path(graph)), load_external_data=False).graph
            types = {i.name: i.type.tensor_type.elem_type for i in g.input}
            assert types["past_k_0"] == want and types["past_v_0"] == want
            assert ("past_k_scale_0" in types) == (kv.dtype == "int8")
            assert sum(n.op_type == "DecodeAttention" for n in g.node) == b.generator_config.n_layer
        if kv.dtype == "int8":
            assert kv.scales["granularity"] == "per (row, head, slot)"
    assert Bundle(bundles["int8+int8"]).manifest["quantization"]["kv_cache"] == "int8"
    assert Bundle(bundles["fp32"]).kv_cache_spec.attention == "standard"


@pytest.mark.parametrize("name", ["fp16", "int8", "int8+int8"])
def test_greedy_tokens_agree_with_the_fp32_cache(bundles, name):
    ref = _greedy(bundles["fp32"])
    fused, kernel = _greedy(bundles[name], "fused"), _greedy(bundles[name], "kernel")
    np.testing.assert_array_equal(fused, kernel)  # decode_sample.onnx == decode.onnx + the kernel sampler
    rate = float((fused == ref).mean())
    assert rate >= MIN_AGREEMENT[name], f"{name}: greedy agreement {rate:.3f} with the fp32 cache"


def test_sampled_scheduler_join_equals_engine(bundles):
    """Rows at different positions over an int8 cache (a request joining a running batch) draw what each
    request draws alone through Engine.generate."""
    import threading

    from larp_rt import Engine, SamplingParams
    from larp_rt.serving import Scheduler

    eng = Engine(bundles["int8"])
    p = SamplingParams(temperature=1.0, cfg_scale=2.0, top_k=50, seed=11)
    q = SamplingParams(temperature=0.8, cfg_scale=1.0, seed=12)
    want_a, want_b = (np.asarray(eng.generate([c], s).tokens)[0] for c, s in ((3, p), (5, q)))
    started = threading.Event()
    with Scheduler(eng, max_batch=4) as sched:
        a = sched.submit(3, p, on_step=lambda s, n, t: started.set() if s == 10 else None)
        assert started.wait(60)
        b = sched.submit(5, q)  # joins at position 0 while a's rows sit past slot 10
        got_a, got_b = a.result(timeout=120), b.result(timeout=120)
    np.testing.assert_array_equal(np.asarray(got_a.tokens)[0], want_a)
    np.testing.assert_array_equal(np.asarray(got_b.tokens)[0], want_b)


def test_mislabelled_cache_is_refused(bundles, tmp_path):
    from larp_rt.bundle import Bundle, BundleError

    def relabel(src, name, dtype, attention=None):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        m = json.loads((dst / "manifest.json").read_text())
        m["generator"]["kv_cache"]["dtype"] = dtype
        if attention is not None:
            m["generator"]["kv_cache"]["attention"] = attention
        (dst / "manifest.json").write_text(json.dumps(m))
        return dst

    with pytest.raises(BundleError, match="claims a int8 KV cache but decode.onnx reads a fp32 cache"):
        Bundle(relabel(bundles["fp32"], "a", "int8"))
    with pytest.raises(BundleError, match="claims a fp32 KV cache but decode.onnx reads a int8 cache"):
        Bundle(relabel(bundles["int8"], "b", "fp32"))
    with pytest.raises(BundleError, match="claims a fp16 KV cache but decode.onnx reads a int8"):
        Bundle(relabel(bundles["int8"], "c", "fp16"))
    with pytest.raises(BundleError, match="reads its fp32 cache with larp_rt::DecodeAttention, but it has no"):
        Bundle(relabel(bundles["fp32"], "d", "fp32", "larp_rt::DecodeAttention"))
    with pytest.raises(BundleError, match="unknown kv_cache dtype 'int4'"):
        Bundle(relabel(bundles["fp32"], "e", "int4"))


def test_what_cannot_take_a_narrow_cache_says_so(bundles, tmp_path):
    pytest.importorskip("torch")
    from larp_rt.export import export_bundle

    for kw, msg in ((dict(kv_dtype="int4"), "kv_dtype must be one of fp32, fp16, int8"),
                    (dict(kv_dtype="int8", precision="fp16"), "an fp16 bundle keeps an fp16 KV cache"),
                    (dict(kv_dtype="int8", generator=None), "is the generator's KV cache: give a generator")):
        gen = kw.pop("generator", GEN)
        with pytest.raises(ValueError, match=msg):
            export_bundle(TOK, gen, tmp_path / "x", onnx_only=True, printer=lambda *a: None, **kw)
        assert not (tmp_path / "x").exists()
    from larp_rt.backends.onnxruntime import OnnxRuntimeBackend
    from larp_rt.bundle import Bundle

    with K.force_fallback():
        with pytest.raises(ValueError, match="needs the ONNX Runtime custom-op library"):
            OnnxRuntimeBackend(Bundle(bundles["int8"]), sampler="reference")
    trt = pytest.importorskip("larp_rt.export.trt_build")
    with pytest.raises(ValueError, match="TensorRT cannot parse"):
        trt.build_plans(bundles["int8"])


def test_frame_prediction_over_an_int8_cache(tmp_path):
    """The prefix prefill writes float entries that the runner quantizes as the decode graph does: predictions
    over an int8 cache follow the fp32 cache's greedy tokens on most positions."""
    pytest.importorskip("torch")
    if not FP.is_dir():
        pytest.skip("checkpoints/tiny/fp_generator is missing")
    from larp_rt.export import export_bundle

    from larp_rt import Engine, SamplingParams

    out = {kv: export_bundle(TOK, FP, tmp_path / kv, kv_dtype=kv, onnx_only=True, verify=kv == "int8",
                             printer=lambda *a: None) for kv in ("fp32", "int8")}
    rng = np.random.default_rng(0)
    video = rng.random((2, 3, 8, 32, 32), dtype=np.float32)
    greedy = SamplingParams(temperature=0.0, seed=0)
    ref = np.asarray(Engine(out["fp32"]).predict(video, greedy)[1].tokens)
    got = np.asarray(Engine(out["int8"]).predict(video, greedy)[1].tokens)
    assert got.shape == ref.shape
    assert float((got == ref).mean()) >= 0.8


def test_portable_code_reads_narrow_caches_too(tmp_path):
    """LARP_RT_ATTENTION_PORTABLE=1 runs the code of CPUs without AVX2/F16C (scalar half conversion, float key
    scores): same float64 reference, in a process of its own (the choice is made once per process)."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(9)
    B, H, S, hd, pos = 2, 3, 40, 48, np.array([40, 17])
    arrs = {n: rng.standard_normal(sh).astype(np.float32) for n, sh in
            (("q", (B, H, 1, hd)), ("k", (B, H, 1, hd)), ("v", (B, H, 1, hd)), ("pk", (B, H, S, hd)),
             ("pv", (B, H, S, hd)))}
    np.savez(tmp_path / "in.npz", pos=pos, **arrs)
    code = f"""
import numpy as np
from larp_rt import kernels as K
d = np.load({str(tmp_path / 'in.npz')!r})
assert K.attention_isa() == "portable"
out = {{}}
h = [d[n].astype(np.float16) for n in ("pk", "pv")]
out["fp16"] = K.decode_attention(d["q"], d["k"], d["v"], *h, d["pos"])
kq, ks = K.quantize_kv(d["pk"]); vq, vs = K.quantize_kv(d["pv"])
out["int8"] = K.decode_attention(d["q"], d["k"], d["v"], kq, vq, d["pos"], k_scale=ks, v_scale=vs)
np.savez({str(tmp_path / 'out.npz')!r}, **out)
"""
    env = dict(os.environ, LARP_RT_ATTENTION_PORTABLE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    out = np.load(tmp_path / "out.npz")
    for kv in ("fp16", "int8"):
        (_, _, dk), (_, _, dv) = narrow(kv, arrs["pk"]), narrow(kv, arrs["pv"])
        want = reference(arrs["q"], arrs["k"], arrs["v"], dk, dv, pos)
        np.testing.assert_allclose(out[kv], want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))
