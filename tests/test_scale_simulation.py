"""Planted region shards (benchmarks/scale_simulation.py): the extractor's format, the planted
positives where the ground truth says, determinism across seeds and part sizes, and the exact
references against brute force."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale_data  # noqa: E402
from scale_data import (SimulationConfig, exact_ground_truth, spectrum_profile,  # noqa: E402
                        write_simulation)

from instsearch.eval.shards import RegionShards  # noqa: E402
from instsearch.eval.streamed import exact_image_ranking  # noqa: E402
from instsearch.formats import Benchmark  # noqa: E402

# 300 images of ~10 regions in blocks of 16 images: parts cut blocks in every way
CONFIG = SimulationConfig(regions=3000, dim=64, regions_per_image=10, queries=12, positives=(2, 4), seed=3,
                          clusters=32, empty_fraction=0.1, junk=1)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(scale_data, "BLOCK_IMAGES", 16)


def _write(root: Path, config: SimulationConfig = CONFIG, part_size: int = 50, dtype: str = "float16") -> RegionShards:
    write_simulation(config, root, dtype=dtype, part_size=part_size, progress=None)
    return RegionShards(root)


@pytest.fixture
def shards(tmp_path) -> RegionShards:
    return _write(tmp_path / "sim")


def _all_features(shards: RegionShards) -> np.ndarray:
    return np.concatenate([np.asarray(f, np.float32) for _, f in shards.iter_features()])


def _all_boxes(shards: RegionShards) -> np.ndarray:
    return np.concatenate([shards.boxes(p) for p in shards.parts])


def test_the_folder_opens_as_shards_with_the_counts_asked(shards):
    manifest = shards.manifest
    bench = Benchmark.load(manifest["benchmark"])
    assert manifest["model"] == "simulated" and manifest["complete"] and manifest["dtype"] == "float16"
    assert manifest["config_sha256"] == scale_data.config_sha256(CONFIG.as_dict())
    assert len(shards.parts) == manifest["num_parts"] == -(-(300 + 12) // 50)
    assert shards.num_regions == manifest["regions"] == CONFIG.regions and shards.dim == CONFIG.dim
    assert shards.image_ids == bench.database and len(shards.image_ids) == manifest["images"] == 300
    counts = np.diff(shards.image_starts)
    assert (counts == 0).any() and counts.max() > counts[counts > 0].min()  # empty images, varying counts
    query_ids, features, _ = shards.queries()
    assert query_ids == [q.id for q in bench.queries] and features.shape == (12, 64)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(_all_features(shards), axis=1), 1, atol=2e-3)  # float16
    for q in bench.queries:
        gt = bench.ground_truth[q.id]
        assert 2 <= len(gt.positives) <= 4 and len(gt.junk) == 1 and not gt.junk & set(gt.positives)
        assert q.image not in set(bench.database)


@pytest.mark.parametrize("spectrum", ["power", "linear"])
def test_each_positive_image_holds_the_planted_region_nearest_the_query_with_the_ground_truth_box(tmp_path, spectrum):
    # easy positives (noise 0.3, as the query's): the planted region is its image's nearest to the
    # query under either spectrum (hard ones, up to the default 1.5, may lose to a background region)
    shards = _write(tmp_path / "sim", SimulationConfig(**{**CONFIG.__dict__, "positive_noise": (0.3, 0.3),
                                                          "spectrum": spectrum}))
    bench = Benchmark.load(shards.manifest["benchmark"])
    query_ids, queries, _ = shards.queries()
    features, boxes, position = _all_features(shards), _all_boxes(shards), {i: n for n, i in enumerate(shards.image_ids)}
    starts = shards.image_starts
    for qid, query in zip(query_ids, queries):
        for image, gt_boxes in bench.ground_truth[qid].positives.items():
            rows = np.arange(starts[position[image]], starts[position[image] + 1])
            best = rows[np.argmax(features[rows] @ query)]
            assert len(gt_boxes) == 1 and tuple(boxes[best].tolist()) == gt_boxes[0]


def test_the_same_seed_writes_the_same_files(tmp_path):
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b")
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    for f in files:
        if f.name != "manifest.json":
            assert (a.root / f).read_bytes() == (b.root / f).read_bytes(), f
    ma, mb = (json.loads((s.root / "manifest.json").read_text()) for s in (a, b))
    assert {**ma, "benchmark": None} == {**mb, "benchmark": None}
    other = _write(tmp_path / "c", SimulationConfig(**{**CONFIG.__dict__, "seed": 4}))
    assert not np.array_equal(_all_features(other), _all_features(a))


def test_part_sizes_give_bitwise_the_same_regions(tmp_path):
    small, whole = _write(tmp_path / "small", part_size=7), _write(tmp_path / "whole", part_size=1000)
    assert len(small.parts) == 45 and len(whole.parts) == 1
    for f in ("features", "boxes"):
        x, y = (np.concatenate([getattr(s, f)(p) for p in s.parts]) for s in (small, whole))
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    scores = [np.concatenate([s.meta(p, ["score"])["score"] for p in s.parts]) for s in (small, whole)]
    assert scores[0].tobytes() == scores[1].tobytes()
    assert small.image_ids == whole.image_ids and small.image_starts.tolist() == whole.image_starts.tolist()
    assert small.queries()[1].tobytes() == whole.queries()[1].tobytes()


def test_a_rerun_finishes_missing_parts_and_another_collection_is_refused(tmp_path):
    shards = _write(tmp_path / "s")
    before = shards.features(3).tobytes()
    (shards.root / "parts" / "part-00003.json").unlink()
    _write(tmp_path / "s")
    assert RegionShards(tmp_path / "s").features(3).tobytes() == before
    bench = (tmp_path / "s" / "benchmark.json").read_bytes()
    with pytest.raises(ValueError, match="another extraction"):
        _write(tmp_path / "s", SimulationConfig(**{**CONFIG.__dict__, "seed": 9}))
    assert (tmp_path / "s" / "benchmark.json").read_bytes() == bench  # untouched by the refused write


def test_exact_ground_truth_is_the_brute_force_top_k(shards):
    _, queries, _ = shards.queries()
    scores = queries @ _all_features(shards).T
    top_scores, top_ids = exact_ground_truth(shards, queries, 10)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert top_ids.shape == (12, 10) and top_ids.tolist() == expected.tolist()
    np.testing.assert_allclose(top_scores, np.take_along_axis(scores, expected, 1), rtol=1e-5, atol=1e-6)
    assert exact_ground_truth(shards, queries, 10**6)[1].shape == (12, CONFIG.regions)  # k capped


@pytest.mark.parametrize("max_scores", [1 << 23, 12 * 25])  # whole parts; a few images a chunk
def test_exact_image_ranking_is_the_brute_force_best_region_per_image(shards, max_scores):
    _, queries, _ = shards.queries()
    scores, starts = queries @ _all_features(shards).T, shards.image_starts
    filled = np.flatnonzero(np.diff(starts))
    best_region = np.stack([starts[i] + np.argmax(scores[:, starts[i]:starts[i + 1]], axis=1) for i in filled], 1)
    best = np.take_along_axis(scores, best_region, 1)
    order = np.argsort(-best, axis=1, kind="stable")[:, :20]
    got = exact_image_ranking(shards, queries, 20, max_scores=max_scores)
    assert got.images.tolist() == filled[order].tolist()
    assert got.regions.tolist() == np.take_along_axis(best_region, order, 1).tolist()
    np.testing.assert_allclose(got.scores, np.take_along_axis(best, order, 1), rtol=1e-5, atol=1e-6)
    padded = exact_image_ranking(shards, queries[:2], 400, max_scores=max_scores)
    assert (padded.images[:, len(filled):] == -1).all() and np.isneginf(padded.scores[:, len(filled):]).all()
    assert sorted(padded.images[0, :len(filled)].tolist()) == filled.tolist()


def test_the_search_chain_runs_on_the_simulated_folder(shards):
    """Flat index -> two-stage search over the shards -> metrics: exact, so the run is the exact
    image ranking, and every positive found is boxed by its planted region."""
    import faiss

    from instsearch.eval.metrics import retrieval_metrics
    from instsearch.eval.searchers import FaissSearcher
    from instsearch.eval.shard_search import search_shards

    searcher = FaissSearcher(faiss.IndexFlatIP(shards.dim))
    searcher.add(_all_features(shards))
    query_ids, queries, _ = shards.queries()
    run = search_shards(searcher, shards, query_ids, queries, shortlist=30)
    bench = Benchmark.load(shards.manifest["benchmark"])
    reference = exact_image_ranking(shards, queries, 30)
    for qid, images in zip(query_ids, reference.images):
        assert [h.image for h in run.rankings[qid]] == [shards.image_ids[i] for i in images]
    metrics = retrieval_metrics(bench, run)
    # hard positives (noise up to 1.5) rank below some distractors; found, each is boxed exactly
    assert 0.5 < metrics["mAP@all"] < 1 and metrics["mIoU"] == pytest.approx(1.0)


def test_spectrum_profiles_by_hand():
    power = np.array([1, 2 ** -0.5, 3 ** -0.5, 0.5])  # standard deviations (i + 1)^-1/2
    np.testing.assert_allclose(spectrum_profile("power", 4), power / np.linalg.norm(power), rtol=1e-6)
    linear = np.array([1.0, 0.7, 0.4, 0.1])
    np.testing.assert_allclose(spectrum_profile("linear", 4), linear / np.linalg.norm(linear), rtol=1e-6)
    with pytest.raises(ValueError, match="spectrum must be one of"):
        SimulationConfig(regions=10, dim=4, spectrum="flat")


def test_background_as_distractors_searches_and_scores_as_the_listed_database(tmp_path):
    # the same collection with the images that hold no instance given by reference (a distractor
    # entry, ids "distractor:…") instead of listed: identical features, the same run up to the
    # ids, the same metrics, and only the instance and junk images in benchmark.json
    from instsearch.eval.index_build import build_index
    from instsearch.search_cli import run_search

    listed = _write(tmp_path / "listed")
    refd = _write(tmp_path / "refd", SimulationConfig(**{**CONFIG.__dict__, "background": "distractors"}))
    np.testing.assert_array_equal(_all_features(listed), _all_features(refd))
    bench = Benchmark.load(refd.manifest["benchmark"])
    planted = {i for g in bench.ground_truth.values() for i in [*g.positives, *g.junk]}
    assert set(bench.database) == planted
    assert bench.distractors == [{"root": "distractors", "id_prefix": "distractor:", "count": 300 - len(planted)}]
    assert sum(1 for i in refd.image_ids if bench.is_distractor(i)) == 300 - len(planted)
    metrics = []
    for shards in (listed, refd):
        index = build_index(shards, shards.root / "index", factory="Flat", progress=False)
        metrics.append(run_search(index, shards.root, shards.root / "run" / "run.json", {}, shortlist=None))
    for key in ("mAP@10", "mAP@100", "mAP@all", "mIoU", "database_regions"):
        assert metrics[0][key] == metrics[1][key], key
    assert metrics[1]["distractor_images"] == 300 - len(planted) and metrics[0]["distractor_images"] == 0
    assert metrics[1]["database_images"] == len(planted)


# ------------------------------------------------------------------------------ nprobe auto
def _ivf_searcher(shards: RegionShards, nlist: int = 16, nprobe: int = 1):
    import faiss

    from instsearch.eval.searchers import FaissSearcher

    quantizer = faiss.IndexFlatIP(shards.dim)
    index = faiss.IndexIVFFlat(quantizer, shards.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rows = _all_features(shards)
    index.train(rows)
    index.add(rows)
    return FaissSearcher(index, nprobe=nprobe)


def _recall_by_hand(shards: RegionShards, searcher, queries: np.ndarray, nprobe: int, depth: int,
                    shortlist: int) -> float:
    """Top ``depth`` images of the two-stage search against a brute-force best-region ranking."""
    from instsearch.eval.shard_search import search_shards

    searcher.index.nprobe = nprobe
    run = search_shards(searcher, shards, [str(i) for i in range(len(queries))], queries, shortlist=shortlist)
    scores, starts = queries @ _all_features(shards).T, shards.image_starts
    filled = np.flatnonzero(np.diff(starts))
    best = np.stack([scores[:, starts[i]:starts[i + 1]].max(axis=1) for i in filled], 1)
    hits = 0
    for q in range(len(queries)):
        exact = {shards.image_ids[i] for i in filled[np.argsort(-best[q], kind="stable")[:depth]]}
        hits += len(exact & {h.image for h in run.rankings[str(q)][:depth]})
    return hits / (depth * len(queries))


def test_nprobe_auto_doubles_until_the_recall_gain_flattens(shards):
    from instsearch.eval.shard_search import tune_nprobe_on_queries

    _, queries, _ = shards.queries()
    searcher = _ivf_searcher(shards)
    tuning = tune_nprobe_on_queries(searcher, shards, queries, shortlist=30, depth=10, tolerance=0.02)
    assert searcher.nprobe == tuning.nprobe and searcher.index.nprobe == tuning.nprobe  # left as chosen
    assert [n for n, _ in tuning.steps] == [1, 2, 4, 8, 16][:len(tuning.steps)]  # doubling from the start
    for n, recall in tuning.steps:
        assert recall == pytest.approx(_recall_by_hand(shards, searcher, queries, n, 10, 30)), n
    # the rule by hand: the nprobe before the first gain below the tolerance, else the last tried
    recalls = [r for _, r in tuning.steps]
    flat = [k for k in range(1, len(recalls)) if recalls[k] - recalls[k - 1] < 0.02]
    expected = tuning.steps[flat[0] - 1][0] if flat else tuning.steps[-1][0]
    assert tuning.nprobe == expected
    assert tuning.queries == len(queries) and tuning.depth == 10
    assert recalls[0] < 1.0 and len(tuning.steps) >= 2  # one list misses neighbours here: the rule had to act
    # any gain is enough: on until every exact image is found or every list is visited
    greedy = tune_nprobe_on_queries(_ivf_searcher(shards), shards, queries, shortlist=30, depth=10, tolerance=0.0)
    assert greedy.steps[-1][1] == 1.0 or greedy.nprobe == 16
    # no gain is enough: the start
    assert tune_nprobe_on_queries(_ivf_searcher(shards), shards, queries, shortlist=30, depth=10,
                                  tolerance=1.0).nprobe == 1


def test_nprobe_auto_needs_inverted_lists_and_inner_product(shards):
    import faiss

    from instsearch.eval.searchers import FaissSearcher
    from instsearch.eval.shard_search import tune_nprobe_on_queries

    _, queries, _ = shards.queries()
    flat = FaissSearcher(faiss.IndexFlatIP(shards.dim))
    with pytest.raises(ValueError, match="no inverted lists"):
        tune_nprobe_on_queries(flat, shards, queries, shortlist=30)
    with pytest.raises(ValueError, match="scores by inverse_l2"):
        tune_nprobe_on_queries(FaissSearcher.exact_l2(shards.dim), shards, queries, shortlist=30)


def test_search_records_how_nprobe_was_chosen(shards, tmp_path):
    import json

    from instsearch.eval.index_build import build_index
    from instsearch.search_cli import run_search

    index = build_index(shards, tmp_path / "index", factory="IVF8,Flat", progress=False)
    stored = json.loads((Path(index) / "index.json").read_text())["nprobe"]
    auto = run_search(index, shards.root, tmp_path / "auto" / "run.json", {}, shortlist=30)
    assert auto["nprobe_rule"]["rule"] == "auto" and auto["nprobe_rule"]["steps"][0][0] == stored
    assert auto["nprobe"] == auto["nprobe_rule"]["nprobe"]
    written = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert written["nprobe_rule"] == auto["nprobe_rule"]
    given = run_search(index, shards.root, tmp_path / "given" / "run.json", {}, nprobe="3", shortlist=30)
    assert given["nprobe"] == 3 and given["nprobe_rule"] == {"rule": "given"}
    kept = run_search(index, shards.root, tmp_path / "stored" / "run.json", {}, nprobe="stored", shortlist=30)
    assert kept["nprobe"] == stored and kept["nprobe_rule"] == {"rule": "stored"}
    with pytest.raises(ValueError, match="--nprobe must be a number of lists >= 1, 'auto' or 'stored'"):
        run_search(index, shards.root, tmp_path / "bad" / "run.json", {}, nprobe="0")
