"""The evaluation protocol of instance search: mAP@k under three normalisations, the Oxford/Paris
trapezoid AP, localisation mIoU and detector recall@IoU.

Definitions (docs/metrics.md). For one query the run's ranked list of database images is first
*cleaned*, and every number is computed on the cleaned list:

* an image returned twice keeps its first (best) position; later copies are removed, since a
  second copy can neither add a new positive nor be a fresh mistake;
* junk images are removed (they count neither for nor against the query). The evaluation follows
  the benchmark file exactly: the query's own image is junk only where the benchmark lists it as
  junk. Whether it is, is the converter's decision per the dataset's official protocol (classic
  Oxford/Paris: the query image stays in the database and counts as a positive where the good/ok
  lists name it; revisited Oxford/Paris, Holidays, Instance-160/335: junk for its own query;
  INSTRE and the synthetic benchmark: query images are not in the database);
* images outside the benchmark's database are removed: the search was over the database, so
  they are neither judged positives nor judged negatives (a run that returns them gains nothing,
  the positives it misses still count in ``R``). Distractor images of the benchmark's
  ``distractors`` folders are database images by reference: they stay, as negatives.

``rel_i`` is 1 when the i-th image of the cleaned list is a positive, ``P@i`` the precision at
``i``, and ``R`` the number of positives in the database (a positive never returned still counts;
one that is also junk, or is not in the database, does not). With ``S_k = Σ_{i≤k} P@i·rel_i``:

============  ====================================  =====================================
name          AP@k                                  equals
============  ====================================  =====================================
relevant      ``S_k / R``                           trec_eval ``map_cut_k``
min           ``S_k / min(k, R)``                   CLAID's tables (mAP@50 ≥ mAP@all)
retrieved     ``S_k / Σ_{i≤k} rel_i`` (0 if none)   torchmetrics ``RetrievalMAP(top_k=k)``
============  ====================================  =====================================

``k = None`` (reported as ``mAP@all``) means the whole returned list; ``min`` then divides by
``R``, i.e. it is the ordinary AP. A query with ``R = 0`` (no positive in the database) has AP 0
under every convention and still counts in the mean, so the number of queries is the
benchmark's, whatever the ground truth.

Protocol ``oxford`` replaces ``P@i`` in ``S_k`` by the trapezoid of the official Oxford/Paris
``compute_ap``: the j-th positive (0-based) at 0-based rank ``r`` contributes
``(j / r + (j + 1) / (r + 1)) / 2`` (the first term is 1 when ``r = 0``), i.e. precision is
interpolated linearly across each recall step. AP@k keeps the terms of the positives ranked
before ``k`` and divides by the same denominator as the chosen normalisation, so ``relevant``
with ``k = None`` is exactly the official number and ``mAP@k`` is the official AP of the list
truncated at ``k`` (recall still measured against all ``R`` positives).
"""
from __future__ import annotations

import math
from collections import abc
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, Union, get_args

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from instsearch.formats import Benchmark, GroundTruth, Hit, Run

Normalization = Literal["relevant", "min", "retrieved"]
Protocol = Literal["standard", "oxford"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)

DEFAULT_KS: tuple[int | None, ...] = (10, 20, 50, 100, None)
DEFAULT_IOU_TOP_K = 100
# 0.05, 0.10, ..., 0.95 rounded, so that reported thresholds print cleanly and an IoU of exactly
# 0.6 is not compared against 0.6000000000000001.
DEFAULT_IOU_THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 2)
BoxesLike = Union[Tensor, np.ndarray, Sequence[Sequence[float]]]

__all__ = [
    "NORMALIZATIONS", "PROTOCOLS", "DEFAULT_KS", "DEFAULT_IOU_TOP_K", "DEFAULT_IOU_THRESHOLDS",
    "JudgedRanking", "judge_ranking", "average_precision", "average_precision_at_ks",
    "oxford_average_precision", "per_query_average_precision", "retrieval_metrics",
    "mean_iou", "recall_at_iou", "metric_key", "RankedPositives", "metrics_from_ranks",
]


def metric_key(k: int | None) -> str:
    """``mAP@10`` … ``mAP@all``: the name a cut-off is reported under."""
    return "mAP@all" if k is None else f"mAP@{k}"


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


# --------------------------------------------------------------------------- one ranking
def average_precision_at_ks(
    rel: np.ndarray | Sequence[bool],
    num_relevant: int,
    ks: Sequence[int | None],
    normalization: Normalization = "relevant",
    protocol: Protocol = "standard",
) -> np.ndarray:
    """AP of one cleaned ranking at several cut-offs at once (one cumulative sum for all).

    ``rel[i]`` says whether the (i+1)-th image of the cleaned list is a positive and
    ``num_relevant`` is ``R``. Returns a float64 array aligned with ``ks``.
    """
    _check_choice(normalization, NORMALIZATIONS, "normalization")
    _check_choice(protocol, PROTOCOLS, "protocol")
    rel = np.asarray(rel, dtype=bool).ravel()
    for k in ks:
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0):
            raise ValueError(f"cut-off k must be a positive integer or None, got {k!r}")
    if num_relevant < 0:
        raise ValueError(f"num_relevant must be >= 0, got {num_relevant}")
    pos = np.flatnonzero(rel)  # 0-based ranks of the positives, ascending
    if pos.size > num_relevant:
        raise ValueError(f"the ranking holds {pos.size} positives but num_relevant is {num_relevant}; "
                         "R must count every positive in the database")
    out = np.zeros(len(ks), dtype=np.float64)
    if num_relevant == 0 or pos.size == 0:
        return out
    j = np.arange(pos.size, dtype=np.float64)  # positives seen before this one
    precision = (j + 1.0) / (pos + 1.0)  # P@i at each positive
    if protocol == "oxford":
        # Left edge of the trapezoid: precision just before this positive; 1 at rank 0 (official).
        before = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
        terms = 0.5 * (before + precision)
    else:
        terms = precision
    csum = np.concatenate(([0.0], np.cumsum(terms)))
    cut = np.array([rel.size if k is None else min(int(k), rel.size) for k in ks], dtype=np.int64)
    hits = np.searchsorted(pos, cut, side="left")  # positives ranked before each cut-off
    s = csum[hits]
    if normalization == "relevant":
        denom = np.full(len(ks), float(num_relevant))
    elif normalization == "min":
        denom = np.array([num_relevant if k is None else min(int(k), num_relevant) for k in ks], dtype=np.float64)
    else:  # retrieved
        denom = hits.astype(np.float64)
    np.divide(s, denom, out=out, where=denom > 0)
    return out


def average_precision(
    rel: np.ndarray | Sequence[bool],
    num_relevant: int,
    k: int | None = None,
    normalization: Normalization = "relevant",
) -> float:
    """AP@k of one cleaned ranking (best first) under ``normalization``; see the module docstring.

    >>> round(average_precision([1, 0, 1], num_relevant=4, k=None), 4)  # (1/1 + 2/3) / 4
    0.4167
    """
    return float(average_precision_at_ks(rel, num_relevant, (k,), normalization)[0])


def oxford_average_precision(ranks_of_positives: np.ndarray | Sequence[int], num_positives: int) -> float:
    """The official Oxford/Paris ``compute_ap`` (trapezoid rule over the precision-recall curve).

    ``ranks_of_positives`` are the 0-based ranks of the positives in the ranking *after junk
    removal* (any order; positives never returned are simply absent) and ``num_positives`` is
    ``nres``, every positive of the query. Recall grows by ``1/nres`` at each positive and the
    precision over that step is the mean of ``j/rank`` and ``(j+1)/(rank+1)``.
    """
    ranks = np.sort(np.asarray(ranks_of_positives, dtype=np.int64).ravel())
    if ranks.size and (ranks[0] < 0 or np.any(np.diff(ranks) == 0)):
        raise ValueError(f"ranks of positives must be distinct and >= 0, got {ranks.tolist()}")
    if ranks.size > num_positives:
        raise ValueError(f"{ranks.size} ranked positives but num_positives is {num_positives}")
    if num_positives <= 0 or ranks.size == 0:
        return 0.0
    j = np.arange(ranks.size, dtype=np.float64)
    precision_0 = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1))
    precision_1 = (j + 1.0) / (ranks + 1.0)
    return float(np.sum(0.5 * (precision_0 + precision_1)) / num_positives)


# --------------------------------------------------------------------------- judging a run
@dataclass(frozen=True)
class JudgedRanking:
    """One query's ranking after cleaning (see the module docstring)."""

    rel: np.ndarray  # (n,) bool: is the i-th kept image a positive
    num_relevant: int  # R
    kept: np.ndarray  # (n,) int64: position of each kept image in the run's original hit list
    db_index: np.ndarray  # (n,) int64: database index of each kept image


def _database_index(benchmark: Benchmark) -> dict[str, int]:
    # Set semantics: an image listed twice in the database is still one image.
    index: dict[str, int] = {}
    for image_id in benchmark.database:
        index.setdefault(image_id, len(index))
    return index


def _judged_sets(gt: GroundTruth | None, db_index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Database indices of (positives counted in R, images dropped from the ranking)."""
    if gt is None:
        positives: set[str] = set()
        junk: set[str] = set()
    else:
        junk = set(gt.junk)
        positives = set(gt.positives) - junk  # an image that is both is junk: it is not judged
    pos = np.array(sorted(db_index[i] for i in positives if i in db_index), dtype=np.int64)
    drop = np.array(sorted(db_index[i] for i in junk if i in db_index), dtype=np.int64)
    return pos, drop


def _clean(ids: np.ndarray, positives: np.ndarray, drop: np.ndarray, num_relevant: int) -> JudgedRanking:
    """Keep the first copy of each database image that is not dropped; mark the positives."""
    _, first = np.unique(ids, return_index=True)  # first occurrence of every image (and of -1)
    keep = np.zeros(ids.size, dtype=bool)
    keep[first] = True
    keep &= (ids >= 0) & ~np.isin(ids, drop)
    kept = np.flatnonzero(keep)
    return JudgedRanking(rel=np.isin(ids[kept], positives), num_relevant=num_relevant, kept=kept, db_index=ids[kept])


def _ranking_ids(hits: Sequence[Hit] | Sequence[str], db_index: Mapping[str, int],
                 benchmark: Benchmark | None = None) -> np.ndarray:
    # The hits are Python objects from JSON, so this one pass over them is unavoidable; all
    # judging after it works on the integer array.
    ids = [h if isinstance(h, str) else h.image for h in hits]
    out = np.fromiter((db_index.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
    if benchmark is not None and benchmark.distractors and (out < 0).any():
        # Distractor images (appended by reference, never listed) are database images that are
        # never positive: each distinct one gets its own index past the listed database.
        extra: dict[str, int] = {}
        for j in np.flatnonzero(out < 0):
            if benchmark.is_distractor(ids[j]):
                out[j] = extra.setdefault(ids[j], len(db_index) + len(extra))
    return out


def judge_ranking(benchmark: Benchmark, query_id: str, hits: Sequence[Hit] | Sequence[str]) -> JudgedRanking:
    """Clean one query's ranked hits (duplicates, junk and non-database images removed) and mark
    the positives; ``hits`` are :class:`Hit` or bare image ids, best first."""
    query = benchmark.query_by_id.get(query_id)
    if query is None:
        raise KeyError(f"benchmark '{benchmark.name}' has no query '{query_id}'")
    db_index = _database_index(benchmark)
    positives, drop = _judged_sets(benchmark.ground_truth.get(query_id), db_index)
    return _clean(_ranking_ids(hits, db_index, benchmark), positives, drop, int(positives.size))


def _judge_all(benchmark: Benchmark, run: Run) -> dict[str, JudgedRanking]:
    """Every benchmark query judged; a query the run does not rank gets an empty ranking (AP 0).
    Rankings for queries the benchmark does not have are ignored (``Run.load`` refuses them)."""
    db_index = _database_index(benchmark)
    out = {}
    for q in benchmark.queries:
        positives, drop = _judged_sets(benchmark.ground_truth.get(q.id), db_index)
        ids = _ranking_ids(run.rankings.get(q.id, []), db_index, benchmark)
        out[q.id] = _clean(ids, positives, drop, int(positives.size))
    return out


def per_query_average_precision(
    benchmark: Benchmark,
    run: Run,
    ks: Sequence[int | None] = DEFAULT_KS,
    normalization: Normalization = "relevant",
    protocol: Protocol = "standard",
) -> dict[str, np.ndarray]:
    """AP of every benchmark query at every cut-off in ``ks``: ``{query id: array aligned with ks}``."""
    return _per_query(_judge_all(benchmark, run), ks, normalization, protocol)


def _per_query(judged: Mapping[str, JudgedRanking], ks: Sequence[int | None], normalization: Normalization,
               protocol: Protocol) -> dict[str, np.ndarray]:
    return {qid: average_precision_at_ks(j.rel, j.num_relevant, ks, normalization, protocol)
            for qid, j in judged.items()}


def retrieval_metrics(
    benchmark: Benchmark,
    run: Run,
    normalization: Normalization = "relevant",
    protocol: Protocol = "standard",
    ks: Sequence[int | None] = DEFAULT_KS,
    iou_top_k: int | None = DEFAULT_IOU_TOP_K,
) -> dict[str, float | int | str]:
    """mAP at every cut-off, localisation mIoU and the convention, for one run on one benchmark.

    Keys: ``mAP@<k>`` for each ``k`` in ``ks`` (``mAP@all`` for ``None``), ``mIoU`` (over the
    top ``iou_top_k`` of the cleaned rankings; NaN when no returned positive has both a box and a
    ground-truth box), ``num_queries``, ``normalization``, ``protocol``. The mean is over all
    benchmark queries; one the run does not rank has AP 0.
    """
    _check_choice(normalization, NORMALIZATIONS, "normalization")
    _check_choice(protocol, PROTOCOLS, "protocol")
    if not benchmark.queries:
        raise ValueError(f"benchmark '{benchmark.name}' has no queries to evaluate")
    return _metrics(benchmark, run, _judge_all(benchmark, run), normalization, protocol, ks, iou_top_k)


@dataclass(frozen=True)
class RankedPositives:
    """Where one query's returned positives stand in its whole cleaned ranking, without the
    ranking: what sharded evaluation knows after counting, on every process, the images that
    outscore each positive (:mod:`instsearch.eval.sharded`)."""

    ranks: np.ndarray  # (p,) int64: 0-based ranks in the cleaned ranking, ascending
    hits: Sequence[Hit]  # the positives' hits (image, score, box), in the same order


class _JudgedFromRanks(abc.Mapping):
    """``query id -> JudgedRanking`` built from :class:`RankedPositives` on access: a ranking whose
    last positive is the millionth image is a million flags, so one query's at a time."""

    def __init__(self, benchmark: Benchmark, positives: Mapping[str, RankedPositives]):
        self.benchmark, self.positives = benchmark, positives
        self.db_index = _database_index(benchmark)

    def __iter__(self):
        return (q.id for q in self.benchmark.queries)

    def __len__(self) -> int:
        return len(self.benchmark.queries)

    def __getitem__(self, query_id: str) -> JudgedRanking:
        positives, _ = _judged_sets(self.benchmark.ground_truth.get(query_id), self.db_index)
        found = self.positives.get(query_id)
        if found is None or not len(found.ranks):
            empty = np.zeros(0, np.int64)
            return JudgedRanking(rel=np.zeros(0, bool), num_relevant=int(positives.size), kept=empty, db_index=empty)
        ranks = np.asarray(found.ranks, dtype=np.int64)
        ids = _ranking_ids(found.hits, self.db_index, self.benchmark)
        if (np.diff(ranks) <= 0).any() or not np.isin(ids, positives).all():
            raise ValueError(f"query {query_id!r}: ranked positives must be distinct positives in ascending rank order")
        length = int(ranks[-1]) + 1  # AP needs no flag past the last positive (see average_precision_at_ks)
        rel = np.zeros(length, bool)
        rel[ranks] = True
        kept = np.full(length, -1, np.int64)
        kept[ranks] = np.arange(len(ranks))
        db_index = np.full(length, -1, np.int64)
        db_index[ranks] = ids
        return JudgedRanking(rel=rel, num_relevant=int(positives.size), kept=kept, db_index=db_index)


def metrics_from_ranks(
    benchmark: Benchmark,
    positives: Mapping[str, RankedPositives],
    normalization: Normalization = "relevant",
    protocol: Protocol = "standard",
    ks: Sequence[int | None] = DEFAULT_KS,
    iou_top_k: int | None = DEFAULT_IOU_TOP_K,
    method: str = "regions",
) -> dict[str, float | int | str]:
    """:func:`retrieval_metrics` of a ranking known only by its positives' ranks: the same
    numbers, bit for bit, as for the whole ranking (AP needs only where the positives stand, mIoU
    only their boxes). A query missing from ``positives`` returned none (AP 0)."""
    _check_choice(normalization, NORMALIZATIONS, "normalization")
    _check_choice(protocol, PROTOCOLS, "protocol")
    if not benchmark.queries:
        raise ValueError(f"benchmark '{benchmark.name}' has no queries to evaluate")
    run = Run(method=method, rankings={q: list(p.hits) for q, p in positives.items()})
    return _metrics(benchmark, run, _JudgedFromRanks(benchmark, positives), normalization, protocol, ks, iou_top_k)


def _metrics(benchmark: Benchmark, run: Run, judged: Mapping[str, JudgedRanking], normalization: Normalization,
             protocol: Protocol, ks: Sequence[int | None], iou_top_k: int | None) -> dict[str, float | int | str]:
    aps = _per_query(judged, ks, normalization, protocol)
    mean = np.mean(np.stack(list(aps.values())), axis=0)
    out: dict[str, float | int | str] = {metric_key(k): float(v) for k, v in zip(ks, mean)}
    out["mIoU"] = _mean_iou(benchmark, run, judged, iou_top_k)
    out["num_queries"] = len(benchmark.queries)
    out["normalization"] = normalization
    out["protocol"] = protocol
    return out


# --------------------------------------------------------------------------- localisation
def _as_boxes(boxes: BoxesLike) -> Tensor:
    """Any (N, 4) box container as a float64 CPU tensor (float64: IoU thresholds compare exactly)."""
    t = boxes.detach().cpu() if isinstance(boxes, Tensor) else torch.as_tensor(np.asarray(boxes, dtype=np.float64))
    return t.to(torch.float64).reshape(-1, 4)


def _gt_table(gt: GroundTruth | None, db_index: Mapping[str, int]) -> tuple[Tensor, np.ndarray]:
    """All ground-truth boxes of one query's positives (G, 4) and the database index of each."""
    if gt is None:
        return torch.zeros(0, 4, dtype=torch.float64), np.zeros(0, dtype=np.int64)
    owners = [(db_index[im], boxes) for im, boxes in gt.positives.items() if im in db_index and boxes]
    if not owners:
        return torch.zeros(0, 4, dtype=torch.float64), np.zeros(0, dtype=np.int64)
    labels = np.concatenate([np.full(len(b), i, dtype=np.int64) for i, b in owners])
    boxes = torch.tensor([box for _, b in owners for box in b], dtype=torch.float64)
    return boxes, labels


def mean_iou(benchmark: Benchmark, run: Run, top_k: int | None = None) -> float:
    """Localisation accuracy: mean over (query, returned positive) pairs of the IoU between the
    run's box and the best-matching ground-truth box of that image.

    Pairs are the positives among the first ``top_k`` images of each cleaned ranking (all of
    them for ``None``); a hit without a box, or a positive without ground-truth boxes, is
    skipped, so the number measures localisation only where it can be judged. NaN when no pair
    can be judged.
    """
    return _mean_iou(benchmark, run, _judge_all(benchmark, run), top_k)


def _mean_iou(benchmark: Benchmark, run: Run, judged: Mapping[str, JudgedRanking], top_k: int | None) -> float:
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    db_index = _database_index(benchmark)
    total, count = 0.0, 0
    for q in benchmark.queries:
        j = judged[q.id]
        sel = np.flatnonzero(j.rel[:top_k])  # positives within the cut-off
        if sel.size == 0:
            continue
        hits = run.rankings[q.id]
        # Boxes arrive as Python tuples from JSON; gather the few judged ones into one tensor.
        with_box = [(i, hits[p].box) for i, p in zip(j.db_index[sel].tolist(), j.kept[sel].tolist())
                    if hits[p].box is not None]
        if not with_box:
            continue
        gt_boxes, gt_owner = _gt_table(benchmark.ground_truth.get(q.id), db_index)
        if gt_boxes.shape[0] == 0:
            continue
        hit_owner = np.array([i for i, _ in with_box], dtype=np.int64)
        hit_boxes = torch.tensor([b for _, b in with_box], dtype=torch.float64)
        same_image = torch.from_numpy(hit_owner[:, None] == gt_owner[None, :])
        iou = box_iou(hit_boxes, gt_boxes).masked_fill(~same_image, -1.0).amax(dim=1)
        judged_pairs = same_image.any(dim=1)  # positives that have ground-truth boxes
        total += float(iou[judged_pairs].sum())
        count += int(judged_pairs.sum())
    return total / count if count else math.nan


def recall_at_iou(
    gt_boxes: Sequence[BoxesLike],
    detected: Sequence[BoxesLike],
    thresholds: np.ndarray | Sequence[float] = DEFAULT_IOU_THRESHOLDS,
) -> dict[str, np.ndarray | int]:
    """Detector exhaustiveness: the share of ground-truth boxes that at least one detected region
    overlaps with IoU ≥ t, for every threshold t.

    ``gt_boxes[i]`` (G_i, 4) and ``detected[i]`` (N_i, 4) belong to image i. Returns
    ``thresholds``, ``recall`` (same length; NaN when there is no ground-truth box at all) and
    ``num_gt``.
    """
    if len(gt_boxes) != len(detected):
        raise ValueError(f"gt_boxes has {len(gt_boxes)} images but detected has {len(detected)}")
    thr = np.asarray(thresholds, dtype=np.float64).ravel()
    best = []
    for gt, det in zip(gt_boxes, detected):  # per image; all box pairs of an image in one call
        g, d = _as_boxes(gt), _as_boxes(det)
        if g.shape[0] == 0:
            continue
        if d.shape[0] == 0:
            best.append(torch.zeros(g.shape[0], dtype=torch.float64))
        else:
            best.append(box_iou(g, d).amax(dim=1))
    if not best:
        return {"thresholds": thr, "recall": np.full(thr.shape, np.nan), "num_gt": 0}
    best_iou = torch.cat(best).numpy()
    recall = (best_iou[:, None] >= thr[None, :]).mean(axis=0)
    return {"thresholds": thr, "recall": recall, "num_gt": int(best_iou.size)}


def json_ready(value: Any) -> Any:
    """``value`` with every NaN (a metric with nothing to judge) as ``None``: JSON has no NaN, null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def loggable(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The defined numeric metrics, as floats for a logger (NaN, None, text and flags left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))}
