"""The generic COCO-format detection DataModule (:class:`DetectionDataModule`).

Any pair of COCO-format splits becomes Lightning dataloaders with multi-scale training,
aspect-ratio grouped batching and DDP-safe sampling, plus the instance-search benchmark it is
evaluated on. The dataset-specific DataModules (:mod:`.coco`, :mod:`.synthetic`, :mod:`.voc`)
subclass it and only say where the files are (with :func:`require_path` checking their layout),
or, for another annotation format, which dataset to build.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from multiprocessing import util as mp_util
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytorch_lightning as pl
from torch.utils.data import BatchSampler, DataLoader, Dataset

from instsearch.checkpointing import ResumesTrainingPosition
from instsearch.datamodules.benchmark import ServesBenchmark
from instsearch.datamodules.coco_format import CocoInstances
from instsearch.datamodules.instance_dataset import InstanceDataset, detection_collate
from instsearch.datamodules.image_io import BadImageReport
from instsearch.datamodules.samplers import (GroupedBatchSampler, TrainingBatchSampler, aspect_ratio_groups,
                                             training_sampler)
from instsearch.datamodules.transforms import Compose, RandomHorizontalFlip, RandomResize, Resize, ToTensor

__all__ = ["DetectionDataModule", "require_path"]


class DetectionDataModule(ServesBenchmark, ResumesTrainingPosition, pl.LightningDataModule):
    """COCO-format training (and optional validation) data for detectors and instance segmenters.

    * training: multi-scale shortest-edge resize (``train_short_sides``, long side ≤ ``max_size``)
      and horizontal flips; images without a non-crowd target skipped; crowd regions left out;
    * validation: one scale (``test_short_side``), every image, crowd regions kept and flagged;
    * batches are lists (:func:`~instsearch.datamodules.instance_dataset.detection_collate`); with
      ``group_by_aspect_ratio`` a :class:`~instsearch.datamodules.samplers.GroupedBatchSampler` puts
      images of similar shape together so the detector's padding to the largest image in the batch
      wastes little;
    * distributed: under a Trainer with ``use_distributed_sampler=True`` (the default), Lightning
      re-creates the grouped batch sampler around its own ``DistributedSampler``; otherwise, when
      ``torch.distributed`` is initialised, the module shards with a ``DistributedSampler``
      itself (``seed`` fixes its shuffling). Either way every rank gets the same number of steps;
    * ``benchmark`` is the ``benchmark.json`` the retrieval evaluation reads
      (``trainer.datamodule.benchmark``); ``test_dataloader`` / ``predict_dataloader`` serve it
      as :class:`~instsearch.datamodules.benchmark.BenchmarkDataModule` does (long side capped at
      ``benchmark_max_side``);
    * unreadable images are skipped and listed in :meth:`bad_image_report`, written to
      ``<log_dir>/bad_images.json`` at teardown when there are any;
    * exact resumption: the training order of an epoch and each sample's augmentation are
      functions of ``(seed, epoch[, index])``, and the module's checkpoint state is its position in
      training (:func:`~instsearch.checkpointing.training_position`), so a run resumed from any
      checkpoint continues with the batch the interrupted run would have trained on next.

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
        self._resume_at: Optional[tuple[int, int]] = None  # (epoch, batches done), from a checkpoint

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
        sampler = training_sampler(ds, self.trainer, self.seed)
        start = self._resume_at  # kept: Lightning may build the loader more than once before training
        if self.group_by_aspect_ratio:
            groups = aspect_ratio_groups(ds.aspect_ratios(), self.aspect_ratio_group_k)
            batch_sampler: BatchSampler = GroupedBatchSampler(sampler, groups, self.batch_size,
                                                              sample_seed=self.seed, start=start)
        else:
            batch_sampler = TrainingBatchSampler(sampler, self.batch_size, sample_seed=self.seed, start=start)
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
        if stage in (None, "fit"):
            self.forget_resume_position()
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

    def _loader(self, ds: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(ds, num_workers=self.num_workers, collate_fn=detection_collate,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, **kwargs)


def _unlink_quietly(path: str) -> None:
    Path(path).unlink(missing_ok=True)


def require_path(path: Path, what: str, layout: str) -> Path:
    """``path`` when it exists; else ``FileNotFoundError`` naming ``what`` is missing and the
    ``layout`` a DataModule or dataset expects, so a wrong root is fixed at the first attempt."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} (expected layout: {layout})")
    return path
