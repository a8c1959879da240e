"""PCA-whitening against a numpy SVD reference, and the evaluator's `whitening` option."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from instsearch.eval.whitening import PCAWhitening


def svd_whitening(train: np.ndarray, rel_eps: float = 1e-6):
    """The textbook whitening by SVD of the centred, l2-normalised training rows."""
    x = train / np.linalg.norm(train, axis=1, keepdims=True)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd((x - mean) / np.sqrt(len(x)), full_matrices=False)
    keep = s ** 2 > rel_eps * s[0] ** 2
    p = vt[keep].T / s[keep]

    def apply(y: np.ndarray) -> np.ndarray:
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        z = (y - mean) @ p
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    return apply, s[keep] ** 2


def test_whitening_matches_numpy_svd():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 0.3
    test = rng.normal(size=(7, 6))
    white = PCAWhitening.fit(train)
    apply, variances = svd_whitening(train)
    np.testing.assert_allclose(white.variances, variances, rtol=1e-8)
    # eigenvector signs are arbitrary: compare the similarities, which do not depend on them
    got, expected = white.transform(test), apply(test)
    np.testing.assert_allclose(got @ got.T, expected @ expected.T, atol=1e-5)
    np.testing.assert_allclose(got @ white.transform(train).T, expected @ apply(train).T, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    # the training set becomes white: identity covariance of the (un-normalised) projections
    x = train / np.linalg.norm(train, axis=1, keepdims=True)
    z = (x - white.mean) @ white.projection
    np.testing.assert_allclose(z.T @ z / len(z), np.eye(white.dim), atol=1e-8)


def test_rank_deficient_data_drops_null_axes_and_dim_caps():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(4, 10))  # 4 rows: rank 3 after centring
    assert PCAWhitening.fit(train).dim == 3
    assert PCAWhitening.fit(train, dim=2).dim == 2
    with pytest.raises(ValueError, match="at least 2"):
        PCAWhitening.fit(train[:1])


def test_save_and_load_round_trip(tmp_path):
    white = PCAWhitening.fit(np.random.default_rng(2).normal(size=(20, 5)))
    path = white.save(tmp_path / "white.npz")
    again = PCAWhitening.load(path)
    x = np.random.default_rng(3).normal(size=(3, 5))
    np.testing.assert_array_equal(again.transform(x), white.transform(x))


def _evaluate(tmp_path, db_features: np.ndarray, query_features: np.ndarray, **config):
    from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator
    from instsearch.eval.extract import QueryFeature, SearchBatch
    from instsearch.formats import Benchmark
    from instsearch.structures import ImageMeta, Regions

    n_db, n_q = len(db_features), len(query_features)
    bench = Benchmark.from_dict({
        "format": "instsearch-benchmark/1", "name": "t", "image_root": ".",
        "images": [{"id": f"d{i}", "file": f"d{i}.jpg", "width": 100, "height": 100} for i in range(n_db)]
        + [{"id": f"q{i}", "file": f"q{i}.jpg", "width": 100, "height": 100} for i in range(n_q)],
        "database": [f"d{i}" for i in range(n_db)],
        "queries": [{"id": f"q{i}", "image": f"q{i}", "box": [0, 0, 10, 10]} for i in range(n_q)],
        "ground_truth": {f"q{i}": {"positives": [{"image": f"d{i}"}], "junk": []} for i in range(n_q)}},
        root=tmp_path)
    ev = RetrievalEvaluator(bench, RetrievalConfig(**config))
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    ev.process(SearchBatch(
        database=[(ImageMeta(f"d{i}", (100, 100)), Regions(boxes=box, scores=torch.ones(1),
                                                            features=torch.tensor(f[None], dtype=torch.float32),
                                                            image_size=(100, 100)))
                  for i, f in enumerate(db_features)],
        queries=[QueryFeature(ImageMeta(f"q{i}", (100, 100), f"q{i}", (0, 0, 10, 10)),
                              torch.tensor(f, dtype=torch.float32)) for i, f in enumerate(query_features)]))
    result = ev.compute()
    return {q: [h.image for h in hits] for q, hits in result.run.rankings.items()}, result.metrics


def test_evaluator_whitening_equals_whitening_the_features_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    # a strong direction shared by every image buries the small identity of each one
    shared = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    identity = rng.normal(size=(12, 6)) * 0.3
    db = shared * rng.uniform(2, 6, size=(12, 1)) + identity
    queries = shared * rng.uniform(2, 6, size=(5, 1)) + identity[:5] + rng.normal(size=(5, 6)) * 0.05
    plain, plain_metrics = _evaluate(tmp_path, db, queries)
    white, white_metrics = _evaluate(tmp_path, db, queries, whitening=True)
    apply, _ = svd_whitening(db)
    by_hand, _ = _evaluate(tmp_path, apply(db), apply(queries))
    assert white == by_hand
    assert white != plain
    assert white_metrics["mAP@all"] > plain_metrics["mAP@all"]


def test_evaluator_refuses_an_unknown_whitening():
    from instsearch.eval.evaluator import RetrievalConfig

    with pytest.raises(ValueError, match="whitening"):
        RetrievalConfig(whitening="nope.npz")
