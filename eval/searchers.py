"""Searchers: the nearest-neighbour engines behind :class:`~instsearch.eval.search.RegionIndex`.

A :class:`Searcher` holds region vectors and answers ``search(queries, k)`` with the ``k`` best
regions per query, **higher score = better**, best first -- the one contract the image-level
search (:mod:`instsearch.eval.search`) relies on. Which searcher a model is searched with is the
model's choice (``RegionSearchModule.make_searcher``): the retrieval settings' ``index_factory``
for most methods, a product quantiser's own codebooks for a quantising method (UDQ's asymmetric
distance). ``eval`` itself knows no method.

Implementations:

* :class:`ExactInnerProductSearcher` -- exact cosine / inner product as a torch matrix product and
  ``topk``, on the CPU or a GPU (``index_factory: Flat``, the default).
* :class:`FaissSearcher` -- any faiss index. Inner-product indexes score by similarity, L2 indexes
  by the inverse distance ``1 / ‖q − x‖`` (nearest first either way). Built by
  :meth:`FaissSearcher.from_factory` (a factory string, trained on the first ``add``),
  :meth:`FaissSearcher.exact_l2` or :meth:`FaissSearcher.adc` (a trained, empty product-quantiser
  index whose codebooks come from a model: asymmetric distance computation).

A searcher saves itself as one faiss file (an exact torch searcher as the equivalent
``IndexFlatIP``), and :func:`load_searcher` reads any of them back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import faiss
import numpy as np
import torch

__all__ = ["Searcher", "ExactInnerProductSearcher", "FaissSearcher", "searcher_from_factory", "load_searcher",
           "searcher_bytes"]


@runtime_checkable
class Searcher(Protocol):
    """Region vectors and a ``k``-best search over them (scores: higher is better)."""

    #: ``"inner_product"`` (score = similarity) or ``"inverse_l2"`` (score = 1 / L2 distance)
    score: str
    #: whether the database is searched from the searcher's codes alone: the region index then
    #: drops the features (4·D bytes per region), and nothing that needs them (category pruning's
    #: exact sub-indexes) is offered
    codes_only: bool

    @property
    def ntotal(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def add(self, features: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(Q, k)``, best first; ``ids`` ``-1`` where fewer exist."""

    def save(self, path: str | Path) -> None: ...


def _float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def ties_by_id(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``(scores, ids)`` (best first) with equal scores ordered by id, the lower first.

    ``topk`` and faiss's heaps leave the order of equal scores unspecified; fixing it makes an
    image's best region among equal ones the earliest stored, whichever engine ranked it (the
    two-stage search over shards breaks ties the same way). Only rows holding a tie are re-sorted.
    """
    if scores.shape[1] < 2:
        return scores, ids
    tied = np.flatnonzero((scores[:, 1:] == scores[:, :-1]).any(axis=1))
    if len(tied):  # common with quantised (PQ) scores: one sort over the tied rows together
        scores, ids = scores.copy(), ids.copy()
        s, i = scores[tied], ids[tied]
        valid = i >= 0
        # per row: real hits before padding, best score first, then the lower id; padding (equal
        # keys) keeps its order, the sort being stable
        order = np.lexsort((np.where(valid, i, 0), np.where(valid, -s, 0), ~valid), axis=-1)
        scores[tied] = np.take_along_axis(s, order, axis=1)
        ids[tied] = np.take_along_axis(i, order, axis=1)
    return scores, ids


class ExactInnerProductSearcher:
    """Exact inner-product search with torch: ``scores = Q Fᵀ`` then ``topk``, on any device.

    On a 2-core CPU it answers 3-4x more queries per second than faiss's flat index for the same
    ranking (``benchmarks/search_throughput.py``). Queries are scored in chunks so that one chunk's
    score matrix stays under ``max_scores`` floats.
    """

    score = "inner_product"
    codes_only = False

    def __init__(self, dim: int, device: torch.device | str = "cpu", max_scores: int = 1 << 25):
        self.device = torch.device(device)
        self.features = torch.zeros(0, int(dim), device=self.device)
        self.max_scores = int(max_scores)

    @property
    def ntotal(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def add(self, features: np.ndarray) -> None:
        rows = torch.from_numpy(_float32(features)).to(self.device)
        self.features = rows if not self.ntotal else torch.cat([self.features, rows])

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(_float32(queries)).to(self.device)
        k = min(int(k), self.ntotal)
        chunk = max(1, self.max_scores // max(self.ntotal, 1))
        scores, ids = [], []
        for start in range(0, len(q), chunk):
            s, i = torch.topk(q[start:start + chunk] @ self.features.T, k, dim=1, largest=True, sorted=True)
            scores.append(s.cpu())
            ids.append(i.cpu())
        if not scores:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return ties_by_id(torch.cat(scores).numpy(), torch.cat(ids).numpy().astype(np.int64))

    def save(self, path: str | Path) -> None:
        index = faiss.IndexFlatIP(self.dim)
        if self.ntotal:
            index.add(self.features.cpu().numpy())
        faiss.write_index(index, str(path))


class FaissSearcher:
    """Any faiss index as a :class:`Searcher`.

    An inner-product index's scores are its similarities; an L2 index's (faiss returns squared
    distances, nearest first) become ``1 / ‖q − x‖`` -- the same order, higher is better -- which is
    also how UDQ scores a proposal (its Eq. 5, with ``x`` the product-quantised feature).
    """

    def __init__(self, index: faiss.Index, codes_only: bool = False, nprobe: int | None = None, eps: float = 1e-12):
        if index.metric_type not in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
            raise ValueError(f"a searcher needs an inner-product or L2 faiss index, got metric {index.metric_type}")
        self.index = index
        self.score = "inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "inverse_l2"
        self.codes_only = bool(codes_only)
        self.eps = float(eps)
        ivf = faiss.try_extract_index_ivf(index)  # behind an OPQ rotation, an id map, ...; else None
        if nprobe is not None and ivf is not None:
            ivf.nprobe = int(nprobe)
        #: inverted lists visited per query (``None``: not an inverted-file index)
        self.nprobe = int(ivf.nprobe) if ivf is not None else None

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_factory(cls, dim: int, key: str, nprobe: int = 16) -> "FaissSearcher":
        """``faiss.index_factory(dim, key)`` over inner product (``IVF…``, ``PQ…``, ``OPQ…``, ``HNSW…``),
        trained on the vectors of the first :meth:`add` when it needs training. The region features
        are kept beside it (category pruning searches them exactly)."""
        return cls(faiss.index_factory(int(dim), key, faiss.METRIC_INNER_PRODUCT), nprobe=nprobe)

    @classmethod
    def exact_l2(cls, dim: int) -> "FaissSearcher":
        """Exact L2 search scored by inverse distance (faiss ``IndexFlatL2``)."""
        return cls(faiss.IndexFlatL2(int(dim)))

    @classmethod
    def adc(cls, index: faiss.Index) -> "FaissSearcher":
        """Asymmetric distance search through a trained, empty L2 product-quantiser index whose
        codebooks come from a model (e.g. ``OPQCodebook.to_faiss_index()``): the database is encoded
        by the model's quantiser, not by one fitted on it."""
        if index.metric_type != faiss.METRIC_L2:
            raise ValueError("an ADC searcher wraps an L2 faiss index (e.g. OPQCodebook.to_faiss_index())")
        if not index.is_trained:
            raise ValueError("an ADC searcher needs a trained index: its codebooks come from the model")
        if index.ntotal:
            raise ValueError(f"an ADC searcher encodes the database itself; this index already holds {index.ntotal} "
                             f"vectors (load a saved one with load_searcher)")
        return cls(index, codes_only=True)

    # -- the protocol ----------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def add(self, features: np.ndarray) -> None:
        if not len(features):
            return
        features = _float32(features)
        if not self.index.is_trained:
            self.index.train(features)
        self.index.add(features)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(_float32(queries), int(k))
        if self.score == "inverse_l2":
            scores = 1.0 / np.sqrt(np.maximum(scores, self.eps))
        return ties_by_id(scores.astype(np.float32, copy=False), ids)

    def save(self, path: str | Path) -> None:
        faiss.write_index(self.index, str(path))


def searcher_bytes(searcher: Searcher) -> int:
    """What a searcher holds for its database, in bytes: the float32 features of the exact
    searcher, the serialised faiss index (codes, ids, codebooks) otherwise."""
    if isinstance(searcher, ExactInnerProductSearcher):
        return int(searcher.features.numel() * searcher.features.element_size())
    if isinstance(searcher, FaissSearcher):
        return int(faiss.serialize_index(searcher.index).nbytes)
    return 0


def searcher_from_factory(key: str, dim: int, device: torch.device | str = "cpu", nprobe: int = 16) -> Searcher:
    """``"Flat"``: :class:`ExactInnerProductSearcher` on ``device``; any other faiss factory string:
    :meth:`FaissSearcher.from_factory`."""
    if key == "Flat":
        return ExactInnerProductSearcher(dim, device=device)
    return FaissSearcher.from_factory(max(int(dim), 1), key, nprobe=nprobe)  # faiss needs d >= 1 (empty database)


def load_searcher(path: str | Path, score: str) -> FaissSearcher:
    """A searcher from the faiss file :meth:`Searcher.save` wrote; ``score`` is the one it was
    saved with (``inner_product`` or ``inverse_l2``), checked against the file's metric. It answers
    from what the file holds (no region features come with it)."""
    searcher = FaissSearcher(faiss.read_index(str(path)), codes_only=True)
    if searcher.score != score:
        raise ValueError(f"{path}: a {searcher.score} index, but it was saved as {score!r}")
    return searcher
