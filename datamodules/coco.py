"""MS-COCO: where the 2014 / 2017 instance files are (:class:`CocoDataModule`).

Everything but the layout is the generic COCO-format
:class:`~instsearch.datamodules.detection.DetectionDataModule`; this module checks that the
standard COCO folders and annotation files exist under ``root`` and names the expected layout
when one is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from instsearch.datamodules.detection import DetectionDataModule, require_path

__all__ = ["CocoDataModule"]


class CocoDataModule(DetectionDataModule):
    """MS-COCO instances from ``root``::

        root/train2017/*.jpg   root/val2017/*.jpg
        root/annotations/instances_train2017.json   root/annotations/instances_val2017.json

    (``year=2014``: ``train2014``, ``val2014``, ``instances_{train,val}2014.json``). Set
    ``with_val=False`` when only the training split is on disk. Other arguments: see
    :class:`~instsearch.datamodules.detection.DetectionDataModule`.
    """

    def __init__(self, root: str | Path, year: int = 2017, with_val: bool = True, **kwargs: Any):
        root = Path(root)
        if year not in (2014, 2017):
            raise ValueError(f"COCO year must be 2014 or 2017, got {year}")
        layout = (f"{root}/train{year}/, {root}/val{year}/, {root}/annotations/instances_train{year}.json, "
                  f"{root}/annotations/instances_val{year}.json")
        require_path(root, "COCO root", layout)
        splits = ["train", "val"] if with_val else ["train"]
        paths: dict[str, Optional[Path]] = {"val_images": None, "val_annotations": None}
        for split in splits:
            paths[f"{split}_images"] = require_path(root / f"{split}{year}", f"COCO {split}{year} image folder",
                                                    layout)
            paths[f"{split}_annotations"] = require_path(root / "annotations" / f"instances_{split}{year}.json",
                                                         f"COCO {split}{year} annotation file", layout)
        super().__init__(train_images=paths["train_images"], train_annotations=paths["train_annotations"],
                         val_images=paths["val_images"], val_annotations=paths["val_annotations"], **kwargs)
        self.root, self.year = root, year
