"""Search over region features: image score = its best region, returned box = that region's box.

Every method's database side ends up as one :class:`RegionStore` (features, owning image, box,
score, label of every region, concatenated). :class:`RegionIndex` puts the features in a searcher
and answers a batch of queries with a ranking of *images*:

1. the searcher returns, per query, the top ``k`` regions (by inner product -- cosine for
   l2-normalised features -- or another score where higher is better), best first;
2. the first time an image appears in that list is its best region, so image scores and boxes
   are read off with one ``np.unique`` over ``(query, image)`` keys - no loop over regions;
3. if fewer than the wanted number of distinct images came back, ``k`` grows for those queries
   only, by the images-per-region rate just observed (at least ×2). With ``k`` = all regions the ranking is exact and complete.

The ranking of the images that appear is exact whatever ``k``: if any region of an image is in
the top ``k``, its best region is too (it scores at least as high).

The regions' vectors live in a :class:`~instsearch.eval.searchers.Searcher` (exact inner product
with torch by default, any faiss index, or a model's product quantiser): the model chooses it,
this module only reduces its region hits to images.

Category pruning (FCIS+XD, Zhan & Zhao): with ``prune_by_label`` a query is compared only with the
regions whose predicted label equals the query's; one sub-index per label is built lazily.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from instsearch.eval.searchers import ExactInnerProductSearcher, Searcher, load_searcher
from instsearch.formats import Hit, Run
from instsearch.structures import Regions


@dataclass
class RegionStore:
    """All database regions, concatenated. ``image_index[r]`` is the position of region r's image."""

    image_ids: list[str]
    features: np.ndarray  # (M, D) float32, C-contiguous
    image_index: np.ndarray  # (M,) int64
    boxes: np.ndarray  # (M, 4) float32
    scores: np.ndarray  # (M,) float32
    labels: Optional[np.ndarray] = None  # (M,) int64

    @classmethod
    def from_regions(cls, image_ids: Sequence[str], regions: Sequence[Regions]) -> "RegionStore":
        if len(image_ids) != len(regions):
            raise ValueError(f"{len(image_ids)} image ids for {len(regions)} region sets")
        dims = {int(r.features.shape[1]) for r in regions if r.features is not None and len(r)}
        if len(dims) > 1:
            raise ValueError(f"regions have features of different sizes: {sorted(dims)}")
        dim = dims.pop() if dims else 0
        counts = np.array([len(r) for r in regions], dtype=np.int64)
        if any(r.features is None for r in regions if len(r)):
            raise ValueError("every database region needs a feature")

        def cat(name: str, width: int | None, dtype) -> np.ndarray:
            parts = [getattr(r, name).detach().cpu().numpy() for r in regions if len(r)]
            if not parts:  # no region at all (e.g. an untrained detector): still (0, width)
                return np.zeros((0, width) if width is not None else (0,), dtype=dtype)
            return np.ascontiguousarray(np.concatenate(parts).astype(dtype, copy=False))

        has_labels = len(regions) > 0 and all(r.labels is not None for r in regions if len(r))
        return cls(
            image_ids=list(image_ids),
            features=cat("features", dim, np.float32),
            image_index=np.repeat(np.arange(len(regions), dtype=np.int64), counts),
            boxes=cat("boxes", 4, np.float32),
            scores=cat("scores", None, np.float32),
            labels=cat("labels", None, np.int64) if has_labels else None,
        )

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


@dataclass
class ImageRanking:
    """One query's ranking: positions into ``RegionStore.image_ids`` and the winning regions."""

    images: np.ndarray  # (n,) int64, best first
    scores: np.ndarray  # (n,) float32
    regions: np.ndarray  # (n,) int64, the best region of each image (its box is the localisation)


#: up to this many (query, image) pairs, duplicates are found with a dense scatter (8 bytes each)
DENSE_KEYS = 1 << 24
#: ... and only while the table is at most this many times the hits: a shortlist of a few hundred
#: hits per query over a million images would otherwise clear megabytes per batch for kilobytes
DENSE_PER_HIT = 16


def best_region_per_image(distances: np.ndarray, region_ids: np.ndarray, image_index: np.ndarray,
                          num_images: int) -> list[ImageRanking]:
    """Reduce per-query region hits (sorted best first, -1 = padding) to per-query image rankings."""
    nq, k = region_ids.shape
    valid = region_ids >= 0
    q = np.broadcast_to(np.arange(nq, dtype=np.int64)[:, None], (nq, k))[valid]
    regions = region_ids[valid]
    scores = distances[valid]
    images = image_index[regions]
    # Row-major flattening keeps each query's hits best first, so the first occurrence of a
    # (query, image) key is that image's best region, and keeping first occurrences in their
    # flattened order leaves every query's images best first: no sort by score is needed.
    keys = q * num_images + images
    positions = np.arange(len(keys))
    if nq * num_images <= min(DENSE_KEYS, DENSE_PER_HIT * max(len(keys), 1)):
        # one scatter: writing positions in reverse, the last write to a key is its first hit
        first_of = np.empty(nq * num_images, dtype=np.int64)
        first_of[keys[::-1]] = positions[::-1]
        first = positions[first_of[keys] == positions]
    else:
        _, first = np.unique(keys, return_index=True)
        first.sort()
    q, images, regions, scores = q[first], images[first], regions[first], scores[first]
    bounds = np.searchsorted(q, np.arange(nq + 1))
    return [ImageRanking(images[a:b], scores[a:b].astype(np.float32), regions[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])]


class RegionIndex:
    """A :class:`RegionStore` in a :class:`~instsearch.eval.searchers.Searcher`, answering image-level queries.

    The searcher is the model's choice (``RegionSearchModule.make_searcher``; default: exact inner
    product on ``device``); an empty one is filled with the store's features here, a filled one
    (:meth:`load`) must hold the store's regions in order. A searcher that answers from its codes
    alone (``codes_only``, e.g. UDQ's product quantiser) leaves the store without features.
    Category-pruning sub-indexes are exact inner product over the store's features.
    """

    def __init__(self, store: RegionStore, searcher: Optional[Searcher] = None, device: torch.device | str = "cpu"):
        self.device = device
        self.searcher = searcher if searcher is not None else ExactInnerProductSearcher(store.dim, device=device)
        if self.searcher.ntotal == 0 and len(store):
            self.searcher.add(store.features)
        if self.searcher.ntotal != len(store):
            raise ValueError(f"the searcher holds {self.searcher.ntotal} vectors for a store of {len(store)} regions")
        self.dim = self.searcher.dim
        if len(store) and store.features.shape[1] and store.dim != self.dim:
            raise ValueError(f"the store's features are {store.dim}-D, the searcher's {self.dim}-D")
        # the codes are all the search needs: do not keep 4·D bytes per region alive
        self.store = replace(store, features=np.zeros((len(store), 0), np.float32)) if self.searcher.codes_only else store
        self._label_indexes: dict[int, tuple[ExactInnerProductSearcher, np.ndarray]] = {}

    # -- writing and reloading -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the searchable database to ``directory``: ``index.faiss`` (the searcher's own file)
        and ``regions.npz`` (image ids, owning image, box, score and label of every region).
        :meth:`load` searches it again without the network or the region features -- for a
        product quantiser the codes are all that is kept."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.searcher.save(directory / "index.faiss")
        s = self.store
        extra = {} if s.labels is None else {"labels": s.labels}
        np.savez(directory / "regions.npz", format=np.array("instsearch-region-index/1"),
                 kind=np.array(self.searcher.score), dim=np.array(self.dim),
                 image_ids=np.array(s.image_ids, dtype=str), image_index=s.image_index,
                 boxes=s.boxes, scores=s.scores, **extra)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "RegionIndex":
        """A :class:`RegionIndex` from what :meth:`save` wrote (searchable; no category pruning,
        whose sub-indexes need the features)."""
        directory = Path(directory)
        files = directory / "index.faiss", directory / "regions.npz"
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"not a saved region index: missing {', '.join(missing)} (expected index.faiss "
                                    f"and regions.npz as written by RegionIndex.save)")
        with np.load(files[1], allow_pickle=False) as z:
            if str(z["format"]) != "instsearch-region-index/1":
                raise ValueError(f"{files[1]}: format {str(z['format'])!r}, expected 'instsearch-region-index/1'")
            kind, dim = str(z["kind"]), int(z["dim"])
            store = RegionStore(image_ids=[str(i) for i in z["image_ids"]],
                                features=np.zeros((len(z["image_index"]), 0), np.float32),
                                image_index=z["image_index"].astype(np.int64), boxes=z["boxes"].astype(np.float32),
                                scores=z["scores"].astype(np.float32),
                                labels=z["labels"].astype(np.int64) if "labels" in z else None)
        searcher = load_searcher(files[0], kind)
        if searcher.ntotal != len(store) or searcher.dim != dim:
            raise ValueError(f"{files[0]} holds {searcher.ntotal} vectors of {searcher.dim}-D but {files[1]} "
                             f"lists {len(store)} regions of {dim}-D")
        return cls(store, searcher)

    def _label_index(self, label: int) -> tuple[ExactInnerProductSearcher, np.ndarray]:
        if label not in self._label_indexes:
            members = np.flatnonzero(self.store.labels == label)
            sub = ExactInnerProductSearcher(self.store.dim, device=self.device)
            sub.add(self.store.features[members])
            self._label_indexes[label] = (sub, members)
        return self._label_indexes[label]

    def search(self, queries: np.ndarray | torch.Tensor, top_images: int | None = None,
               query_labels: Sequence[int] | np.ndarray | None = None, prune_by_label: bool = False,
               batch_size: int = 256) -> list[ImageRanking]:
        """Rank database images for each query feature row.

        ``top_images=None`` ranks every image that has a region (exact, complete ranking).
        """
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().cpu().numpy()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2:
            raise ValueError(f"queries must be (Q, D), got shape {queries.shape}")
        if len(self.store) and queries.shape[1] != self.dim:
            raise ValueError(f"query features are {queries.shape[1]}-D, database regions {self.dim}-D")
        if prune_by_label:
            if self.store.labels is None or query_labels is None:
                raise ValueError("category pruning needs labels on the database regions and the queries")
            if len(self.store) and self.store.features.shape[1] == 0:
                raise ValueError("category pruning searches the region features, which a searcher that answers from "
                                 "codes alone (a product quantiser, a reloaded index) does not keep")
            if self.searcher.score != "inner_product":
                raise ValueError(f"category pruning ranks by inner product; this index scores by {self.searcher.score}")
            query_labels = np.asarray(query_labels, dtype=np.int64)
            results: list[ImageRanking | None] = [None] * len(queries)
            for label in np.unique(query_labels):  # loop over categories, not regions
                rows = np.flatnonzero(query_labels == label)
                index, members = self._label_index(int(label))
                for row, ranking in zip(rows, self._search_index(index, members, queries[rows], top_images, batch_size)):
                    results[row] = ranking
            return results  # type: ignore[return-value]
        return self._search_index(self.searcher, None, queries, top_images, batch_size)

    def _search_index(self, index, members: np.ndarray | None, queries: np.ndarray,
                      top_images: int | None, batch_size: int) -> list[ImageRanking]:
        total = index.ntotal
        num_images = len(self.store.image_ids)
        if total == 0:
            empty = ImageRanking(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
            return [empty for _ in range(len(queries))]
        image_index = self.store.image_index if members is None else self.store.image_index[members]
        wanted = min(top_images, num_images) if top_images is not None else num_images
        out: list[ImageRanking] = []
        for start in range(0, len(queries), batch_size):
            batch = queries[start:start + batch_size]
            k = total if top_images is None else min(total, max(4 * wanted, 64))
            pending = np.arange(len(batch))
            found: dict[int, ImageRanking] = {}
            while len(pending):
                distances, ids = index.search(batch[pending], k)
                rankings = best_region_per_image(distances, ids, image_index, num_images)
                retry, fewest = [], wanted
                for row, ranking in zip(pending, rankings):
                    if len(ranking.images) >= wanted or k >= total:
                        if members is not None:
                            ranking.regions = members[ranking.regions]
                        if top_images is not None:
                            ranking = ImageRanking(ranking.images[:top_images], ranking.scores[:top_images],
                                                   ranking.regions[:top_images])
                        found[int(row)] = ranking
                    else:
                        retry.append(row)
                        fewest = min(fewest, len(ranking.images))
                pending = np.asarray(retry, dtype=np.int64)
                # Grow k by the images-per-region rate just seen (proposals of one image crowd
                # together), with a margin, so that one retry usually suffices; at least x2.
                k = min(total, max(2 * k, int(np.ceil(1.5 * k * wanted / max(fewest, 1)))))
            out.extend(found[i] for i in range(len(batch)))
        return out

    def to_run(self, query_ids: Sequence[str], rankings: Sequence[ImageRanking], method: str) -> Run:
        """A :class:`Run` with each hit's image id, score and its best region's box."""
        ids = self.store.image_ids
        rank = {}
        for qid, r in zip(query_ids, rankings):
            boxes = self.store.boxes[r.regions]
            rank[qid] = [Hit(ids[i], float(s), tuple(float(v) for v in b))
                         for i, s, b in zip(r.images.tolist(), r.scores.tolist(), boxes.tolist())]
        return Run(method=method, rankings=rank)
