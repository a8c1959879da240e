"""The evaluation protocol: every AP convention by hand, against trec_eval and torchmetrics, the
official Oxford compute_ap, the ranking clean-up rules, mIoU and recall@IoU."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instsearch.eval.metrics import (
    DEFAULT_IOU_THRESHOLDS,
    average_precision,
    average_precision_at_ks,
    judge_ranking,
    mean_iou,
    oxford_average_precision,
    per_query_average_precision,
    recall_at_iou,
    retrieval_metrics,
)
from instsearch.formats import Benchmark, Hit, Run


# --------------------------------------------------------------------------- helpers
def make_benchmark(database, queries, ground_truth, extra_images=()):
    """A Benchmark in memory: every image 100x100; ``queries`` as (qid, image) pairs."""
    ids = list(dict.fromkeys([*database, *extra_images, *(im for _, im in queries)]))
    data = {
        "format": "instsearch-benchmark/1",
        "name": "tiny",
        "image_root": "images",
        "images": [{"id": i, "file": f"{i}.jpg", "width": 100, "height": 100} for i in ids],
        "database": list(database),
        "queries": [{"id": q, "image": im, "box": [1, 1, 50, 50]} for q, im in queries],
        "ground_truth": ground_truth,
    }
    return Benchmark.from_dict(data, root=".")


def make_run(rankings, boxes=None):
    """``rankings``: qid -> list of image ids, best first; scores decrease down the list."""
    boxes = boxes or {}
    return Run(method="test", rankings={
        q: [Hit(im, float(len(ims) - i), boxes.get(q, {}).get((i, im))) for i, im in enumerate(ims)]
        for q, ims in rankings.items()})


def slow_ap(rel, R, k, normalization):
    """The definition of docs/metrics.md written as a plain loop: an independent reference."""
    rel = list(rel)[: (len(rel) if k is None else k)]
    s, hits = 0.0, 0
    for i, r in enumerate(rel, start=1):
        if r:
            hits += 1
            s += hits / i
    if R == 0:
        return 0.0
    if normalization == "relevant":
        return s / R
    if normalization == "min":
        return s / (R if k is None else min(k, R))
    return s / hits if hits else 0.0


def official_compute_ap(ranks, nres):
    """The revisited-Oxford ``compute_ap``, transcribed loop for loop."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


# --------------------------------------------------------------------------- one ranking, by hand
# rel = [1, 0, 1, 0, 0, 1], R = 4: positives at ranks 1, 3, 6 with P@i = 1, 2/3, 3/6.
REL = [1, 0, 1, 0, 0, 1]


@pytest.mark.parametrize("k, normalization, expected", [
    # k = 2: S = 1
    (2, "relevant", 1 / 4),          # 1 / R
    (2, "min", 1 / 2),               # 1 / min(2, 4)
    (2, "retrieved", 1.0),           # 1 / (one hit in the top 2)
    # k = 3: S = 1 + 2/3 = 5/3
    (3, "relevant", (5 / 3) / 4),    # 5/12
    (3, "min", (5 / 3) / 3),         # 5/9
    (3, "retrieved", (5 / 3) / 2),   # 5/6
    # k = 10 > n = 6: S = 1 + 2/3 + 1/2 = 13/6
    (10, "relevant", (13 / 6) / 4),  # 13/24
    (10, "min", (13 / 6) / 4),       # min(10, 4) = 4 -> 13/24
    (10, "retrieved", (13 / 6) / 3),  # 13/18
    # k = None (AP@n, n = 6): relevant and min are the ordinary AP, retrieved divides by 3 hits
    (None, "relevant", 13 / 24),
    (None, "min", 13 / 24),
    (None, "retrieved", 13 / 18),
])
def test_average_precision_hand_cases(k, normalization, expected):
    assert average_precision(np.array(REL, bool), 4, k, normalization) == pytest.approx(expected, abs=1e-12)


def test_min_normalization_uses_k_when_fewer_than_r():
    # rel = [1, 1], R = 5, k = 3: S = 1 + 1 = 2, min(3, 5) = 3 -> 2/3 (above the relevant 2/5).
    assert average_precision([1, 1], 5, 3, "min") == pytest.approx(2 / 3)
    assert average_precision([1, 1], 5, 3, "relevant") == pytest.approx(2 / 5)


def test_no_hit_and_no_relevant_give_zero():
    for normalization in ("relevant", "min", "retrieved"):
        assert average_precision([0, 0, 0], 3, None, normalization) == 0.0
        assert average_precision([0, 0, 0], 0, 10, normalization) == 0.0  # R = 0 -> 0 by convention
        assert average_precision([], 2, None, normalization) == 0.0


def test_unreturned_positives_count_in_r():
    # Two of five positives returned on top: perfect precision but only 2/5 of the recall.
    assert average_precision([1, 1], 5, None, "relevant") == pytest.approx(2 / 5)
    assert average_precision([1, 1], 5, None, "retrieved") == pytest.approx(1.0)


def test_at_ks_matches_single_k_and_slow_reference():
    rng = np.random.default_rng(0)
    ks = (1, 2, 5, 10, 20, 50, None)
    for _ in range(50):
        n = int(rng.integers(0, 40))
        rel = rng.random(n) < 0.3
        R = int(rel.sum() + rng.integers(0, 5))
        for normalization in ("relevant", "min", "retrieved"):
            batch = average_precision_at_ks(rel, R, ks, normalization)
            for k, v in zip(ks, batch):
                assert v == pytest.approx(slow_ap(rel, R, k, normalization), abs=1e-12)
                assert average_precision(rel, R, k, normalization) == pytest.approx(v, abs=1e-15)


def test_average_precision_refuses_bad_input():
    with pytest.raises(ValueError, match="num_relevant"):
        average_precision([1, 1, 1], 2)
    with pytest.raises(ValueError, match="positive integer"):
        average_precision([1], 1, k=0)
    with pytest.raises(ValueError, match="normalization"):
        average_precision([1], 1, normalization="mean")
    with pytest.raises(ValueError, match="protocol"):
        average_precision_at_ks([1], 1, (None,), protocol="paris")


# --------------------------------------------------------------------------- Oxford compute_ap
def test_oxford_ap_hand_cases():
    # ranks [0, 2], nres 4: trapezoids (1 + 1)/2 and (1/2 + 2/3)/2 = 7/12; (1 + 7/12) / 4 = 19/48
    assert oxford_average_precision([0, 2], 4) == pytest.approx(19 / 48)
    # ranks [1, 3], nres 2: (0/1 + 1/2)/2 = 1/4 and (1/3 + 2/4)/2 = 5/12; (1/4 + 5/12) / 2 = 1/3
    assert oxford_average_precision([3, 1], 2) == pytest.approx(1 / 3)
    # perfect ranking: every trapezoid has height 1
    assert oxford_average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    assert oxford_average_precision([], 3) == 0.0
    assert oxford_average_precision([], 0) == 0.0


def test_oxford_ap_matches_official_loop_and_ranking_form():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 60))
        rel = rng.random(n) < 0.25
        nres = int(rel.sum() + rng.integers(0, 4)) or 1
        ranks = np.flatnonzero(rel)
        official = official_compute_ap(ranks.tolist(), nres)
        assert oxford_average_precision(ranks, nres) == pytest.approx(official, abs=1e-12)
        assert average_precision_at_ks(rel, nres, (None,), "relevant", "oxford")[0] == pytest.approx(official, abs=1e-12)


def test_oxford_truncated_at_k():
    # rel = [1, 0, 1], nres 4, k = 2: only the first trapezoid (height 1) -> 1/4;
    # under 'min' it is divided by min(2, 4) = 2 instead.
    out = average_precision_at_ks([1, 0, 1], 4, (2, 3, None), "relevant", "oxford")
    np.testing.assert_allclose(out, [1 / 4, 19 / 48, 19 / 48])
    assert average_precision_at_ks([1, 0, 1], 4, (2,), "min", "oxford")[0] == pytest.approx(1 / 2)


def test_oxford_refuses_repeated_ranks():
    with pytest.raises(ValueError, match="distinct"):
        oxford_average_precision([0, 0], 2)


# --------------------------------------------------------------------------- judging a run
# Database d0..d9 and an image "x" outside it. q1 is cut from d0 (in the database), which its
# benchmark lists as junk for q1 (as the revisited / Holidays / Instance-N converters do).
GT = {
    "q1": {"positives": [{"image": "d1", "boxes": [[0, 0, 10, 10], [50, 50, 60, 60]]},
                         {"image": "d2", "boxes": [[0, 0, 20, 20]]},
                         {"image": "d3", "boxes": []},
                         {"image": "d9", "boxes": [[0, 0, 5, 5]]},  # never returned: still in R
                         {"image": "x", "boxes": []}],  # not in the database: not in R
           "junk": ["d4", "d0"]},
    "q2": {"positives": [{"image": "d5"}], "junk": []},  # not in the run: AP 0
    "q3": {"positives": [{"image": "x"}], "junk": []},  # R = 0
}
DB = [f"d{i}" for i in range(10)]
QUERIES = [("q1", "d0"), ("q2", "d7"), ("q3", "d8")]
# d0 (query image), d4 (junk), the second d1 and x (not in the database) are removed:
# cleaned = d1 d5 d2 d6 d3 -> rel 1 0 1 0 1, R = 4 (d1 d2 d3 d9).
RANKING_Q1 = ["d0", "d1", "d4", "d5", "d1", "d2", "x", "d6", "d3"]


@pytest.fixture
def bench():
    return make_benchmark(DB, QUERIES, GT, extra_images=["x"])


def test_judge_ranking_cleans_and_counts(bench):
    j = judge_ranking(bench, "q1", RANKING_Q1)
    assert j.rel.tolist() == [True, False, True, False, True]
    assert j.num_relevant == 4
    assert j.kept.tolist() == [1, 3, 5, 7, 8]  # positions in the original list; first d1 kept


def test_junk_never_counts_even_if_listed_positive():
    gt = {"q": {"positives": [{"image": "a"}, {"image": "b"}, {"image": "c"}], "junk": ["b"]}}
    bench = make_benchmark(["a", "b", "c", "d"], [("q", "e")], gt)
    j = judge_ranking(bench, "q", ["a", "b", "d", "c"])
    # b is junk: dropped and not in R; cleaned = a d c.
    assert j.rel.tolist() == [True, False, True]
    assert j.num_relevant == 2


def test_the_query_image_counts_exactly_as_the_benchmark_lists_it():
    """Classic Oxford/Paris: the query image is in the database and a positive (good list); the
    official ``compute_ap`` counts it. Database q_img a b c, positives {q_img, a}, ranking
    q_img b a c: positives at ranks 0 and 2 of 2, recall step 1/2 ->
    (1 + 1)/2 · 1/2 + (1/2 + 2/3)/2 · 1/2 = 1/2 + 7/24 = 19/24."""
    gt = {"q": {"positives": [{"image": "q_img"}, {"image": "a"}], "junk": []}}
    bench = make_benchmark(["q_img", "a", "b", "c"], [("q", "q_img")], gt)
    run = make_run({"q": ["q_img", "b", "a", "c"]})
    m = retrieval_metrics(bench, run, protocol="oxford", ks=(None,))
    assert m["mAP@all"] == pytest.approx(19 / 24)
    assert m["mAP@all"] == pytest.approx(official_compute_ap([0, 2], 2))
    # listed as junk for its own query (revisited, Holidays, Instance-N): dropped, not in R
    gt["q"]["junk"] = ["q_img"]
    bench = make_benchmark(["q_img", "a", "b", "c"], [("q", "q_img")], gt)
    m = retrieval_metrics(bench, run, protocol="oxford", ks=(None,))
    assert m["mAP@all"] == pytest.approx(official_compute_ap([1], 1)) == pytest.approx(0.25)


def test_per_query_ap_by_hand(bench):
    run = make_run({"q1": RANKING_Q1, "q3": ["d1", "d2"]})
    ks = (2, 3, None)
    aps = per_query_average_precision(bench, run, ks, "relevant")
    # q1: rel 1 0 1 0 1, P = 1, 2/3, 3/5 -> S@2 = 1, S@3 = 5/3, S@all = 34/15; R = 4.
    np.testing.assert_allclose(aps["q1"], [1 / 4, 5 / 12, 34 / 60])
    np.testing.assert_allclose(aps["q2"], 0.0)  # no ranking in the run
    np.testing.assert_allclose(aps["q3"], 0.0)  # R = 0
    aps = per_query_average_precision(bench, run, ks, "retrieved")
    np.testing.assert_allclose(aps["q1"], [1 / 1, (5 / 3) / 2, (34 / 15) / 3])
    aps = per_query_average_precision(bench, run, ks, "min")
    np.testing.assert_allclose(aps["q1"], [1 / 2, (5 / 3) / 3, (34 / 15) / 4])


def test_retrieval_metrics_keys_and_means(bench):
    boxes = {"q1": {(1, "d1"): (0, 0, 10, 5)}}
    m = retrieval_metrics(bench, make_run({"q1": RANKING_Q1}, boxes), ks=(10, 20, 50, 100, None))
    assert set(m) == {"mAP@10", "mAP@20", "mAP@50", "mAP@100", "mAP@all", "mIoU",
                      "num_queries", "normalization", "protocol"}
    # Only q1 scores (34/60); q2 and q3 are 0; mean over the benchmark's 3 queries.
    for key in ("mAP@10", "mAP@20", "mAP@50", "mAP@100", "mAP@all"):
        assert m[key] == pytest.approx((34 / 60) / 3)
    assert m["num_queries"] == 3 and m["normalization"] == "relevant" and m["protocol"] == "standard"
    assert m["mIoU"] == pytest.approx(0.5)


def test_retrieval_metrics_oxford(bench):
    m = retrieval_metrics(bench, make_run({"q1": RANKING_Q1}), protocol="oxford", ks=(1, None))
    # cleaned positives at ranks 0, 2, 4 with nres 4: the official loop is the reference.
    assert m["mAP@all"] == pytest.approx(official_compute_ap([0, 2, 4], 4) / 3)
    assert m["mAP@1"] == pytest.approx((1 / 4) / 3)  # first trapezoid only
    assert math.isnan(m["mIoU"])  # the run has no boxes


# --------------------------------------------------------------------------- independent libraries
def _random_case(seed, n_queries=6, n_db=80):
    """Random benchmark and run with distinct scores (trec_eval orders by score, then docid)."""
    rng = np.random.default_rng(seed)
    db = [f"img{i:03d}" for i in range(n_db)]
    queries, gt, rankings = [], {}, {}
    for qi in range(n_queries):
        q = f"q{qi}"
        queries.append((q, db[int(rng.integers(n_db))]))
        others = [d for d in db if d != queries[-1][1]]
        pos = rng.choice(others, size=int(rng.integers(1, 15)), replace=False).tolist()
        gt[q] = {"positives": [{"image": p} for p in pos], "junk": []}
        rankings[q] = rng.choice(others, size=int(rng.integers(5, 60)), replace=False).tolist()
    return make_benchmark(db, queries, gt), make_run(rankings)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relevant_equals_trec_eval_map_cut(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    bench, run = _random_case(seed)
    qrel = {q: {p: 1 for p in g.positives} for q, g in bench.ground_truth.items()}
    trec_run = {q: {h.image: h.score for h in hits} for q, hits in run.rankings.items()}
    ev = pytrec_eval.RelevanceEvaluator(qrel, {"map_cut.10,20,50,100", "map"})
    ref = ev.evaluate(trec_run)
    ours = per_query_average_precision(bench, run, (10, 20, 50, 100, None), "relevant")
    for q, r in ref.items():
        expected = [r["map_cut_10"], r["map_cut_20"], r["map_cut_50"], r["map_cut_100"], r["map"]]
        np.testing.assert_allclose(ours[q], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("top_k", [10, 20, 50, None])
def test_retrieved_equals_torchmetrics_retrieval_map(top_k):
    from torchmetrics.retrieval import RetrievalMAP

    bench, run = _random_case(3, n_queries=8)
    preds, target, indexes = [], [], []
    for qi, q in enumerate(bench.queries):
        positives = set(bench.ground_truth[q.id].positives)
        for h in run.rankings[q.id]:
            preds.append(h.score)  # > 0: torchmetrics ignores relevance at non-positive scores
            target.append(h.image in positives)
            indexes.append(qi)
    metric = RetrievalMAP(top_k=top_k)
    expected = float(metric(torch.tensor(preds), torch.tensor(target), indexes=torch.tensor(indexes)))
    ours = retrieval_metrics(bench, run, normalization="retrieved", ks=(top_k,))
    key = "mAP@all" if top_k is None else f"mAP@{top_k}"
    assert ours[key] == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- mIoU
def test_mean_iou_by_hand(bench):
    boxes = {"q1": {
        (1, "d1"): (0, 0, 10, 5),      # vs [0,0,10,10]: 50 / 100 = 0.5 (vs the other gt box: 0)
        (4, "d1"): (0, 0, 10, 10),     # the duplicate: removed with its box
        (5, "d2"): (10, 10, 30, 30),   # vs [0,0,20,20]: 100 / (400 + 400 - 100) = 1/7
        (8, "d3"): (0, 0, 10, 10),     # d3 has no gt box: skipped
        (3, "d5"): (0, 0, 10, 10),     # not a positive: skipped
    }}
    run = make_run({"q1": RANKING_Q1, "q2": ["d5"]}, boxes)  # q2's hit has no box: skipped
    assert mean_iou(bench, run) == pytest.approx((0.5 + 1 / 7) / 2)
    assert mean_iou(bench, run, top_k=2) == pytest.approx(0.5)  # cleaned top 2 = d1 d5
    assert mean_iou(bench, run, top_k=3) == pytest.approx((0.5 + 1 / 7) / 2)
    assert retrieval_metrics(bench, run, iou_top_k=2)["mIoU"] == pytest.approx(0.5)


def test_mean_iou_nan_when_nothing_to_judge(bench):
    assert math.isnan(mean_iou(bench, make_run({"q1": ["d6", "d7"]})))


# --------------------------------------------------------------------------- recall@IoU
def test_recall_at_iou_by_hand():
    gt = [
        torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32),
        np.array([[0, 0, 10, 10]]),
        np.zeros((0, 4)),
        [[0, 0, 10, 10]],
    ]
    det = [
        torch.tensor([[0, 0, 10, 5], [100, 100, 110, 110]]),  # best IoUs 0.5 and 0
        np.zeros((0, 4)),                                       # no detection: 0
        [[0, 0, 5, 5]],                                         # no gt: ignored
        np.array([[0, 0, 10, 10], [0, 0, 1, 1]]),              # exact: 1.0
    ]
    out = recall_at_iou(gt, det)
    # best IoU per gt box: 0.5, 0, 0, 1 -> 2/4 covered up to t = 0.5 (inclusive), then 1/4.
    np.testing.assert_allclose(out["thresholds"], DEFAULT_IOU_THRESHOLDS)
    np.testing.assert_allclose(out["recall"], [0.5] * 10 + [0.25] * 9)
    assert out["num_gt"] == 4


def test_recall_at_iou_matches_slow_reference():
    rng = np.random.default_rng(5)

    def boxes(n):
        xy = rng.uniform(0, 80, size=(n, 2))
        return np.concatenate([xy, xy + rng.uniform(1, 30, size=(n, 2))], axis=1)

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    gt = [boxes(int(rng.integers(0, 5))) for _ in range(6)]
    det = [boxes(int(rng.integers(0, 20))) for _ in range(6)]
    thresholds = np.array([0.1, 0.3, 0.5, 0.7])
    covered = np.zeros(len(thresholds))
    total = 0
    for g_img, d_img in zip(gt, det):
        for g in g_img:
            total += 1
            best = max((iou(g, d) for d in d_img), default=0.0)
            covered += best >= thresholds
    out = recall_at_iou(gt, det, thresholds)
    np.testing.assert_allclose(out["recall"], covered / total)


def test_recall_at_iou_edge_cases():
    out = recall_at_iou([np.zeros((0, 4))], [np.zeros((0, 4))])
    assert out["num_gt"] == 0 and np.isnan(out["recall"]).all()
    with pytest.raises(ValueError, match="images"):
        recall_at_iou([np.zeros((0, 4))], [])


# --------------------------------------------------------------------------- inputs refused, by message
def test_bad_choices_name_the_parameter_and_the_choices(bench):
    msg_norm = "unknown normalization 'mean'; expected one of relevant, min, retrieved"
    msg_proto = "unknown protocol 'paris'; expected one of standard, oxford"
    with pytest.raises(ValueError, match=msg_norm):
        average_precision([1], 1, normalization="mean")
    with pytest.raises(ValueError, match=msg_proto):
        average_precision_at_ks([1], 1, (None,), protocol="paris")
    run = make_run({"q1": RANKING_Q1})
    with pytest.raises(ValueError, match=msg_norm):
        retrieval_metrics(bench, run, normalization="mean")
    with pytest.raises(ValueError, match=msg_proto):
        retrieval_metrics(bench, run, protocol="paris")


def test_cut_offs_must_be_positive_integers_not_flags_or_floats():
    for k in (True, 2.5, -1):
        with pytest.raises(ValueError, match=f"cut-off k must be a positive integer or None, got {k!r}"):
            average_precision_at_ks([1, 0], 1, (k,))
    np.testing.assert_allclose(average_precision_at_ks([0, 1], 1, (np.int64(2),)), [0.5])  # numpy ints are fine


def test_counts_of_positives_are_checked_with_a_message():
    with pytest.raises(ValueError, match="num_relevant must be >= 0, got -1"):
        average_precision([], -1)
    with pytest.raises(ValueError, match="^the ranking holds 3 positives but num_relevant is 2; "
                                         "R must count every positive in the database$"):
        average_precision([1, 1, 1], 2)
    with pytest.raises(ValueError, match="3 ranked positives but num_positives is 2"):
        oxford_average_precision([0, 1, 2], 2)


def test_oxford_ap_of_a_single_positive():
    # nres 1: one trapezoid; at rank 0 its height is 1, at rank 1 it is (0/1 + 1/2)/2 = 1/4
    assert oxford_average_precision([0], 1) == pytest.approx(1.0)
    assert oxford_average_precision([1], 1) == pytest.approx(official_compute_ap([1], 1)) == pytest.approx(0.25)


# --------------------------------------------------------------------------- judging: corner cases
def test_unknown_query_is_a_key_error_naming_it(bench):
    with pytest.raises(KeyError, match="benchmark 'tiny' has no query 'nope'"):
        judge_ranking(bench, "nope", ["d1"])


def test_query_without_ground_truth_scores_zero():
    gt = {q: {"positives": [{"image": "a"}], "junk": []} for q in ("q", "r")}
    bench = make_benchmark(["a", "b"], [("q", "c"), ("r", "c")], gt)
    del bench.ground_truth["q"]  # a Benchmark built in code may leave a query without ground truth
    j = judge_ranking(bench, "q", ["a", "b"])
    assert j.rel.tolist() == [False, False] and j.num_relevant == 0
    aps = per_query_average_precision(bench, make_run({"q": ["a", "b"], "r": ["b", "a"]}), (None,))
    np.testing.assert_allclose(aps["q"], [0.0])
    np.testing.assert_allclose(aps["r"], [0.5])  # default normalization 'relevant': (1/2) / R, R = 1


def test_image_outside_the_database_never_takes_a_database_image_place(bench):
    # x is not in the database: dropped, so d2 (positive) is the first kept image
    j = judge_ranking(bench, "q1", ["x", "d2", "d1"])
    assert j.kept.tolist() == [1, 2] and j.rel.tolist() == [True, True]
    assert j.db_index.tolist() == [2, 1]
    assert j.kept.dtype == np.int64 and j.db_index.dtype == np.int64  # as JudgedRanking documents


def test_distractors_stay_in_the_ranking_as_distinct_negatives(bench):
    """Distractors are database images by reference: kept (first copy), never positive; an image
    that is neither listed nor a distractor is dropped. Ranking dA d1 dB dA d2 y d3 -> cleaned
    dA d1 dB d2 d3, rel 0 1 0 1 1, R = 4 (d1 d2 d3 d9): AP = (1/2 + 2/4 + 3/5) / 4 = 0.4."""
    bench.extra["distractors"] = [{"root": "distractors", "count": 2, "id_prefix": "distractor:"}]
    ranking = ["distractor:a", "d1", "distractor:b", "distractor:a", "d2", "y", "d3"]
    j = judge_ranking(bench, "q1", ranking)
    assert j.rel.tolist() == [False, True, False, True, True]
    assert j.kept.tolist() == [0, 1, 2, 4, 6]
    assert j.db_index[[1, 3, 4]].tolist() == [1, 2, 3]
    assert j.db_index[0] >= len(DB) and j.db_index[2] >= len(DB) and j.db_index[0] != j.db_index[2]
    m = retrieval_metrics(bench, make_run({"q1": ranking}), ks=(None,))
    assert m["mAP@all"] == pytest.approx(0.4 / 3)  # q2 and q3 score 0


# --------------------------------------------------------------------------- mIoU: corner cases
def test_mean_iou_refuses_non_positive_top_k_and_accepts_one(bench):
    boxes = {"q1": {(1, "d1"): (0, 0, 10, 5)}}
    run = make_run({"q1": RANKING_Q1}, boxes)
    with pytest.raises(ValueError, match="top_k must be a positive integer or None, got 0"):
        mean_iou(bench, run, top_k=0)
    assert mean_iou(bench, run, top_k=1) == pytest.approx(0.5)  # cleaned top 1 = d1


def test_mean_iou_averages_over_every_query_after_skipped_ones():
    """Queries in order: qa (no positive returned), qb (positive returned without a box), qc
    (positive whose ground truth has no box), then qd and qe with one judged pair each.
    Coordinates are not float32-exact: qd's IoU 3.3 * 10 / 100 = 0.33, qe's 1 / 4 = 0.25 (vs the
    other box of g2: 0)."""
    gt = {"qa": {"positives": [{"image": "a"}]},
          "qb": {"positives": [{"image": "b", "boxes": [[0, 0, 10, 10]]}]},
          "qc": {"positives": [{"image": "c", "boxes": []}]},
          "qd": {"positives": [{"image": "d", "boxes": [[0, 0, 10, 10]]},
                               {"image": "outside", "boxes": [[0, 0, 10, 10]]}]},  # not in the database
          "qe": {"positives": [{"image": "e", "boxes": [[0.0, 0.0, 2.2, 2.2], [50, 50, 60, 60]]}]}}
    for g in gt.values():
        g["junk"] = []
    bench = make_benchmark(["a", "b", "c", "d", "e", "z"], [(q, "z") for q in gt], gt, extra_images=["outside"])
    run = make_run({"qa": ["z"], "qb": ["b"], "qc": ["c"], "qd": ["d"], "qe": ["e"]},
                   {"qc": {(0, "c"): (0, 0, 5, 5)}, "qd": {(0, "d"): (0.0, 0.0, 10.0, 3.3)},
                    "qe": {(0, "e"): (0.0, 0.0, 1.1, 2.2)}})
    expected = (3.3 * 10 / 100 + (1.1 * 2.2) / (2.2 * 2.2)) / 2  # float64 reference
    assert mean_iou(bench, run) == pytest.approx(expected, rel=0, abs=1e-12)


# --------------------------------------------------------------------------- recall@IoU: corner cases
def test_recall_at_iou_compares_float32_boxes_in_float64():
    """IoU 70 / 100 = 0.7 exactly: float32 would make it 0.69999999 and miss the 0.7 threshold."""
    gt = [torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float32)]
    det = [torch.tensor([[0.0, 0.0, 10.0, 7.0]], dtype=torch.float32, requires_grad=True)]  # a model's output
    out = recall_at_iou(gt, det, [0.7, 0.71])
    np.testing.assert_array_equal(out["recall"], [1.0, 0.0])
    assert out["num_gt"] == 1


def test_recall_at_iou_without_ground_truth_keeps_the_thresholds():
    out = recall_at_iou([np.zeros((0, 4))], [np.zeros((0, 4))], [0.5, 0.7])
    np.testing.assert_array_equal(out["thresholds"], [0.5, 0.7])
    assert np.isnan(out["recall"]).all() and out["recall"].shape == (2,)


def test_json_ready_replaces_nan_inside_lists_and_tuples():
    from instsearch.eval.metrics import json_ready

    assert json_ready([1.0, math.nan, (math.nan, 2)]) == [1.0, None, [None, 2]]
    assert json_ready({"a": [math.nan]}) == {"a": [None]}
