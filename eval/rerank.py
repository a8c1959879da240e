"""Re-rankers over a query's shortlist: query expansion, database-side augmentation, diffusion.

Each works on one query's :class:`Shortlist` -- its first ``S`` images, the features of every
region of each (an image scores by its best region) -- and returns new scores for those images;
nothing of the database outside the shortlist is touched, and the largest matrix is ``S x S``.
For region methods, an image enters an expansion by its best region for the query (the region
that ranked it).

* :class:`AverageQueryExpansion` -- AQE (Chum et al., "Total Recall", ICCV 2007): the query plus
  its top ``k`` images' best regions, l2-normalised, searched again over the shortlist.
* :class:`AlphaQueryExpansion` -- alpha-QE (Radenovic et al., "Fine-tuning CNN image retrieval
  with no human annotation", TPAMI 2018): the same, each top image weighted by its score^alpha.
* :class:`DatabaseAugmentation` -- DBA (Arandjelovic & Zisserman 2012, weighted as alpha-QE): each
  shortlisted image's best region replaced by itself plus its ``k`` nearest shortlisted images'
  (weights similarity^alpha), l2-normalised; scores are the query's similarity to them.
* :class:`Diffusion` -- Iscen et al., "Efficient Diffusion on Region Manifolds", CVPR 2017: a
  mutual ``k``-nearest-neighbour graph over the shortlisted images (affinity max(0, sim)^gamma),
  symmetrically normalised ``S = D^-1/2 W D^-1/2``; the query's affinities ``y`` to its ``k``
  nearest images diffuse as ``f = (I - alpha S)^-1 y``, solved exactly (``S`` is small).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Shortlist:
    """One query's shortlisted images, best first, with every region's feature."""

    query: np.ndarray  # (D,) float32
    scores: np.ndarray  # (S,) the first search's scores, best first
    features: np.ndarray  # (M, D) float32 every region of the shortlisted images, grouped by image
    owner: np.ndarray  # (M,) int64 position in the shortlist of each region's image, ascending

    def image_scores(self, query: np.ndarray) -> np.ndarray:
        """Each shortlisted image's best-region score for ``query`` (``-inf`` for an image
        without a region)."""
        out = np.full(len(self.scores), -np.inf, np.float32)
        if len(self.owner):
            np.maximum.at(out, self.owner, (self.features @ query).astype(np.float32))
        return out

    def best_regions(self) -> np.ndarray:
        """``(S, D)`` the feature of each image's best region for the original query (zeros for
        an image without a region)."""
        s = (self.features @ self.query).astype(np.float32)
        best = np.zeros((len(self.scores), self.features.shape[1]), np.float32)
        if len(self.owner):
            # first maximum per image: sort by (owner, -score, region order)
            order = np.lexsort((np.arange(len(s)), -s, self.owner))
            first = np.ones(len(order), bool)
            first[1:] = self.owner[order][1:] != self.owner[order][:-1]
            best[self.owner[order][first]] = self.features[order][first]
        return best


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _nearest(best: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The shortlisted images' similarities (an image not its own neighbour: ``-inf`` on the
    diagonal) and each one's ``min(k, S - 1)`` nearest others, nearest first."""
    sim = best @ best.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(best) - 1)
    neighbours = np.argsort(-sim, axis=1, kind="stable")[:, :max(k, 0)]
    return sim, neighbours


@runtime_checkable
class Reranker(Protocol):
    """New scores for a query's shortlisted images (higher is better)."""

    name: str

    def rerank(self, shortlist: Shortlist) -> np.ndarray: ...


@dataclass
class AverageQueryExpansion:
    k: int = 2
    name: str = "aqe"

    def rerank(self, shortlist: Shortlist) -> np.ndarray:
        top = shortlist.best_regions()[:self.k]
        return shortlist.image_scores(_unit(shortlist.query + top.sum(axis=0)))


@dataclass
class AlphaQueryExpansion:
    k: int = 2
    alpha: float = 3.0
    name: str = "alpha_qe"

    def rerank(self, shortlist: Shortlist) -> np.ndarray:
        top = shortlist.best_regions()[:self.k]
        weights = np.maximum(shortlist.scores[:self.k], 0.0) ** self.alpha
        return shortlist.image_scores(_unit(shortlist.query + (weights[:, None] * top).sum(axis=0)))


@dataclass
class DatabaseAugmentation:
    k: int = 2
    alpha: float = 3.0
    name: str = "dba"

    def rerank(self, shortlist: Shortlist) -> np.ndarray:
        best = shortlist.best_regions()
        sim, neighbours = _nearest(best, self.k)
        augmented = best.copy()
        if neighbours.shape[1]:
            weights = np.maximum(np.take_along_axis(sim, neighbours, 1), 0.0) ** self.alpha
            augmented = best + np.einsum("sk,skd->sd", weights, best[neighbours])
        return (_unit(augmented) @ shortlist.query).astype(np.float32)


@dataclass
class Diffusion:
    k: int = 5
    alpha: float = 0.99
    gamma: float = 3.0
    name: str = "diffusion"

    def affinity(self, best: np.ndarray) -> np.ndarray:
        """``W``: max(0, sim)^gamma between mutual k-nearest neighbours, zero elsewhere."""
        sim, neighbours = _nearest(best, self.k)
        knn = np.zeros(sim.shape, bool)
        np.put_along_axis(knn, neighbours, True, axis=1)
        mutual = knn & knn.T
        return np.where(mutual, np.maximum(sim, 0.0) ** self.gamma, 0.0)

    def rerank(self, shortlist: Shortlist) -> np.ndarray:
        best = shortlist.best_regions().astype(np.float64)
        w = self.affinity(best)
        degree = w.sum(axis=1)
        inv = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
        s = inv[:, None] * w * inv[None, :]
        y = np.maximum(best @ shortlist.query.astype(np.float64), 0.0) ** self.gamma
        y[np.argsort(-y, kind="stable")[self.k:]] = 0.0  # the query's k nearest images start the walk
        f = np.linalg.solve(np.eye(len(best)) - self.alpha * s, y)
        return f.astype(np.float32)


@dataclass
class RerankInputs:
    """What re-ranking a finished search needs: every database region's feature and image, and
    the query features as searched (``features.npz`` of an ``instsearch compare`` cell)."""

    image_ids: list[str]
    image_index: np.ndarray  # (M,) int64, ascending: regions grouped by image
    features: np.ndarray  # (M, D) float32
    query_ids: list[str]
    queries: np.ndarray  # (Q, D) float32

    def save(self, path) -> None:
        np.savez(path, image_ids=np.array(self.image_ids, dtype=str), image_index=self.image_index,
                 features=self.features, query_ids=np.array(self.query_ids, dtype=str), queries=self.queries)

    @classmethod
    def load(cls, path) -> "RerankInputs":
        with np.load(path, allow_pickle=False) as z:
            return cls([str(i) for i in z["image_ids"]], z["image_index"].astype(np.int64),
                       z["features"].astype(np.float32), [str(q) for q in z["query_ids"]],
                       z["queries"].astype(np.float32))

    def shortlist(self, query: int, images: np.ndarray, scores: np.ndarray) -> Shortlist:
        """Query ``query``'s shortlist of image positions ``images`` (best first) with ``scores``."""
        from instsearch.eval.shard_search import image_regions

        starts = np.searchsorted(self.image_index, np.arange(len(self.image_ids) + 1))
        images = np.asarray(images, np.int64)
        lengths = starts[images + 1] - starts[images]
        regions, _ = image_regions(starts, images)
        return Shortlist(self.queries[query], np.asarray(scores, np.float32), self.features[regions],
                         np.repeat(np.arange(len(images)), lengths))


RERANKERS = {"aqe": AverageQueryExpansion, "alpha_qe": AlphaQueryExpansion, "dba": DatabaseAugmentation,
             "diffusion": Diffusion}


def build_reranker(spec: dict) -> Reranker:
    """A re-ranker from ``{type: aqe|alpha_qe|dba|diffusion, name?: str, ...its parameters}``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in RERANKERS:
        raise ValueError(f"reranker type must be one of {', '.join(RERANKERS)}, got {kind!r}")
    return RERANKERS[kind](**spec)


def rerank_run(run, inputs: RerankInputs, reranker: Reranker, shortlist: int = 100):
    """``run`` with each query's first ``shortlist`` hits reordered by ``reranker`` (their new
    scores; each keeps the box of its first search's best region), the rest after them as they
    were. A query without stored features keeps its ranking."""
    from instsearch.formats import Hit, Run

    position = {image_id: k for k, image_id in enumerate(inputs.image_ids)}
    row_of = {q: i for i, q in enumerate(inputs.query_ids)}
    rankings = {}
    for qid, hits in run.rankings.items():
        head = hits[:shortlist]
        if qid not in row_of or not head:
            rankings[qid] = list(hits)
            continue
        images = np.array([position[h.image] for h in head], np.int64)
        order, scores = rerank_order(inputs.shortlist(row_of[qid], images, [h.score for h in head]), reranker)
        rankings[qid] = [Hit(head[i].image, float(v), head[i].box) for i, v in zip(order.tolist(), scores.tolist())]
        rankings[qid] += hits[shortlist:]
    return Run(method=f"{run.method}+{reranker.name}", rankings=rankings)


def rerank_order(shortlist: Shortlist, reranker: Reranker) -> tuple[np.ndarray, np.ndarray]:
    """``(order, scores)``: the shortlist's positions by the new scores, best first (equal scores
    keep the first search's order), and those scores."""
    scores = np.asarray(reranker.rerank(shortlist), dtype=np.float32)
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order, scores[order]
