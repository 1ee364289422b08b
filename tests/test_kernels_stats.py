"""Statistical tests of the CPU sampling kernel: 10^6 draws per case against the exact filtered distribution.

Each case draws N = 1,000,000 tokens (one per Philox stream) and runs Pearson's chi-square test against the
exact renormalised top-k/top-p distribution computed independently here in float64. The test passes when
p-value > 1e-6 (with fixed seeds this is deterministic; for a correct sampler the chance of a false failure on a
fresh seed would be 1e-6 per case). The same counts must *fail* (p-value < 1e-6) against the distribution of
an off-by-one k and of a 10% wrong temperature, which shows the test has the power to catch those bugs.
"""

import functools

import numpy as np
import pytest
from _stats import chi2_pvalue

from larp_rt import kernels as K
from larp_rt.sampling import RowParams

pytestmark = pytest.mark.skipif(K.cpu_library() is None, reason="CPU kernels not built")

N = 1_000_000
P_BOUND = 1e-6
LOGITS = np.array([2.0, 0.5, 2.0, 1.0, -1.0, 1.5, 0.5, 0.0, 1.0, -0.5, 2.5, 0.25], np.float32)  # with ties


def exact(l, T, k, p):
    """softmax(l / T) restricted to the first k of (l desc, index asc), then the smallest prefix with mass >= p."""
    l = np.asarray(l, np.float64)
    w = np.exp((l - l.max()) / T)
    order = sorted(range(len(l)), key=lambda i: (-l[i], i))
    if k:
        order = order[:k]
    if p < 1.0:
        mass = np.cumsum(w[order]) / w[order].sum()
        n = int(np.argmax(mass >= np.float64(np.float32(p)))) + 1
        order = order[:n]
    out = np.zeros(len(l))
    out[order] = w[order]
    return out / out.sum()


@functools.cache
def draw(T, k, p, seed=2024):
    params = RowParams(
        cfg_scale=np.ones(N, np.float32), temperature=np.full(N, T, np.float32), top_k=np.full(N, k, np.int64),
        top_p=np.full(N, p, np.float32), seed=np.full(N, seed, np.uint64), stream=np.arange(N, dtype=np.uint64),
    )
    logits = np.broadcast_to(LOGITS, (N, len(LOGITS)))  # one row shared by every draw (row stride 0)
    tokens = K.sample_numpy(logits, None, params, 7)
    return np.bincount(tokens, minlength=len(LOGITS))


@pytest.mark.parametrize("T, k, p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.7), (2.0, 12, 0.95)])
def test_frequencies_match_the_exact_distribution(T, k, p):
    counts = draw(T, k, p)
    assert counts.sum() == N
    probs = exact(LOGITS, T, k, p)
    assert chi2_pvalue(counts, probs) > P_BOUND
    # power: the same counts reject a 10% wrong temperature and an off-by-one k (where k decides the support:
    # with a binding top-p cut or k = V, k +- 1 gives the same distribution)
    assert chi2_pvalue(counts, exact(LOGITS, T * 1.1, k, p)) < P_BOUND
    for k_wrong in (k - 1, k + 1):
        if 0 < k < len(LOGITS) and 0 < k_wrong <= len(LOGITS):
            alt = exact(LOGITS, T, k_wrong, p)
            if np.abs(alt - probs).max() > 1e-3:
                assert chi2_pvalue(counts, alt) < P_BOUND


def test_the_chi_square_test_rejects_off_by_one_k():
    counts = draw(0.7, 5, 1.0)
    assert chi2_pvalue(counts, exact(LOGITS, 0.7, 5, 1.0)) > P_BOUND
    assert chi2_pvalue(counts, exact(LOGITS, 0.7, 4, 1.0)) < P_BOUND
    assert chi2_pvalue(counts, exact(LOGITS, 0.7, 6, 1.0)) < P_BOUND


def test_ties_at_the_top_k_boundary_go_to_the_lower_index():
    # sorted (l desc, index asc): 10, 0, 2, 5, 3, 8, ...: k = 2 keeps 10 and 0 (not 2, which ties with 0)
    counts = draw(1.0, 2, 1.0, seed=5)
    assert set(np.flatnonzero(counts)) == {10, 0}
    assert chi2_pvalue(counts, exact(LOGITS, 1.0, 2, 1.0)) > P_BOUND
