"""Exact image scores streamed over region shards: each image scored by its best region, one
block of whole images at a time, so that no pass holds more than a block's score matrix.

The building block of every exact computation over shards that would not fit in memory: the
reference ranking the ANN stage's recall is measured against (``benchmarks/scale_search.py``),
and sharded evaluation's streamed search (:mod:`instsearch.eval.sharded`), which also counts,
for the positives' exact global ranks, the images scoring above each of them.

Scores are a torch float32 product of all queries against the block's rows, as
:class:`~instsearch.eval.searchers.ExactInnerProductSearcher` computes them, and ties follow the
searchers' order: within an image the earlier region is its best, between images the earlier
image ranks first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from instsearch.eval.shards import RegionShards

#: floats of one block's score matrix (32 MB): queries × the rows of a block of whole images
BLOCK_SCORES = 1 << 21


@dataclass
class ImageScores:
    """One block's exact image scores: ``images`` are positions in ``RegionShards.image_ids``."""

    images: np.ndarray  # (n,) int64
    scores: np.ndarray  # (Q, n) float32; -inf where category pruning leaves an image no region
    regions: np.ndarray  # (Q, n) int64 region id of each image's best region (first among equals)


def stream_image_scores(shards: RegionShards, queries: np.ndarray, max_scores: int = BLOCK_SCORES,
                        query_labels: Optional[Sequence[Optional[int]]] = None) -> Iterator[ImageScores]:
    """Every image with a region, in order, in blocks of whole images whose scores stay within
    ``max_scores`` floats (at least one image a block). Each part is mapped only while it is read.

    ``query_labels`` (category pruning, FCIS+XD): a query is compared only with regions of its
    own label (the shards' ``label`` column); an image without one scores ``-inf``. A query
    label ``None`` compares with every region."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    nq = len(q)
    label_of = None
    if query_labels is not None:
        if shards.num_regions and not shards.has_labels:  # shards without regions have nothing to prune
            raise ValueError(f"{shards.root}: category pruning needs region labels, and these shards hold none")
        label_of = torch.tensor([-1 if v is None else int(v) for v in query_labels], dtype=torch.int64)
    starts = shards.image_starts
    rows = max(1, int(max_scores) // max(nq, 1))
    for i, (o0, features) in enumerate(shards.iter_features()):
        o1 = int(shards.offsets[i + 1])
        first, last = np.searchsorted(starts[:-1], [o0, o1])
        images = np.arange(first, last)
        images = images[starts[images + 1] > starts[images]]
        labels = (torch.from_numpy(shards.meta(shards.parts[i], ["label"])["label"].astype(np.int64))
                  if label_of is not None and len(images) else None)
        at = 0
        while at < len(images):
            # whole images whose regions fit in `rows` (at least one image)
            stop = max(at + 1, int(np.searchsorted(starts[images + 1], starts[images[at]] + rows, side="right")))
            block = images[at:stop]
            r0, r1 = int(starts[block[0]]), int(starts[block[-1] + 1])
            x = torch.from_numpy(np.array(features[r0 - o0:r1 - o0], dtype=np.float32))
            if labels is None:
                scores = q @ x.T
            else:  # each category's queries together, as the in-memory search's sub-indexes score them
                scores = torch.empty(nq, len(x))
                block_labels = labels[r0 - o0:r1 - o0]
                for label in torch.unique(label_of).tolist():  # a loop over categories, not regions
                    members = torch.nonzero(label_of == label).flatten()
                    s = q[members] @ x.T
                    if label >= 0:
                        s = s.masked_fill(block_labels[None, :] != label, -np.inf)
                    scores[members] = s
            yield _best_per_image(scores.numpy(), starts, block, r0)
            at = stop


def _best_per_image(scores: np.ndarray, starts: np.ndarray, images: np.ndarray, r0: int) -> ImageScores:
    """Each image's best score and first best region from the ``(Q, rows)`` scores of its
    contiguous rows (the block starts at region ``r0``)."""
    local = (starts[images] - r0).astype(np.int64)
    counts = (starts[images + 1] - starts[images]).astype(np.int64)
    top = np.maximum.reduceat(scores, local, axis=1)
    width = scores.shape[1]
    column = np.where(scores == np.repeat(top, counts, axis=1), np.arange(width), width)
    return ImageScores(images, top, np.minimum.reduceat(column, local, axis=1) + r0)


@dataclass
class ImageTopK:
    """An exact image ranking: ``(Q, K)`` arrays, best first; ``-1`` / ``-inf`` pad where fewer
    images have regions."""

    scores: np.ndarray  # float32
    images: np.ndarray  # int64 image positions (RegionShards.image_ids order, or the caller's keys)
    regions: np.ndarray  # int64 region id of each image's best region

    @classmethod
    def empty(cls, num_queries: int, k: int) -> "ImageTopK":
        return cls(np.full((num_queries, k), -np.inf, np.float32), np.full((num_queries, k), -1, np.int64),
                   np.full((num_queries, k), -1, np.int64))

    def merge(self, scores: np.ndarray, images: np.ndarray, regions: np.ndarray) -> "ImageTopK":
        """The best ``K`` of this ranking and ``(Q, n)`` more candidates (``images`` broadcast
        over queries); equal scores: the lower image key first. ``-inf`` candidates never enter."""
        k = self.scores.shape[1]
        images = np.broadcast_to(images, scores.shape)
        s = np.concatenate([self.scores, scores], axis=1)
        im = np.concatenate([self.images, np.where(np.isneginf(scores), -1, images)], axis=1)
        reg = np.concatenate([self.regions, np.where(np.isneginf(scores), -1, regions)], axis=1)
        # padding (-1, -inf) sorts after every real image: its key is +inf on the score, +max on the image
        image_key = np.where(im < 0, np.iinfo(np.int64).max, im)
        order = np.lexsort((image_key, -s), axis=1)[:, :k]
        return ImageTopK(np.take_along_axis(s, order, 1), np.take_along_axis(im, order, 1),
                         np.take_along_axis(reg, order, 1))


def exact_image_ranking(shards: RegionShards, queries: np.ndarray, k: int, max_scores: int = BLOCK_SCORES,
                        query_labels: Optional[Sequence[Optional[int]]] = None) -> ImageTopK:
    """Exact top-``k`` images per query (best region per image, inner product), streamed over the
    parts (:func:`stream_image_scores`)."""
    best = ImageTopK.empty(len(queries), int(k))
    for block in stream_image_scores(shards, queries, max_scores=max_scores, query_labels=query_labels):
        best = best.merge(block.scores, block.images, block.regions)
    return best
