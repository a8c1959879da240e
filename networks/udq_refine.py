"""UDQ feature refinement (Section 3.4): BFR (Eq. 11), PBR (Eq. 12), CBR (Eq. 13).

Before OPQ is refitted at a round boundary, each proposal feature ``f_t`` may be averaged with
similar proposals, a kind of blind relevance feedback (as average query expansion) that gives
cleaner pseudo-labels:

- BFR: ``f̂_t = (f_t + Σ_{s=1..S} f_{P_s}) / (S + 1)``, ``P_s`` the ``s``-th nearest proposal over the
  whole set (S = 10 in the paper);
- PBR: the same, with neighbours restricted to proposals of ``f_t``'s own k-means cell (S = 50);
- CBR: ``f̂_t = (f_t + c(f_t)) / 2``, ``c(f_t)`` the k-means centroid ``f_t`` is assigned to.

Choices the paper leaves open, each a parameter:

- *Similarity.* "Nearest" is taken in the paper's search metric, Euclidean distance (Eq. 2);
  ``metric="ip"`` ranks by inner product instead (cosine on l2-normalised features).
- *Self.* ``f_t`` is its own nearest neighbour; since Eqs. 11–12 add ``f_t`` separately, it is
  excluded from the ``S`` neighbours (``exclude_self=True``). An exact duplicate of ``f_t`` is a
  different proposal and counts.
- *Too few neighbours.* If a k-means cell holds fewer than ``S + 1`` proposals (or the whole set
  fewer than ``S + 1``), all available neighbours are used and the mean divides by their number
  plus one, so a refined feature is always a mean of real features.
- *k-means.* The number of cells is not given; ``n_cells`` is a parameter. Cells come from faiss
  k-means with a seed; a point's cell is its nearest centroid after the last iteration.

All searches are faiss batch searches; the only Python loop is over chunks of rows, which bounds
the ``chunk × S × d`` neighbour gather (1 M proposals × 50 × 300 floats would be 60 GB at once).
PBR searches within cells through an inverted file whose lists are the k-means cells: every
point is listed under its own cell and searched in that list only (``search_preassigned``).

**BFR at scale: exact below 50,000 proposals, an IVF index above.** Exact BFR compares every
proposal with every other, ``O(G² d)``: at the paper's ~1 M proposals (Oxford5K, 5,063 images ×
200 proposals, d = 300) that is about 6·10¹⁴ flops, hours on one core. ``refine_bfr`` therefore
chooses (:func:`bfr_method`; ``method="auto"``):

- ``G < exact_below`` (default 50,000): exact search, ``IndexFlat``, run at the caller's faiss
  thread count (UDQ's module pins it, so exact fits repeat bit for bit);
- ``G ≥ exact_below``: faiss's approximate kNN, an ``IndexIVFFlat`` with ``nlist = round(4 √G)``
  lists (:func:`bfr_ivf_lists`; the count that balances the coarse search, ``G × nlist``, against
  the list scan, ``G × nprobe × G / nlist``, for ``nprobe`` ≈ 16), trained by faiss's seeded k-means
  (10 iterations) on a seeded uniform sample of ``min(G, 40 · nlist)`` proposals, and searched with
  ``nprobe = 32`` lists per proposal. Each proposal is listed under its nearest centroid and
  searches its ``nprobe`` nearest lists, so its own list is always searched and it always finds
  itself. Rows are searched in chunks, in order of their list, so consecutive queries scan the
  same lists while they are in cache; results do not depend on the order.

The IVF path runs on ``threads`` OpenMP threads (default: every core the process may use). For a
fixed seed and thread count it is deterministic; on this project's faiss build its neighbours
were also identical at 1 and 2 threads (tests/test_udq_refine_scale.py).

Measured (``benchmarks/udq_refit_scale.py``, 1 M proposals × 296-D from a two-level Gaussian
mixture on the unit sphere, 2 shared CPU cores): on a seeded sample of 1,000 proposals the IVF
neighbours' recall@10 against exact search was 1.000 (nprobe 8: 0.996, 16: 1.000), every sampled
proposal got exactly its exact refinement (mean cosine 1.000000); BFR took 821 s against about
6,600 s extrapolated for exact search at 1 thread (66 s measured at 100 k proposals, × 100). At
50,000 proposals exact BFR took 9–17 s and the IVF path 5 s, which is where ``auto`` switches.
Real region features may be harder for an inverted file than Gaussian clusters; ``nprobe`` trades
time (the list scan, most of the IVF time, is proportional to it) for recall.

Memory of the IVF path: the index's copy of the features (``G × d`` floats), the probe lists
(``G × nprobe`` int32) and one chunk's gather (4.6 GB peak at 1 M × 296 with the input and output).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Optional, Union

import faiss
import numpy as np

from instsearch.networks.product_quantizer import faiss_threads

__all__ = ["KMeansCells", "kmeans_cells", "refine_bfr", "refine_pbr", "refine_cbr", "neighbour_mean",
           "bfr_method", "bfr_ivf_lists", "BFR_METHODS", "BFR_EXACT_BELOW", "BFR_NPROBE"]

Metric = Literal["l2", "ip"]
BFRMethod = Literal["auto", "exact", "ivf"]
BFR_METHODS = ("auto", "exact", "ivf")
BFR_EXACT_BELOW = 50_000
BFR_NPROBE = 32


def _float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _faiss_metric(metric: Metric) -> int:
    return {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}[metric]


def neighbour_mean(features: np.ndarray, neighbours: np.ndarray, num_neighbours: int,
                   exclude_self: bool, row_offset: int = 0, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Eqs. 11–12 for a block of rows: ``(f_t + Σ_s f_{P_s}) / (n_t + 1)``.

    ``neighbours`` ``(B, S + 1)`` are faiss search results for rows ``row_offset…row_offset+B-1``
    (or for the row indices ``rows`` when given), ``-1`` where fewer were found, ranked nearest
    first. With ``exclude_self`` the row's own index is dropped (or, when it is not among them,
    the last, so ``S`` remain); otherwise the first ``S`` are kept.
    """
    b = len(neighbours)
    rows = np.arange(row_offset, row_offset + b) if rows is None else np.asarray(rows, dtype=np.int64)
    keep = neighbours >= 0
    if exclude_self:
        is_self = neighbours == rows[:, None]
        # a row whose own index was not returned (ties) drops its (S+1)-th neighbour instead
        no_self = ~is_self.any(axis=1)
        is_self[no_self, -1] = True
        keep &= ~is_self
    else:
        keep[:, num_neighbours:] = False
    keep &= np.cumsum(keep, axis=1) <= num_neighbours
    gathered = features[np.where(keep, neighbours, 0)] * keep[:, :, None]
    count = keep.sum(axis=1, keepdims=True)
    return (features[rows] + gathered.sum(axis=1)) / (count + 1)


def _refine_by_search(index: faiss.Index, features: np.ndarray, num_neighbours: int,
                      exclude_self: bool, chunk_size: int,
                      neighbours_out: Optional[np.ndarray] = None) -> np.ndarray:
    out = np.empty_like(features)
    k = min(num_neighbours + 1, len(features))
    for start in range(0, len(features), chunk_size):
        block = features[start:start + chunk_size]
        _, neighbours = index.search(block, k)
        out[start:start + len(block)] = neighbour_mean(features, neighbours, num_neighbours,
                                                       exclude_self, start)
        if neighbours_out is not None:
            neighbours_out[start:start + len(block)] = neighbours
    return out


def bfr_method(num_features: int, method: BFRMethod = "auto", exact_below: int = BFR_EXACT_BELOW) -> str:
    """The search BFR uses for ``num_features`` proposals: ``"exact"`` or ``"ivf"``.

    ``"auto"``: exact below ``exact_below`` proposals, IVF from there on (module docstring).
    """
    if method not in BFR_METHODS:
        raise ValueError(f"BFR method must be one of {BFR_METHODS}, got {method!r}")
    if method == "auto":
        return "exact" if num_features < exact_below else "ivf"
    return method


def bfr_ivf_lists(num_features: int) -> int:
    """Default inverted lists of the IVF path: ``round(4 √G)``, at least 1 and at most ``G``."""
    return max(1, min(num_features, int(round(4 * math.sqrt(num_features)))))


def _all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ivf_refine(x: np.ndarray, num_neighbours: int, metric: Metric, exclude_self: bool, chunk_size: int,
                nlist: Optional[int], nprobe: int, seed: int, train_per_list: int,
                train_iterations: int, neighbours_out: Optional[np.ndarray]) -> np.ndarray:
    g, d = x.shape
    fm = _faiss_metric(metric)
    nlist = max(1, min(g, nlist or bfr_ivf_lists(g)))
    nprobe = max(1, min(nprobe, nlist))
    n_train = min(g, max(nlist, train_per_list * nlist))
    if n_train < g:
        rows = np.sort(np.random.default_rng(seed).choice(g, n_train, replace=False))
        train = x[rows]
    else:
        train = x
    quantizer = faiss.IndexFlat(d, fm)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, fm)
    index.cp.seed = int(seed) % (1 << 31)
    index.cp.niter = train_iterations
    index.cp.max_points_per_centroid = n_train // nlist + 1  # the sample is the training set: no resampling
    index.cp.min_points_per_centroid = 1  # few points per list on small sets is intended: no warning
    index.cp.spherical = metric == "ip"
    index.train(train)
    del train
    # one coarse search for both sides: a proposal is listed under its nearest list and searches
    # its nprobe nearest (which include that one), so it always meets itself
    probes = np.empty((g, nprobe), dtype=np.int32)
    for start in range(0, g, chunk_size):
        probes[start:start + chunk_size] = quantizer.search(x[start:start + chunk_size], nprobe)[1]
    own = np.ascontiguousarray(probes[:, 0], dtype=np.int64)
    index.add_core(g, faiss.swig_ptr(x), None, faiss.swig_ptr(own))
    index.nprobe = nprobe
    index.parallel_mode = 3  # search_preassigned splits queries over threads only in modes 1-3
    order = np.argsort(own, kind="stable")  # queries of one list together: its lists stay in cache
    del own
    out = np.empty_like(x)
    k = min(num_neighbours + 1, g)
    for start in range(0, g, chunk_size):
        rows = order[start:start + chunk_size]
        _, neighbours = index.search_preassigned(x[rows], k, probes[rows].astype(np.int64), None)
        out[rows] = neighbour_mean(x, neighbours, num_neighbours, exclude_self, rows=rows)
        if neighbours_out is not None:
            neighbours_out[rows] = neighbours
    return out


def refine_bfr(features: np.ndarray, num_neighbours: int = 10, metric: Metric = "l2",
               exclude_self: bool = True, chunk_size: int = 4096, *, method: BFRMethod = "auto",
               exact_below: int = BFR_EXACT_BELOW, nlist: Optional[int] = None, nprobe: int = BFR_NPROBE,
               seed: int = 0, threads: Optional[int] = None, train_per_list: int = 40,
               train_iterations: int = 10, return_neighbours: bool = False
               ) -> Union[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Brute-force refinement, Eq. 11: mean of ``f_t`` and its top-``S`` proposals over all of them.

    ``method`` (module docstring, :func:`bfr_method`): ``"exact"`` searches exactly
    (``IndexFlat``, ``O(G² d)``) at the caller's faiss thread count; ``"ivf"`` searches faiss's
    ``IndexIVFFlat`` (``nlist`` lists, default ``round(4 √G)``; ``nprobe`` searched per proposal;
    trained with ``seed`` on ``train_per_list · nlist`` sampled proposals for ``train_iterations``
    k-means iterations) on ``threads`` OpenMP threads (``None``: every core the process may use);
    ``"auto"`` is exact below ``exact_below`` proposals, IVF from there on.

    ``return_neighbours``: also the ``(G, min(S + 1, G))`` neighbour indices the means were taken
    over, as faiss returned them (the row itself included, ``-1`` where fewer were found).
    """
    x = _float32(features)
    chosen = bfr_method(len(x), method, exact_below)
    neighbours = np.empty((len(x), min(num_neighbours + 1, len(x))), np.int64) if return_neighbours else None
    if chosen == "exact":
        index = faiss.IndexFlat(x.shape[1], _faiss_metric(metric))
        index.add(x)
        out = _refine_by_search(index, x, num_neighbours, exclude_self, chunk_size, neighbours)
    else:
        with faiss_threads(threads or _all_cores()):
            out = _ivf_refine(x, num_neighbours, metric, exclude_self, chunk_size, nlist, nprobe, seed,
                              train_per_list, train_iterations, neighbours)
    return (out, neighbours) if return_neighbours else out


@dataclass(frozen=True)
class KMeansCells:
    """k-means of the proposal set: ``centroids`` ``(C, d)`` and each point's cell ``assignment`` ``(G,)``."""

    centroids: np.ndarray
    assignment: np.ndarray


def kmeans_cells(features: np.ndarray, n_cells: int, seed: int = 0, iterations: int = 20,
                 metric: Metric = "l2") -> KMeansCells:
    """faiss k-means (seeded) and the nearest centroid of every feature."""
    x = _float32(features)
    km = faiss.Kmeans(x.shape[1], n_cells, niter=iterations, seed=seed, verbose=False,
                      spherical=(metric == "ip"))
    km.train(x)
    quantizer = faiss.IndexFlat(x.shape[1], _faiss_metric(metric))
    quantizer.add(km.centroids)
    _, assignment = quantizer.search(x, 1)
    return KMeansCells(np.ascontiguousarray(km.centroids), assignment[:, 0].astype(np.int64))


def refine_pbr(features: np.ndarray, n_cells: int, num_neighbours: int = 50, seed: int = 0,
               cells: Optional[KMeansCells] = None, metric: Metric = "l2", exclude_self: bool = True,
               kmeans_iterations: int = 20, chunk_size: int = 4096) -> np.ndarray:
    """Proposal-based refinement, Eq. 12: top-``S`` neighbours among the proposals of ``f_t``'s cell.

    ``cells`` reuses a k-means (then ``n_cells`` and ``seed`` are ignored). The search is an
    inverted file over those cells, each point listed under and searching only its own cell.
    """
    x = _float32(features)
    cells = cells or kmeans_cells(x, n_cells, seed, kmeans_iterations, metric)
    d, c = x.shape[1], len(cells.centroids)
    quantizer = faiss.IndexFlat(d, _faiss_metric(metric))
    quantizer.add(_float32(cells.centroids))
    index = faiss.IndexIVFFlat(quantizer, d, c, _faiss_metric(metric))
    index.is_trained = True
    # list each point under its given cell, so search and assignment can never disagree
    index.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(cells.assignment))
    out = np.empty_like(x)
    k = min(num_neighbours + 1, len(x))
    for start in range(0, len(x), chunk_size):
        block = x[start:start + chunk_size]
        assign = cells.assignment[start:start + len(block)].reshape(-1, 1)
        coarse_dist = np.zeros(assign.shape, dtype=np.float32)
        _, neighbours = index.search_preassigned(block, k, assign, coarse_dist)
        out[start:start + len(block)] = neighbour_mean(x, neighbours, num_neighbours, exclude_self, start)
    return out


def refine_cbr(features: np.ndarray, n_cells: int, seed: int = 0, cells: Optional[KMeansCells] = None,
               metric: Metric = "l2", kmeans_iterations: int = 20) -> np.ndarray:
    """Centre-based refinement, Eq. 13: ``(f_t + c(f_t)) / 2`` with ``c(f_t)`` its k-means centroid."""
    x = _float32(features)
    cells = cells or kmeans_cells(x, n_cells, seed, kmeans_iterations, metric)
    return (x + cells.centroids[cells.assignment]) / 2
