"""A COCO-format instances file as a training / evaluation dataset (:class:`CocoInstances`).

The COCO-format reader every COCO-format DataModule shares (COCO itself, the synthetic benchmark,
any converted dataset). Parsing is vectorised over all annotations at construction; an item's
masks are decoded with one pycocotools call.

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
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from instsearch.datamodules.instance_dataset import DetectionTarget, InstanceDataset
from instsearch.datamodules.image_io import MAX_PIXELS, BadImageReport
from instsearch.formats import FormatError

log = logging.getLogger(__name__)

__all__ = ["CocoInstances"]

# Segmentation kinds, decided once per annotation at load time.
_SEG_NONE, _SEG_POLY, _SEG_RLE, _SEG_URLE = 0, 1, 2, 3


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

    Item: ``(image, target)`` with a :class:`~instsearch.datamodules.instance_dataset.DetectionTarget`:
    ``masks`` when ``masks=True``, ``area`` the file's (scaled with any resize), ``image_id`` the
    file's image id, ``instance_ids`` the annotations' ``instance_id`` (-1 without).

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

    def load_target(self, index: int, height: int, width: int) -> DetectionTarget:
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
