"""The standard-ops sampling graph (export/sampler_graph.py) against the reference sampler, token for token."""

import numpy as np
import pytest

from larp_rt import sampling as S
from larp_rt.sampling import RowParams

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from larp_rt.export.sampler_graph import SAMPLER_OPSET, build_sampler_model  # noqa: E402


@pytest.fixture(scope="module")
def sess():
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(build_sampler_model().SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(sess, logits, p: RowParams, step):
    return sess.run(None, {"logits": logits, "cfg_scale": p.cfg_scale, "temperature": p.temperature,
                           "top_k": p.top_k, "top_p": p.top_p, "uniform": S.uniform(p.seed, p.stream, step)})


def random_params(rng, B, V):
    k_choices = [0, 1, 2, V - 1, V, int(rng.integers(0, V + 1))]
    return RowParams(
        cfg_scale=rng.choice([1.0, 2.0, 0.0, 1.5], B).astype(np.float32),
        temperature=rng.choice([0.0, 0.5, 1.0, 3.0], B).astype(np.float32),
        top_k=np.clip(rng.choice(k_choices, B), 0, V).astype(np.int64),
        top_p=rng.choice([1.0, 0.9, 0.3, 0.01, 0.999], B).astype(np.float32),
        seed=rng.integers(0, 2**63, B).astype(np.uint64), stream=np.arange(B, dtype=np.uint64))


def test_graph_is_standard_onnx():
    m = build_sampler_model()
    assert [o.domain for o in m.opset_import] == [""] and m.opset_import[0].version == SAMPLER_OPSET
    assert not m.graph.initializer or all(t.data_location == 0 for t in m.graph.initializer)


def test_graph_draws_the_reference_tokens(sess):
    rng = np.random.default_rng(0)
    rows = 0
    for _ in range(250):
        B, V = int(rng.integers(1, 6)), int(rng.choice([1, 2, 3, 17, 100, 2000]))
        cfg = bool(rng.integers(0, 2))
        p = random_params(rng, B, V)
        logits = (rng.standard_normal((2 * B if cfg else B, V)) * rng.choice([0.1, 1.0, 5.0])).astype(np.float32)
        if rng.random() < 0.3:  # many exact ties (top-k boundary, greedy, top-p order)
            logits = np.round(logits)
        step = int(rng.integers(0, 1000))
        tokens, logp = run(sess, logits, p, step)
        want_t, want_l = S.sample(logits[:B], logits[B:] if cfg else None, p, step, return_logprobs=True)
        np.testing.assert_array_equal(tokens, want_t)
        np.testing.assert_allclose(logp, want_l, rtol=0, atol=1e-12)  # the runtime's exp/log vs numpy's: ulps
        rows += B
    assert rows > 600


def test_graph_marks_non_finite_rows(sess):
    rng = np.random.default_rng(1)
    p = random_params(rng, 3, 50)
    p = RowParams(**{**p.__dict__, "cfg_scale": np.array([1.0, 2.0, 1.0], np.float32)})
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    logits[0, 7] = np.nan  # cond row 0
    logits[4, 3] = np.inf  # null row of request 1 (guided): bad
    logits[5, 9] = np.inf  # null row of request 2 (cfg_scale 1: unused, as in the reference)
    tokens, logp = run(sess, logits, p, 0)
    assert tokens[0] == -1 and tokens[1] == -1 and tokens[2] >= 0
    assert np.isnan(logp[:2]).all()
    assert tokens[2] == S.sample(logits[2:3], None, RowParams(**{k: v[2:] for k, v in p.__dict__.items()}), 0)[0]
