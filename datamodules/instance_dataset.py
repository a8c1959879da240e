"""The item every instance dataset here serves, and the machinery they share.

An item is ``(image, target)`` in the torchvision detection convention: ``image`` float
``(3, H, W)`` in ``[0, 1]`` and ``target`` a :class:`DetectionTarget` (a plain ``dict`` at run
time, which is what torchvision's detectors consume). :class:`InstanceDataset` serves such items
for any annotation format (COCO, VOC, ...): it skips unreadable images, checks each image against
the size its annotation declares, and applies the transforms. :func:`detection_collate` batches
items as lists, since images differ in size.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, TypedDict

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from instsearch.datamodules.image_io import MAX_PIXELS, BadImageError, BadImageReport, load_rgb
from instsearch.datamodules.samplers import SeededIndex
from instsearch.datamodules.transforms import to_float_tensor
from instsearch.seeding import seeded_rng

__all__ = ["DetectionTarget", "detection_collate", "InstanceDataset"]


class _TargetFields(TypedDict):
    """The fields every dataset's :meth:`InstanceDataset.load_target` fills, for ``N`` objects."""

    boxes: Tensor  # float32 (N, 4), xyxy in pixels
    labels: Tensor  # int64 (N,), contiguous labels 1..C (0 is the background)
    iscrowd: Tensor  # int64 (N,), 1 for a crowd region: never a training target, ignored by evaluation
    area: Tensor  # float32 (N,), scaled with any resize
    image_id: Tensor  # int64 scalar
    instance_ids: Tensor  # int64 (N,), the object's instance identity, -1 where the annotation has none


class DetectionTarget(_TargetFields, total=False):
    """The target of one item, as torchvision's detectors and this project's modules read it.

    Besides the fields every dataset fills (see the field comments): ``masks`` when the dataset
    serves instance masks, ``difficult`` from VOC detection annotations, and ``orig_size``, which
    :class:`InstanceDataset` adds to every item it serves (before the transforms run).
    """

    masks: Tensor  # uint8 (N, H, W)
    difficult: Tensor  # int64 (N,), 1 for VOC's "difficult" objects
    orig_size: Tensor  # int64 (2,) = (height, width) of the image before transforms


def detection_collate(batch: Sequence[tuple[Tensor, DetectionTarget]]) -> tuple[list[Tensor], list[DetectionTarget]]:
    """Lists of images and targets: sizes differ, and the detectors pad (and batch) themselves."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class InstanceDataset(Dataset):
    """Machinery shared by every instance dataset: skipping unreadable images, transforms.

    A subclass provides ``__len__``, :meth:`image_path`, :meth:`image_key`, :meth:`expected_size`
    (``(width, height)`` from its annotations, or ``None``), :meth:`aspect_ratios` and
    :meth:`load_target` (which raises :class:`BadImageError` for an unreadable label image, so
    that item is skipped like an unreadable photo).
    """

    transforms: Optional[Callable]
    report: BadImageReport
    max_pixels: int = MAX_PIXELS
    num_classes: int
    category_names: list[str]

    def __init__(self, transforms: Optional[Callable] = None, report: Optional[BadImageReport] = None,
                 max_pixels: int = MAX_PIXELS):
        self.transforms = transforms
        self.report = report if report is not None else BadImageReport()
        self.max_pixels = max_pixels
        self._bad: set[int] = set()  # per process: indices already found unreadable (or empty, see below)
        # Datasets that learn an image is target-less only by reading its labels set this to skip
        # such images on first sight in training (others filter them up front).
        self.skip_empty_lazily = False

    # -- subclass hooks -------------------------------------------------------------------
    def image_path(self, index: int) -> Path:
        raise NotImplementedError

    def image_key(self, index: int) -> str:
        return str(index)

    def expected_size(self, index: int) -> Optional[tuple[int, int]]:
        return None

    def load_target(self, index: int, height: int, width: int) -> DetectionTarget:
        raise NotImplementedError

    def aspect_ratios(self) -> np.ndarray:
        """Width / height of every item, from annotations (no image is opened)."""
        raise NotImplementedError

    # -- serving --------------------------------------------------------------------------
    def __getitem__(self, key: int | SeededIndex) -> tuple[Tensor, DetectionTarget]:
        """The image and target of ``key``: an index, or ``(index, seed)`` from a training batch
        sampler, whose random augmentation then draws from ``seed`` (:func:`~instsearch.seeding.seeded_rng`)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                image = self._load_image(i)
                target = self.load_target(i, image.height, image.width)  # may read label images
            except BadImageError as e:
                self._bad.add(i)
                self.report.add(e, self.image_key(i))
                warnings.warn(f"skipping unreadable training image {e}", RuntimeWarning, stacklevel=2)
                continue
            if self.skip_empty_lazily and not bool((target["iscrowd"] == 0).any()):
                self._bad.add(i)
                continue
            target["orig_size"] = torch.tensor([image.height, image.width], dtype=torch.int64)
            if self.transforms is not None:
                with seeded_rng(seed):
                    image, target = self.transforms(image, target)
            return to_float_tensor(image), target
        raise RuntimeError(f"no readable image with a target left in {type(self).__name__} ({n} items); "
                           f"see the bad-image report ({len(self.report)} entries)")

    def _load_image(self, i: int):
        path = self.image_path(i)
        image = load_rgb(path, max_pixels=self.max_pixels)
        expected = self.expected_size(i)
        if expected is not None and image.size != tuple(expected):
            # Annotations are pixel coordinates of the declared size; serving another size would
            # silently misplace every box and mask.
            raise BadImageError(path, f"image is {image.width}x{image.height} but its annotation declares "
                                      f"{expected[0]}x{expected[1]}")
        return image
