"""Two-stage search over region shards, against hand-worked cases and brute force."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from instsearch.eval.searchers import ExactInnerProductSearcher, FaissSearcher, ties_by_id
from instsearch.eval.shard_search import region_images, rescore, search_shards, shortlist_images
from instsearch.eval.shards import RegionShards, ShardImage, ShardWriter


def _write(tmp_path, images: list[tuple[str, np.ndarray]], part_size: int = 2) -> RegionShards:
    """Shards of ``images`` (id, (n, D) features); region j of an image has box (j, j, j+1, j+1)."""
    parts = [images[i:i + part_size] for i in range(0, len(images), part_size)]
    writer = ShardWriter(tmp_path, {"model": "m", "config_sha256": "c", "checkpoint_sha256": None,
                                    "benchmark_sha256": "b", "part_size": part_size, "num_parts": len(parts)},
                         dtype="float32")
    writer.write_manifest()
    for p, part in enumerate(parts):
        writer.write_part(p, [ShardImage(i, boxes=np.array([[j, j, j + 1, j + 1] for j in range(len(f))],
                                                          np.float32).reshape(-1, 4),
                                         scores=np.ones(len(f), np.float32), features=f.astype(np.float32))
                              for i, f in part])
    return RegionShards(tmp_path)


def test_ties_are_ordered_by_id_and_padding_stays_last():
    scores = np.array([[0.9, 0.5, 0.5, 0.5, 0.1], [0.8, 0.8, 0.2, -np.inf, -np.inf]], np.float32)
    ids = np.array([[7, 9, 2, 4, 1], [5, 3, 8, -1, -1]])
    s, i = ties_by_id(scores, ids)
    assert i.tolist() == [[7, 2, 4, 9, 1], [3, 5, 8, -1, -1]]
    assert s.tolist()[0] == [pytest.approx(v) for v in (0.9, 0.5, 0.5, 0.5, 0.1)]
    untouched = np.array([[3, 1]])
    assert ties_by_id(np.array([[0.5, 0.4]], np.float32), untouched)[1] is untouched


def test_exact_searcher_breaks_ties_by_region_order():
    searcher = ExactInnerProductSearcher(2)
    searcher.add(np.array([[0, 1], [1, 0], [1, 0], [1, 0]], np.float32))
    assert searcher.search(np.array([[1, 0]], np.float32), 4)[1].tolist() == [[1, 2, 3, 0]]


def test_rescoring_by_hand(tmp_path):
    # image a: regions (1,0), (0,1); image b: (0.6,0.8); image c: (-1,0), (0.8,0.6), (0.8,0.6)
    shards = _write(tmp_path, [("a", np.array([[1, 0], [0, 1]])), ("b", np.array([[0.6, 0.8]])),
                               ("c", np.array([[-1, 0], [0.8, 0.6], [0.8, 0.6]]))])
    assert shards.image_starts.tolist() == [0, 2, 3, 6]
    assert region_images(shards, np.array([0, 1, 2, 5, -1])).tolist() == [0, 0, 1, 2, -1]
    q = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    out = rescore(shards, q, [np.array([2, 1, 0]), np.array([1, 2])])
    # query (0,1): a scores 1 (region 1), b 0.8 (region 2), c 0.6 (regions 4 and 5 tie: 4 first)
    assert out[0].images.tolist() == [0, 1, 2] and out[0].regions.tolist() == [1, 2, 4]
    np.testing.assert_allclose(out[0].scores, [1.0, 0.8, 0.6], rtol=1e-6)
    # query (1,0): c scores 0.8, b 0.6; image a was not a candidate
    assert out[1].images.tolist() == [2, 1] and out[1].regions.tolist() == [4, 2]
    l2 = rescore(shards, q[:1], [np.array([1, 2])], score="inverse_l2")
    # distances from (0,1): b (0.6,0.8) -> sqrt(0.4); c's best (0.8,0.6) -> sqrt(0.8)
    np.testing.assert_allclose(l2[0].scores, [1 / np.sqrt(0.4), 1 / np.sqrt(0.8)], rtol=1e-5)


def test_rescoring_ties_between_images_go_to_the_lower_best_region_id(tmp_path):
    # query (1,1): image 0 region 0 (1,0) scores 1; image 1 regions 1 (0,0.5), 2 (1,1) score
    # 0.5, 2; image 2 regions 3 (2,0), 4 (0,1) score 2, 1. Images 1 and 2 tie at 2: image 1's
    # best region (2) precedes image 2's (3), so image 1 comes first although shortlisted after
    shards = _write(tmp_path, [("a", np.array([[1, 0]])), ("b", np.array([[0, 0.5], [1, 1]])),
                               ("c", np.array([[2, 0], [0, 1]]))])
    out = rescore(shards, np.array([[1.0, 1.0]], np.float32), [np.array([2, 1, 0])])[0]
    assert out.images.tolist() == [1, 2, 0] and out.regions.tolist() == [2, 3, 0]
    assert out.scores.tolist() == [2.0, 2.0, 1.0]


def test_inverse_l2_rescoring_of_close_long_vectors_is_exact(tmp_path):
    # 30 regions (10 images of 3) within 0.03 of a query of norm ~1414: ||q||^2 + ||x||^2 - 2 q.x
    # in float32 (cdist's matrix-product path, taken above 25 rows) loses every such distance;
    # the scores must be 1 / ||q - x|| of the stored float32 rows, ranked as in float64
    rng = np.random.default_rng(0)
    q = np.array([[1000.0, 1000.0]], np.float32)
    directions = rng.standard_normal((30, 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    feats = (q + 1e-3 * (rng.permutation(30) + 1)[:, None] * directions).astype(np.float32)
    shards = _write(tmp_path, [(f"i{k}", feats[3 * k:3 * k + 3]) for k in range(10)], part_size=4)
    candidates = rng.permutation(10)
    out = rescore(shards, q, [candidates], score="inverse_l2")[0]
    distance = np.sqrt(((feats.astype(np.float64) - q.astype(np.float64)) ** 2).sum(1))
    best_region = np.array([3 * k + int(np.argmin(distance[3 * k:3 * k + 3])) for k in range(10)])
    order = np.argsort(distance[best_region])
    assert out.images.tolist() == order.tolist()
    assert out.regions.tolist() == best_region[order].tolist()
    np.testing.assert_allclose(out.scores, 1.0 / distance[best_region[order]], rtol=1e-6)


def test_shortlist_grows_until_enough_distinct_images(tmp_path):
    rng = np.random.default_rng(0)
    # image 0 holds 200 regions near the query: the first 64 hits are all one image
    crowd = np.array([1.0, 0.0]) + 0.01 * rng.standard_normal((200, 2))
    others = [(f"i{k}", np.array([[np.cos(0.1 * k), np.sin(0.1 * k)]])) for k in range(1, 6)]
    shards = _write(tmp_path, [("i0", crowd), *others], part_size=4)
    index = faiss.IndexFlatIP(2)
    for _, rows in shards.iter_features():
        index.add(np.asarray(rows, np.float32))
    lists = shortlist_images(FaissSearcher(index), shards, np.array([[1.0, 0.0]], np.float32), shortlist=4)
    assert lists[0].tolist() == [0, 1, 2, 3]


def test_two_stage_search_equals_brute_force_best_region(tmp_path):
    rng = np.random.default_rng(1)
    images = [(f"im{k}", rng.standard_normal((int(rng.integers(0, 6)), 8))) for k in range(30)]
    shards = _write(tmp_path, images, part_size=7)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    for _, rows in shards.iter_features():
        index.add(np.asarray(rows, np.float32))
    run = search_shards(FaissSearcher(index), shards, [f"q{i}" for i in range(5)], queries, shortlist=10)
    for qi, q in enumerate(queries):  # brute force, one image at a time
        best = sorted(((float(np.max(f.astype(np.float32) @ q)), name, int(np.argmax(f.astype(np.float32) @ q)))
                       for name, f in images if len(f)), key=lambda t: -t[0])[:10]
        hits = run.rankings[f"q{qi}"]
        assert [h.image for h in hits] == [b[1] for b in best]
        assert [h.score for h in hits] == pytest.approx([b[0] for b in best], rel=1e-5)
        assert [h.box for h in hits] == [(b[2], b[2], b[2] + 1, b[2] + 1) for b in best]


def test_shortlist_stops_growing_k_once_the_probed_lists_are_exhausted(tmp_path):
    # 4,000 regions in 1,000 images, IVF64 visiting 1 list: fewer than 100 images are reachable,
    # and asking for more regions than the visited list holds returns -1 padding, not new images
    import faiss

    from instsearch.eval.shard_search import StageTimes

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4000, 8)).astype(np.float32)
    shards = _write(tmp_path, [(f"i{i}", feats[4 * i:4 * i + 4]) for i in range(1000)], part_size=250)
    index = faiss.index_factory(8, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(feats)
    index.add(feats)
    searcher = FaissSearcher(index, nprobe=1)
    times = StageTimes()
    found = shortlist_images(searcher, shards, rng.standard_normal((3, 8)).astype(np.float32), 100, times)
    assert times.ann_k < 4000 and all(0 < len(f) < 100 for f in found)
    with pytest.raises(ValueError, match="shortlist must be >= 1"):
        shortlist_images(searcher, shards, feats[:1], -1)
