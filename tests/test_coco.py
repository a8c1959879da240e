"""CocoDataModule: the COCO 2014 / 2017 layouts, and what a missing path says."""
from __future__ import annotations

import pytest

from coco_files import make_coco
from instsearch.datamodules.coco import CocoDataModule


def test_coco_datamodule_layouts_and_missing_paths(tmp_path):
    for year in (2014, 2017):
        root = tmp_path / f"coco{year}"
        make_coco(root, f"train{year}")
        make_coco(root, f"val{year}")
        dm = CocoDataModule(root, year=year, num_workers=0, train_short_sides=(32,), max_size=64)
        assert dm.train_images == root / f"train{year}"
        assert dm.val_annotations == root / "annotations" / f"instances_val{year}.json"
        assert dm.num_classes == 4
    with pytest.raises(FileNotFoundError, match="COCO root not found: .*missing"):
        CocoDataModule(tmp_path / "missing")
    root = tmp_path / "partial"
    make_coco(root, "train2017")
    with pytest.raises(FileNotFoundError, match=r"val2017 image folder not found: .*partial/val2017 \(expected layout"):
        CocoDataModule(root)
    assert CocoDataModule(root, with_val=False).val_images is None
    (root / "annotations" / "instances_train2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="annotations/instances_train2017.json"):
        CocoDataModule(root, with_val=False)
    with pytest.raises(FileNotFoundError, match="train2014"):
        CocoDataModule(root, year=2014)
