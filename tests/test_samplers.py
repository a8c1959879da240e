"""Aspect-ratio groups and the grouped batch sampler: against torchvision's loop, and under DDP sharding."""
from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DistributedSampler, SequentialSampler

from instsearch.datamodules.samplers import GroupedBatchSampler, aspect_ratio_groups


def test_aspect_ratio_groups_separate_portrait_and_landscape():
    groups = aspect_ratio_groups(np.array([0.5, 0.75, 1.0, 1.333, 1.777, 3.0]))
    assert len(set(groups[:2].tolist()) & set(groups[3:].tolist())) == 0
    assert groups[0] != groups[-1] and (np.diff(groups) >= 0).all()


def _slow_grouped_batches(indices, groups, b):
    """torchvision-references algorithm with a Python loop: the reference for the vectorised one."""
    buffers, out = {}, []
    for i in indices:
        buffers.setdefault(groups[i], []).append(i)
        if len(buffers[groups[i]]) == b:
            out.append(buffers.pop(groups[i]))
    return out, buffers


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_grouped_batch_sampler_matches_reference(batch_size):
    rng = np.random.default_rng(batch_size)
    groups = rng.integers(0, 4, 37)
    order = rng.permutation(37).tolist()

    class ListSampler(SequentialSampler):
        def __iter__(self):
            return iter(order)

    sampler = GroupedBatchSampler(ListSampler(range(37)), groups, batch_size)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-37 // batch_size)
    full, leftovers = _slow_grouped_batches(order, groups, batch_size)
    assert batches[:len(full)] == full  # same batches, same order
    for batch in batches:
        assert len(batch) == batch_size and len(set(groups[batch])) == 1
    for batch in batches[len(full):]:  # top-ups start with the group's leftovers
        assert batch[:len(leftovers[groups[batch[0]]])] == leftovers[groups[batch[0]]]
    dropped = GroupedBatchSampler(ListSampler(range(37)), groups, batch_size, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 37 // batch_size
    assert list(dropped)[:len(full)] == full


def test_grouped_batches_shard_across_ranks():
    groups = np.array([0, 1] * 10)
    seen = []
    lengths = []
    for rank in range(2):
        ds_sampler = DistributedSampler(range(20), num_replicas=2, rank=rank, shuffle=True, seed=3)
        ds_sampler.set_epoch(1)
        sampler = GroupedBatchSampler(ds_sampler, groups, 2)
        batches = list(sampler)
        lengths.append(len(batches))
        shard = set(ds_sampler)
        assert all(set(b) <= shard for b in batches)  # a rank only sees its own shard
        seen.append(shard)
        assert all(len(set(groups[b])) == 1 for b in batches)
    assert lengths[0] == lengths[1] == 5  # equal step counts keep DDP ranks in lockstep
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(20))
