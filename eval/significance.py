"""Is a difference in mAP more than the noise of the queries? The paired bootstrap over queries.

Two systems scored on the same queries give paired APs ``a_i``, ``b_i``; the difference in mAP is
the mean of ``d_i = a_i - b_i``. Resampling the queries with replacement ``resamples`` times
(seeded) gives the distribution of that mean under the benchmark's query sampling; the
percentile interval at ``confidence`` is reported, and whether it excludes 0 (Efron & Tibshirani,
"An Introduction to the Bootstrap", ch. 13; the paired test of Smucker et al., "A comparison of
statistical significance tests for information retrieval evaluation", CIKM 2007).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: resamples drawn per block: a block's index matrix stays within 64 MB
_BLOCK_DRAWS = 1 << 23


@dataclass(frozen=True)
class PairedDifference:
    """The mean paired difference and its bootstrap percentile interval."""

    mean: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> PairedDifference:
    """Bootstrap interval of ``mean(a - b)`` over the paired queries (see the module docstring).

    The percentiles are numpy's default (linear) quantiles of the resampled means."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired scores need one value per query on both sides, got {a.size} and {b.size}")
    if not a.size:
        raise ValueError("no queries to compare")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"resamples must be >= 1 and confidence in (0, 1), got {resamples}, {confidence}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(int(resamples), np.float64)
    per_block = max(1, _BLOCK_DRAWS // d.size)
    for start in range(0, len(means), per_block):
        n = min(per_block, len(means) - start)
        means[start:start + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(d.mean()), float(low), float(high), float(confidence), int(resamples), int(seed))
