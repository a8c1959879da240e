"""Samplers of training batches: aspect-ratio grouping and DDP sharding.

Detectors pad every image of a batch to the largest one, so :class:`GroupedBatchSampler` batches
images of similar shape (:func:`aspect_ratio_groups`) without losing the sampler's randomness or
its per-rank shard. :func:`training_sampler` decides who shards a training set under
``torch.distributed``: Lightning, when it injects its own ``DistributedSampler``, or else the
DataModule itself.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, RandomSampler, Sampler

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["aspect_ratio_groups", "GroupedBatchSampler", "shards_itself", "training_sampler"]


def aspect_ratio_groups(aspect_ratios: np.ndarray, k: int = 3) -> np.ndarray:
    """Quantise width/height into ``2k + 2`` bins, log-spaced between 1/2 and 2.

    The bins of torchvision's detection references: portrait and landscape images land in
    different groups, and within each the ratio is close enough that padding to the batch's
    largest image wastes little.
    """
    bins = 2.0 ** np.linspace(-1, 1, 2 * k + 1)
    return np.digitize(np.asarray(aspect_ratios, dtype=np.float64), bins).astype(np.int64)


class GroupedBatchSampler(BatchSampler):
    """Batches whose images all share an aspect-ratio group.

    Walks ``sampler`` in order and emits a group's batch when it has ``batch_size`` members, so
    the sampler's randomness (and, under DDP, its per-rank shard) is kept. At the end of an
    epoch, incomplete groups are topped up with other members of the same group (largest first)
    until the epoch has ``ceil(len(sampler) / batch_size)`` batches (``floor`` with ``drop_last``);
    the leftovers of the smallest groups wait for another epoch. That count depends only on
    ``len(sampler)``, so every DDP rank runs the same number of steps.

    It subclasses :class:`~torch.utils.data.BatchSampler` with a ``sampler`` argument, which lets
    Lightning re-create it around its own ``DistributedSampler``.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int] | np.ndarray, batch_size: int,
                 drop_last: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.drop_last = drop_last  # epoch length floor(n / batch_size) instead of ceil

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        idx = np.fromiter(iter(self.sampler), dtype=np.int64)
        b = self.batch_size
        if len(idx) == 0:
            return
        groups = self.group_ids[idx]
        # rank of each sample within its group, in sampler order
        order = np.argsort(groups, kind="stable")
        sorted_groups = groups[order]
        group_start = np.searchsorted(sorted_groups, sorted_groups, side="left")
        rank = np.empty(len(idx), np.int64)
        rank[order] = np.arange(len(idx)) - group_start
        # samples whose slot (rank // b) is filled completely form full batches; order each
        # batch's members by sampler position, and emit batches when their last member arrives
        slot = rank // b
        full = slot < (np.bincount(groups)[groups] // b)
        full_pos = np.flatnonzero(full)
        batch_key = groups[full_pos] * (len(idx) + 1) + slot[full_pos]
        by_batch = full_pos[np.lexsort((full_pos, batch_key))].reshape(-1, b)
        for members in by_batch[np.argsort(by_batch[:, -1], kind="stable")]:
            yield idx[members].tolist()
        remaining = len(self) - len(by_batch)
        if remaining <= 0:
            return
        # top up the incomplete groups, largest first
        left_pos = np.flatnonzero(~full)
        left_groups = groups[left_pos]
        uniq, sizes = np.unique(left_groups, return_counts=True)
        for g in uniq[np.argsort(-sizes, kind="stable")][:remaining]:
            members = idx[left_pos[left_groups == g]]
            pool = idx[groups == g]
            fill = np.resize(pool, b - len(members))  # repeats the group's members as needed
            yield np.concatenate([members, fill]).tolist()


def shards_itself(trainer: Optional[pl.Trainer]) -> bool:
    """Whether a DataModule must shard its training set itself.

    Only where ``torch.distributed`` runs with several ranks and Lightning will not inject its
    ``DistributedSampler``: without a Trainer, or under one with ``use_distributed_sampler=False``.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if trainer is None:
        return True
    connector = getattr(trainer, "_accelerator_connector", None)
    return not getattr(connector, "use_distributed_sampler", True)


def training_sampler(dataset: Dataset, trainer: Optional[pl.Trainer], seed: int) -> Sampler[int]:
    """A shuffling sampler over ``dataset``: this rank's shard (``DistributedSampler`` seeded with
    ``seed``) when :func:`shards_itself`, else a ``RandomSampler``."""
    if shards_itself(trainer):
        return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
    return RandomSampler(dataset)
