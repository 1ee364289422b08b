"""Pearson's chi-square test shared by the sampler's statistical tests."""

import numpy as np
from scipy.stats import chi2


def chi2_pvalue(counts, probs) -> float:
    """p-value of ``counts`` drawn from ``probs``; 0.0 when a zero-probability category was drawn at all."""
    if np.any((probs == 0) & (counts > 0)):
        return 0.0
    m = probs > 0
    expected = probs[m] * counts.sum()
    stat = ((counts[m] - expected) ** 2 / expected).sum()
    return float(chi2.sf(stat, df=max(int(m.sum()) - 1, 1)))
