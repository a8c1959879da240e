"""BFR (UDQ, Eq. 11) at scale: the IVF path against an independent brute force, the auto rule,
determinism, argument checks."""
from __future__ import annotations

import numpy as np
import pytest

from instsearch.networks.udq_refine import (BFR_EXACT_BELOW, bfr_ivf_lists, bfr_method, neighbour_mean,
                                            refine_bfr)

S = 10


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    """3,000 unit vectors in 16-D around 60 centres."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((60, 16))
    x = centres[rng.integers(0, 60, 3000)] + 0.6 * rng.standard_normal((3000, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _numpy_knn(x: np.ndarray, s: int, metric: str = "l2") -> np.ndarray:
    """Each row's ``s`` nearest other rows, brute force in float64 numpy, nearest first."""
    x64 = x.astype(np.float64)
    if metric == "l2":
        sq = (x64 ** 2).sum(1)
        scores = sq[:, None] + sq[None] - 2 * x64 @ x64.T
    else:
        scores = -(x64 @ x64.T)
    np.fill_diagonal(scores, np.inf)
    part = np.argpartition(scores, s, axis=1)[:, :s]
    return np.take_along_axis(part, np.argsort(np.take_along_axis(scores, part, 1), axis=1), 1)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    rows = np.arange(len(found))
    hits = [len(np.intersect1d(f[(f != r) & (f >= 0)], t)) for r, f, t in zip(rows, found, truth)]
    return float(np.sum(hits)) / truth.size


@pytest.fixture(scope="module")
def truth(clustered) -> np.ndarray:
    return _numpy_knn(clustered, S)


def test_ivf_refinement_agrees_with_numpy_brute_force(clustered, truth):
    out, nb = refine_bfr(clustered, S, method="ivf", seed=0, threads=1, return_neighbours=True)
    assert nb.shape == (len(clustered), S + 1)
    np.testing.assert_array_equal(nb[:, 0], np.arange(len(clustered)))  # a proposal always finds itself
    assert _recall(nb, truth) >= 0.97
    expected = (clustered + clustered[truth].sum(1)) / (S + 1)
    same = np.all(np.abs(out - expected) < 1e-5, axis=1)
    assert same.mean() >= 0.9
    cos = (out * expected).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.mean() > 0.999
    # nprobe matters: one list per proposal finds fewer true neighbours
    _, nb1 = refine_bfr(clustered, S, method="ivf", nprobe=1, seed=0, threads=1, return_neighbours=True)
    assert _recall(nb1, truth) < _recall(nb, truth)


def test_ivf_inner_product(clustered):
    truth = _numpy_knn(clustered, S, "ip")
    _, nb = refine_bfr(clustered, S, metric="ip", method="ivf", threads=1, return_neighbours=True)
    assert _recall(nb, truth) >= 0.97


def test_exact_method_matches_numpy(clustered, truth):
    out, nb = refine_bfr(clustered, S, method="exact", return_neighbours=True)
    assert _recall(nb, truth) == 1.0
    np.testing.assert_allclose(out, (clustered + clustered[truth].sum(1)) / (S + 1), atol=1e-5)


def test_auto_rule(clustered):
    g = len(clustered)
    assert bfr_method(g) == ("exact" if g < BFR_EXACT_BELOW else "ivf")
    assert bfr_method(49_999) == "exact" and bfr_method(50_000) == "ivf"
    assert bfr_method(10**6, "exact") == "exact" and bfr_method(10, "ivf") == "ivf"
    exact = refine_bfr(clustered, S, method="exact")
    ivf = refine_bfr(clustered, S, method="ivf", seed=1, threads=1)
    np.testing.assert_array_equal(refine_bfr(clustered, S, exact_below=g + 1), exact)
    np.testing.assert_array_equal(refine_bfr(clustered, S, exact_below=g, seed=1, threads=1), ivf)
    assert not np.array_equal(exact, ivf)  # the two paths differ here, so the rule is observable


def test_ivf_is_deterministic(clustered):
    kw = dict(method="ivf", seed=5, return_neighbours=True)
    a, na = refine_bfr(clustered, S, threads=2, **kw)
    b, nb = refine_bfr(clustered, S, threads=2, **kw)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(na, nb)
    # on this faiss build the neighbours do not depend on the thread count either
    c, nc = refine_bfr(clustered, S, threads=1, **kw)
    np.testing.assert_array_equal(na, nc)
    np.testing.assert_array_equal(a, c)


def test_invalid_method_refused(clustered):
    with pytest.raises(ValueError, match="method"):
        refine_bfr(clustered, S, method="hnsw")
    with pytest.raises(ValueError, match="method"):
        bfr_method(10, "approximate")


def test_ivf_on_fewer_points_than_neighbours():
    x = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [5, 5]], np.float32)
    out = refine_bfr(x, S, method="ivf", threads=1)
    np.testing.assert_allclose(out, np.tile(x.mean(0), (5, 1)), atol=1e-6)
    assert bfr_ivf_lists(5) == 5 and bfr_ivf_lists(1_000_000) == 4000


def test_neighbour_mean_with_row_indices(clustered, truth):
    nb = np.concatenate([np.arange(len(clustered))[:, None], truth], axis=1)
    rows = np.array([7, 3, 2999, 0])
    np.testing.assert_allclose(neighbour_mean(clustered, nb[rows], S, True, rows=rows),
                               neighbour_mean(clustered, nb, S, True)[rows], atol=1e-6)
