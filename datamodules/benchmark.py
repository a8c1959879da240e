"""Serving a ``benchmark.json`` to an extractor: database images and query images with their boxes.

Items are ``(image, ImageMeta)``; a file that cannot be decoded yields ``(None, meta)`` with the
reason in ``meta.extra["error"]``, so the evaluator can skip it, count it and list it in its
report instead of crashing mid-run.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from instsearch.datamodules.image_io import MAX_PIXELS, BadImageError, load_rgb
from instsearch.formats import Benchmark
from instsearch.structures import ImageMeta

Part = Literal["database", "queries", "all"]


class BenchmarkImages(Dataset):
    """Database images first, then one item per query (its image, with ``query_box`` set).

    ``max_side`` shrinks images whose long side exceeds it (memory guard for huge photos); the
    served tensor's size against ``meta.orig_size`` maps boxes back to original pixels.
    """

    def __init__(self, benchmark: Benchmark | str | Path, part: Part = "all", max_side: Optional[int] = None,
                 max_pixels: int = MAX_PIXELS):
        self.benchmark = benchmark if isinstance(benchmark, Benchmark) else Benchmark.load(benchmark)
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.items: list[tuple[str, Optional[str]]] = []
        if part in ("database", "all"):
            self.items += [(image_id, None) for image_id in self.benchmark.database]
        if part in ("queries", "all"):
            self.items += [(q.image, q.id) for q in self.benchmark.queries]
        self._queries = self.benchmark.query_by_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Optional[torch.Tensor], ImageMeta]:
        image_id, query_id = self.items[index]
        entry = self.benchmark.images[image_id]
        meta = ImageMeta(image_id=image_id, orig_size=(entry.height, entry.width), query_id=query_id,
                         query_box=self._queries[query_id].box if query_id else None)
        try:
            image = load_rgb(self.benchmark.image_path(image_id), max_pixels=self.max_pixels)
        except BadImageError as e:
            meta.extra["error"] = e.reason
            meta.extra["path"] = e.path
            return None, meta
        if image.size != (entry.width, entry.height):
            # The benchmark's declared size is the coordinate frame of every box: rescale to it.
            meta.extra["declared_size_mismatch"] = image.size
            image = image.resize((entry.width, entry.height))
        return to_served_tensor(image, self.max_side), meta


def shrink_to_max_side(image, max_side: Optional[int]):
    """The PIL ``image`` shrunk so that its long side is at most ``max_side`` (unchanged when it is
    already, or when ``max_side`` is None): the image a network is served."""
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    return image


def to_served_tensor(image, max_side: Optional[int]) -> torch.Tensor:
    """``(3, H, W)`` float in ``[0, 1]``, shrunk so that its long side is at most ``max_side``
    (memory guard for huge photos; the served size against the original maps boxes back)."""
    return pil_to_tensor(shrink_to_max_side(image, max_side)).float().div_(255.0)


def collate_images(batch):
    """Lists, not stacks: images differ in size and the detectors batch them themselves."""
    images, metas = zip(*batch)
    return list(images), list(metas)


def benchmark_dataloader(benchmark: Benchmark | str | Path, part: Part = "all", batch_size: int = 4,
                         num_workers: int = 0, max_side: Optional[int] = None,
                         indices: Optional[list[int]] = None) -> DataLoader:
    dataset: Dataset = BenchmarkImages(benchmark, part=part, max_side=max_side)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_images, persistent_workers=False)


def served_with_size(image, max_side: Optional[int] = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """A distractor as served (:func:`to_served_tensor`) and its original ``(height, width)``."""
    return to_served_tensor(image, max_side=max_side), (int(image.height), int(image.width))


def collate_distractors(batch):
    """``DistractorImages`` with :func:`served_with_size` yields ``((image, original size), id)``:
    give each the meta a database item has, so that its regions are stored in original pixels
    as every other image's (and as ``instsearch extract`` stores them)."""
    served, ids = zip(*batch)
    return [im for im, _ in served], [ImageMeta(image_id=i, orig_size=size) for (_, size), i in zip(served, ids)]


def distractor_dataloaders(benchmark: Benchmark | str | Path, batch_size: int = 4, num_workers: int = 0,
                           max_side: Optional[int] = None, rank: Optional[int] = None,
                           world_size: Optional[int] = None) -> list[DataLoader]:
    """One streaming loader per distractor folder the benchmark names (empty when none).

    The folders are walked lazily and sharded over ranks and workers by
    :class:`~instsearch.datamodules.distractors.DistractorImages`; nothing is listed in memory.
    """
    from instsearch.datamodules.distractors import DistractorImages

    bench = benchmark if isinstance(benchmark, Benchmark) else Benchmark.load(benchmark)

    to_tensor = functools.partial(served_with_size, max_side=max_side)

    loaders = []
    for entry in bench.distractors:
        dataset = DistractorImages(bench.distractor_root(entry), transform=to_tensor,
                                   id_prefix=str(entry.get("id_prefix", "distractor:")), rank=rank,
                                   world_size=world_size)
        loaders.append(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                  collate_fn=collate_distractors))
    return loaders


class ServesBenchmark:
    """Mixin for DataModules with a ``benchmark`` argument: the one place benchmark loaders are made.

    The per-epoch retrieval callback, ``instsearch test`` / ``predict`` and the demo all read the
    benchmark through :meth:`benchmark_dataloaders`, so they serve the same images at the same
    size (``benchmark_max_side``). ``instsearch test --data.benchmark B.json`` scores a checkpoint
    on any benchmark with whatever DataModule the training config named.
    """

    benchmark: Optional[str]
    num_workers: int = 0
    benchmark_batch_size: int = 4
    benchmark_max_side: Optional[int] = 1600
    _loaded_benchmark: Optional[tuple[str, Benchmark]] = None

    def load_benchmark(self) -> Optional[Benchmark]:
        """The parsed benchmark (cached per path), ``None`` when the DataModule has none."""
        if not self.benchmark:
            return None
        path = str(self.benchmark)
        if self._loaded_benchmark is None or self._loaded_benchmark[0] != path:
            self._loaded_benchmark = (path, Benchmark.load(path))
        return self._loaded_benchmark[1]

    def benchmark_dataloaders(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> list[DataLoader]:
        """Database + query images, then one streaming loader per distractor folder.

        With ``rank`` / ``world_size`` every loader serves only that rank's shard (the callback
        shards itself); without, Lightning's test loop shards the first loader with its
        distributed sampler and the distractor loaders shard by ``torch.distributed``.
        """
        bench = self.load_benchmark()
        if bench is None:
            raise ValueError(f"{type(self).__name__} has no benchmark: pass --data.benchmark path/to/benchmark.json")
        indices = None
        if world_size is not None and world_size > 1:
            indices = list(range(rank, len(bench.database) + len(bench.queries), world_size))
        main = benchmark_dataloader(bench, "all", self.benchmark_batch_size, self.num_workers,
                                    self.benchmark_max_side, indices=indices)
        extra = distractor_dataloaders(bench, self.benchmark_batch_size, self.num_workers, self.benchmark_max_side,
                                       rank=rank if world_size is not None else None, world_size=world_size)
        return [main, *extra]

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = self.benchmark_dataloaders()
        return loaders if len(loaders) > 1 else loaders[0]

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self.test_dataloader()


class BenchmarkDataModule(ServesBenchmark, pl.LightningDataModule):
    """Any ``benchmark.json`` for ``instsearch test`` / ``predict``: no training data needed."""

    def __init__(self, benchmark: Optional[str] = None, batch_size: int = 4, num_workers: int = 0,
                 max_side: Optional[int] = 1600):
        super().__init__()
        self.benchmark = benchmark
        self.benchmark_batch_size = batch_size
        self.num_workers = num_workers
        self.benchmark_max_side = max_side
