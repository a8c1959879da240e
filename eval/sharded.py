"""Sharded evaluation: every process ranks only its own database images, and no process ever
holds every region or every image's score.

How the exact metrics come out of shards (``retrieval.evaluation: sharded``):

1. every process holds all queries and its own images -- in memory, or, with
   ``retrieval.spill_dir``, written to region shards as the batches arrive
   (:class:`SpilledCollection`) and ranked by an exact search streamed over them
   (:mod:`instsearch.eval.streamed`), so that its memory does not grow with its share of regions;
2. each process scores, for every query, the positive and junk images it holds and sends these
   few scores to all (``all_gather``);
3. each process counts, for every positive, its own images ranked above it (higher score, or the
   same score and listed earlier: the order one index gives), and the counts are summed
   (``all_reduce``): the positive's exact rank in the whole ranking, junk removed by subtracting
   the junk images above it;
4. rank 0 computes the metrics from those ranks
   (:func:`~instsearch.eval.metrics.metrics_from_ranks`: the same numbers as from the whole
   ranking) and merges each process's top ``retrieval.run_depth`` images per query into
   ``run.json``.

With ``run_depth`` unset every process sends its whole ranking (``run.json`` then holds every
image, as the gathered path writes it); at scale a depth is what keeps rank 0's memory bounded.

No process holds the whole database's regions or ids: processes learn of each other's images
by 64-bit hashes of their ids, 8 bytes an image (an image two processes extracted is ranked by
the lower one), and order equal scores by a key each computes for its own images (listed images
by their place in the benchmark, distractors by id; rank 0 compares distractor ids across
processes). Spilled regions are read twice: once to score the judged images, once to count. Measured in
docs/scale.md ("Sharded evaluation"): peak memory per process at 1 M and 10 M regions.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from instsearch.distributed import all_gather_objects, all_reduce_sum, gather_to_rank0, rank_and_world
from instsearch.eval.extraction import QueryFeature, SearchBatch, add_bad_items, capped
from instsearch.eval.metrics import RankedPositives, metrics_from_ranks, recall_at_iou
from instsearch.eval.search import RegionIndex
from instsearch.eval.shard_search import image_regions
from instsearch.eval.shards import RegionShards, ShardImage, ShardWriter
from instsearch.eval.streamed import BLOCK_SCORES, ImageTopK, stream_image_scores
from instsearch.formats import Benchmark, Hit, Run

if TYPE_CHECKING:
    from instsearch.eval.evaluator import EvaluationResult, RetrievalEvaluator

#: regions per spilled part (float32 rows: 2 MB a part at 512-D... 32 MB at 128-D x 65,536)
SPILL_PART_REGIONS = 1 << 16


class SpilledCollection:
    """One process's extraction with the database regions written to region shards under
    ``root`` as they arrive (float32, the rows the in-memory path would hold: the same bits), the
    queries and undecodable items kept. Memory: one part's buffer; the ids come back from the parts'
    records when ranking.

    A folder from an earlier evaluation is cleared first. ``transform`` (a whitening loaded from a
    file) is applied to each part's features before they are written.
    """

    def __init__(self, root: str | Path, regions_per_image: Optional[int] = None,
                 part_regions: int = SPILL_PART_REGIONS,
                 transform: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.root = Path(root)
        if self.root.exists():
            shutil.rmtree(self.root)
        self.regions_per_image = regions_per_image
        self.part_regions = int(part_regions)
        self.transform = transform
        self.writer = ShardWriter(self.root, {"model": "spilled evaluation regions"}, dtype="float32")
        self.queries: dict[str, QueryFeature] = {}
        self.bad_images: list[dict] = []
        self._images = 0
        self._buffer: list[ShardImage] = []
        self._buffered = 0
        self._parts = 0
        self._shards: Optional[RegionShards] = None

    def add(self, batch: SearchBatch) -> None:
        for meta, regions in batch.database:
            # a padded sampler's repeat is written too (no id set is kept): evaluation ranks the last copy
            self._images += 1
            r = capped(regions, self.regions_per_image)
            labels = getattr(r, "labels", None)
            self._buffer.append(ShardImage(meta.image_id, r.boxes.detach().cpu().numpy().astype(np.float32),
                                           r.scores.detach().cpu().numpy().astype(np.float32),
                                           r.features.detach().cpu().float().numpy() if r.features is not None
                                           else np.zeros((0, 0), np.float32),  # an image without regions
                                           None if labels is None else labels.detach().cpu().numpy()))
            self._buffered += len(r)
            if self._buffered >= self.part_regions:
                self._flush()
        for query in batch.queries:
            self.queries[query.meta.query_id] = query
        add_bad_items(self.bad_images, batch.bad)

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self.transform is not None:
            filled = [im for im in self._buffer if len(im.boxes)]
            if filled:
                rows = self.transform(np.concatenate([im.features for im in filled]))
                at = 0
                for im in filled:
                    im.features, at = rows[at:at + len(im.boxes)], at + len(im.boxes)
        self.writer.write_part(self._parts, self._buffer)
        self._parts += 1
        self._buffer, self._buffered = [], 0

    def shards(self) -> RegionShards:
        """The spilled regions, once every batch is in (the last part written on the first call)."""
        if self._shards is None:
            self._flush()
            self.writer.write_manifest(num_parts=self._parts, complete=True)
            self._shards = RegionShards(self.root)
        return self._shards

    def __len__(self) -> int:
        return self._images


# ------------------------------------------------------------------------------ local rankings
@dataclass
class _Judged:
    """This process's (query, image) pairs the benchmark judges: positives and junk."""

    query: np.ndarray  # (T,) int64 query index
    local: np.ndarray  # (T,) int64 local image position
    junk: np.ndarray  # (T,) bool


@dataclass
class _Scored:
    """Judged pairs with their exact scores, from every process: what the counting compares with."""

    query: np.ndarray  # (T,) int64
    position: np.ndarray  # (T,) int64 global image position
    score: np.ndarray  # (T,) float32
    junk: np.ndarray  # (T,) bool
    box: np.ndarray  # (T, 4) float32 box of the image's best region

    @classmethod
    def concat(cls, parts: Sequence["_Scored"]) -> "_Scored":
        fields = ("query", "position", "score", "junk", "box")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def _ahead(scores: np.ndarray, positions: np.ndarray, score: np.ndarray, position: np.ndarray) -> np.ndarray:
    """For each judged pair ``t``, how many of the images (``scores[t]``: its query's scores of
    them) rank above it: a higher score, or the same score and an earlier global position."""
    s = score[:, None]
    above = (scores > s) | ((scores == s) & (positions[None, :] < position[:, None]))
    return above.sum(axis=1)


def _count_above(query_scores: np.ndarray, positions: np.ndarray, scored: "_Scored",
                 pairs: Optional[np.ndarray] = None) -> np.ndarray:
    """:func:`_ahead` for the judged ``pairs`` (default: all) against images whose scores are the
    rows of ``query_scores`` (one per query, or a single row for all), in chunks of pairs so that
    no temporary exceeds a streamed block's size (a query may judge hundreds of images)."""
    pairs = np.arange(len(scored.query)) if pairs is None else pairs
    out = np.zeros(len(pairs), np.int64)
    step = max(1, BLOCK_SCORES // max(len(positions), 1))
    for a in range(0, len(pairs), step):
        sel = pairs[a:a + step]
        rows = query_scores[scored.query[sel]] if len(query_scores) > 1 else \
            np.broadcast_to(query_scores, (len(sel), len(positions)))
        out[a:a + step] = _ahead(rows, positions, scored.score[sel], scored.position[sel])
    return out


class _InMemoryRanking:
    """This process's images in a :class:`RegionIndex` of the model's searcher (any searcher)."""

    def __init__(self, evaluator: "RetrievalEvaluator", local_ids: Sequence[str], queries: np.ndarray,
                 labels: Optional[list]):
        cfg = evaluator.config
        store = evaluator.collection.store(list(local_ids))
        whitening = cfg.fit_whitening(store.features) if len(store) else None  # from a file: see RetrievalConfig
        if whitening is not None:
            store.features = whitening.transform(store.features)
            queries = whitening.transform(queries)
        self.store = store
        index = RegionIndex(store, evaluator.make_searcher(store.dim), device=evaluator.device)
        self.rankings = (index.search(queries, top_images=cfg.ranking_depth, query_labels=labels,
                                      prune_by_label=cfg.prune_by_label) if len(queries) and len(store) else [])
        self.num_regions = len(store)
        self.feature_bytes = int(store.features.nbytes)  # as indexed (whitened when the config whitens)

    def scores_of(self, judged: _Judged) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(found, score, region)`` of each judged pair: found where the ranking holds it."""
        found = np.zeros(len(judged.query), bool)
        score = np.zeros(len(judged.query), np.float32)
        region = np.zeros(len(judged.query), np.int64)
        for q, r in enumerate(self.rankings):
            sel = np.flatnonzero(judged.query == q)
            if not len(sel) or not len(r.images):
                continue
            order = np.argsort(r.images)
            at = np.minimum(np.searchsorted(r.images[order], judged.local[sel]), len(order) - 1)
            hit = r.images[order][at] == judged.local[sel]
            found[sel[hit]] = True
            score[sel[hit]] = r.scores[order][at[hit]]
            region[sel[hit]] = r.regions[order][at[hit]]
        return found, score, region

    def count_and_top(self, scored: _Scored, local_position: np.ndarray, depth: Optional[int]
                      ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        counts = np.zeros(len(scored.query), np.int64)
        top = []
        for q, r in enumerate(self.rankings):
            sel = np.flatnonzero(scored.query == q)
            positions = local_position[r.images]
            if len(sel):
                counts[sel] = _count_above(r.scores[None, :], positions, scored, sel)
            top.append((positions[:depth], r.scores[:depth].astype(np.float32), r.regions[:depth]))
        return counts, top

    def boxes(self, regions: np.ndarray) -> np.ndarray:
        return self.store.boxes[regions]


class _StreamedRanking:
    """This process's spilled images, ranked by the exact search streamed over their shards."""

    def __init__(self, shards: RegionShards, keep: np.ndarray, queries: np.ndarray, labels: Optional[list]):
        self.shards, self.keep, self.queries, self.labels = shards, keep, queries, labels
        self.num_regions = int(np.diff(shards.image_starts)[keep].sum())
        self.feature_bytes = self.num_regions * int(shards.dim) * 4  # float32 on disk, as spilled

    def _blocks(self) -> Iterator:
        if not len(self.queries):
            return
        for block in stream_image_scores(self.shards, self.queries, query_labels=self.labels):
            kept = self.keep[block.images]
            if kept.all():
                yield block.images, block.scores, block.regions
            elif kept.any():
                yield block.images[kept], block.scores[:, kept], block.regions[:, kept]

    def scores_of(self, judged: _Judged) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = np.zeros(len(judged.query), bool)
        score = np.zeros(len(judged.query), np.float32)
        region = np.zeros(len(judged.query), np.int64)
        order = np.argsort(judged.local, kind="stable")
        local = judged.local[order]
        for images, scores, regions in self._blocks():
            a, b = np.searchsorted(local, [images[0], images[-1] + 1])
            if a == b:
                continue
            sel = order[a:b]
            column = np.searchsorted(images, judged.local[sel])
            hit = images[np.minimum(column, len(images) - 1)] == judged.local[sel]
            sel, column = sel[hit], column[hit]
            s = scores[judged.query[sel], column]
            ok = ~np.isneginf(s)  # category pruning left the image no region for this query
            found[sel[ok]] = True
            score[sel[ok]] = s[ok]
            region[sel[ok]] = regions[judged.query[sel[ok]], column[ok]]
        return found, score, region

    def count_and_top(self, scored: _Scored, local_position: np.ndarray, depth: Optional[int]
                      ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        counts = np.zeros(len(scored.query), np.int64)
        k = int(self.keep.sum()) if depth is None else min(int(depth), int(self.keep.sum()))
        best = ImageTopK.empty(len(self.queries), k if depth is not None else 0)
        blocks = []  # without a depth the whole ranking is kept: gathered once and sorted once
        for images, scores, regions in self._blocks():
            positions = local_position[images]
            if len(scored.query):
                counts += _count_above(scores, positions, scored)
            if depth is None:
                blocks.append((scores, np.broadcast_to(positions, scores.shape), regions))
            elif k:
                best = best.merge(scores, positions, regions)
        if blocks:
            s, im, reg = (np.concatenate([b[i] for b in blocks], axis=1) for i in range(3))
            best = ImageTopK.empty(len(s), k).merge(s, im, reg)
        top = []
        for q in range(len(self.queries)):
            real = best.images[q] >= 0
            top.append((best.images[q][real], best.scores[q][real], best.regions[q][real]))
        return counts, top

    def boxes(self, regions: np.ndarray) -> np.ndarray:
        return self.shards.region_boxes(regions)


# ------------------------------------------------------------------------------ image order
def _id_hashes(image_ids: Sequence[str]) -> np.ndarray:
    """A 64-bit BLAKE2b hash of each image id: 8 bytes an id is what every process learns of the
    others' images (two distinct ids of a million collide with probability ~3e-8)."""
    import hashlib

    return np.frombuffer(b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in image_ids),
                         dtype=np.uint64).copy()


def _order_keys(bench: Benchmark, local_ids: Sequence[str], rank: int) -> np.ndarray:
    """Each local image's place in the order one index over every image holds them -- the
    benchmark's listed images in its order (key: the first listing's index), then the distractors
    by id (key: ``len(database)`` + the id's rank among this process's distractors, which orders
    them as the global sort does; rank 0 compares ids across processes) -- or ``-1`` where this
    process does not rank the image: another process extracted it first (the lowest rank that has
    it ranks it), it repeats here (the last copy counts), or the benchmark names it neither listed
    nor distractor. Every process holds the 8-byte hashes of all ids (about 40 bytes an image with
    the sort's temporaries), not the ids."""
    listing: dict[str, int] = {}
    for k, image_id in enumerate(bench.database):
        listing.setdefault(image_id, k)
    keys = np.fromiter((listing.get(i, -1) for i in local_ids), np.int64, len(local_ids))
    if bench.distractors:
        extra = np.flatnonzero(keys < 0)
        extra = extra[np.fromiter((bench.is_distractor(local_ids[k]) for k in extra), bool, len(extra))]
        by_id = sorted(range(len(extra)), key=lambda j: local_ids[extra[j]])
        keys[extra[by_id]] = len(bench.database) + np.arange(len(extra))
    hashes = _id_hashes(local_ids)
    everyone = all_gather_objects(hashes)
    distinct, first = np.unique(np.concatenate(everyone), return_index=True)  # first: the lowest rank's copy
    owner = np.repeat(np.arange(len(everyone)), [len(h) for h in everyone])[first]
    at = np.searchsorted(distinct, hashes)
    # an image this process extracted twice counts once, its last copy: as the in-memory
    # collection, keyed by id, keeps it
    mine_last = np.zeros(len(local_ids), bool)
    mine_last[len(hashes) - 1 - np.unique(hashes[::-1], return_index=True)[1]] = True
    keys[(owner[at] != rank) | ~mine_last] = -1
    return keys


# ------------------------------------------------------------------------------ the evaluation
def evaluate_sharded(evaluator: "RetrievalEvaluator") -> Optional["EvaluationResult"]:
    """:meth:`RetrievalEvaluator.compute` without gathering regions (see the module docstring).
    Images a padded sampler served to two processes count once (on the lower rank). Returns the
    result on rank 0, ``None`` elsewhere."""
    from instsearch.eval.evaluator import RECALL_THRESHOLDS, EvaluationResult, add_database_metrics, gt_boxes

    bench, cfg = evaluator.benchmark, evaluator.config
    collection = evaluator.collection
    started = time.perf_counter()
    rank, _ = rank_and_world()
    spilled = isinstance(collection, SpilledCollection)
    local_ids = collection.shards().image_ids if spilled else list(collection.database)
    local_position = _order_keys(bench, local_ids, rank)  # "position": the order key below
    listed = len(bench.database)
    queries: dict[str, QueryFeature] = {}
    for part in all_gather_objects(collection.queries):
        queries.update(part)
    query_ids = [q.id for q in bench.queries if q.id in queries]
    features = (torch.stack([queries[q].feature for q in query_ids]).numpy() if query_ids
                else np.zeros((0, 0), np.float32))
    labels = [queries[q].label for q in query_ids] if cfg.prune_by_label else None

    if spilled:
        shards = collection.shards()
        whitening = cfg.fit_whitening(features) if cfg.whitening and len(features) else None
        if whitening is not None:
            features = whitening.transform(features)
        ranking = _StreamedRanking(shards, local_position >= 0, features, labels)
        ranked_local = shards.image_ids
    else:  # this process's images in the global order, as one index over all would hold them
        kept = np.flatnonzero(local_position >= 0)
        kept = kept[np.argsort(local_position[kept], kind="stable")]
        mine = [local_ids[k] for k in kept]
        local_position = local_position[kept]
        ranking = _InMemoryRanking(evaluator, mine, features, labels)
        ranked_local = mine

    # 2. this process's judged pairs scored, then everyone's
    judged = _judged_pairs(bench, query_ids, local_position)
    found, score, region = ranking.scores_of(judged)
    sel = np.flatnonzero(found)
    mine_scored = _Scored(judged.query[sel], local_position[judged.local[sel]], score[sel], judged.junk[sel],
                          ranking.boxes(region[sel]).astype(np.float32).reshape(-1, 4))
    scored = _Scored.concat(all_gather_objects(mine_scored))
    # 3. images above each judged pair, summed over processes; and this process's top images
    depth = cfg.run_depth if cfg.run_depth is not None else cfg.ranking_depth
    if cfg.ranking_depth is not None and depth is not None:
        depth = min(depth, cfg.ranking_depth)
    counts, top = ranking.count_and_top(scored, local_position, depth)
    counts = all_reduce_sum(torch.from_numpy(counts)).numpy()
    top_boxes = ranking.boxes(np.concatenate([t[2] for t in top]).astype(np.int64)) if top else np.zeros((0, 4))
    bounds = np.cumsum([0] + [len(t[2]) for t in top])
    by_key = np.argsort(local_position)
    top = [(p, s, np.asarray(top_boxes[a:b], np.float32).reshape(-1, 4),
            [ranked_local[i] for i in by_key[np.searchsorted(local_position[by_key], p)].tolist()])
           for (p, s, _), a, b in zip(top, bounds[:-1], bounds[1:])]

    # detector recall and region counts: sums over processes
    ranked_here = {ranked_local[k] for k in np.flatnonzero((local_position >= 0) & (local_position < listed))}
    gt_ids, gt = gt_boxes(bench, available=ranked_here.__contains__)
    counts_iou = recall_at_iou(gt, _image_boxes(collection, gt_ids), thresholds=RECALL_THRESHOLDS)
    covered = np.nan_to_num(np.asarray(counts_iou["recall"], dtype=np.float64)) * counts_iou["num_gt"]
    feature_bytes = ranking.feature_bytes  # the float32 features this process ranks
    sums = all_reduce_sum(torch.tensor([*np.rint(covered), counts_iou["num_gt"], feature_bytes,
                                        int((local_position >= 0).sum()), ranking.num_regions],
                                       dtype=torch.float64))
    bad = gather_to_rank0(collection.bad_images)
    parts = gather_to_rank0(top)
    if parts is None:
        return None

    # 4. rank 0: the metrics from the positives' ranks, run.json from every process's top images
    run = _merged_run(query_ids, listed, parts, depth, evaluator.method)
    positives = _ranked_positives(query_ids, bench.database.__getitem__, scored, counts, cfg.ranking_depth)
    metrics = metrics_from_ranks(bench, positives, normalization=cfg.normalization, protocol=cfg.protocol,
                                 method=evaluator.method)
    num_gt = float(sums[len(RECALL_THRESHOLDS)])
    recall = [float(c / num_gt) if num_gt else math.nan for c in sums[:len(RECALL_THRESHOLDS)].tolist()]
    curve = {"thresholds": [float(t) for t in RECALL_THRESHOLDS], "recall": recall}
    bad_images = [e for b in bad for e in b]
    bad_images = [e for k, e in enumerate(bad_images) if e not in bad_images[:k]]
    add_database_metrics(metrics, curve, num_regions=int(sums[-1]), num_images=int(sums[-2]),
                         bad_items=len(bad_images))
    seconds = time.perf_counter() - started
    # every process ranks its share at once: rank 0's wall time of the whole distributed ranking
    # (scoring, counting, merging), not one index's search as in the gathered evaluation
    costs = {"sharded_ranking_s": round(seconds, 4),
             "search_ms_per_query": round(1000 * seconds / max(len(query_ids), 1), 4),
             "index_bytes_per_image": round(float(sums[-3]) / max(int(sums[-2]), 1), 1),
             "search_rule": "sharded: scoring, counting and merging over processes (rank 0's wall time)"}
    return EvaluationResult(metrics=metrics, run=run, recall_curve=curve, bad_images=bad_images,
                            num_regions=int(sums[-1]), costs=costs)


def _judged_pairs(bench: Benchmark, query_ids: Sequence[str], local_position: np.ndarray) -> _Judged:
    """The (query, local image) pairs the ground truth judges, for images this process ranks: the
    metrics' own rule (:func:`~instsearch.eval.metrics._judged_sets`: database images only, an
    image both positive and junk is junk), matched on the order keys, which for a listed image are
    its database index."""
    from instsearch.eval.metrics import _database_index, _judged_sets

    db_index = _database_index(bench)
    order = np.argsort(local_position, kind="stable")
    keys = local_position[order]
    query, local, is_junk = [], [], []
    for q, qid in enumerate(query_ids):  # a loop over queries; the images are matched by one search each
        positives, junk = _judged_sets(bench.ground_truth.get(qid), db_index)
        for named, junk_flag in ((junk, True), (positives, False)):
            at = np.minimum(np.searchsorted(keys, named), max(len(keys) - 1, 0))
            hit = keys[at] == named if len(keys) else np.zeros(len(named), bool)
            query.append(np.full(int(hit.sum()), q, np.int64))
            local.append(order[at[hit]])
            is_junk.append(np.full(int(hit.sum()), junk_flag))
    if not query:
        return _Judged(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    return _Judged(np.concatenate(query), np.concatenate(local).astype(np.int64), np.concatenate(is_junk))


def _image_boxes(collection, image_ids: Sequence[str]) -> list[torch.Tensor]:
    """The region boxes (original pixels) of each of this process's ``image_ids``."""
    if not isinstance(collection, SpilledCollection):
        return [collection.database[i].boxes for i in image_ids]
    shards = collection.shards()
    wanted = set(image_ids)
    at = {i: k for k, i in enumerate(shards.image_ids) if i in wanted}
    positions = np.array([at[i] for i in image_ids], np.int64)
    regions, _ = image_regions(shards.image_starts, positions)
    boxes = torch.from_numpy(shards.region_boxes(regions))
    lengths = (shards.image_starts[positions + 1] - shards.image_starts[positions]).tolist()
    return list(torch.split(boxes, lengths)) if lengths else []


def _merged_run(query_ids: Sequence[str], listed: int, parts: list, depth: Optional[int], method: str) -> Run:
    """Each query's top ``depth`` images over every process's top images. Equal scores: the order
    one index over all holds them, i.e. the order keys for listed images (below ``listed``), the
    ids for distractors (whose keys only order each process's own)."""
    run = Run(method=method, rankings={})
    for qi, qid in enumerate(query_ids):
        found = [p[qi] for p in parts if len(p) > qi]
        keys = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64)
        scores = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.float32)
        boxes = np.concatenate([f[2] for f in found]) if found else np.zeros((0, 4), np.float32)
        names = [n for f in found for n in f[3]]
        distractor = np.flatnonzero(keys >= listed)
        if len(distractor):
            keys = keys.copy()
            keys[distractor] = listed + np.unique(np.array([names[i] for i in distractor]), return_inverse=True)[1]
        order = np.lexsort((keys, -scores))[:depth]
        run.rankings[qid] = [Hit(names[i], float(scores[i]), tuple(float(v) for v in boxes[i])) for i in order.tolist()]
    return run


def _ranked_positives(query_ids: Sequence[str], name: Callable[[int], str], scored: _Scored, above: np.ndarray,
                      ranking_depth: Optional[int]) -> dict[str, RankedPositives]:
    """Each query's returned positives and their ranks once junk is removed: ``above`` counts
    every image ranked above a pair (junk included, which decides whether it is within
    ``ranking_depth``); the junk images above it are subtracted."""
    out: dict[str, RankedPositives] = {}
    order = np.argsort(scored.query, kind="stable")
    bounds = np.searchsorted(scored.query[order], np.arange(len(query_ids) + 1))
    for q, qid in enumerate(query_ids):
        sel = order[bounds[q]:bounds[q + 1]]
        pos, junk = sel[~scored.junk[sel]], sel[scored.junk[sel]]
        if ranking_depth is not None:
            pos = pos[above[pos] < ranking_depth]
        if not len(pos):
            continue
        junk_above = _ahead(np.broadcast_to(scored.score[junk], (len(pos), len(junk))), scored.position[junk],
                            scored.score[pos], scored.position[pos]) if len(junk) else 0
        ranks = above[pos] - junk_above
        by_rank = np.argsort(ranks, kind="stable")
        pos, ranks = pos[by_rank], ranks[by_rank]
        out[qid] = RankedPositives(ranks.astype(np.int64), [
            Hit(name(p), float(s), tuple(float(v) for v in b))
            for p, s, b in zip(scored.position[pos].tolist(), scored.score[pos].tolist(), scored.box[pos].tolist())])
    return out
