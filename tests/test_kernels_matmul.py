"""The few-row packed matmul of the fused decode step (cpp_ext matmul_cpu.h/.cc, the ONNX Runtime op
larp_rt::PackedMatMul, export/sampler_graph.py pack_matmuls): against float64, bit-for-bit row independence (batch
invariance), ISA and thread agreement, the packed layout, argument checks, and the rewritten fused graph."""

import os
import subprocess
import sys

import numpy as np
import pytest

from larp_rt import kernels

pytestmark = pytest.mark.skipif(kernels.cpu_library() is None, reason="the CPU kernels are not built")

SHAPES = [(1, 1, 1), (1, 64, 32), (2, 512, 1536), (3, 100, 33), (7, 3, 31), (8, 64, 96), (9, 17, 100),
          (16, 256, 64), (17, 40, 65)]


def _isas() -> list[str]:
    best = kernels.matmul_isa()
    return {"avx512": ["avx512", "avx2", "portable"], "avx2": ["avx2", "portable"]}.get(best, ["portable"])


def _data(m, k, n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


def test_pack_layout_and_padding():
    w = np.arange(5 * 70, dtype=np.float32).reshape(5, 70)
    p = kernels.pack_matmul_weights(w)
    assert p.shape == (3, 5, 32) and p.dtype == np.float32 and p.flags.c_contiguous
    for panel in range(3):
        for c in range(32):
            col = 32 * panel + c
            want = w[:, col] if col < 70 else np.zeros(5, np.float32)
            assert np.array_equal(p[panel, :, c], want)
    with pytest.raises(ValueError, match=r"weights must be a \(K, N\) matrix, got shape \(3,\)"):
        kernels.pack_matmul_weights(np.zeros(3))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_float64_within_the_float32_bound(m, k, n):
    x, w = _data(m, k, n, m * 1000 + k + n)
    p = kernels.pack_matmul_weights(w)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    bound = (k + 2) * 2.0**-23 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)) + 1e-30
    for isa in _isas():
        y = kernels.packed_matmul(x, p, n, isa=isa, num_threads=2)
        assert y.shape == (m, n) and y.dtype == np.float32
        assert (np.abs(y - ref) <= bound).all(), isa


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_rows_threads_and_avx_paths_agree_bit_for_bit(m, k, n):
    """A row's result is the same whatever shares its call (batch invariance of the fused step), however the panels
    are split over threads, and on the AVX-512 and AVX2 paths (one FMA chain per output, k ascending)."""
    x, w = _data(m, k, n, 7 + m + k + n)
    p = kernels.pack_matmul_weights(w)
    for isa in _isas():
        full = kernels.packed_matmul(x, p, n, isa=isa, num_threads=1)
        for threads in (2, 3):
            assert np.array_equal(kernels.packed_matmul(x, p, n, isa=isa, num_threads=threads), full)
        for r in range(m):
            assert np.array_equal(kernels.packed_matmul(x[r:r + 1], p, n, isa=isa), full[r:r + 1])
        if m > 2:  # a different partner set for the same rows
            assert np.array_equal(kernels.packed_matmul(x[::-1], p, n, isa=isa), full[::-1])
    avx = [i for i in _isas() if i != "portable"]
    outs = [kernels.packed_matmul(x, p, n, isa=i) for i in avx]
    assert all(np.array_equal(o, outs[0]) for o in outs)
    x3 = x.reshape(m, 1, k)  # leading axes are rows
    assert np.array_equal(kernels.packed_matmul(x3, p, n), kernels.packed_matmul(x, p, n).reshape(m, 1, n))


def test_argument_checks_say_what_is_wrong():
    x, w = _data(2, 8, 40, 0)
    p = kernels.pack_matmul_weights(w)
    with pytest.raises(ValueError, match=r"packed must have shape \(ceil\(n / 32\), K, 32\) = \(2, 8, 32\) for n = 40"):
        kernels.packed_matmul(x, p[:1], 40)
    with pytest.raises(ValueError, match=r"packed must have shape .* = \(1, 8, 32\) for n = 32"):
        kernels.packed_matmul(x, p, 32)
    with pytest.raises(ValueError, match=r"for n = 0"):
        kernels.packed_matmul(x, p, 0)
    with pytest.raises(ValueError, match="isa must be one of auto, avx512, avx2, portable"):
        kernels.packed_matmul(x, p, 40, isa="sse")


def test_the_environment_forces_the_portable_path():
    code = ("import numpy as np; from larp_rt import kernels; print(kernels.matmul_isa()); "
            "x = np.ones((2, 4), np.float32); w = np.arange(12, dtype=np.float32).reshape(4, 3); "
            "print(kernels.packed_matmul(x, kernels.pack_matmul_weights(w), 3).tolist())")
    env = {**os.environ, "LARP_RT_MATMUL_ISA": "portable"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "portable"
    assert lines[1] == str([[18.0, 22.0, 26.0]] * 2)


# --------------------------------------------------------------------------------------------
# the ONNX Runtime op and the graph rewrite
# --------------------------------------------------------------------------------------------
def _model(k, n, seed=0):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((n, k)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"]), helper.make_node("MatMul", ["x", "z"], ["xz"])],
        "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["B", 1, k]),
              helper.make_tensor_value_info("z", TP.FLOAT, [k, 3])],
        [helper.make_tensor_value_info("y", TP.FLOAT, ["B", 1, k]),
         helper.make_tensor_value_info("xz", TP.FLOAT, ["B", 1, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    return onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w, w2


def _session(model):
    ort = pytest.importorskip("onnxruntime")
    if kernels.ort_custom_op_library() is None:
        pytest.skip("the ONNX Runtime custom-op library is not built")
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernels.ort_custom_op_library())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_pack_matmuls_rewrites_initializer_matmuls_and_the_op_runs_them():
    from larp_rt.export.sampler_graph import pack_matmuls

    model, w, w2 = _model(48, 70)
    assert pack_matmuls(model) == 2
    ops = [(n.op_type, n.domain) for n in model.graph.node]
    assert ops.count(("PackedMatMul", "larp_rt")) == 2 and ops.count(("MatMul", "")) == 1  # x @ z: z is an input
    assert {t.name for t in model.graph.initializer} == {"w_panels", "w2_panels"}  # the unpacked ones dropped
    sess = _session(model)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 1, 48)).astype(np.float32)
    z = rng.standard_normal((48, 3)).astype(np.float32)
    y, xz = sess.run(["y", "xz"], {"x": x, "z": z})
    h = kernels.packed_matmul(x, kernels.pack_matmul_weights(w), 70)
    want = kernels.packed_matmul(np.maximum(h, 0), kernels.pack_matmul_weights(w2), 48)
    assert np.array_equal(y, want)  # the op is the kernel, bit for bit
    ref = np.maximum(x.astype(np.float64) @ w, 0) @ w2
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.allclose(xz, x @ z, atol=1e-5)
    for r in range(5):  # row independence inside ONNX Runtime (its thread pool splits the panels)
        assert np.array_equal(sess.run(["y"], {"x": x[r:r + 1], "z": z})[0], y[r:r + 1])


def test_the_op_refuses_a_mislabelled_panel_tensor():
    from larp_rt.export.sampler_graph import pack_matmuls
    from onnx import helper

    model, _, _ = _model(16, 40)
    pack_matmuls(model)
    node = next(n for n in model.graph.node if n.op_type == "PackedMatMul")
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("n", 100))  # P holds 2 panels; n = 100 needs 4
    sess = _session(model)
    want = r"larp_rt.PackedMatMul: P must have shape \[ceil\(n / 32\), K, 32\] = \[4, 16, 32\]"
    with pytest.raises(Exception, match=want):
        sess.run(["y"], {"x": np.zeros((1, 1, 16), np.float32), "z": np.zeros((16, 3), np.float32)})


def test_pack_matmuls_refuses_external_references(tmp_path):
    onnx = pytest.importorskip("onnx")
    from larp_rt.export.sampler_graph import pack_matmuls

    model, _, _ = _model(64, 64)
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    ref = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match=r"external reference \(load the model with its external data\)"):
        pack_matmuls(ref)
