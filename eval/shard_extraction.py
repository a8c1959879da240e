"""Extraction into region shards under Lightning's predict loop (``instsearch extract``).

The module's ``predict_step`` is its ``search_step`` -- the step ``instsearch test`` runs -- so the
features are the same; a :class:`RegionShardWriter` (a Lightning ``BasePredictionWriter``) turns
each batch's output into rows of :mod:`instsearch.eval.shards` parts as it comes, and nothing is
returned to the trainer. Memory holds at most one part per process.

Parts are fixed ranges of the benchmark's items; :class:`PartSampler` hands each process whole
parts (part ``p`` to rank ``p mod world``), in order, leaving out the parts already complete on
disk -- so no item is extracted twice (Lightning's test sampler pads the last shard with repeats;
a part sampler never does), a part's content does not depend on the number of processes, and a
rerun after a kill extracts only what is missing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, get_worker_info

from instsearch.distributed import rank_and_world
from instsearch.eval.extraction import SearchBatch, capped
from instsearch.eval.shards import RegionShards, ShardImage, ShardQuery, ShardWriter
from instsearch.structures import ImageMeta


def part_bounds(part: int, part_size: int, num_items: int) -> tuple[int, int]:
    """Item range ``[start, stop)`` of part ``part``."""
    return part * part_size, min((part + 1) * part_size, num_items)


@dataclass(frozen=True)
class PartLayout:
    """How items are numbered and cut into parts: the benchmark's items (database images, then
    queries) from item 0, then each distractor folder from the next part boundary, so a part never
    mixes two sources. ``segments``: ``(first item, count)`` of each source, in order."""

    part_size: int
    segments: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, part_size: int, counts: Sequence[int]) -> "PartLayout":
        segments, start = [], 0
        for n in counts:
            segments.append((start, int(n)))
            start += -(-int(n) // part_size) * part_size  # the next source starts a new part
        return cls(int(part_size), tuple(segments))

    @property
    def num_parts(self) -> int:
        first, count = self.segments[-1] if self.segments else (0, 0)
        return -(-(first + count) // self.part_size)

    def part_items(self, part: int) -> range:
        """The item indices of part ``part`` (empty for a part no source reaches)."""
        start = part * self.part_size
        for first, count in self.segments:
            if first <= start < first + count:
                return range(start, min(start + self.part_size, first + count))
        return range(start, start)


class PartSampler(DistributedSampler):
    """Item indices of this process's incomplete parts, part by part, in order.

    A ``DistributedSampler`` so that Lightning does not wrap it in its own; rank and world size are
    read when iteration starts (the process group exists by then under every launcher) unless given.
    """

    def __init__(self, num_items: int, part_size: int, skip: Sequence[int] = (), rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        # DistributedSampler.__init__ would ask torch.distributed now: set its attributes instead
        if part_size < 1:
            raise ValueError(f"part_size must be >= 1, got {part_size}")
        self.num_items, self.part_size = int(num_items), int(part_size)
        self.skip = set(int(p) for p in skip)
        self._rank, self._world = rank, world_size
        self.shuffle, self.seed, self.epoch, self.drop_last = False, 0, 0, False

    @property
    def num_parts(self) -> int:
        return math.ceil(self.num_items / self.part_size)

    def my_parts(self) -> list[int]:
        rank, world = rank_and_world(self._rank, self._world)
        self.rank, self.num_replicas = rank, world
        return [p for p in range(rank, self.num_parts, world) if p not in self.skip]

    def __iter__(self) -> Iterator[int]:
        for part in self.my_parts():
            yield from range(*part_bounds(part, self.part_size, self.num_items))

    def __len__(self) -> int:
        return sum(len(range(*part_bounds(p, self.part_size, self.num_items))) for p in self.my_parts())


class RegionShardWriter(BasePredictionWriter):
    """Writes each batch's regions and query features into the parts of a shards folder.

    Items are routed to their part by their dataset index (``batch_indices``); a part is written
    as soon as all its items have been seen, then dropped from memory. ``regions_per_image``
    keeps each image's best regions, as the evaluator does.
    """

    def __init__(self, writer: ShardWriter, layout: PartLayout, regions_per_image: Optional[int] = None):
        super().__init__(write_interval="batch")
        self.writer, self.layout, self.part_size = writer, layout, layout.part_size
        self.regions_per_image = regions_per_image
        self._pending: dict[int, dict[str, Any]] = {}
        self.parts_written: list[int] = []

    def _part(self, part: int) -> dict[str, Any]:
        if part not in self._pending:
            self._pending[part] = {"left": len(self.layout.part_items(part)), "images": {}, "queries": {}, "bad": []}
        return self._pending[part]

    def add(self, prediction: SearchBatch, metas: Sequence[ImageMeta], indices: Sequence[int]) -> None:
        """Route one batch's output to its parts; write the parts it completes."""
        # an item is its (image, query) pair: the batch's metas may be copies of the ones the step saw
        index_of = {(m.image_id, m.query_id): int(i) for m, i in zip(metas, indices)}
        for meta, regions in prediction.database:
            i = index_of[meta.image_id, meta.query_id]
            regions = capped(regions, self.regions_per_image)
            labels = regions.labels.numpy().astype(np.int64) if regions.labels is not None else None
            feats = regions.features.numpy() if regions.features is not None else np.zeros((len(regions), 0), np.float32)
            self._part(i // self.part_size)["images"][i] = ShardImage(
                meta.image_id, regions.boxes.numpy().astype(np.float32), regions.scores.numpy().astype(np.float32),
                feats.astype(np.float32), labels)
        for query in prediction.queries:
            i = index_of[query.meta.image_id, query.meta.query_id]
            self._part(i // self.part_size)["queries"][i] = ShardQuery(
                query.meta.query_id, query.meta.image_id, query.feature.numpy().astype(np.float32), query.label)
        for meta in prediction.bad:
            self._part(index_of[meta.image_id, meta.query_id] // self.part_size)["bad"].append(
                {"path": meta.extra.get("path"), "image": meta.image_id, "query": meta.query_id,
                 "reason": meta.extra.get("error")})
        for i in indices:
            part = int(i) // self.part_size
            state = self._part(part)
            state["left"] -= 1
            if state["left"] == 0:
                self.writer.write_part(part, [state["images"][k] for k in sorted(state["images"])],
                                       [state["queries"][k] for k in sorted(state["queries"])], state["bad"])
                self.parts_written.append(part)
                del self._pending[part]

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        metas = batch[1]
        if metas and all("item" in m.extra for m in metas):  # a source that numbers its items (distractors)
            batch_indices = [m.extra["item"] for m in metas]
        elif batch_indices is None or len(batch_indices) != len(metas):
            raise RuntimeError("the shard writer needs each item's index: Lightning's predict loop tracks them for "
                               "map-style datasets, an iterable source sets meta.extra['item']")
        self.add(prediction, metas, batch_indices)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:
            unfinished = sorted(self._pending)
            raise RuntimeError(f"parts {unfinished} were not complete at the end of extraction: their items were not "
                               f"all served (is the loader's sampler the PartSampler?)")


class DistractorPartBatches(IterableDataset):
    """A distractor folder's images as ready batches for extraction into shards.

    File ``i`` of the folder's walk (:func:`~instsearch.datamodules.distractors.iter_image_files`,
    deterministic) is item ``first_item + i``; its part goes to rank ``part mod world`` and, within
    a rank, to DataLoader worker ``(part div world) mod workers``. Batches never span two parts, so
    they are the same whichever process extracts a part. An undecodable file is served as
    ``(None, meta)`` with the reason, so that its part still completes and lists it. Use with
    ``DataLoader(batch_size=None)``.
    """

    def __init__(self, root: str | Path, id_prefix: str, first_item: int, layout: PartLayout, batch_size: int,
                 skip: Sequence[int] = (), max_side: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__()
        self.root, self.id_prefix, self.first_item = Path(root), id_prefix, int(first_item)
        self.layout, self.batch_size, self.skip = layout, int(batch_size), set(int(p) for p in skip)
        self.max_side, self._rank, self._world = max_side, rank, world_size

    def _mine(self) -> Callable[[int], bool]:
        rank, world = rank_and_world(self._rank, self._world)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return lambda part: part % world == rank and (part // world) % workers == worker and part not in self.skip

    def _load(self, path: Path, item: int):
        from instsearch.datamodules.benchmark import to_served_tensor
        from instsearch.datamodules.distractors import distractor_image_id
        from instsearch.datamodules.image_io import BadImageError, load_rgb

        image_id = distractor_image_id(self.root, path, self.id_prefix)
        try:
            image = load_rgb(path)
        except BadImageError as e:
            return None, ImageMeta(image_id=image_id, orig_size=(0, 0),
                                   extra={"item": item, "error": e.reason, "path": e.path})
        return to_served_tensor(image, self.max_side), ImageMeta(image_id=image_id, orig_size=(image.height, image.width),
                                                                 extra={"item": item})

    def __iter__(self) -> Iterator[tuple[list, list]]:
        from instsearch.datamodules.distractors import iter_image_files

        mine = self._mine()
        images: list = []
        metas: list = []
        current = None
        for i, path in enumerate(iter_image_files(self.root)):
            item = self.first_item + i
            part = item // self.layout.part_size
            if not mine(part):
                continue
            if metas and (part != current or len(metas) == self.batch_size):
                yield images, metas
                images, metas = [], []
            current = part
            image, meta = self._load(path, item)
            images.append(image)
            metas.append(meta)
        if metas:
            yield images, metas


def finalize_manifest(writer: ShardWriter, num_parts: int) -> Optional[dict[str, Any]]:
    """When every part is complete, record the totals in the manifest (rank 0 calls it); returns
    the totals, or ``None`` while parts are missing."""
    shards = RegionShards(writer.root, require_complete=False)
    if len(shards.parts) != num_parts:
        return None
    totals = {"complete": True, "dim": shards.dim, "images": len(shards.image_ids), "regions": shards.num_regions,
              "queries": sum(r["queries"] for r in shards.records), "bad_items": len(shards.bad_images)}
    writer.write_manifest(**totals)
    return totals


def part_loader(dataset: torch.utils.data.Dataset, sampler: PartSampler, batch_size: int, num_workers: int,
                collate_fn) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, persistent_workers=False)
