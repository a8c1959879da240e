"""Sharded evaluation: metrics from the positives' ranks counted on every process, regions in
memory or spilled to shards and ranked streamed -- the same metrics.json and run.json as the
gathered path, which ranks everything in one index."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator
from instsearch.eval.extraction import QueryFeature, SearchBatch
from instsearch.eval.metrics import RankedPositives, judge_ranking, metrics_from_ranks, retrieval_metrics
from instsearch.eval.whitening import PCAWhitening
from instsearch.formats import Benchmark, Hit, Run
from instsearch.structures import ImageMeta, Regions

DIM, NUM_IMAGES, NUM_DISTRACTORS, NUM_QUERIES, NUM_LABELS = 8, 40, 6, 7, 3


def _benchmark(tmp_path: Path) -> Benchmark:
    rng = np.random.default_rng(5)
    ids = [f"d{i}" for i in range(NUM_IMAGES)]
    truth = {}
    for q in range(NUM_QUERIES):
        chosen = rng.choice(NUM_IMAGES, size=6, replace=False)
        positives, junk = chosen[:rng.integers(1, 5)], chosen[4:4 + rng.integers(0, 3)]
        truth[f"q{q}"] = {"positives": [{"image": ids[i], "boxes": [[10, 10, 40, 40]]} for i in positives],
                          "junk": [ids[i] for i in junk]}
    truth["q0"]["junk"].append(truth["q0"]["positives"][0]["image"])  # positive and junk: junk
    return Benchmark.from_dict({
        "format": "instsearch-benchmark/1", "name": "sharded", "image_root": ".",
        "images": [{"id": i, "file": f"{i}.jpg", "width": 100, "height": 80} for i in ids]
        + [{"id": f"qi{q}", "file": f"qi{q}.jpg", "width": 100, "height": 80} for q in range(NUM_QUERIES)],
        "database": ids,
        "queries": [{"id": f"q{q}", "image": f"qi{q}", "box": [0, 0, 50, 50]} for q in range(NUM_QUERIES)],
        "ground_truth": truth,
        "distractors": [{"root": "flickr", "count": NUM_DISTRACTORS, "id_prefix": "distractor:"}]}, root=tmp_path)


def _batches() -> list[SearchBatch]:
    """Database images with 0-5 regions (labels from 3 categories), exact ties between two
    images, distractors, one image served twice (a padded sampler), queries with labels."""
    rng = np.random.default_rng(7)
    names = [f"d{i}" for i in range(NUM_IMAGES)] + [f"distractor:{k}.jpg" for k in range(NUM_DISTRACTORS)]
    features = {}
    items = []
    for name in names:
        n = int(rng.integers(0, 6))
        f = rng.normal(size=(n, DIM)).astype(np.float32)
        f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
        features[name] = f
        boxes = np.sort(rng.uniform(0, 80, size=(n, 2, 2)), axis=1).reshape(n, 4)  # x1 y1 x2 y2
        items.append((name, boxes.astype(np.float32), f, rng.integers(0, NUM_LABELS, size=n)))
    # d7 is a copy of d3: every query scores them equally, so their order is the listed one
    items[7] = ("d7", items[3][1] + 1, items[3][2].copy(), items[3][3].copy())
    # the last two distractors hold the same single region: query 3 scores both 1, and the lower id
    # ranks first -- in the two-process test the first is the last of process 0's distractors
    # and the second the only one of process 1 (each process's own order cannot tell)
    twin = rng.normal(size=(1, DIM)).astype(np.float32)
    twin /= np.linalg.norm(twin)
    box = np.array([[5, 5, 30, 40]], np.float32)
    items[-2] = (items[-2][0], box, twin, np.array([1]))
    items[-1] = (items[-1][0], box + 2, twin.copy(), np.array([1]))
    batches = []
    for start in range(0, len(items), 5):
        batches.append(SearchBatch(database=[
            (ImageMeta(name, (80, 100)), Regions(boxes=torch.from_numpy(b), scores=torch.linspace(1, 0.5, len(b)),
                                                 features=torch.from_numpy(f), labels=torch.from_numpy(lab),
                                                 image_size=(80, 100)))
            for name, b, f, lab in items[start:start + 5]]))
    batches.append(SearchBatch(database=[batches[0].database[1]]))  # served again
    q = rng.normal(size=(NUM_QUERIES, DIM)).astype(np.float32)
    q[2] = items[3][2][0] if len(items[3][2]) else q[2]  # query 2 ties d3 and d7 exactly
    q[3] = twin[0]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    batches[-1].queries = [QueryFeature(ImageMeta(f"qi{k}", (80, 100), f"q{k}", (0, 0, 50, 50)), torch.from_numpy(q[k]),
                                        label=int(k % NUM_LABELS)) for k in range(NUM_QUERIES)]
    return batches


def _evaluate(bench: Benchmark, batches: list[SearchBatch], **config):
    evaluator = RetrievalEvaluator(bench, RetrievalConfig(grid_queries=0, **config))
    for b in batches:
        evaluator.process(b)
    result = evaluator.compute()
    return result.metrics, result.run.to_dict(), result.recall_curve


CASES = {
    "plain": {},
    "depth": {"ranking_depth": 6},
    "min_oxford": {"normalization": "min", "protocol": "oxford"},
    "retrieved_depth": {"normalization": "retrieved", "ranking_depth": 9},
    "pruned": {"prune_by_label": True},
    "capped": {"regions_per_image": 2},
}


@pytest.mark.parametrize("case", CASES)
def test_sharded_in_memory_and_spilled_equal_the_gathered_path(tmp_path, case):
    bench, batches = _benchmark(tmp_path), _batches()
    gathered = _evaluate(bench, batches, evaluation="gather", **CASES[case])
    assert _evaluate(bench, batches, evaluation="sharded", **CASES[case]) == gathered
    assert _evaluate(bench, batches, evaluation="sharded", spill_dir=str(tmp_path / "spill"), **CASES[case]) == gathered
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["rank-00000"]


def test_the_tie_is_ordered_by_listing_and_distractors_are_ranked(tmp_path):
    bench, batches = _benchmark(tmp_path), _batches()
    _, run, _ = _evaluate(bench, batches, evaluation="sharded", spill_dir=str(tmp_path / "spill"))
    images = [h["image"] for h in run["rankings"]["q2"]]
    assert images.index("d3") + 1 == images.index("d7")  # equal scores: the image listed first
    assert run["rankings"]["q2"][images.index("d3")]["score"] == run["rankings"]["q2"][images.index("d7")]["score"]
    assert any(i.startswith("distractor:") for i in images)
    twins = [(h["image"], h["score"]) for h in run["rankings"]["q3"][:2]]
    assert [i for i, _ in twins] == [f"distractor:{NUM_DISTRACTORS - 2}.jpg", f"distractor:{NUM_DISTRACTORS - 1}.jpg"]
    assert twins[0][1] == twins[1][1]
    assert len(images) == len(set(images))  # the image served twice is ranked once


def test_run_depth_trims_the_run_but_not_the_metrics(tmp_path):
    bench, batches = _benchmark(tmp_path), _batches()
    full_metrics, full_run, _ = _evaluate(bench, batches, evaluation="gather")
    for mode in ({"evaluation": "gather"}, {"evaluation": "sharded"},
                 {"evaluation": "sharded", "spill_dir": str(tmp_path / "spill")}):
        metrics, run, _ = _evaluate(bench, batches, run_depth=3, **mode)
        assert metrics == full_metrics, mode
        assert run["rankings"] == {q: hits[:3] for q, hits in full_run["rankings"].items()}, mode


def test_spilled_regions_are_whitened_from_a_file(tmp_path):
    bench, batches = _benchmark(tmp_path), _batches()
    rows = np.concatenate([r.features.numpy() for b in batches for _, r in b.database])
    path = PCAWhitening.fit(rows, dim=6, shrinkage=0.1).save(tmp_path / "white.npz")
    gathered = _evaluate(bench, batches, evaluation="gather", whitening=str(path))
    plain = _evaluate(bench, batches, evaluation="gather")
    spilled = _evaluate(bench, batches, evaluation="sharded", spill_dir=str(tmp_path / "spill"), whitening=str(path))
    assert gathered[0]["mAP@all"] != plain[0]["mAP@all"]  # the whitening changes the ranking here
    # the rows are whitened part by part instead of all at once: the same numbers to rounding
    assert spilled[0].keys() == gathered[0].keys()
    for key, value in gathered[0].items():
        assert spilled[0][key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


def test_spilling_needs_the_exact_search(tmp_path):
    bench = _benchmark(tmp_path)
    evaluator = RetrievalEvaluator(bench, RetrievalConfig(evaluation="sharded", spill_dir=str(tmp_path / "s"),
                                                          index_factory="IVF4,Flat"))
    with pytest.raises(ValueError, match="spill_dir: spilled regions are ranked by an exact inner-product search"):
        evaluator.process(_batches()[0])
    with pytest.raises(ValueError, match="spill_dir is used by sharded evaluation"):
        RetrievalConfig(evaluation="gather", spill_dir="x")
    with pytest.raises(ValueError, match="run_depth must be >= 1"):
        RetrievalConfig(run_depth=0)


# ------------------------------------------------------------------------------- two processes
def _worker(rank: int, world: int, init: str, bench_root: str, out: str, config: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # as the test process (conftest): threads split a product differently
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        bench = _benchmark(Path(bench_root))
        batches = _batches()
        evaluator = RetrievalEvaluator(bench, RetrievalConfig(grid_queries=0, **config))
        for k, b in enumerate(batches):
            if k % world == rank or k == len(batches) - 1:  # the last batch (repeat + queries) on both
                evaluator.process(b)
        result = evaluator.compute()
        if rank == 0:
            Path(out).write_bytes(pickle.dumps((result.metrics, result.run.to_dict(), result.recall_curve)))
    finally:
        dist.barrier()  # neither process tears the group down while the other still uses it
        dist.destroy_process_group()


@pytest.mark.parametrize("spill", [False, True])
def test_two_gloo_processes_give_the_gathered_numbers(tmp_path, spill):
    import torch.multiprocessing as mp

    bench, batches = _benchmark(tmp_path), _batches()
    config = {"evaluation": "sharded", "ranking_depth": 12, "run_depth": 4}
    if spill:
        config["spill_dir"] = str(tmp_path / "spill")
    out = tmp_path / "result.pkl"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path), str(out), config), nprocs=2)
    got = pickle.loads(out.read_bytes())
    expected = _evaluate(bench, batches, evaluation="gather", ranking_depth=12, run_depth=4)
    assert got == expected
    if spill:
        assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["rank-00000", "rank-00001"]


# ------------------------------------------------------------------------------- metrics from ranks
@pytest.mark.parametrize("normalization", ["relevant", "min", "retrieved"])
@pytest.mark.parametrize("protocol", ["standard", "oxford"])
def test_metrics_from_ranks_equal_those_of_the_whole_run(tmp_path, normalization, protocol):
    bench = _benchmark(tmp_path)
    rng = np.random.default_rng(1)
    listed = list(bench.database) + [f"distractor:{k}.jpg" for k in range(NUM_DISTRACTORS)]
    run = Run(method="m", rankings={})
    for q in bench.queries[:-1]:  # the last query is not ranked: AP 0
        order = rng.permutation(len(listed))[:int(rng.integers(5, len(listed)))]
        run.rankings[q.id] = [Hit(listed[i], float(1 - k / 100), (10.0, 12.0, 38.0, float(30 + k)))
                              for k, i in enumerate(order)]
    expected = retrieval_metrics(bench, run, normalization=normalization, protocol=protocol)
    positives = {}
    for qid, hits in run.rankings.items():
        judged = judge_ranking(bench, qid, hits)
        ranks = np.flatnonzero(judged.rel)
        positives[qid] = RankedPositives(ranks, [hits[p] for p in judged.kept[ranks]])
    got = metrics_from_ranks(bench, positives, normalization=normalization, protocol=protocol)
    assert got == expected
    assert expected["mAP@all"] > 0 and expected["mIoU"] > 0


def test_metrics_from_ranks_by_hand(tmp_path):
    """Two positives of q6 at cleaned ranks 0 and 2 of its 4 positives: AP = (1/1 + 2/3) / 4."""
    bench = _benchmark(tmp_path)
    gt = bench.ground_truth["q6"]
    positives = [i for i in gt.positives if i not in gt.junk]
    assert len(positives) == 4
    hits = [Hit(positives[0], 0.9, (10, 10, 40, 40)), Hit(positives[1], 0.5, (10, 10, 40, 70))]
    metrics = metrics_from_ranks(bench, {"q6": RankedPositives(np.array([0, 2]), hits)}, ks=(1, 2, None))
    assert metrics["mAP@all"] == pytest.approx((1 + 2 / 3) / 4 / NUM_QUERIES)
    assert metrics["mAP@1"] == pytest.approx(1 / 4 / NUM_QUERIES)
    assert metrics["mAP@2"] == pytest.approx(1 / 4 / NUM_QUERIES)
    assert metrics["mIoU"] == pytest.approx((1 + 0.5) / 2)  # boxes of IoU 1 and 900/1800 with the truth
    with pytest.raises(ValueError, match="distinct positives in ascending rank order"):
        metrics_from_ranks(bench, {"q6": RankedPositives(np.array([2, 0]), hits)})


def test_the_gathered_path_reports_its_costs(tmp_path):
    bench, batches = _benchmark(tmp_path), _batches()
    evaluator = RetrievalEvaluator(bench, RetrievalConfig(grid_queries=0))
    for b in batches:
        evaluator.process(b)
    result = evaluator.compute()
    # the exact searcher holds float32 features: 4·D bytes per region
    images = NUM_IMAGES + NUM_DISTRACTORS
    assert result.costs["index_bytes_per_image"] == pytest.approx(4 * DIM * result.num_regions / images, abs=0.05)
    assert result.costs["search_ms_per_query"] > 0 and result.costs["index_build_s"] >= 0


def test_streamed_pruning_gives_the_same_scores_in_blocks_of_any_size(tmp_path):
    """Category pruning over spilled shards read in blocks of a few images (many blocks a part)
    ranks and boxes every image as one block does (scores to float32 rounding: a product of a few
    columns rounds differently)."""
    from instsearch.eval.sharded import SpilledCollection
    from instsearch.eval.streamed import exact_image_ranking

    collection = SpilledCollection(tmp_path / "spill")
    for b in _batches():
        collection.add(b)
    shards = collection.shards()
    q = np.stack([f.feature.numpy() for b in _batches() for f in b.queries])
    labels = [k % NUM_LABELS for k in range(len(q))]
    whole = exact_image_ranking(shards, q, 50, query_labels=labels)
    small = exact_image_ranking(shards, q, 50, max_scores=3 * len(q), query_labels=labels)
    assert small.images.tolist() == whole.images.tolist() and small.regions.tolist() == whole.regions.tolist()
    np.testing.assert_allclose(small.scores, whole.scores, rtol=0, atol=1e-6)


def test_an_image_without_features_and_ground_truth_naming_a_distractor(tmp_path):
    """Regions.empty() (no feature tensor) is an image without regions on every path; a ground
    truth that names a distractor id judges nothing there (only database images are judged)."""
    bench, batches = _benchmark(tmp_path), _batches()
    batches.append(SearchBatch(database=[(ImageMeta("d5", (80, 100)), Regions.empty(image_size=(80, 100)))]))
    bench.ground_truth["q1"].positives["distractor:0.jpg"] = [(1.0, 1.0, 9.0, 9.0)]
    gathered = _evaluate(bench, batches, evaluation="gather")
    assert _evaluate(bench, batches, evaluation="sharded") == gathered
    assert _evaluate(bench, batches, evaluation="sharded", spill_dir=str(tmp_path / "spill")) == gathered
