"""Fine-tuning the detector on the benchmark's own instances, as the deep region CNN paper does.

Mei et al. 2018 ("deep region CNN") fine-tune their Faster R-CNN on the instances of the
benchmark it then searches, with one detector class per instance (plus the background):

* INSTRE: "we randomly select 75 images from each class to form the training set for
  fine-tuning Faster R-CNN", on INSTRE-S (S1 + S2: 200 single-object classes) only;
  :class:`InstreFinetuneDataModule`;
* Oxford: "only the query image is marked with the ground truth ... we only use the 55 markup
  images for fine tuning": the 55 query images with their query boxes, one class per landmark
  (11); :class:`OxfordFinetuneDataModule` (Paris 6k, same layout, too).

Both read the folders exactly as distributed, through the same helpers ``instsearch convert``
uses (:mod:`instsearch.datamodules.converters.instre`, :mod:`~instsearch.datamodules.converters.oxford`),
so ids, class order and box conventions agree with the converted benchmark.

**Protocol choice.** The paper does not say that the fine-tuning images leave the searched
database; its numbers are on the standard benchmarks (the full INSTRE database; on Oxford the
55 queries *are* the fine-tuning images). ``exclude_finetune_images=False`` (default) follows
that reading and serves the benchmark unchanged. With ``True``, :meth:`FinetuneDataModule.load_benchmark`
serves it without the training images: they leave the database and every query's positives and
junk, while a query whose own image was trained on stays a query (see :func:`without_database_images`).
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from instsearch.datamodules.box_dataset import AnnotatedImage, BoxDataset, LabelledBox
from instsearch.datamodules.converters import instre, oxford
from instsearch.datamodules.converters.common import require_dir
from instsearch.datamodules.detection import DetectionDataModule
from instsearch.formats import Benchmark, FormatError, GroundTruth

__all__ = ["FinetuneSelection", "FinetuneDataModule", "InstreFinetuneDataModule", "OxfordFinetuneDataModule",
           "INSTRE_FINETUNE_SUBSETS", "draw_split", "without_database_images"]

# The paper fine-tunes on INSTRE-S only; an INSTRE-M image shows two different objects, which
# no single class label describes.
INSTRE_FINETUNE_SUBSETS = ("INSTRE-S1", "INSTRE-S2")


@dataclass(frozen=True)
class FinetuneSelection:
    """The detector's classes (label ``k + 1`` is ``classes[k]``) and the images chosen for each split."""

    classes: tuple[str, ...]
    train: tuple[AnnotatedImage, ...]
    val: tuple[AnnotatedImage, ...] = ()


def without_database_images(benchmark: Benchmark, image_ids: Iterable[str]) -> Benchmark:
    """``benchmark`` with ``image_ids`` out of the database and out of every query's positives and junk.

    Every query stays, also one whose own image is removed: its image entry is kept, so it is still
    served as a query. The name gains ``-minus-finetune`` and ``extra`` records how many database
    images left, so results are not mistaken for the standard protocol's.
    """
    removed = set(image_ids)
    database = [i for i in benchmark.database if i not in removed]
    ground_truth = {qid: GroundTruth({i: boxes for i, boxes in g.positives.items() if i not in removed},
                                     {i for i in g.junk if i not in removed})
                    for qid, g in benchmark.ground_truth.items()}
    return dataclasses.replace(benchmark, name=f"{benchmark.name}-minus-finetune", database=database,
                               ground_truth=ground_truth,
                               extra={**benchmark.extra,
                                      "finetune_images_excluded": len(benchmark.database) - len(database)})


def draw_split(items: Sequence[Any], counts: Sequence[int], seed: int, key: str) -> list[list[Any]]:
    """Disjoint random draws of ``counts[0]``, ``counts[1]``, ... items, each kept in the given order.

    The generator is seeded by ``seed`` and ``key`` (a class name), so a class draws the same
    images whichever other classes are selected alongside it.
    """
    if sum(counts) > len(items):
        raise ValueError(f"{key}: {' + '.join(map(str, counts))} images wanted, only {len(items)} there")
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    order = rng.permutation(len(items))
    bounds = np.cumsum([0, *counts])
    return [[items[i] for i in sorted(order[a:b].tolist())] for a, b in zip(bounds[:-1], bounds[1:])]


class FinetuneDataModule(DetectionDataModule):
    """Fine-tuning data chosen from a benchmark's own dataset, and that benchmark, with or without it.

    A subclass implements :meth:`select`; datasets, ``num_classes`` and the served benchmark
    follow from its :class:`FinetuneSelection`, computed once on first use. Scales follow the
    paper's Faster R-CNN: short side 600, long side at most 1000, for training and validation.
    Other arguments: see :class:`~instsearch.datamodules.detection.DetectionDataModule`.
    """

    def __init__(self, exclude_finetune_images: bool = False, train_short_sides: Sequence[int] = (600,),
                 max_size: Optional[int] = 1000, test_short_side: int = 600, **kwargs: Any):
        super().__init__(train_images=None, train_annotations=None, masks=False, category_ids=None,
                         train_short_sides=train_short_sides, max_size=max_size, test_short_side=test_short_side,
                         **kwargs)
        self.exclude_finetune_images = exclude_finetune_images
        self._selection: Optional[FinetuneSelection] = None
        self._served: Optional[tuple[Benchmark, Benchmark]] = None  # (as loaded, as served)

    def select(self) -> FinetuneSelection:
        """The classes and the images of each split (read from disk; called once)."""
        raise NotImplementedError

    @property
    def selection(self) -> FinetuneSelection:
        if self._selection is None:
            self._selection = self.select()
        return self._selection

    def build_dataset(self, split: str) -> Optional[BoxDataset]:
        train = split == "train"
        images = self.selection.train if train else self.selection.val
        if not images and not train:
            return None
        return BoxDataset(images, self.category_names, report=self.bad_image_report(),
                          transforms=self.train_transforms() if train else self.val_transforms())

    @property
    def num_classes(self) -> int:
        """Classes + 1 (background), known without opening an image."""
        return len(self.selection.classes) + 1

    @property
    def category_names(self) -> list[str]:
        return ["__background__", *self.selection.classes]

    def finetune_image_ids(self) -> list[str]:
        """Benchmark ids of the training images (validation images are never trained on)."""
        return [im.image_id for im in self.selection.train]

    def load_benchmark(self) -> Optional[Benchmark]:
        """The benchmark, without the training images when ``exclude_finetune_images`` (module docstring).

        Cached like the parent's: filtered once per loaded benchmark, which is loaded once per path.
        """
        loaded = super().load_benchmark()
        if loaded is None or not self.exclude_finetune_images:
            return loaded
        if self._served is None or self._served[0] is not loaded:
            ids = self.finetune_image_ids()
            if not set(ids) & set(loaded.images):
                example = f", ids like {ids[0]!r}" if ids else ""
                raise ValueError(f"none of the {len(ids)} fine-tuning images{example} is in the benchmark "
                                 f"{self.benchmark}: is it the benchmark of {type(self).__name__}'s dataset?")
            self._served = (loaded, without_database_images(loaded, ids))
        return self._served[1]


class InstreFinetuneDataModule(FinetuneDataModule):
    """INSTRE-S fine-tuning data: ``images_per_class`` random images of each class (the paper: 75).

    Layout, as distributed: ``root/INSTRE-S1/<class>/NNN.jpg`` with ``NNN.txt`` beside it
    (``x y w h`` per object line; the target boxes are ``[x, y, x + w, y + h]``), and the same
    under ``root/INSTRE-S2``. The classes are those of ``subsets`` in the converter's order
    (S1 then S2, class folders in natural name order); label = class index + 1, so the paper's
    200 classes give ``num_classes == 201``. ``seed`` fixes the draw (and the training order);
    ``val_images_per_class`` more images of each class, disjoint from the training ones, form a
    validation split for detection AP (none by default: the paper has none).
    """

    def __init__(self, root: str | Path, images_per_class: int = 75, val_images_per_class: int = 0,
                 subsets: Sequence[str] = INSTRE_FINETUNE_SUBSETS, seed: int = 0,
                 benchmark: Optional[str | Path] = None, exclude_finetune_images: bool = False, **kwargs: Any):
        unknown = [s for s in subsets if s not in INSTRE_FINETUNE_SUBSETS]
        if unknown or not subsets:
            raise ValueError(f"subsets must be among {INSTRE_FINETUNE_SUBSETS}, got {list(subsets)} "
                             f"(INSTRE-M images show two objects of different classes)")
        if images_per_class < 1 or val_images_per_class < 0:
            raise ValueError(f"need images_per_class >= 1 and val_images_per_class >= 0, "
                             f"got {images_per_class} and {val_images_per_class}")
        self.root = require_dir(Path(root), "INSTRE root", instre.LAYOUT)
        for subset in subsets:
            require_dir(self.root / subset, f"INSTRE subset {subset}", instre.LAYOUT)
        super().__init__(exclude_finetune_images=exclude_finetune_images, benchmark=benchmark, seed=seed, **kwargs)
        self.subsets = tuple(s for s in INSTRE_FINETUNE_SUBSETS if s in subsets)
        self.images_per_class, self.val_images_per_class = images_per_class, val_images_per_class

    def select(self) -> FinetuneSelection:
        classes: list[str] = []
        train: list[AnnotatedImage] = []
        val: list[AnnotatedImage] = []
        for subset in self.subsets:
            for class_dir in instre.class_folders(self.root, subset):
                name = f"{subset}/{class_dir.name}"
                classes.append(name)
                try:
                    picked_train, picked_val = draw_split(instre.class_images(class_dir),
                                                          (self.images_per_class, self.val_images_per_class),
                                                          self.seed, name)
                except ValueError as e:
                    raise FormatError(f"{class_dir}: too few images for the fine-tuning split ({e})") from None
                train += [self._annotated(image, len(classes)) for image in picked_train]
                val += [self._annotated(image, len(classes)) for image in picked_val]
        return FinetuneSelection(tuple(classes), tuple(train), tuple(val))

    def _annotated(self, image: Path, label: int) -> AnnotatedImage:
        objects = tuple(LabelledBox(b.box, label, b.where) for b in instre.read_boxes(image))
        return AnnotatedImage(instre.benchmark_image_id(self.root, image), image, objects)


class OxfordFinetuneDataModule(FinetuneDataModule):
    """The 55 Oxford 5k query images with their query boxes, one class per landmark.

    Layout, as distributed: ``root/jpg/<image>.jpg`` and ``root/gt_files/<landmark>_<n>_query.txt``
    (one line ``oxc1_<image> x1 y1 x2 y2``). Paris 6k reads the same (no ``oxc1_`` prefix, images
    nested as ``jpg/<landmark>/<image>.jpg``). Label = landmark index + 1 in sorted landmark order
    (11 landmarks: ``num_classes == 12``). The paper uses every query image, so there is no
    validation split. Other arguments: see :class:`FinetuneDataModule`.
    """

    def __init__(self, root: str | Path, benchmark: Optional[str | Path] = None,
                 exclude_finetune_images: bool = False, **kwargs: Any):
        self.root = require_dir(Path(root), "Oxford / Paris root", oxford.LAYOUT)
        self.image_dir = require_dir(self.root / "jpg", "Oxford / Paris image folder", oxford.LAYOUT)
        self.gt_dir = require_dir(self.root / "gt_files", "Oxford / Paris ground-truth folder", oxford.LAYOUT)
        super().__init__(exclude_finetune_images=exclude_finetune_images, benchmark=benchmark, **kwargs)

    def select(self) -> FinetuneSelection:
        queries = oxford.read_query_files(self.gt_dir)
        found = oxford.index_images(self.image_dir)
        landmarks = sorted({q.landmark for q in queries})
        label = {name: k + 1 for k, name in enumerate(landmarks)}
        objects: dict[str, list[LabelledBox]] = {}  # image id -> its query boxes (one, unless queries share it)
        for q in queries:
            objects.setdefault(q.image, []).append(LabelledBox(q.box, label[q.landmark], q.where))
        # A listed image missing from jpg/ is reported as unreadable and skipped, like any bad image.
        train = tuple(AnnotatedImage(image_id, found.get(image_id, self.image_dir / f"{image_id}.jpg"), tuple(boxes))
                      for image_id, boxes in objects.items())
        return FinetuneSelection(tuple(landmarks), train)
