"""The ONNX Runtime custom op (domain larp_rt, op Sample) in a small graph, on the CPU execution provider."""

import numpy as np
import pytest

from larp_rt import kernels as K
from larp_rt import sampling as S
from larp_rt.sampling import RowParams

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytestmark = pytest.mark.skipif(K.ort_custom_op_library() is None, reason="ORT custom-op library not built")

from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as h  # noqa: E402

INPUTS = [("cfg_scale", TP.FLOAT), ("temperature", TP.FLOAT), ("top_k", TP.INT64), ("top_p", TP.FLOAT),
          ("seed", TP.INT64), ("stream", TP.INT64)]


def session(logits_type=TP.FLOAT, with_logprobs=True, pre_scale=False, step_dims=()):
    """A graph with the op fed by the graph inputs (``step_dims``: the step input's declared shape)."""
    ins = [h.make_tensor_value_info("logits", logits_type, ["R", "V"])]
    ins += [h.make_tensor_value_info(n, t, ["B"]) for n, t in INPUTS]
    ins += [h.make_tensor_value_info("step", TP.INT64, list(step_dims))]
    nodes, src = [], "logits"
    if pre_scale:  # the op behind another node, as in a fused decode + sample graph
        nodes.append(h.make_node("Identity", ["logits"], ["logits_id"]))
        src = "logits_id"
    outs = ["tokens"] + (["logprobs"] if with_logprobs else [])
    nodes.append(h.make_node("Sample", [src] + [n for n, _ in INPUTS] + ["step"], outs, domain="larp_rt"))
    out_info = [h.make_tensor_value_info("tokens", TP.INT64, ["B"])]
    if with_logprobs:
        out_info.append(h.make_tensor_value_info("logprobs", TP.DOUBLE, ["B"]))
    graph = h.make_graph(nodes, "sample", ins, out_info)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("larp_rt", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(K.ort_custom_op_library())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feed(logits, p: RowParams, step):
    return {"logits": logits, "cfg_scale": p.cfg_scale, "temperature": p.temperature, "top_k": p.top_k,
            "top_p": p.top_p, "seed": p.seed.view(np.int64), "stream": p.stream.view(np.int64),
            "step": np.array(step, np.int64)}


def params(rng, B, V):
    return RowParams(
        cfg_scale=rng.choice([1.0, 2.0], B).astype(np.float32), temperature=rng.choice([0.0, 0.7, 1.0], B).astype(
            np.float32), top_k=rng.integers(0, V + 1, B).astype(np.int64),
        top_p=rng.choice([1.0, 0.9, 0.3], B).astype(np.float32),
        seed=rng.integers(0, 2**64 - 1, B, dtype=np.uint64, endpoint=True), stream=np.arange(B, dtype=np.uint64))


@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_ort_custom_op_matches_the_reference(cfg, dtype):
    rng = np.random.default_rng(int(cfg) + 2 * (dtype == np.float16))
    sess = session(TP.FLOAT if dtype == np.float32 else TP.FLOAT16, pre_scale=True)
    for _ in range(10):
        B, V = int(rng.integers(1, 5)), int(rng.choice([3, 100, 2000]))
        p = params(rng, B, V)
        logits = (rng.standard_normal((2 * B if cfg else B, V)) * 3).astype(dtype)
        step = int(rng.integers(0, 1000))
        tokens, logp = sess.run(None, feed(logits, p, step))
        want_t, want_l = S.sample(logits[:B], logits[B:] if cfg else None, p, step, return_logprobs=True)
        np.testing.assert_array_equal(tokens, want_t)
        if K.available()["exact_exp"]:
            np.testing.assert_array_equal(logp, want_l)
        np.testing.assert_allclose(logp, want_l, rtol=1e-13, atol=1e-13)


def test_ort_custom_op_without_the_optional_output_and_with_errors():
    rng = np.random.default_rng(3)
    sess = session(with_logprobs=False)
    p = params(rng, 2, 50)
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    (tokens,) = sess.run(None, feed(logits, p, 0))
    np.testing.assert_array_equal(tokens, S.sample(logits, None, p, 0))
    with pytest.raises(Exception, match="logits has 3 rows for B = 2"):
        sess.run(None, feed(rng.standard_normal((3, 50)).astype(np.float32), p, 0))
    bad = RowParams(**{**p.__dict__, "top_k": np.array([0, 51], np.int64)})
    with pytest.raises(Exception, match=r"top_k\[1\] = 51"):
        sess.run(None, feed(logits, bad, 0))


def test_ort_custom_op_with_per_row_steps():
    """step [B]: row r draws at step[r] (== the reference with the same steps, row by row); [1] still shares one
    step; any other shape is refused naming it; a negative row step is named by the kernel."""
    rng = np.random.default_rng(4)
    sess = session(step_dims=["N"])
    for cfg in (False, True):
        B, V = 4, 300
        p = params(rng, B, V)
        logits = (rng.standard_normal((2 * B if cfg else B, V)) * 3).astype(np.float32)
        steps = np.array([0, 5, 5, 2**62 + 1], np.int64)
        tokens, logp = sess.run(None, feed(logits, p, steps))
        want_t, want_l = S.sample(logits[:B], logits[B:] if cfg else None, p, steps, return_logprobs=True)
        np.testing.assert_array_equal(tokens, want_t)
        np.testing.assert_allclose(logp, want_l, rtol=1e-13, atol=1e-13)
        (shared, _) = sess.run(None, feed(logits, p, [5]))
        np.testing.assert_array_equal(shared, S.sample(logits[:B], logits[B:] if cfg else None, p, 5))
    with pytest.raises(Exception, match=r"step must have shape \[\] or \[1\] \(one step for every row\) or "
                                        r"\[B\] = \[4\] \(one per row\), got \[3\]"):
        sess.run(None, feed(logits, p, [1, 2, 3]))
    with pytest.raises(Exception, match=r"steps\[2\] = -1: must be >= 0"):
        sess.run(None, feed(logits, p, [0, 1, -1, 2]))
