"""Images whose boxes and labels are all known up front: :class:`BoxDataset`.

Some training sets are small lists of images with a few boxes each, read from per-image text
files rather than one annotation file (the fine-tuning sets of :mod:`instsearch.datamodules.finetune`).
Their reader builds :class:`AnnotatedImage` s; :class:`BoxDataset` measures the images once,
clips the boxes to them and serves the item every instance dataset serves, so the generic
:class:`~instsearch.datamodules.detection.DetectionDataModule` batches it like COCO or VOC.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from instsearch.datamodules.converters.common import measure_images
from instsearch.datamodules.instance_dataset import DetectionTarget, InstanceDataset
from instsearch.datamodules.image_io import MAX_PIXELS, BadImageError, BadImageReport
from instsearch.formats import parse_box

__all__ = ["LabelledBox", "AnnotatedImage", "BoxDataset"]


@dataclass(frozen=True)
class LabelledBox:
    """One object: its ``[x1, y1, x2, y2]`` box in pixels as annotated, its label, its source entry."""

    box: tuple[float, float, float, float]
    label: int  # contiguous 1..C, 0 being the background
    where: str  # 'file, line N': named when the box is refused


@dataclass(frozen=True)
class AnnotatedImage:
    """An image file and its objects; ``image_id`` is the image's id in the converted benchmark."""

    image_id: str
    path: Path
    objects: tuple[LabelledBox, ...]


class BoxDataset(InstanceDataset):
    """Serves ``images`` with their boxes (no masks, no crowd regions).

    Construction reads every image header once (sizes for aspect-ratio grouping and clipping);
    an unreadable or missing image is listed in ``report`` and left out. Boxes partly outside
    their image are clipped; an empty, inverted or wholly outside box is a
    :class:`~instsearch.formats.FormatError` naming its entry, as in ``instsearch convert``.
    ``category_names[0]`` is the background.
    """

    def __init__(self, images: Sequence[AnnotatedImage], category_names: Sequence[str],
                 transforms: Optional[Callable] = None, report: Optional[BadImageReport] = None, *,
                 max_pixels: int = MAX_PIXELS, workers: int = 8):
        super().__init__(transforms, report, max_pixels)
        self.category_names = list(category_names)
        self.num_classes = len(self.category_names)
        ids = [im.image_id for im in images]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{type(self).__name__}: image ids must be unique (merge the objects of one image)")
        sizes, unreadable = measure_images({im.image_id: im.path for im in images}, max_pixels=max_pixels,
                                           workers=workers)
        for entry in unreadable.entries:
            self.report.add(BadImageError(entry["path"], entry["reason"]), entry["image"])
        self.images = [im for im in images if im.image_id in sizes]
        # the position in the given list: stable whichever images are unreadable
        self._numeric_ids = [k for k, im in enumerate(images) if im.image_id in sizes]
        self._sizes = np.array([sizes[im.image_id] for im in self.images], dtype=np.int64).reshape(-1, 2)
        boxes, labels = [], []
        for im, (width, height) in zip(self.images, self._sizes.tolist()):
            for obj in im.objects:
                if not 1 <= obj.label < self.num_classes:
                    raise ValueError(f"{obj.where}: label {obj.label} outside 1..{self.num_classes - 1}")
                boxes.append(parse_box(obj.box, obj.where, size=(width, height)))
                labels.append(obj.label)
        self._start = np.concatenate([[0], np.cumsum([len(im.objects) for im in self.images], dtype=np.int64)])
        self._boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        self._labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.images[index].path

    def image_key(self, index: int) -> str:
        return self.images[index].image_id

    def expected_size(self, index: int) -> tuple[int, int]:
        return int(self._sizes[index, 0]), int(self._sizes[index, 1])

    def aspect_ratios(self) -> np.ndarray:
        return self._sizes[:, 0] / self._sizes[:, 1]

    def load_target(self, index: int, height: int, width: int) -> DetectionTarget:
        s = slice(self._start[index], self._start[index + 1])
        boxes = torch.from_numpy(self._boxes[s].copy())
        labels = torch.from_numpy(self._labels[s].copy())
        return {"boxes": boxes, "labels": labels, "iscrowd": torch.zeros_like(labels),
                "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                "image_id": torch.tensor(self._numeric_ids[index], dtype=torch.int64),
                # every class of these sets is one object instance: the class is the identity
                "instance_ids": labels - 1}
