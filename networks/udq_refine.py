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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import faiss
import numpy as np

__all__ = ["KMeansCells", "kmeans_cells", "refine_bfr", "refine_pbr", "refine_cbr", "neighbour_mean"]

Metric = Literal["l2", "ip"]


def _float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _faiss_metric(metric: Metric) -> int:
    return {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}[metric]


def neighbour_mean(features: np.ndarray, neighbours: np.ndarray, num_neighbours: int,
                   exclude_self: bool, row_offset: int = 0) -> np.ndarray:
    """Eqs. 11–12 for a block of rows: ``(f_t + Σ_s f_{P_s}) / (n_t + 1)``.

    ``neighbours`` ``(B, S + 1)`` are faiss search results for rows ``row_offset…row_offset+B-1``
    (``-1`` where fewer were found), ranked nearest first. With ``exclude_self`` the row's own
    index is dropped (or, when it is not among them, the last, so ``S`` remain); otherwise the
    first ``S`` are kept.
    """
    b = len(neighbours)
    rows = np.arange(row_offset, row_offset + b)
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
                      exclude_self: bool, chunk_size: int) -> np.ndarray:
    out = np.empty_like(features)
    k = min(num_neighbours + 1, len(features))
    for start in range(0, len(features), chunk_size):
        block = features[start:start + chunk_size]
        _, neighbours = index.search(block, k)
        out[start:start + len(block)] = neighbour_mean(features, neighbours, num_neighbours,
                                                       exclude_self, start)
    return out


def refine_bfr(features: np.ndarray, num_neighbours: int = 10, metric: Metric = "l2",
               exclude_self: bool = True, chunk_size: int = 4096) -> np.ndarray:
    """Brute-force refinement, Eq. 11: mean of ``f_t`` and its top-``S`` proposals over all of them.

    Exact search (``IndexFlat``), as the name says: ``O(G² d)`` for ``G`` proposals.
    """
    x = _float32(features)
    index = faiss.IndexFlat(x.shape[1], _faiss_metric(metric))
    index.add(x)
    return _refine_by_search(index, x, num_neighbours, exclude_self, chunk_size)


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
