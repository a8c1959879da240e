"""COCO-format instance data for training detectors and instance segmenters.

:class:`CocoInstances` serves ``(image, target)`` in the torchvision detection convention and is
the item format every training dataset here shares (VOC included). :class:`DetectionDataModule`
turns any pair of COCO-format splits into Lightning dataloaders with multi-scale training,
aspect-ratio grouped batching and DDP-safe sampling; :class:`CocoDataModule` (and
:class:`~instsearch.datamodules.synthetic.SyntheticDataModule`) only say where the files are.

Annotation policy (the COCO protocol, as detectron2 and torchvision's references apply it):

* ``iscrowd=1`` regions (RLE blobs covering a crowd) are never training targets: a detector
  taught to fire on "a crowd of people" as one person learns the wrong box. A training dataset
  (``include_crowd=False``) leaves them out of the target. An evaluation dataset
  (``include_crowd=True``) keeps them with ``iscrowd = 1`` so an evaluator can ignore detections
  that fall on them, as COCOeval does.
* Boxes are clipped to the image; boxes empty after clipping are dropped and counted in
  :attr:`CocoInstances.stats`, as are annotations of categories outside ``category_ids`` and, when
  masks are asked for, annotations without a usable segmentation (polygons need ≥ 3 points).
* With ``skip_empty=True`` (training) an image left with no non-crowd target is not served: it
  would contribute only background. Validation keeps every image.
* An image that cannot be decoded is skipped at load time: the dataset serves the next readable
  item instead, remembers the index, and records the file in its :class:`BadImageReport`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
from multiprocessing import util as mp_util
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from instsearch.datamodules.benchmark import ServesBenchmark
from instsearch.datamodules.image_io import MAX_PIXELS, BadImageError, BadImageReport, load_rgb
from instsearch.datamodules.transforms import Compose, RandomHorizontalFlip, RandomResize, Resize, ToTensor, to_float_tensor
from instsearch.formats import FormatError

Target = dict[str, Tensor]
log = logging.getLogger(__name__)

__all__ = ["CocoInstances", "InstanceDataset", "GroupedBatchSampler", "aspect_ratio_groups",
           "detection_collate", "DetectionDataModule", "CocoDataModule"]

# Segmentation kinds, decided once per annotation at load time.
_SEG_NONE, _SEG_POLY, _SEG_RLE, _SEG_URLE = 0, 1, 2, 3


def detection_collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
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

    def load_target(self, index: int, height: int, width: int) -> Target:
        raise NotImplementedError

    def aspect_ratios(self) -> np.ndarray:
        """Width / height of every item, from annotations (no image is opened)."""
        raise NotImplementedError

    # -- serving --------------------------------------------------------------------------
    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
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


def _load_coco_json(annotation_file: Path) -> dict:
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
    try:
        with open(annotation_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{annotation_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{annotation_file}: expected a COCO object with 'images', 'annotations', "
                          f"'categories', got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise FormatError(f"{annotation_file}: missing or non-list '{key}' (COCO instances format)")
    return data


def _segmentation_kind(segm: Any) -> int:
    if isinstance(segm, list):
        return _SEG_POLY if any(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm) else _SEG_NONE
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        return _SEG_URLE if isinstance(segm["counts"], list) else _SEG_RLE
    return _SEG_NONE


def _numeric_column(entries: list[dict], key: str, where: str, default: Any = None, width: int = 0) -> np.ndarray:
    """One field of every entry as an array; a missing or malformed value names its entry."""
    values = [e.get(key, default) if isinstance(e, dict) else None for e in entries]
    try:
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != ((len(values), width) if width else (len(values),)):
            raise ValueError
        return arr
    except (TypeError, ValueError):
        for i, v in enumerate(values):
            try:
                a = np.asarray(v, dtype=np.float64)
                ok = a.shape == ((width,) if width else ())
            except (TypeError, ValueError):
                ok = False
            if not ok:
                shape = f"[{width} numbers]" if width else "a number"
                raise FormatError(f"{where}[{i}]: '{key}' must be {shape}, got {v!r}") from None
        raise


class CocoInstances(InstanceDataset):
    """A COCO-format instances file as a detection / instance segmentation dataset.

    Item: ``(image, target)``; ``image`` float ``(3, H, W)`` in ``[0, 1]``; ``target`` holds
    ``boxes`` float32 ``(N, 4)`` xyxy pixels, ``labels`` int64 ``(N,)`` in ``1..C`` (0 is
    background), ``masks`` uint8 ``(N, H, W)`` (when ``masks=True``), ``iscrowd`` int64,
    ``area`` float32 (the file's area, scaled with any resize), ``image_id`` int64 scalar,
    ``instance_ids`` int64 (the annotation's ``instance_id``, -1 without), ``orig_size`` int64
    ``(2,)`` = (height, width) before transforms.

    ``category_ids`` chooses which categories are targets and in which order (label ``k`` is
    ``category_ids[k-1]``); default: every category in the file, sorted by id (the usual
    COCO 80-class mapping).
    """

    def __init__(self, images_dir: str | Path, annotation_file: str | Path, masks: bool = True,
                 transforms: Optional[Callable] = None, category_ids: Optional[Sequence[int]] = None,
                 report: Optional[BadImageReport] = None, *, skip_empty: bool = False,
                 include_crowd: bool = True, max_pixels: int = MAX_PIXELS):
        super().__init__(transforms, report, max_pixels)
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.masks = masks
        self.skip_empty = skip_empty
        self.include_crowd = include_crowd
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.images_dir}")
        data = _load_coco_json(self.annotation_file)
        self._setup_categories(data["categories"], category_ids)
        self._setup_images(data["images"])
        self._setup_annotations(data["annotations"])
        # pycocotools' index (validated input only: it raises bare KeyErrors otherwise), for
        # evaluators that want COCOeval on the same file.
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

    # -- indexing (vectorised over all annotations) ----------------------------------------
    def _setup_categories(self, categories: list[dict], category_ids: Optional[Sequence[int]]) -> None:
        where = f"{self.annotation_file}: categories"
        by_id: dict[int, str] = {}
        for i, c in enumerate(categories):
            if not isinstance(c, dict) or not isinstance(c.get("id"), int):
                raise FormatError(f"{where}[{i}]: needs an integer 'id', got {c!r}")
            by_id[c["id"]] = str(c.get("name", c["id"]))
        ids = sorted(by_id) if category_ids is None else [int(c) for c in category_ids]
        if not ids:
            raise FormatError(f"{where}: no categories (need at least one to train on)")
        missing = [c for c in ids if c not in by_id]
        if missing:
            raise ValueError(f"category_ids {missing} are not in {self.annotation_file} "
                             f"(it has {sorted(by_id)})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"category_ids has duplicates: {ids}")
        self.category_ids = ids
        self.category_names = ["__background__"] + [by_id[c] for c in ids]
        self.num_classes = len(ids) + 1
        self.cat_id_to_label = {c: k + 1 for k, c in enumerate(ids)}

    def _setup_images(self, images: list[dict]) -> None:
        where = f"{self.annotation_file}: images"
        ids = _numeric_column(images, "id", where)
        if not np.all(ids == np.round(ids)):
            bad = int(np.flatnonzero(ids != np.round(ids))[0])
            raise FormatError(f"{where}[{bad}]: 'id' must be an integer, got {images[bad].get('id')!r}")
        self._img_ids = ids.astype(np.int64)
        if len(np.unique(self._img_ids)) != len(self._img_ids):
            raise FormatError(f"{where}: image ids are not unique")
        self._img_w = _numeric_column(images, "width", where)
        self._img_h = _numeric_column(images, "height", where)
        if np.any(self._img_w <= 0) or np.any(self._img_h <= 0):
            bad = int(np.flatnonzero((self._img_w <= 0) | (self._img_h <= 0))[0])
            raise FormatError(f"{where}[{bad}]: width and height must be positive")
        for i, im in enumerate(images):
            if not isinstance(im.get("file_name"), str):
                raise FormatError(f"{where}[{i}]: needs a string 'file_name'")
        self._img_files = [im["file_name"] for im in images]

    def _setup_annotations(self, anns: list[dict]) -> None:
        where = f"{self.annotation_file}: annotations"
        self._anns = anns
        n_img = len(self._img_ids)
        stats = {"annotations": len(anns), "crowd": 0, "crowd_dropped": 0, "degenerate_boxes": 0,
                 "unknown_category": 0, "no_segmentation": 0, "images": n_img, "images_without_targets": 0}
        if anns:
            img_of_ann = _numeric_column(anns, "image_id", where).astype(np.int64)
            xywh = _numeric_column(anns, "bbox", where, width=4)
            cats = _numeric_column(anns, "category_id", where).astype(np.int64)
            crowd = _numeric_column(anns, "iscrowd", where, default=0).astype(np.int64)
            inst = _numeric_column(anns, "instance_id", where, default=-1).astype(np.int64)
            area = _numeric_column(anns, "area", where, default=math.nan)
        else:
            img_of_ann = cats = crowd = inst = np.zeros(0, np.int64)
            xywh, area = np.zeros((0, 4)), np.zeros(0)
        # image row of every annotation
        order = np.argsort(self._img_ids)
        pos = np.searchsorted(self._img_ids, img_of_ann, sorter=order)
        pos = np.clip(pos, 0, max(n_img - 1, 0))
        known_img = (self._img_ids[order[pos]] == img_of_ann) if n_img else np.zeros(len(anns), bool)
        if not np.all(known_img):
            bad = int(np.flatnonzero(~known_img)[0])
            raise FormatError(f"{where}[{bad}]: image_id {img_of_ann[bad]} is not in 'images'")
        row = order[pos] if n_img else pos
        # clip boxes to their image, drop the empty ones
        w, h = self._img_w[row], self._img_h[row]
        boxes = np.stack([xywh[:, 0], xywh[:, 1], xywh[:, 0] + xywh[:, 2], xywh[:, 1] + xywh[:, 3]], axis=1)
        boxes = np.clip(boxes, 0.0, np.stack([w, h, w, h], axis=1))
        finite = np.isfinite(boxes).all(axis=1)
        nondegenerate = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        # category id -> contiguous label through a sorted lookup table
        lut_ids = np.array(self.category_ids, dtype=np.int64)
        lut_order = np.argsort(lut_ids)
        sorted_ids = lut_ids[lut_order]
        cat_pos = np.minimum(np.searchsorted(sorted_ids, cats), len(sorted_ids) - 1)
        known_cat = sorted_ids[cat_pos] == cats
        labels = np.where(known_cat, lut_order[cat_pos] + 1, 0).astype(np.int64)
        keep = nondegenerate & known_cat
        if self.masks:
            kinds = np.fromiter((_segmentation_kind(a.get("segmentation")) for a in anns), np.int8, len(anns))
            has_seg = kinds != _SEG_NONE
            stats["no_segmentation"] = int(np.sum(keep & ~has_seg))
            keep &= has_seg
        else:
            kinds = np.zeros(len(anns), np.int8)
        stats["degenerate_boxes"] = int(np.sum(known_cat & ~nondegenerate))
        stats["unknown_category"] = int(np.sum(~known_cat))
        is_crowd = crowd > 0
        stats["crowd"] = int(np.sum(keep & is_crowd))
        if not self.include_crowd:
            stats["crowd_dropped"] = stats["crowd"]
            keep &= ~is_crowd
        area = np.where(np.isfinite(area), area, (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))

        kept = np.flatnonzero(keep)
        by_image = kept[np.argsort(row[kept], kind="stable")]
        starts = np.searchsorted(row[by_image], np.arange(n_img + 1))
        self._ann_index = by_image  # positions into the annotation list, grouped by image row
        self._ann_start = starts
        self._boxes = boxes[by_image].astype(np.float32)
        self._labels = labels[by_image]
        self._crowd = is_crowd[by_image].astype(np.int64)
        self._area = area[by_image].astype(np.float32)
        self._inst = inst[by_image]
        self._kinds = kinds[by_image]

        n_targets = np.bincount(row[kept[~is_crowd[kept]]], minlength=n_img) if n_img else np.zeros(0, np.int64)
        stats["images_without_targets"] = int(np.sum(n_targets == 0))
        self._rows = np.flatnonzero(n_targets > 0) if self.skip_empty else np.arange(n_img)
        self.stats = stats
        dropped = {k: stats[k] for k in ("degenerate_boxes", "unknown_category", "no_segmentation", "crowd_dropped")
                   if stats[k]}
        if dropped:
            log.info("%s: %d annotations, left out: %s; %d of %d images without a target%s", self.annotation_file,
                     len(anns), dropped, stats["images_without_targets"], n_img,
                     " (skipped)" if self.skip_empty else "")

    # -- InstanceDataset hooks --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self._img_files[self._rows[index]]

    def image_key(self, index: int) -> str:
        return str(int(self._img_ids[self._rows[index]]))

    def image_id(self, index: int) -> int:
        return int(self._img_ids[self._rows[index]])

    def expected_size(self, index: int) -> tuple[int, int]:
        r = self._rows[index]
        return int(self._img_w[r]), int(self._img_h[r])

    def aspect_ratios(self) -> np.ndarray:
        return self._img_w[self._rows] / self._img_h[self._rows]

    def load_target(self, index: int, height: int, width: int) -> Target:
        r = self._rows[index]
        s = slice(self._ann_start[r], self._ann_start[r + 1])
        target = {
            "boxes": torch.from_numpy(self._boxes[s].copy()).reshape(-1, 4),
            "labels": torch.from_numpy(self._labels[s].copy()),
            "iscrowd": torch.from_numpy(self._crowd[s].copy()),
            "area": torch.from_numpy(self._area[s].copy()),
            "image_id": torch.tensor(int(self._img_ids[r]), dtype=torch.int64),
            "instance_ids": torch.from_numpy(self._inst[s].copy()),
        }
        if self.masks:
            target["masks"] = self._decode_masks(self._ann_index[s], self._kinds[s], height, width)
        return target

    def _decode_masks(self, ann_index: np.ndarray, kinds: np.ndarray, h: int, w: int) -> Tensor:
        """All masks of one image with one pycocotools decode.

        Every segmentation is first brought to compressed RLE: all polygons of the image in one
        ``frPyObjects`` call, the parts of multi-polygon objects merged in the RLE domain (run
        lengths, no pixels), uncompressed RLE converted in one call. Merging in RLE is several
        times faster than OR-ing decoded full-resolution masks.
        """
        n = len(ann_index)
        if n == 0:
            return torch.zeros((0, h, w), dtype=torch.uint8)
        segs = [self._anns[j]["segmentation"] for j in ann_index]
        rles: list = [None] * n
        poly_objs = np.flatnonzero(kinds == _SEG_POLY)
        if len(poly_objs):
            polys_per_obj = [[p for p in segs[k] if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
                             for k in poly_objs]
            flat = [p for ps in polys_per_obj for p in ps]
            counts = np.array([len(ps) for ps in polys_per_obj])
            ends = np.cumsum(counts)
            parts = mask_utils.frPyObjects(flat, h, w)
            for k, a, b in zip(poly_objs, ends - counts, ends):  # RLE list splicing, no pixel work
                rles[k] = parts[a] if b - a == 1 else mask_utils.merge(parts[a:b])
        rle_objs = np.flatnonzero((kinds == _SEG_RLE) | (kinds == _SEG_URLE))
        if len(rle_objs):
            sizes = np.array([segs[k]["size"] for k in rle_objs], dtype=np.int64).reshape(-1, 2)
            bad = np.flatnonzero((sizes[:, 0] != h) | (sizes[:, 1] != w))
            if len(bad):
                j = int(ann_index[rle_objs[bad[0]]])
                raise FormatError(f"{self.annotation_file}: annotations[{j}] (id {self._anns[j].get('id')}): RLE size "
                                  f"{sizes[bad[0]].tolist()} differs from its image's [height, width] [{h}, {w}]")
            for k in rle_objs[kinds[rle_objs] == _SEG_RLE]:
                rles[k] = segs[k]
            uncompressed = rle_objs[kinds[rle_objs] == _SEG_URLE]
            if len(uncompressed):
                for k, rle in zip(uncompressed, mask_utils.frPyObjects([segs[k] for k in uncompressed], h, w)):
                    rles[k] = rle
        decoded = mask_utils.decode(rles)  # (h, w, n), Fortran order
        return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# DataModules
# ---------------------------------------------------------------------------------------------

class DetectionDataModule(ServesBenchmark, pl.LightningDataModule):
    """COCO-format training (and optional validation) data for detectors and instance segmenters.

    * training: multi-scale shortest-edge resize (``train_short_sides``, long side ≤ ``max_size``)
      and horizontal flips; images without a non-crowd target skipped; crowd regions left out;
    * validation: one scale (``test_short_side``), every image, crowd regions kept and flagged;
    * batches are lists (:func:`detection_collate`); with ``group_by_aspect_ratio`` a
      :class:`GroupedBatchSampler` puts images of similar shape together so the detector's
      padding to the largest image in the batch wastes little;
    * distributed: under a Trainer with ``use_distributed_sampler=True`` (the default), Lightning
      re-creates the grouped batch sampler around its own ``DistributedSampler``; otherwise, when
      ``torch.distributed`` is initialised, the module shards with a ``DistributedSampler``
      itself (``seed`` fixes its shuffling). Either way every rank gets the same number of steps;
    * ``benchmark`` is the ``benchmark.json`` the retrieval evaluation reads
      (``trainer.datamodule.benchmark``); ``test_dataloader`` / ``predict_dataloader`` serve it
      as :class:`~instsearch.datamodules.benchmark.BenchmarkDataModule` does (long side capped at
      ``benchmark_max_side``);
    * unreadable images are skipped and listed in :meth:`bad_image_report`, written to
      ``<log_dir>/bad_images.json`` at teardown when there are any.

    ``test_short_side`` defaults to 800 with ``max_size`` 1333 (the Mask R-CNN / detectron2
    evaluation scale matching the default multi-scale range); FCIS' own protocol is 600 / 1000.

    Subclasses with another annotation format pass ``train_images=train_annotations=None`` and
    override :meth:`build_dataset` (the VOC modules do); everything else is shared. Outside
    Lightning, call ``loader.batch_sampler.sampler.set_epoch(epoch)`` when sharded, as with any
    ``DistributedSampler``.
    """

    def __init__(self, train_images: Optional[str | Path], train_annotations: Optional[str | Path],
                 val_images: Optional[str | Path] = None, val_annotations: Optional[str | Path] = None,
                 benchmark: Optional[str | Path] = None, batch_size: int = 2, num_workers: int = 2,
                 train_short_sides: Sequence[int] = (480, 576, 688, 864, 1000), max_size: Optional[int] = 1333,
                 test_short_side: int = 800, hflip: float = 0.5, masks: bool = True,
                 group_by_aspect_ratio: bool = True, category_ids: Optional[Sequence[int]] = None,
                 aspect_ratio_group_k: int = 3, val_batch_size: Optional[int] = None, seed: int = 0,
                 pin_memory: bool = False, benchmark_max_side: Optional[int] = 1600):
        super().__init__()
        if (val_images is None) != (val_annotations is None):
            raise ValueError("give both val_images and val_annotations, or neither")
        self.train_images = Path(train_images) if train_images is not None else None
        self.train_annotations = Path(train_annotations) if train_annotations is not None else None
        self.val_images = Path(val_images) if val_images is not None else None
        self.val_annotations = Path(val_annotations) if val_annotations is not None else None
        self.benchmark = str(benchmark) if benchmark is not None else None
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.train_short_sides = tuple(int(s) for s in train_short_sides)
        self.max_size = max_size
        self.test_short_side = int(test_short_side)
        self.hflip = float(hflip)
        self.masks = masks
        self.group_by_aspect_ratio = group_by_aspect_ratio
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.aspect_ratio_group_k = aspect_ratio_group_k
        self.seed = seed
        self.pin_memory = pin_memory
        self.benchmark_max_side = benchmark_max_side
        self.train_dataset: Optional[InstanceDataset] = None
        self.val_dataset: Optional[InstanceDataset] = None
        self._report: Optional[BadImageReport] = None

    # -- overridable pieces --------------------------------------------------------------
    def train_transforms(self) -> Callable:
        return Compose([RandomResize(self.train_short_sides, self.max_size), RandomHorizontalFlip(self.hflip),
                        ToTensor()])

    def val_transforms(self) -> Callable:
        return Compose([Resize(self.test_short_side, self.max_size), ToTensor()])

    def build_dataset(self, split: str) -> Optional[InstanceDataset]:
        """The dataset of ``split`` ("train" or "val"), or ``None`` when that split is not configured."""
        train = split == "train"
        images, annotations = ((self.train_images, self.train_annotations) if train
                               else (self.val_images, self.val_annotations))
        if images is None:
            return None
        return CocoInstances(images, annotations, masks=self.masks,
                             transforms=self.train_transforms() if train else self.val_transforms(),
                             category_ids=self.category_ids, report=self.bad_image_report(),
                             skip_empty=train, include_crowd=not train)

    def ensure_data(self) -> None:
        """Make sure the files exist before a dataset is built (hook for generated data)."""

    # -- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        self.ensure_data()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self.build_dataset("train")
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self.build_dataset("val")

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        ds = self.train_dataset
        if len(ds) == 0:
            raise RuntimeError(f"the training split has no image with a usable target "
                               f"({self.train_annotations or type(self).__name__})")
        sampler = self._train_sampler(ds)
        if self.group_by_aspect_ratio:
            groups = aspect_ratio_groups(ds.aspect_ratios(), self.aspect_ratio_group_k)
            batch_sampler: BatchSampler = GroupedBatchSampler(sampler, groups, self.batch_size)
        else:
            batch_sampler = BatchSampler(sampler, self.batch_size, drop_last=False)
        return self._loader(ds, batch_sampler=batch_sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False)

    @property
    def benchmark_batch_size(self) -> int:  # read by ServesBenchmark.test_dataloader
        return self.val_batch_size

    def teardown(self, stage: Optional[str] = None) -> None:
        if self._report is None:
            return
        self._report.collect()
        if len(self._report) and self.trainer is not None:
            # Each rank skips the images of its own shard: each writes its own list (no collective
            # call here, so a rank that failed earlier cannot hang the others).
            rank = self.trainer.global_rank
            name = "bad_images.json" if rank == 0 else f"bad_images.rank{rank}.json"
            out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / name
            self._report.write(out)
            warnings.warn(f"{len(self._report)} unreadable training image(s) skipped; listed in {out}",
                          RuntimeWarning, stacklevel=2)

    # -- properties ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Categories + 1 (background), from the training annotations."""
        return self._reference_dataset().num_classes

    @property
    def category_names(self) -> list[str]:
        """Name of each contiguous label; index 0 is the background."""
        return self._reference_dataset().category_names

    def bad_image_report(self) -> BadImageReport:
        """Images skipped so far, in this process and its DataLoader workers."""
        if self._report is None:
            fd, spool = tempfile.mkstemp(prefix="instsearch-bad-images-", suffix=".jsonl")
            os.close(fd)
            self._report = BadImageReport(spool=spool)
            # Removed at garbage collection or exit, also in spawned DDP ranks (multiprocessing's
            # finalizers run there; forked DataLoader workers drop inherited ones, as they must).
            mp_util.Finalize(self, _unlink_quietly, args=(spool,), exitpriority=0)
        return self._report.collect()

    # -- internals -----------------------------------------------------------------------
    def _reference_dataset(self) -> InstanceDataset:
        if self.train_dataset is None:
            self.ensure_data()
            self.train_dataset = self.build_dataset("train")
        return self.train_dataset

    def _train_sampler(self, ds: Dataset) -> Sampler[int]:
        if self._shard_here():
            return DistributedSampler(ds, shuffle=True, seed=self.seed, drop_last=False)
        return RandomSampler(ds)

    def _shard_here(self) -> bool:
        """Shard ourselves only where Lightning will not inject its DistributedSampler."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        trainer = self.trainer
        if trainer is None:
            return True
        connector = getattr(trainer, "_accelerator_connector", None)
        return not getattr(connector, "use_distributed_sampler", True)

    def _loader(self, ds: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(ds, num_workers=self.num_workers, collate_fn=detection_collate,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, **kwargs)


def _unlink_quietly(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def _require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (expected layout: {layout})")
    return path


class CocoDataModule(DetectionDataModule):
    """MS-COCO instances from ``root``::

        root/train2017/*.jpg   root/val2017/*.jpg
        root/annotations/instances_train2017.json   root/annotations/instances_val2017.json

    (``year=2014``: ``train2014``, ``val2014``, ``instances_{train,val}2014.json``). Set
    ``with_val=False`` when only the training split is on disk. Other arguments: see
    :class:`DetectionDataModule`.
    """

    def __init__(self, root: str | Path, year: int = 2017, with_val: bool = True, **kwargs: Any):
        root = Path(root)
        if year not in (2014, 2017):
            raise ValueError(f"COCO year must be 2014 or 2017, got {year}")
        layout = (f"{root}/train{year}/, {root}/val{year}/, {root}/annotations/instances_train{year}.json, "
                  f"{root}/annotations/instances_val{year}.json")
        _require(root, "COCO root", layout)
        splits = ["train", "val"] if with_val else ["train"]
        paths: dict[str, Optional[Path]] = {"val_images": None, "val_annotations": None}
        for split in splits:
            paths[f"{split}_images"] = _require(root / f"{split}{year}", f"COCO {split}{year} image folder", layout)
            paths[f"{split}_annotations"] = _require(root / "annotations" / f"instances_{split}{year}.json",
                                                     f"COCO {split}{year} annotation file", layout)
        super().__init__(train_images=paths["train_images"], train_annotations=paths["train_annotations"],
                         val_images=paths["val_images"], val_annotations=paths["val_annotations"], **kwargs)
        self.root, self.year = root, year

