"""PASCAL VOC training data: VOC 2007 boxes and VOC 2012 + SBD instance masks.

Both datasets serve the item every instance dataset serves (a
:class:`~instsearch.datamodules.instance_dataset.DetectionTarget`, labels ``1..20`` in the official
class order, 0 = background), and both DataModules are
:class:`~instsearch.datamodules.detection.DetectionDataModule` s that only change where the items come
from, so batching, multi-scale resizing, DDP sampling and bad-image handling are shared.

On-disk layouts (as the official tarballs unpack)::

    root/VOC2007/Annotations/<id>.xml  JPEGImages/<id>.jpg  ImageSets/Main/{train,val,trainval,test}.txt
    root/VOC2012/SegmentationObject/<id>.png  SegmentationClass/<id>.png  JPEGImages/<id>.jpg
                 ImageSets/Segmentation/{train,val}.txt
    sbd_root/dataset/inst/<id>.mat  cls/<id>.mat  img/<id>.jpg  train.txt  val.txt

Conventions, chosen to match the reference implementations:

* VOC boxes are 1-based inclusive pixel indices; they become continuous ``[xmin - 1, ymin - 1,
  xmax, ymax]`` (as detectron2 converts them), so a box covers exactly its pixels.
* ``difficult`` objects are flagged in ``target["difficult"]``. Training leaves them out unless
  ``use_difficult`` (the py-faster-rcnn protocol that Ren et al.'s RPN, and UDQ after it, train
  with); validation keeps them, flagged, so the VOC evaluator can ignore them.
* VOC 2012 instance masks exclude the 255 "void" boundary band; an instance's class is the
  majority class of its pixels in ``SegmentationClass``. SBD instance classes come from
  ``GTinst.Categories`` (``GTcls`` is only read when that field is missing).
* ``image_id`` is the VOC id with the underscore removed (``2008_000123`` → ``2008000123``).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.ops import masks_to_boxes

from instsearch.datamodules.detection import DetectionDataModule, require_path
from instsearch.datamodules.instance_dataset import DetectionTarget, InstanceDataset
from instsearch.datamodules.image_io import MAX_PIXELS, BadImageError, BadImageReport, image_size
from instsearch.formats import FormatError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
VOID = 255  # label of the boundary / "don't care" band in VOC segmentation PNGs

__all__ = ["VOC_CLASSES", "VOCDetectionDataset", "VOCInstanceDataset", "VOCDetectionDataModule",
           "VOCInstanceDataModule", "read_split", "instances_from_label_maps"]


def read_split(path: Path, layout: str) -> list[str]:
    """Image ids listed one per line (first token; class-specific lists carry a second column)."""
    require_path(path, "VOC split list", layout)
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _numeric_id(voc_id: str) -> int:
    digits = voc_id.replace("_", "")
    if not digits.isdigit():
        raise FormatError(f"VOC image id {voc_id!r} is not of the form 000005 or 2008_000123")
    return int(digits)


def instances_from_label_maps(instance_map: np.ndarray, class_map: Optional[np.ndarray] = None,
                              instance_classes: Optional[np.ndarray] = None) -> dict[str, Tensor]:
    """Masks, labels, boxes and areas of every instance in an instance-id map, at once.

    ``instance_map`` holds 0 for background, ``k`` for the k-th instance, 255 for void. Labels
    come from ``instance_classes[k - 1]`` when given (SBD), else from the majority of
    ``class_map`` over the instance's pixels (VOC 2012), counted for all instances with one
    ``bincount``. Instances without a class (only background / void under them) are dropped.
    """
    instance_map = np.asarray(instance_map).astype(np.int64)
    ids = np.unique(instance_map)
    ids = ids[(ids != 0) & (ids != VOID)]
    if instance_classes is not None:
        classes = np.asarray(instance_classes, dtype=np.int64).reshape(-1)
        labels = np.where(ids <= len(classes), classes[np.minimum(ids, len(classes)) - 1], 0)
    elif class_map is not None:
        class_map = np.asarray(class_map).astype(np.int64)
        if class_map.shape != instance_map.shape:
            raise ValueError(f"class map {class_map.shape} and instance map {instance_map.shape} differ in size")
        counts = np.bincount((instance_map * 256 + class_map).ravel(), minlength=256 * 256).reshape(256, 256)
        votes = counts[ids][:, 1:len(VOC_CLASSES) + 1]  # only real classes vote
        labels = np.where(votes.sum(1) > 0, votes.argmax(1) + 1, 0)
    else:
        raise ValueError("need class_map or instance_classes")
    valid = (labels >= 1) & (labels <= len(VOC_CLASSES))
    ids, labels = ids[valid], labels[valid]
    masks = torch.from_numpy(instance_map[None] == ids[:, None, None])
    if len(ids):
        boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # inclusive index -> edge
    else:
        boxes = torch.zeros(0, 4)
    return {"boxes": boxes.float(), "labels": torch.from_numpy(labels.astype(np.int64)),
            "masks": masks.to(torch.uint8), "area": masks.sum((1, 2)).float()}


class _VOCBase(InstanceDataset):
    num_classes = len(VOC_CLASSES) + 1
    category_names = ["__background__", *VOC_CLASSES]

    def __init__(self, transforms, report, max_pixels):
        super().__init__(transforms, report, max_pixels)
        self.ids: list[str] = []
        self._image_paths: list[Path] = []
        self._sizes = np.zeros((0, 2), np.int64)  # (width, height)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self._image_paths[index]

    def image_key(self, index: int) -> str:
        return self.ids[index]

    def expected_size(self, index: int) -> tuple[int, int]:
        return int(self._sizes[index, 0]), int(self._sizes[index, 1])

    def aspect_ratios(self) -> np.ndarray:
        return self._sizes[:, 0] / self._sizes[:, 1]

    def _base_target(self, index: int, n: int) -> DetectionTarget:
        return {"iscrowd": torch.zeros(n, dtype=torch.int64),
                "image_id": torch.tensor(_numeric_id(self.ids[index]), dtype=torch.int64),
                "instance_ids": torch.full((n,), -1, dtype=torch.int64)}


class VOCDetectionDataset(_VOCBase):
    """VOC detection boxes (``voc_root`` is e.g. ``root/VOC2007``); all XML is parsed up front.

    ``include_difficult`` keeps difficult objects (flagged in ``target["difficult"]``);
    ``skip_empty`` drops images left without an object.
    """

    def __init__(self, voc_root: str | Path, split: str = "trainval", transforms: Optional[Callable] = None,
                 report: Optional[BadImageReport] = None, *, include_difficult: bool = True,
                 skip_empty: bool = False, max_pixels: int = MAX_PIXELS):
        super().__init__(transforms, report, max_pixels)
        self.voc_root = Path(voc_root)
        layout = (f"{self.voc_root}/Annotations/<id>.xml, {self.voc_root}/JPEGImages/<id>.jpg, "
                  f"{self.voc_root}/ImageSets/Main/{split}.txt")
        require_path(self.voc_root, "VOC root", layout)
        ids = read_split(self.voc_root / "ImageSets" / "Main" / f"{split}.txt", layout)
        class_index = {name: k + 1 for k, name in enumerate(VOC_CLASSES)}
        boxes, labels, difficult, counts, sizes, paths, kept_ids = [], [], [], [], [], [], []
        self.stats = {"images": len(ids), "objects": 0, "difficult_dropped": 0, "degenerate_boxes": 0,
                      "images_without_targets": 0}
        for voc_id in ids:
            xml_path = require_path(self.voc_root / "Annotations" / f"{voc_id}.xml", "VOC annotation", layout)
            ann = _parse_voc_xml(xml_path, class_index)
            image_path = self.voc_root / "JPEGImages" / ann["filename"]
            size = ann["size"]
            if size is None:  # some hand-made XML lack <size>: read the image header instead
                try:
                    size = image_size(image_path)
                except BadImageError as e:
                    self.report.add(e, voc_id)
                    continue
            b = np.clip(ann["boxes"], 0, [size[0], size[1], size[0], size[1]])
            ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            self.stats["degenerate_boxes"] += int(np.sum(~ok))
            self.stats["objects"] += len(b)
            if not include_difficult:
                self.stats["difficult_dropped"] += int(np.sum(ok & ann["difficult"]))
                ok &= ~ann["difficult"]
            if skip_empty and not ok.any():
                self.stats["images_without_targets"] += 1
                continue
            boxes.append(b[ok])
            labels.append(ann["labels"][ok])
            difficult.append(ann["difficult"][ok])
            counts.append(int(ok.sum()))
            sizes.append(size)
            paths.append(image_path)
            kept_ids.append(voc_id)
        self.ids, self._image_paths = kept_ids, paths
        self._sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)
        self._start = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._boxes = np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
        self._labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64)
        self._difficult = np.concatenate(difficult).astype(np.int64) if difficult else np.zeros(0, np.int64)

    def load_target(self, index: int, height: int, width: int) -> DetectionTarget:
        s = slice(self._start[index], self._start[index + 1])
        boxes = torch.from_numpy(self._boxes[s].copy()).reshape(-1, 4)
        target = self._base_target(index, len(boxes))
        target.update(boxes=boxes, labels=torch.from_numpy(self._labels[s].copy()),
                      difficult=torch.from_numpy(self._difficult[s].copy()),
                      area=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        return target


def _parse_voc_xml(path: Path, class_index: dict[str, int]) -> dict[str, Any]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise FormatError(f"{path}: not valid XML ({e})") from None
    size = None
    size_el = root.find("size")
    if size_el is not None:
        try:
            w, h = int(float(size_el.findtext("width"))), int(float(size_el.findtext("height")))
            size = (w, h) if w > 0 and h > 0 else None
        except (TypeError, ValueError):
            size = None
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise FormatError(f"{path}: object {i} has class {name!r}, not one of the 20 VOC classes")
        bb = obj.find("bndbox")
        try:
            coords = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise FormatError(f"{path}: object {i} ({name}) needs <bndbox> with numeric xmin/ymin/xmax/ymax") from None
        boxes.append(coords)
        labels.append(class_index[name])
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    b[:, :2] -= 1.0  # 1-based inclusive pixel indices -> continuous pixel edges
    return {"filename": root.findtext("filename") or f"{path.stem}.jpg", "size": size, "boxes": b,
            "labels": np.array(labels, dtype=np.int64), "difficult": np.array(difficult, dtype=bool)}


def _require_scipy():
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError("reading SBD .mat annotations needs scipy: pip install scipy") from None
    return loadmat


def _loadmat(path: Path) -> dict:
    loadmat = _require_scipy()
    try:
        return loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises ValueError / TypeError / MatReadError on bad files
        raise BadImageError(path, f"unreadable .mat annotation ({type(e).__name__}: {e})") from None


def _read_label_png(path: Path) -> np.ndarray:
    """A palette PNG's indices (not its colours): VOC stores labels as palette indices."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise BadImageError(path, f"label image must be a palette or greyscale PNG, got mode {im.mode}")
            return np.asarray(im)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(path, f"unreadable label image ({type(e).__name__}: {e})") from None


class VOCInstanceDataset(_VOCBase):
    """Instance masks from VOC 2012 ``SegmentationObject`` and / or SBD ``inst/*.mat``.

    ``sources`` is a list of ``(kind, root, ids)``: ``("voc", root/VOC2012, ids)`` or
    ``("sbd", sbd_root/dataset, ids)``. An id listed by several sources is served once, from
    the first source that lists it; ``exclude`` ids are never served (keeps a validation set
    out of training). Image sizes come from the image headers (read once, cheaply); the label
    maps are only read per item, so ``skip_empty`` (training) skips an image found to hold no
    instance lazily, the first time it is drawn.
    """

    def __init__(self, sources: Sequence[tuple[str, str | Path, Sequence[str]]], transforms: Optional[Callable] = None,
                 report: Optional[BadImageReport] = None, *, exclude: Sequence[str] = (),
                 skip_empty: bool = False, max_pixels: int = MAX_PIXELS):
        super().__init__(transforms, report, max_pixels)
        self.skip_empty_lazily = skip_empty
        seen = set(exclude)
        self._kind: list[str] = []
        self._label_paths: list[tuple[Path, Path]] = []
        sizes = []
        for kind, root, ids in sources:
            root = Path(root)
            if kind == "sbd":
                _require_scipy()  # fail at construction, not in the first training step
            elif kind != "voc":
                raise ValueError(f"unknown VOC instance source {kind!r} (expected 'voc' or 'sbd')")
            for voc_id in ids:
                if voc_id in seen:
                    continue
                seen.add(voc_id)
                if kind == "voc":
                    image = root / "JPEGImages" / f"{voc_id}.jpg"
                    labels = (root / "SegmentationObject" / f"{voc_id}.png", root / "SegmentationClass" / f"{voc_id}.png")
                else:
                    image = root / "img" / f"{voc_id}.jpg"
                    labels = (root / "inst" / f"{voc_id}.mat", root / "cls" / f"{voc_id}.mat")
                try:
                    sizes.append(image_size(image, max_pixels=max_pixels))
                except BadImageError as e:
                    self.report.add(e, voc_id)
                    continue
                self.ids.append(voc_id)
                self._image_paths.append(image)
                self._kind.append(kind)
                self._label_paths.append(labels)
        self._sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)

    def load_target(self, index: int, height: int, width: int) -> DetectionTarget:
        inst_path, cls_path = self._label_paths[index]
        if self._kind[index] == "voc":
            inst = _read_label_png(inst_path)
            cls = _read_label_png(cls_path)
            parts = instances_from_label_maps(inst, class_map=cls) if inst.shape == cls.shape else None
        else:
            gt = _loadmat(inst_path).get("GTinst")
            inst = np.asarray(getattr(gt, "Segmentation", np.zeros(0)))
            categories = getattr(gt, "Categories", None)
            if categories is not None:
                parts = instances_from_label_maps(inst, instance_classes=np.atleast_1d(categories))
            else:
                cls = np.asarray(getattr(_loadmat(cls_path).get("GTcls"), "Segmentation", np.zeros(0)))
                parts = instances_from_label_maps(inst, class_map=cls) if inst.shape == cls.shape else None
        if parts is None or inst.shape != (height, width):
            raise BadImageError(inst_path, f"label map of shape {inst.shape} does not match the "
                                           f"{width}x{height} image (or its class map)")
        target = self._base_target(index, len(parts["labels"]))
        target.update(parts)
        return target


# ---------------------------------------------------------------------------------------------
# DataModules
# ---------------------------------------------------------------------------------------------

class VOCDetectionDataModule(DetectionDataModule):
    """VOC 2007 (or 2012) detection: ``root/VOC2007``, train on ``train_split``, validate on ``val_split``.

    Defaults follow UDQ's RPN training (VOC 2007 trainval) and test; ``val_split=None`` when the
    test set is not on disk. Scales follow the Faster R-CNN VOC protocol: one scale, short side
    600, long side ≤ 1000. Other arguments: see :class:`DetectionDataModule` (no masks here).
    """

    def __init__(self, root: str | Path, year: int = 2007, train_split: str = "trainval",
                 val_split: Optional[str] = "test", use_difficult: bool = False,
                 train_short_sides: Sequence[int] = (600,), max_size: Optional[int] = 1000,
                 test_short_side: int = 600, **kwargs: Any):
        root = Path(root)
        self.voc_root = root / f"VOC{year}"
        layout = (f"{self.voc_root}/Annotations/<id>.xml, {self.voc_root}/JPEGImages/<id>.jpg, "
                  f"{self.voc_root}/ImageSets/Main/{{train,val,trainval,test}}.txt")
        require_path(root, "VOC root", layout)
        require_path(self.voc_root, f"VOC{year} folder", layout)
        for split in (train_split, val_split):
            if split is not None:
                require_path(self.voc_root / "ImageSets" / "Main" / f"{split}.txt", f"VOC{year} '{split}' split list",
                             layout)
        super().__init__(train_images=None, train_annotations=None, val_images=None, val_annotations=None,
                         masks=False, category_ids=None,
                         train_short_sides=train_short_sides, max_size=max_size, test_short_side=test_short_side,
                         **kwargs)
        self.root, self.year = root, year
        self.train_split, self.val_split, self.use_difficult = train_split, val_split, use_difficult

    def build_dataset(self, split: str) -> Optional[InstanceDataset]:
        train = split == "train"
        name = self.train_split if train else self.val_split
        if name is None:
            return None
        return VOCDetectionDataset(self.voc_root, name,
                                   transforms=self.train_transforms() if train else self.val_transforms(),
                                   report=self.bad_image_report(),
                                   include_difficult=self.use_difficult or not train, skip_empty=train)


class VOCInstanceDataModule(DetectionDataModule):
    """VOC 2012 instance segmentation, optionally with SBD's extra masks.

    ``protocol="voc2012"`` (default): train on VOC 2012 ``Segmentation/train`` plus, with
    ``sbd_root``, SBD train + val, minus every VOC 2012 ``Segmentation/val`` image (no leak);
    validate on VOC 2012 ``Segmentation/val``. ``protocol="sbd"``: train on SBD train, validate
    on SBD val (the MNC / FCIS protocol). Scales follow FCIS on VOC: short side 600, long side
    ≤ 1000. Other arguments: see :class:`DetectionDataModule`.
    """

    def __init__(self, root: str | Path, sbd_root: Optional[str | Path] = None,
                 protocol: Literal["voc2012", "sbd"] = "voc2012", train_short_sides: Sequence[int] = (600,),
                 max_size: Optional[int] = 1000, test_short_side: int = 600, **kwargs: Any):
        root = Path(root)
        self.voc_root = root / "VOC2012"
        self.sbd_dir = Path(sbd_root) / "dataset" if sbd_root is not None else None
        voc_layout = (f"{self.voc_root}/SegmentationObject/<id>.png, {self.voc_root}/SegmentationClass/<id>.png, "
                      f"{self.voc_root}/JPEGImages/<id>.jpg, {self.voc_root}/ImageSets/Segmentation/{{train,val}}.txt")
        if protocol not in ("voc2012", "sbd"):
            raise ValueError(f"protocol must be 'voc2012' or 'sbd', got {protocol!r}")
        if protocol == "sbd" and self.sbd_dir is None:
            raise ValueError("protocol='sbd' needs sbd_root")
        self.splits: dict[str, list[str]] = {}
        if protocol == "voc2012":
            require_path(root, "VOC root", voc_layout)
            require_path(self.voc_root, "VOC2012 folder", voc_layout)
            for s in ("train", "val"):
                self.splits[f"voc_{s}"] = read_split(self.voc_root / "ImageSets" / "Segmentation" / f"{s}.txt",
                                                     voc_layout)
        if self.sbd_dir is not None:
            sbd_layout = (f"{self.sbd_dir}/inst/<id>.mat, {self.sbd_dir}/cls/<id>.mat, {self.sbd_dir}/img/<id>.jpg, "
                          f"{self.sbd_dir}/{{train,val}}.txt")
            require_path(self.sbd_dir, "SBD dataset folder", sbd_layout)
            for s in ("train", "val"):
                self.splits[f"sbd_{s}"] = read_split(self.sbd_dir / f"{s}.txt", sbd_layout)
        super().__init__(train_images=None, train_annotations=None, val_images=None, val_annotations=None,
                         masks=True, category_ids=None,
                         train_short_sides=train_short_sides, max_size=max_size, test_short_side=test_short_side,
                         **kwargs)
        self.root, self.protocol = root, protocol

    def build_dataset(self, split: str) -> Optional[InstanceDataset]:
        train = split == "train"
        if self.protocol == "sbd":
            sources = [("sbd", self.sbd_dir, self.splits["sbd_train" if train else "sbd_val"])]
            exclude: Sequence[str] = ()
        elif train:
            sources = [("voc", self.voc_root, self.splits["voc_train"])]
            if self.sbd_dir is not None:
                sources += [("sbd", self.sbd_dir, self.splits["sbd_train"] + self.splits["sbd_val"])]
            exclude = self.splits["voc_val"]
        else:
            sources, exclude = [("voc", self.voc_root, self.splits["voc_val"])], ()
        return VOCInstanceDataset(sources, transforms=self.train_transforms() if train else self.val_transforms(),
                                  report=self.bad_image_report(), exclude=exclude, skip_empty=train)
