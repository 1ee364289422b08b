"""The one-token cache attention kernel (cpp_ext attention_cpu.h) of the fused decode graph: against a float64
reference, the torch graph math, and as the ONNX Runtime op larp_rt::DecodeAttention."""

import numpy as np
import pytest

from larp_rt import kernels as K

pytestmark = pytest.mark.skipif(not K.available()["cpu"], reason="the CPU kernels are not built")


def reference(q, k, v, pk, pv, pos):
    """float64: softmax over [q.past_k[:pos] | q.k] then the weighted values; pos an int or one per row."""
    if np.ndim(pos):
        return np.concatenate([reference(*(a[b:b + 1] for a in (q, k, v, pk, pv)), int(p)) for b, p in enumerate(pos)])
    n = min(pos, pk.shape[2])
    q64, k64, v64 = (a[:, :, 0].astype(np.float64) for a in (q, k, v))
    s = np.concatenate([np.einsum("bhsd,bhd->bhs", pk[:, :, :n].astype(np.float64), q64),
                        np.einsum("bhd,bhd->bh", k64, q64)[..., None]], -1)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = np.einsum("bhs,bhsd->bhd", a[..., :n], pv[:, :, :n].astype(np.float64)) + a[..., n:] * v64
    return y[:, :, None]


def case(rng, B, H, S, hd, scale=1.0):
    q, k, v = (rng.standard_normal((B, H, 1, hd)).astype(np.float32) * scale for _ in range(3))
    pk, pv = (rng.standard_normal((B, H, S, hd)).astype(np.float32) * scale for _ in range(2))
    return q, k, v, pk, pv


@pytest.mark.parametrize("shape", [(2, 8, 640, 64, 512), (1, 3, 20, 5, 0), (3, 2, 33, 40, 33), (1, 1, 9, 8, 7),
                                   (2, 4, 16, 64, 100), (1, 2, 300, 96, 257)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_the_float64_reference(shape, threads):
    B, H, S, hd, pos = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    q, k, v, pk, pv = case(rng, B, H, S, hd, scale=2.0)
    pk[:, :, min(pos, S):] = np.nan  # slots at and after pos are never read
    y = K.decode_attention(q, k, v, pk, pv, pos, num_threads=threads)
    want = reference(q, k, v, np.nan_to_num(pk), pv, pos)
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("shape", [(3, 2, 70, 64, 65), (1, 5, 40, 40, 39), (2, 3, 24, 72, 24), (2, 2, 9, 5, 9),
                                   (3, 3, 40, 64, (0, 17, 99)), (4, 2, 30, 64, (5, 5, 30, 12)),
                                   (3, 5, 24, 72, (24, 3, 3)), (2, 3, 9, 5, (1, 9))])
def test_pairs_equal_single_tasks_bit_for_bit(shape):
    """Tasks run two at a time (two concurrent streams) except an odd last one; one (row, head) alone is always a
    single task. Every split must give the same bits: the pair path is the single path's arithmetic. With per-row
    positions (tuples) a pair across two rows at different positions runs as two single tasks: same bits."""
    B, H, S, hd, pos = shape
    pos = np.array(pos, np.int64) if isinstance(pos, tuple) else pos
    q, k, v, pk, pv = case(np.random.default_rng(7), B, H, S, hd, scale=2.0)
    whole = K.decode_attention(q, k, v, pk, pv, pos, num_threads=1)
    for threads in (2, 3):
        np.testing.assert_array_equal(K.decode_attention(q, k, v, pk, pv, pos, num_threads=threads), whole)
    for b in range(B):
        pb = int(pos[b]) if np.ndim(pos) else pos
        for h in range(H):
            one = K.decode_attention(*(a[b:b + 1, h:h + 1] for a in (q, k, v, pk, pv)), pb, num_threads=1)
            np.testing.assert_array_equal(one[0, 0], whole[b, h])


@pytest.mark.parametrize("shape", [(4, 8, 64, 64, (0, 64, 200, 31)), (3, 3, 33, 40, (33, 0, 7)),
                                   (5, 1, 20, 8, (19, 20, 21, 0, 1)), (2, 5, 50, 96, (49, 2))])
@pytest.mark.parametrize("threads", [1, 3])
def test_per_row_positions(shape, threads):
    """Rows at their own positions (continuous batching): each row == the float64 reference at its position
    (0, > S clamped, mixed; odd H puts rows of different positions in one pair) and == that row alone with its
    position as an int, bit for bit."""
    B, H, S, hd, pos = shape
    pos = np.array(pos, np.int64)
    rng = np.random.default_rng(B * 100 + H)
    q, k, v, pk, pv = case(rng, B, H, S, hd, scale=2.0)
    for b in range(B):
        pk[b, :, min(pos[b], S):] = np.nan  # each row's slots at and after its pos are never read
    y = K.decode_attention(q, k, v, pk, pv, pos, num_threads=threads)
    want = reference(q, k, v, np.nan_to_num(pk), pv, pos)
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))
    for b in range(B):
        alone = K.decode_attention(*(a[b:b + 1] for a in (q, k, v, pk, pv)), int(pos[b]), num_threads=threads)
        np.testing.assert_array_equal(alone[0], y[b])
    # one position for every row: an int and a (B,) array of it are the same call
    np.testing.assert_array_equal(K.decode_attention(q, k, v, pk, pv, np.full(B, 3), num_threads=threads),
                                  K.decode_attention(q, k, v, pk, pv, 3, num_threads=threads))


def test_peaked_scores_and_exp_range():
    rng = np.random.default_rng(1)
    q, k, v, pk, pv = case(rng, 1, 2, 50, 16, scale=6.0)  # scores up to ~1e3: exp underflows to 0 for most slots
    y = K.decode_attention(q, k, v, pk, pv, 50)
    np.testing.assert_allclose(y, reference(q, k, v, pk, pv, 50), rtol=0, atol=1e-4)
    assert np.isfinite(y).all()


def test_bad_arguments_name_the_problem():
    q, k, v, pk, pv = case(np.random.default_rng(2), 1, 2, 8, 4)
    with pytest.raises(ValueError, match="past_k/past_v must have shape"):
        K.decode_attention(q, k, v, pk[:, :1], pv, 3)
    with pytest.raises(ValueError, match="q, k, v must share"):
        K.decode_attention(q, k[:, :1], v, pk, pv, 3)
    with pytest.raises(ValueError, match="pos must be"):
        K.decode_attention(q, k, v, pk, pv, -1)
    with pytest.raises(ValueError, match=r"pos must be >= 0"):
        K.decode_attention(q, k, v, pk, pv, np.array([-1]))
    with pytest.raises(ValueError, match=r"pos must be an int >= 0 or a \(1,\) integer array"):
        K.decode_attention(q, k, v, pk, pv, np.array([1, 2]))
    with pytest.raises(ValueError, match=r"pos must be an int >= 0 or a \(1,\) integer array"):
        K.decode_attention(q, k, v, pk, pv, 1.5)


def test_graph_op_matches_the_torch_math():
    """larp_rt::DecodeAttention in ONNX Runtime == the torch forward the exporter traced (export/graphs.py)."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from larp_rt.export.graphs import _CacheAttention
    from onnx import TensorProto as TP
    from onnx import helper as h

    if K.ort_custom_op_library() is None:
        pytest.skip("the ONNX Runtime custom-op library is not built")
    names = ["q", "k", "v", "past_k", "past_v"]
    ins = [h.make_tensor_value_info(n, TP.FLOAT, ["B", "H", 1 if i < 3 else "S", "D"]) for i, n in enumerate(names)]
    ins.append(h.make_tensor_value_info("pos", TP.INT64, [1]))
    node = h.make_node("DecodeAttention", names + ["pos"], ["y"], domain="larp_rt")
    graph = h.make_graph([node], "attn", ins, [h.make_tensor_value_info("y", TP.FLOAT, ["B", "H", 1, "D"])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("larp_rt", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(K.ort_custom_op_library())
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for B, H, S, hd, pos in [(2, 8, 64, 16, 40), (1, 3, 16, 64, 0), (4, 2, 24, 8, 24)]:
        arrs = case(rng, B, H, S, hd)
        (y,) = sess.run(None, {**dict(zip(names, arrs, strict=True)), "pos": np.array([pos], np.int64)})
        want = _CacheAttention.apply(*map(torch.from_numpy, arrs), torch.tensor([pos])).numpy()
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="past_k must have shape"):
        q, k, v, pk, pv = case(rng, 1, 2, 8, 4)
        sess.run(None, {"q": q, "k": k, "v": v, "past_k": pk[:, :, :, :2], "past_v": pv, "pos": np.array([1])})


def attention_session(pos_dims):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto as TP
    from onnx import helper as h

    if K.ort_custom_op_library() is None:
        pytest.skip("the ONNX Runtime custom-op library is not built")
    names = ["q", "k", "v", "past_k", "past_v"]
    ins = [h.make_tensor_value_info(n, TP.FLOAT, ["B", "H", 1 if i < 3 else "S", "D"]) for i, n in enumerate(names)]
    ins.append(h.make_tensor_value_info("pos", TP.INT64, pos_dims))
    node = h.make_node("DecodeAttention", names + ["pos"], ["y"], domain="larp_rt")
    graph = h.make_graph([node], "attn", ins, [h.make_tensor_value_info("y", TP.FLOAT, ["B", "H", 1, "D"])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("larp_rt", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(K.ort_custom_op_library())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_graph_op_with_per_row_positions():
    """pos [B] (one per row) in ONNX Runtime == the ctypes kernel bit for bit (the same pairs, split over ONNX
    Runtime's threads) and the float64 reference; pos [1] still broadcasts; any other shape is refused."""
    sess = attention_session(["P"])
    names = ["q", "k", "v", "past_k", "past_v"]
    rng = np.random.default_rng(4)
    for B, H, S, hd, pos in [(4, 3, 32, 64, [0, 32, 50, 9]), (3, 2, 16, 8, [16, 1, 16]), (1, 5, 8, 40, [3])]:
        arrs = case(rng, B, H, S, hd)
        pos = np.array(pos, np.int64)
        (y,) = sess.run(None, {**dict(zip(names, arrs, strict=True)), "pos": pos})
        np.testing.assert_array_equal(y, K.decode_attention(*arrs, pos))
        np.testing.assert_allclose(y, reference(*arrs, pos), rtol=0, atol=2e-5)
        (y1,) = sess.run(None, {**dict(zip(names, arrs, strict=True)), "pos": pos[:1]})
        np.testing.assert_array_equal(y1, K.decode_attention(*arrs, int(pos[0])))
    arrs = case(rng, 2, 2, 8, 4)
    with pytest.raises(Exception, match=r"pos must have shape \[1\] \(one position for every row\) or \[B\] = \[2\] "
                                        r"\(one per row\), got \[3\]"):
        sess.run(None, {**dict(zip(names, arrs, strict=True)), "pos": np.array([1, 2, 3])})
