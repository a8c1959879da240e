"""Samplers of training batches: aspect-ratio grouping, DDP sharding, exact resumption.

Detectors pad every image of a batch to the largest one, so :class:`GroupedBatchSampler` batches
images of similar shape (:func:`aspect_ratio_groups`) without losing the sampler's randomness or
its per-rank shard. :func:`training_sampler` decides who shards a training set under
``torch.distributed``: Lightning, when it injects its own ``DistributedSampler``, or else the
DataModule itself.

Every order is a function of ``(seed, epoch)`` (:class:`EpochRandomSampler`), every batch sampler
(:class:`TrainingBatchSampler`) can hand each index out with the seed of its augmentation,
``(seed, epoch, index)``, and can start an epoch after the batches a resumed run already trained
on. Together they make a resumed run see exactly the batches of the uninterrupted one
(:mod:`instsearch.seeding`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from instsearch.distributed import is_distributed
from instsearch.seeding import derive_seed

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["aspect_ratio_groups", "EpochRandomSampler", "GroupedBatchSampler", "SeededIndex", "shards_itself",
           "TrainingBatchSampler", "training_sampler"]

#: A dataset key: the sample's index and the seed of its random augmentation.
SeededIndex = tuple[int, int]


def aspect_ratio_groups(aspect_ratios: np.ndarray, k: int = 3) -> np.ndarray:
    """Quantise width/height into ``2k + 2`` bins, log-spaced between 1/2 and 2.

    The bins of torchvision's detection references: portrait and landscape images land in
    different groups, and within each the ratio is close enough that padding to the batch's
    largest image wastes little.
    """
    bins = 2.0 ** np.linspace(-1, 1, 2 * k + 1)
    return np.digitize(np.asarray(aspect_ratios, dtype=np.float64), bins).astype(np.int64)


class EpochRandomSampler(Sampler[int]):
    """A random permutation per epoch, drawn from :func:`~instsearch.seeding.derive_seed` ``(seed,
    epoch)``: the same order in every run for the same seed and epoch, resumed or not (what
    ``DistributedSampler`` does for a shard, here for the whole set). Lightning calls
    :meth:`set_epoch` before each epoch; outside Lightning, call it yourself."""

    def __init__(self, data_source: Sequence | Dataset, seed: int = 0) -> None:
        self.num_samples = len(data_source)  # type: ignore[arg-type]
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class TrainingBatchSampler(BatchSampler):
    """Batches of ``sampler``'s indices in order (``BatchSampler``), plus what exact resumption needs.

    * ``sample_seed``: when set, each index is handed out as ``(index, derive_seed(sample_seed,
      epoch, index))`` (:data:`SeededIndex`), the seed the dataset runs that sample's random
      augmentation with (:func:`~instsearch.seeding.seeded_rng`), in whichever DataLoader worker
      loads it;
    * ``start``: ``(epoch, batches)`` -- the sampler starts in that epoch, and its first iteration,
      if it is still of that epoch, skips the epoch's first ``batches`` batches (the ones a resumed
      run already trained on). Later iterations, and a first one that Lightning has moved on to
      another epoch with :meth:`set_epoch` (reloaded dataloaders), are whole epochs. The skipped
      batches are never loaded.

    :meth:`set_epoch` is forwarded to ``sampler`` (Lightning calls it on ``batch_sampler.sampler``
    directly as well). Subclasses change how indices are grouped by overriding :meth:`batches`.
    Constructor arguments are kept as attributes of the same name, so Lightning can re-create the
    sampler around its own ``DistributedSampler``.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool = False,
                 sample_seed: Optional[int] = None, start: Optional[tuple[int, int]] = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.drop_last = drop_last  # epoch length floor(n / batch_size) instead of ceil
        self.sample_seed = None if sample_seed is None else int(sample_seed)
        self.start = None if start is None else (int(start[0]), int(start[1]))
        self._epoch = 0
        self._pending_start = self.start
        if self.start is not None:
            self.set_epoch(self.start[0])

    @property
    def epoch(self) -> int:
        """The sampler's epoch when it has one (Lightning sets it on ``batch_sampler.sampler``, not
        on the batch sampler), else the last :meth:`set_epoch`."""
        return int(getattr(self.sampler, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self._epoch)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, indices: np.ndarray) -> Iterator[np.ndarray]:
        """The epoch's batches from the sampler's ``indices``, in order."""
        b = self.batch_size
        stop = len(indices) - len(indices) % b if self.drop_last else len(indices)
        for first in range(0, stop, b):
            yield indices[first:first + b]

    def __iter__(self) -> Iterator[Union[list[int], list[SeededIndex]]]:
        skip = 0
        if self._pending_start is not None:
            (epoch, batches), self._pending_start = self._pending_start, None
            skip = batches if epoch == self.epoch else 0
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        for n, batch in enumerate(self.batches(indices)):
            if n < skip:
                continue
            if self.sample_seed is None:
                yield batch.tolist()
            else:
                yield [(i, derive_seed(self.sample_seed, self.epoch, i)) for i in batch.tolist()]


class GroupedBatchSampler(TrainingBatchSampler):
    """Batches whose images all share an aspect-ratio group.

    Walks ``sampler`` in order and emits a group's batch when it has ``batch_size`` members, so
    the sampler's randomness (and, under DDP, its per-rank shard) is kept. At the end of an
    epoch, incomplete groups are topped up with other members of the same group (largest first)
    until the epoch has ``ceil(len(sampler) / batch_size)`` batches (``floor`` with ``drop_last``);
    the leftovers of the smallest groups wait for another epoch. That count depends only on
    ``len(sampler)``, so every DDP rank runs the same number of steps.

    ``sample_seed`` and ``start`` as :class:`TrainingBatchSampler`.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int] | np.ndarray, batch_size: int,
                 drop_last: bool = False, sample_seed: Optional[int] = None,
                 start: Optional[tuple[int, int]] = None):
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        super().__init__(sampler, batch_size, drop_last=drop_last, sample_seed=sample_seed, start=start)

    def batches(self, idx: np.ndarray) -> Iterator[np.ndarray]:
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
            yield idx[members]
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
            yield np.concatenate([members, fill])


def shards_itself(trainer: Optional[pl.Trainer]) -> bool:
    """Whether a DataModule must shard its training set itself.

    Only where ``torch.distributed`` runs with several ranks and Lightning will not inject its
    ``DistributedSampler``: without a Trainer, or under one with ``use_distributed_sampler=False``.
    """
    if not is_distributed():
        return False
    if trainer is None:
        return True
    connector = getattr(trainer, "_accelerator_connector", None)
    return not getattr(connector, "use_distributed_sampler", True)


def training_sampler(dataset: Dataset, trainer: Optional[pl.Trainer], seed: int) -> Sampler[int]:
    """A shuffling sampler over ``dataset`` whose order is a function of ``(seed, epoch)``: this
    rank's shard (``DistributedSampler`` seeded with ``seed``) when :func:`shards_itself`, else an
    :class:`EpochRandomSampler`. (Lightning replaces the latter by its own ``DistributedSampler``
    under DDP, also seeded by ``(seed, epoch)``.)"""
    if shards_itself(trainer):
        return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
    return EpochRandomSampler(dataset, seed=seed)
