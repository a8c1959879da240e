"""The collectives instsearch uses under DDP, in one place; each is the identity on one process.

Lightning runs the ranks (``torchrun``, SLURM, ``strategy: ddp``); what crosses them is either
tensors of rows whose count differs per rank (:func:`all_gather_rows`: features, proposal ids --
tensors, not pickles, 4 bytes a float instead of a Python float's ~30) or small Python objects
(:func:`gather_to_rank0`, :func:`broadcast_from_rank0`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "rank_and_world", "all_gather_rows", "all_gather_objects", "gather_to_rank0",
           "broadcast_from_rank0", "all_reduce_sum"]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` runs with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given pair, else ``torch.distributed``'s, else ``(0, 1)``."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
    if rank is not None:
        return int(rank), int(world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(rows: Tensor, device: torch.device | str = "cpu") -> list[Tensor]:
    """Every rank's ``rows`` (their first dimension may differ between ranks), on the CPU, in rank
    order: one ``all_gather`` of the counts, then one of the rows padded to the largest count.
    ``device`` is where the collective runs (the rank's GPU under NCCL)."""
    if not is_distributed():
        return [rows]
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [part[:n].cpu() for part, n in zip(parts, sizes)]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_reduce_sum(values: Tensor) -> Tensor:
    """The element-wise sum of ``values`` over ranks (float64 or int64 counts), on the CPU."""
    if not is_distributed():
        return values
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = values.to(backend_device).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def gather_to_rank0(obj: Any) -> Optional[list[Any]]:
    """Every rank's ``obj`` as a list in rank order on rank 0, ``None`` on the other ranks."""
    if not is_distributed():
        return [obj]
    parts: Optional[list[Any]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
