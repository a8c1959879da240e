"""PCA-whitening against numpy references (textbook SVD; eigendecomposition of the covariance with
Ledoit-Wolf shrinkage), its rank cap, warning, file round trip, and the evaluator's options."""
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
    white = PCAWhitening.fit(train, shrinkage=0.0)  # the textbook whitening
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
    from instsearch.eval.extraction import QueryFeature, SearchBatch
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
    white, white_metrics = _evaluate(tmp_path, db, queries, whitening=True, whitening_shrinkage=0.0)
    apply, _ = svd_whitening(db)
    by_hand, _ = _evaluate(tmp_path, apply(db), apply(queries))
    assert white == by_hand
    assert white != plain
    assert white_metrics["mAP@all"] > plain_metrics["mAP@all"]


def test_evaluator_refuses_an_unknown_whitening():
    from instsearch.eval.evaluator import RetrievalConfig

    with pytest.raises(ValueError, match="whitening"):
        RetrievalConfig(whitening="nope.npz")


# ---------------------------------------------------------------- fewer vectors than dimensions
def structured(n: int, d: int, seed: int, clusters: int = 5) -> np.ndarray:
    """Rows near a few cluster centres, on a low-rank signal plus isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(8, d))
    centres = rng.normal(size=(clusters, 8)) * 2.0
    codes = centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, 8)) * 0.7
    return codes @ basis + rng.normal(size=(n, d)) * 0.5 + 0.3


def reference_whitening(train: np.ndarray, shrinkage="auto", dim=None, rel_eps: float = 1e-6):
    """From the equations: l2, centre, eigendecompose S = X^T X / N (D x D), keep at most min(D, N - 1)
    axes, Ledoit-Wolf rho from its definition, variances (1 - rho) l + rho trace(S) / D, project, l2."""
    x = train / np.linalg.norm(train, axis=1, keepdims=True)
    n, p = x.shape
    mean = x.mean(0)
    c = x - mean
    s = c.T @ c / n
    lam, vec = np.linalg.eigh(s)
    lam, vec = lam[::-1], vec[:, ::-1]
    k = min(p, n - 1) if dim is None else min(p, n - 1, dim)
    keep = np.flatnonzero(lam[:k] > rel_eps * lam[0])
    lam, vec = lam[keep], vec[:, keep]
    m = np.trace(s) / p
    if shrinkage == "auto":
        norm2 = lambda a: np.sum(a * a) / p  # Ledoit & Wolf's normalised Frobenius norm
        d2 = norm2(s - m * np.eye(p))
        b2 = min(sum(norm2(np.outer(xk, xk) - s) for xk in c) / n ** 2, d2)
        rho = b2 / d2
    else:
        rho = float(shrinkage)
    proj = vec / np.sqrt((1 - rho) * lam + rho * m)

    def apply(y: np.ndarray) -> np.ndarray:
        z = (y / np.linalg.norm(y, axis=1, keepdims=True) - mean) @ proj
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    return apply, rho, len(keep)


def off_diagonal(g: np.ndarray) -> np.ndarray:
    return g[~np.eye(len(g), dtype=bool)]


def test_fewer_vectors_than_dimensions_do_not_collapse_and_rank_as_the_reference(caplog):
    db = structured(30, 64, seed=4)
    rng = np.random.default_rng(5)
    queries = db[rng.choice(30, size=6, replace=False)] + rng.normal(size=(6, 64)) * 0.8
    # the collapse this guards against: textbook whitening on all N - 1 axes -> a regular simplex
    simplex, _, _ = reference_whitening(db, shrinkage=0.0)
    z = simplex(db)
    assert np.std(off_diagonal(z @ z.T)) < 1e-6
    np.testing.assert_allclose(off_diagonal(z @ z.T), -1 / 29, atol=1e-6)

    with caplog.at_level("WARNING", logger="instsearch.eval.whitening"):
        white = PCAWhitening.fit(db)
    apply, rho, kept = reference_whitening(db)
    assert kept == 29 and white.dim == 29
    assert 0.0 < rho < 1.0 and white.shrinkage == pytest.approx(rho, rel=1e-9)
    got_db, ref_db = white.transform(db), apply(db)
    sims = off_diagonal(got_db @ got_db.T)
    assert np.std(sims) > 1e-2
    np.testing.assert_allclose(got_db @ got_db.T, ref_db @ ref_db.T, atol=1e-5)
    got_q, ref_q = white.transform(queries) @ got_db.T, apply(queries) @ ref_db.T
    np.testing.assert_allclose(got_q, ref_q, atol=1e-5)
    assert (np.argsort(-got_q, axis=1) == np.argsort(-ref_q, axis=1)).all()

    text = caplog.text
    assert "30 vectors of 64 dimensions" in text and "kept 29 dimensions" in text
    assert "another set" in text and "instsearch whitening" in text


def test_no_warning_with_more_vectors_than_dimensions(caplog):
    with caplog.at_level("WARNING", logger="instsearch.eval.whitening"):
        PCAWhitening.fit(structured(80, 16, seed=6))
    assert "fewer vectors than dimensions" not in caplog.text


def test_kept_dimensions_are_at_most_min_d_and_n_minus_1_and_dim():
    assert PCAWhitening.fit(structured(30, 64, seed=7)).dim == 29  # N - 1
    assert PCAWhitening.fit(structured(30, 64, seed=7), rel_eps=0.0).dim == 29  # not the centring's null axis
    assert PCAWhitening.fit(structured(13, 12, seed=7), rel_eps=0.0).dim == 12
    assert PCAWhitening.fit(structured(200, 12, seed=7)).dim == 12  # D
    assert PCAWhitening.fit(structured(13, 12, seed=7)).dim == 12  # N - 1 = D
    assert PCAWhitening.fit(structured(30, 64, seed=7), dim=10).dim == 10
    assert PCAWhitening.fit(structured(30, 64, seed=7), dim=500).dim == 29
    with pytest.raises(ValueError, match="dim"):
        PCAWhitening.fit(structured(30, 64, seed=7), dim=0)


@pytest.mark.parametrize("rho", [0.05, 0.3, 1.0])
def test_every_fixed_shrinkage_matches_the_reference(rho):
    db = structured(30, 64, seed=8)
    queries = structured(4, 64, seed=9)
    white = PCAWhitening.fit(db, shrinkage=rho)
    apply, _, _ = reference_whitening(db, shrinkage=rho)
    assert white.shrinkage == rho
    np.testing.assert_allclose(white.transform(queries) @ white.transform(db).T, apply(queries) @ apply(db).T,
                               atol=1e-5)


@pytest.mark.parametrize("n, d", [(30, 64), (80, 16)])
def test_ledoit_wolf_shrinkage_matches_the_reference_on_both_sides_of_n_equals_d(n, d):
    db, queries = structured(n, d, seed=n), structured(5, d, seed=n + 1)
    white = PCAWhitening.fit(db)
    apply, rho, kept = reference_whitening(db)
    assert white.shrinkage == pytest.approx(rho, rel=1e-9) and white.dim == kept
    np.testing.assert_allclose(white.transform(queries) @ white.transform(db).T, apply(queries) @ apply(db).T,
                               atol=1e-5)


def test_shrinkage_changes_the_similarities_and_one_is_a_plain_pca_rotation():
    db = structured(30, 64, seed=10)

    def sims(**kw):
        z = PCAWhitening.fit(db, **kw).transform(db)
        return z @ z.T

    assert np.abs(sims(shrinkage=0.1) - sims(shrinkage=0.5)).max() > 1e-2
    assert np.abs(sims() - sims(shrinkage=0.5)).max() > 1e-3
    assert np.abs(sims(dim=5) - sims()).max() > 1e-2
    # rho = 1: every axis divided by the same number, i.e. the cosine of the centred vectors
    x = db / np.linalg.norm(db, axis=1, keepdims=True)
    c = x - x.mean(0)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    np.testing.assert_allclose(sims(shrinkage=1.0), c @ c.T, atol=1e-5)


def test_unshrunk_whitening_of_the_fitting_set_onto_a_simplex_is_refused():
    db = structured(30, 64, seed=11)
    with pytest.raises(ValueError, match="simplex"):
        PCAWhitening.fit(db, shrinkage=0.0)
    with pytest.raises(ValueError, match="simplex"):
        PCAWhitening.fit(structured(13, 12, seed=11), shrinkage=0.0)  # N - 1 = D: a simplex as well
    assert PCAWhitening.fit(db, shrinkage=0.0, dim=20).dim == 20  # a strict subspace does not collapse
    for bad in (-0.1, 1.5, "often", True):
        with pytest.raises(ValueError, match="shrinkage"):
            PCAWhitening.fit(db, shrinkage=bad)


def test_retrieval_config_options_reach_the_fit():
    from instsearch.eval.evaluator import RetrievalConfig

    db = structured(30, 64, seed=12)
    assert RetrievalConfig(whitening=False).fit_whitening(db) is None
    auto = RetrievalConfig(whitening=True).fit_whitening(db)
    assert RetrievalConfig().whitening_shrinkage == "auto"
    assert auto.shrinkage == pytest.approx(reference_whitening(db)[1], rel=1e-9)
    fixed = RetrievalConfig(whitening="pca", whitening_shrinkage=0.3).fit_whitening(db)
    assert fixed.shrinkage == 0.3
    np.testing.assert_array_equal(fixed.projection, PCAWhitening.fit(db, shrinkage=0.3).projection)
    assert RetrievalConfig(whitening=True, whitening_dim=7).fit_whitening(db).dim == 7
    for bad in (-1, 2.0, "ledoit"):
        with pytest.raises(ValueError, match="shrinkage"):
            RetrievalConfig(whitening=True, whitening_shrinkage=bad)
    with pytest.raises(ValueError, match="whitening_dim"):
        RetrievalConfig(whitening=True, whitening_dim=0)


def test_a_whitening_fitted_on_another_set_round_trips_through_a_file(tmp_path):
    from instsearch.eval.evaluator import RetrievalConfig

    other, db = structured(40, 64, seed=13), structured(25, 64, seed=14)
    white = PCAWhitening.fit(other, dim=20)
    path = white.save(tmp_path / "other")
    assert path == tmp_path / "other.npz" and path.is_file()
    again = PCAWhitening.load(path)
    for name in ("mean", "projection", "variances"):
        np.testing.assert_array_equal(getattr(again, name), getattr(white, name))
    assert (again.shrinkage, again.num_samples, again.dim) == (white.shrinkage, 40, 20)
    loaded = RetrievalConfig(whitening=str(path)).fit_whitening(db)  # loaded, not fitted on db
    np.testing.assert_array_equal(loaded.transform(db), white.transform(db))


def test_a_file_of_another_dimension_is_refused_with_its_name(tmp_path):
    from instsearch.eval.evaluator import RetrievalConfig

    path = PCAWhitening.fit(structured(40, 64, seed=15)).save(tmp_path / "paris_white.npz")
    features = structured(10, 32, seed=16)
    with pytest.raises(ValueError, match=r"paris_white\.npz.*64-D.*32-D"):
        RetrievalConfig(whitening=str(path)).fit_whitening(features)
    with pytest.raises(ValueError, match=r"paris_white\.npz.*64-D.*32-D"):
        PCAWhitening.load(path).transform(features)


# ---------------------------------------------------------------- instsearch whitening
def test_whitening_command_fits_another_benchmarks_database_and_the_evaluator_loads_it(tmp_path, small_benchmark,
                                                                                      capsys):
    """`instsearch whitening` on the small DASR config, with and without a checkpoint: the file
    holds the whitening of the database region features that the checkpoint's network extracts."""
    import pytorch_lightning as pl
    import yaml

    from instsearch.cli import main
    from instsearch.datamodules.benchmark import benchmark_dataloader
    from instsearch.eval.evaluator import RetrievalConfig
    from instsearch.eval.extraction import extract_batch
    from instsearch.networks.dasr import DASR
    from tests.config_runs import CONFIGS, load_config

    config = load_config(CONFIGS / "dasr_synthetic.yaml")
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["init_args"]["net"]["init_args"]["long_side"] = 96
    config["model"]["init_args"]["retrieval"]["whitening_dim"] = 6
    config["data"] = {"class_path": "instsearch.datamodules.benchmark.BenchmarkDataModule",
                      "init_args": {"benchmark": str(small_benchmark), "batch_size": 4}}
    path = tmp_path / "dasr.yaml"
    path.write_text(yaml.safe_dump(config))
    # a checkpoint whose (random) backbone differs from the one the config builds under its seed
    pl.seed_everything(config["seed_everything"] + 1)
    net = DASR(**config["model"]["init_args"]["net"]["init_args"]).eval()
    ckpt = tmp_path / "other_weights.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "pytorch-lightning_version": pl.__version__, "epoch": 0, "global_step": 0}, ckpt)

    files = {}
    for name, extra in (("config", []), ("ckpt", ["--ckpt_path", str(ckpt)])):
        files[name] = tmp_path / "w" / f"{name}.npz"
        assert main(["whitening", "--config", str(path), "--benchmark", str(small_benchmark),
                     "--out", str(files[name]), *extra]) == 0
        assert f"whitening: {files[name]}" in capsys.readouterr().out
    white = PCAWhitening.load(files["ckpt"])
    assert white.dim == 6 and white.num_samples >= 24  # every database image gives at least one region
    assert not np.allclose(PCAWhitening.load(files["config"]).mean, white.mean)

    regions = [r for batch in benchmark_dataloader(small_benchmark, "database", batch_size=4, max_side=1600)
               for _, r in extract_batch(net, *batch).database]
    features = np.concatenate([r.features.numpy() for r in regions if len(r)])
    assert white.num_samples == len(features)
    expected = PCAWhitening.fit(features, dim=6)
    np.testing.assert_allclose(white.mean, expected.mean, atol=1e-5)
    np.testing.assert_allclose(white.transform(features) @ white.transform(features).T,
                               expected.transform(features) @ expected.transform(features).T, atol=1e-4)
    assert RetrievalConfig(whitening=str(files["ckpt"])).fit_whitening(features).dim == 6
