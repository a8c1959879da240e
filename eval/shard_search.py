"""Two-stage search over region shards: an ANN shortlist of images, then exact best-region scores.

Stage 1 asks a region index (any :class:`~instsearch.eval.searchers.Searcher`; for shards, the
faiss index ``instsearch index build`` wrote, ids = region ids of the shards) for the best
regions of each query, growing ``k`` until ``shortlist`` distinct images appear -- as
:class:`~instsearch.eval.search.RegionIndex` does in memory.

Stage 2 reads **every** region of every shortlisted image from the memory-mapped shards and
scores it exactly against the query (inner product, or ``1 / ‖q − x‖`` for an L2 index), so each
returned image's score and box are those of its exact best region. The one approximation left is
whether the shortlist holds the images an exact search would rank first (its recall, measured in
``docs/scale.md``). With a flat index and a shortlist of every image the result is the exact
search of ``instsearch test``.

Memory: the shards' per-image offsets (8 bytes an image), one batch of queries' candidate rows,
and the index (on-disk inverted lists for a large IVF index) -- not the database.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from instsearch.eval.search import ImageRanking, best_region_per_image
from instsearch.eval.searchers import FaissSearcher, Searcher
from instsearch.eval.shards import RegionShards
from instsearch.formats import Hit, Run


@dataclass
class StageTimes:
    """Seconds spent in each stage (summed over query batches)."""

    ann: float = 0.0
    rescoring: float = 0.0
    #: the largest ``k`` (regions per query) the ANN stage asked the index for
    ann_k: int = 0


def region_images(shards: RegionShards, region_ids: np.ndarray) -> np.ndarray:
    """The image position of each region id (``-1`` stays ``-1``)."""
    flat = np.asarray(region_ids).ravel()
    # numpy's binary search starts from the previous key's answer when keys ascend: sorting the
    # ids first makes the lookup ~3x faster than searching them in the ANN's order
    order = np.argsort(flat)
    images = np.empty(flat.shape, np.int64)
    images[order] = np.searchsorted(shards.image_starts, flat[order], side="right") - 1
    return np.where(flat >= 0, images, -1).reshape(np.shape(region_ids))


def shortlist_images(searcher: Searcher, shards: RegionShards, queries: np.ndarray,
                     shortlist: int, times: Optional[StageTimes] = None) -> list[np.ndarray]:
    """Stage 1: for each query, up to ``shortlist`` image positions, best region first, from the
    region searcher; ``k`` grows until that many distinct images are found, every region is
    asked for, or the index pads the row with ``-1`` (an inverted file has returned every region
    of the lists it visits: a larger ``k`` finds nothing more)."""
    if shortlist < 1:
        raise ValueError(f"shortlist must be >= 1 image per query, got {shortlist}")
    total, num_images = searcher.ntotal, len(shards.image_ids)
    wanted = min(shortlist, num_images)
    k = min(total, max(4 * wanted, 64))
    pending = np.arange(len(queries))
    found: list[Optional[np.ndarray]] = [None] * len(queries)
    while len(pending):
        scores, ids = searcher.search(queries[pending], k)
        if times is not None:
            times.ann_k = max(times.ann_k, k)
        # region -> image by the shards' offsets; the reduction keeps each image's first hit
        image_of = region_images(shards, np.where(ids >= 0, ids, 0))
        rankings = _first_hits(scores, ids, image_of)
        retry, fewest = [], wanted
        exhausted = (ids < 0).any(axis=1)
        for row, images, done in zip(pending, rankings, exhausted):
            if len(images) >= wanted or k >= total or done:
                found[int(row)] = images[:wanted]
            else:
                retry.append(row)
                fewest = min(fewest, len(images))
        pending = np.asarray(retry, dtype=np.int64)
        k = min(total, max(2 * k, int(np.ceil(1.5 * k * wanted / max(fewest, 1)))))
    return found  # type: ignore[return-value]


def _first_hits(scores: np.ndarray, ids: np.ndarray, image_of: np.ndarray) -> list[np.ndarray]:
    """Each query's distinct images in order of their first (best) hit."""
    flat_index = np.where(ids >= 0, np.arange(ids.size).reshape(ids.shape), -1)
    # best_region_per_image works on "regions" 0..n-1 with an image per region: give it each hit
    # as its own region, owned by the hit's image
    owner = np.where(ids >= 0, image_of, 0).reshape(-1)
    rankings = best_region_per_image(scores, flat_index, owner, int(owner.max()) + 1 if owner.size else 1)
    return [r.images for r in rankings]


#: floats of one query chunk's score matrix in rescoring (16 MB): chunks of a few queries against
#: the union of their candidates' rows
RESCORE_SCORES = 1 << 22


def image_regions(starts: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The region ids of ``images`` (each image's regions in order, images in the given order)
    and each region's position within its image."""
    lengths = starts[images + 1] - starts[images]
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts[images], lengths) + within, within


def rescore(shards: RegionShards, queries: np.ndarray, candidates: Sequence[np.ndarray],
            score: str = "inner_product", max_scores: int = RESCORE_SCORES) -> list[ImageRanking]:
    """Stage 2: every region of each query's candidate images scored exactly; each image's best
    region (its score and region id), images best first.

    Scores are one dense float32 product per chunk of queries against the rows of the images
    they shortlisted (torch, as the exact in-memory searcher computes them: with every image
    shortlisted and the same chunking, the two give the same bits); a chunk holds at most
    ``max_scores`` scores. Rows are gathered per image, never deduplicated region by region."""
    import torch

    if score not in ("inner_product", "inverse_l2"):
        raise ValueError(f"unknown score {score!r}: inner_product or inverse_l2")
    starts = shards.image_starts
    empty = np.zeros(0, np.int64)
    images = np.concatenate(candidates).astype(np.int64) if len(candidates) else empty
    lengths = starts[images + 1] - starts[images]
    pair_query = np.repeat(np.repeat(np.arange(len(candidates)), [len(c) for c in candidates]), lengths)
    pair_image = np.repeat(images, lengths)
    pair_region, within = image_regions(starts, images)
    values = np.empty(len(pair_region), np.float32)
    distinct = np.unique(images)
    union = max(int((starts[distinct + 1] - starts[distinct]).sum()), 1)
    chunk = max(1, min(len(candidates), max_scores // union)) if len(candidates) else 1
    bounds = np.searchsorted(pair_query, np.arange(0, len(candidates) + chunk, chunk))
    for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if a == b:
            continue
        chunk_images = np.unique(pair_image[a:b])
        rows_needed, _ = image_regions(starts, chunk_images)
        first_row = np.cumsum(starts[chunk_images + 1] - starts[chunk_images]) - (starts[chunk_images + 1] - starts[chunk_images])
        where = first_row[np.searchsorted(chunk_images, pair_image[a:b])] + within[a:b]
        q = torch.from_numpy(np.ascontiguousarray(queries[c * chunk:(c + 1) * chunk]))
        x = torch.from_numpy(shards.rows(rows_needed))
        if score == "inner_product":
            s = q @ x.T
        else:  # 1 / ||q - x||, the order of an L2 index (nearest first)
            # the differences themselves, not ||q||^2 + ||x||^2 - 2 q.x (cdist's matrix-product
            # path above 25 rows), which cancels catastrophically for close, long vectors
            s = 1.0 / torch.cdist(q, x, compute_mode="donot_use_mm_for_euclid_dist").clamp_min(1e-12)
        values[a:b] = s[torch.from_numpy(pair_query[a:b] - c * chunk), torch.from_numpy(where)].numpy()
    # Pairs come grouped by (query, candidate image), each image's regions in id order: the best
    # region of a group is its maximum, the first one among equal scores (the lower region id, as
    # the in-memory search's first hit).
    lengths = lengths[lengths > 0]
    group_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if len(group_start):
        best = np.maximum.reduceat(values, group_start)
        is_best = values == np.repeat(best, lengths)
        first = np.minimum.reduceat(np.where(is_best, np.arange(len(values)), len(values)), group_start)
    else:
        best, first = np.zeros(0, np.float32), np.zeros(0, np.int64)
    q, img, reg = pair_query[first], pair_image[first], pair_region[first]
    # images best first within each query; equal scores: the lower best-region id first
    order = np.lexsort((reg, -best, q))
    q, img, reg, val = q[order], img[order], reg[order], best[order]
    edges = np.searchsorted(q, np.arange(len(candidates) + 1))
    return [ImageRanking(img[a:b], val[a:b], reg[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def search_shards(searcher: Searcher, shards: RegionShards, query_ids: Sequence[str], queries: np.ndarray,
                  shortlist: Optional[int] = 100, method: str = "regions", batch_size: int = 256,
                  times: Optional[StageTimes] = None) -> Run:
    """Both stages for every query, as a :class:`Run` (each hit: image, exact best-region score and
    box). ``shortlist=None`` ranks every image with a region (exact with a flat index)."""
    import time

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    times = times if times is not None else StageTimes()
    wanted = len(shards.image_ids) if shortlist is None else int(shortlist)
    rankings: list[ImageRanking] = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        t0 = time.perf_counter()
        candidates = shortlist_images(searcher, shards, batch, wanted, times) if searcher.ntotal else [
            np.zeros(0, np.int64) for _ in batch]
        t1 = time.perf_counter()
        rankings += rescore(shards, batch, candidates, score=searcher.score)
        times.ann += t1 - t0
        times.rescoring += time.perf_counter() - t1
    hit_regions = np.concatenate([r.regions for r in rankings]) if rankings else np.zeros(0, np.int64)
    boxes = shards.region_boxes(hit_regions)
    ids, out, at = shards.image_ids, {}, 0
    for qid, r in zip(query_ids, rankings):
        n = len(r.images)
        out[qid] = [Hit(ids[i], float(s), tuple(float(v) for v in b))
                    for i, s, b in zip(r.images.tolist(), r.scores.tolist(), boxes[at:at + n].tolist())]
        at += n
    return Run(method=method, rankings=out)


# ------------------------------------------------------------------------------ nprobe from the queries
@dataclass
class NprobeTuning:
    """How ``nprobe: auto`` chose the inverted lists to visit (recorded in ``metrics.json``)."""

    nprobe: int
    #: ``(nprobe, recall@depth)`` of each step tried, in order
    steps: list[tuple[int, float]]
    queries: int
    depth: int
    tolerance: float
    seconds: float

    def as_dict(self) -> dict:
        return {"rule": "auto", "nprobe": self.nprobe, "steps": [[n, round(r, 5)] for n, r in self.steps],
                "queries": self.queries, "depth": self.depth, "tolerance": self.tolerance,
                "seconds": round(self.seconds, 2)}


def tune_nprobe_on_queries(searcher: Searcher, shards: RegionShards, queries: np.ndarray, shortlist: Optional[int],
                           depth: int = 100, tolerance: float = 1e-3, sample: int = 100, seed: int = 0
                           ) -> NprobeTuning:
    """``nprobe: auto``: visit more inverted lists until it stops paying, judged on the queries
    themselves, without labels.

    A sample of ``sample`` queries is ranked exactly (streamed over the shards: their top
    ``depth`` images by best region). Starting from the searcher's nprobe (the index's stored,
    database-sample estimate), nprobe doubles while the two-stage search's top ``depth`` images
    gain at least ``tolerance`` of recall against that exact ranking; the nprobe before the first
    smaller gain is chosen (or the first that finds every image, or every list).

    Why not a recall target: once the lists hold a query's neighbours, what the shortlist misses
    is decided by the codes' (PQ) order, so recall plateaus below 1 at a level that depends on the
    code, and a fixed target is either unreachable or too lax. Relevant images far from the query
    -- hard positives, in lists the query's neighbours are not in -- keep being found as lists are
    added; stopping where the gain flattens visits their lists too (docs/scale.md, section 5,
    measures mAP@100 against exact search at the chosen nprobe). Inner-product indexes only (the
    exact ranking is by inner product)."""
    import time

    import faiss

    from instsearch.eval.streamed import exact_image_ranking

    if searcher.score != "inner_product":
        raise ValueError("nprobe auto compares with the exact inner-product ranking; this index scores by "
                         f"{searcher.score}: give --nprobe N")
    ivf = faiss.try_extract_index_ivf(searcher.index) if isinstance(searcher, FaissSearcher) else None
    if ivf is None:
        raise ValueError("nprobe auto tunes an inverted-file (IVF) index; this index has no inverted lists")
    t0 = time.perf_counter()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(queries), size=min(int(sample), len(queries)),
                                                      replace=False))
    q = queries[rows]
    num_images = len(shards.image_ids)
    wanted = num_images if shortlist is None else min(int(shortlist), num_images)
    depth = max(1, min(int(depth), wanted))
    exact = exact_image_ranking(shards, q, depth).images
    relevant = max(int((exact >= 0).sum()), 1)

    def recall(nprobe: int) -> float:
        ivf.nprobe = int(nprobe)
        found = rescore(shards, q, shortlist_images(searcher, shards, q, wanted), score=searcher.score)
        hits = sum(len(np.intersect1d(f.images[:depth], e[e >= 0])) for f, e in zip(found, exact))
        return hits / relevant

    start = max(1, int(ivf.nprobe))
    steps = [(start, recall(start))]
    chosen = start
    while True:
        n, r = steps[-1]
        if r >= 1.0 or n >= ivf.nlist:
            chosen = n
            break
        nxt = min(2 * n, int(ivf.nlist))
        steps.append((nxt, recall(nxt)))
        if steps[-1][1] - r < tolerance:
            chosen = n
            break
    ivf.nprobe = searcher.nprobe = chosen
    return NprobeTuning(chosen, steps, len(rows), depth, float(tolerance), time.perf_counter() - t0)
