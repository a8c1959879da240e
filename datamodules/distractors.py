"""Distractor image folders (Flickr 100K / 1M style) appended to a benchmark's database.

A million-image folder is never listed in ``benchmark.json``; the benchmark records only
``{"root": <path relative to the benchmark>, "count": N, "id_prefix": ...}`` under its
``"distractors"`` key, and extraction walks the folder again with :func:`iter_image_files`, whose
order is deterministic, so the walk at conversion time and at extraction time agree.

Nothing here materialises the file list: :func:`iter_image_files` is a generator over
``os.scandir`` that sorts one directory at a time, and :class:`DistractorImages` shards that
stream across DataLoader workers and DDP ranks by index modulo, so every process walks the tree
(cheap: directory reads only) but decodes only its own share.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.functional import to_tensor

from instsearch.datamodules.image_io import MAX_PIXELS, BadImageError, BadImageReport, load_rgb
from instsearch.distributed import rank_and_world

__all__ = ["IMAGE_EXTENSIONS", "iter_image_files", "count_image_files", "DistractorImages", "DEFAULT_ID_PREFIX"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# Distractor ids are "<prefix><relative path>"; the prefix keeps them apart from benchmark ids.
DEFAULT_ID_PREFIX = "distractor:"


def iter_image_files(root: str | os.PathLike[str], extensions: frozenset[str] = IMAGE_EXTENSIONS) -> Iterator[Path]:
    """Image files under ``root`` at any depth, lazily, in a deterministic order.

    Order: depth-first, entries of each directory sorted by name (files and sub-folders
    interleaved in that order), so the sequence equals sorting the relative paths by their
    components. Extensions match case-insensitively. Hidden entries (name starting with '.',
    e.g. macOS ``._x.jpg`` resource forks) are skipped. Symlinked folders are followed once
    (a link cycle is not walked twice).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"distractor folder not found: {root} (expected a folder of images, any depth)")
    exts = frozenset(e.lower() for e in extensions)
    seen: set[tuple[int, int]] = set()

    def walk(folder: str) -> Iterator[Path]:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return
        seen.add(key)
        # Only this directory's entries are held (and sorted) at a time.
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                yield from walk(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in exts:
                yield Path(entry.path)

    yield from walk(str(root))


def distractor_image_id(root: str | os.PathLike[str], path: Path, id_prefix: str = DEFAULT_ID_PREFIX) -> str:
    """A distractor image's id: ``id_prefix`` + its path under ``root`` (posix separators)."""
    return id_prefix + Path(path).relative_to(root).as_posix()


def count_image_files(root: str | os.PathLike[str], extensions: frozenset[str] = IMAGE_EXTENSIONS) -> int:
    """Number of files :func:`iter_image_files` yields, counted in constant memory."""
    return sum(1 for _ in iter_image_files(root, extensions))


class DistractorImages(IterableDataset):
    """Stream ``(image, image_id)`` from a distractor folder, sharded over workers and ranks.

    ``image_id`` is ``id_prefix`` + the path relative to ``root`` (POSIX separators). ``image``
    is ``transform(pil_rgb)`` when a transform is given, else a float CHW tensor in [0, 1].
    Item ``i`` of :func:`iter_image_files` goes to shard ``i % (world * workers)``, shard index
    ``rank * workers + worker_id``: every file is read by exactly one process. Rank and world
    size come from ``torch.distributed`` when it is initialised, unless given explicitly.

    Bad images are skipped, logged, and added to ``report``. DataLoader worker processes each
    hold a copy of ``report``: give it a ``spool`` file and call ``report.collect()`` in the main
    process to gather what the workers recorded.
    """

    def __init__(self, root: str | os.PathLike[str], transform: Optional[Callable[[Any], Any]] = None,
                 report: Optional[BadImageReport] = None, id_prefix: str = DEFAULT_ID_PREFIX, *,
                 extensions: frozenset[str] = IMAGE_EXTENSIONS, max_pixels: int = MAX_PIXELS,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"distractor folder not found: {self.root} (expected a folder of images, any depth)")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.transform = transform
        self.report = report
        self.id_prefix = id_prefix
        self.extensions = extensions
        self.max_pixels = max_pixels
        self.rank = rank
        self.world_size = world_size

    def shard(self) -> tuple[int, int]:
        """(this process's shard index, number of shards) for the current worker and rank."""
        rank, world = rank_and_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def image_id(self, path: Path) -> str:
        return distractor_image_id(self.root, path, self.id_prefix)

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        index, shards = self.shard()
        for i, path in enumerate(iter_image_files(self.root, self.extensions)):
            if i % shards != index:
                continue
            image_id = self.image_id(path)
            try:
                image = load_rgb(path, max_pixels=self.max_pixels)
            except BadImageError as e:
                log.warning("skipping distractor %s: %s", image_id, e.reason)
                if self.report is not None:
                    self.report.add(e, image_id)
                continue
            yield (self.transform(image) if self.transform is not None else to_tensor(image)), image_id
