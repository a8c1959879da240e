"""CocoInstances: label mapping, boxes, masks of every segmentation kind, the annotation policy,
bad images, malformed files; and the DetectionTarget its items carry."""
from __future__ import annotations

import json
import pickle
import typing
import warnings

import pytest
import torch
from PIL import Image

from coco_files import make_coco, rect_mask
from instsearch.datamodules.coco_format import CocoInstances
from instsearch.datamodules.instance_dataset import DetectionTarget
from instsearch.datamodules.image_io import BadImageReport
from instsearch.formats import FormatError


def test_label_mapping_boxes_masks_and_counts(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    ds = CocoInstances(images_dir, ann, masks=True)
    # contiguous labels in category-id order; 0 is background
    assert ds.category_names == ["__background__", "person", "car", "dog"]
    assert ds.num_classes == 4
    assert len(ds) == 3  # validation-style: every image kept
    image, t = ds[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    # ann 14 (zero width), 15 (unknown category), 16 (outside) dropped; crowd 13 kept and flagged
    assert t["labels"].tolist() == [1, 2, 3, 1]
    assert t["iscrowd"].tolist() == [0, 0, 0, 1]
    assert t["instance_ids"].tolist() == [7, -1, -1, -1]
    assert t["image_id"].item() == 1 and t["orig_size"].tolist() == [48, 64]
    torch.testing.assert_close(t["boxes"][:3], torch.tensor([[2, 2, 20, 20], [30, 5, 50, 25], [5, 30, 15, 40.]]))
    assert t["masks"].shape == (4, 48, 64) and t["masks"].dtype == torch.uint8
    # polygon parts are OR-ed into one object: two 10x10 squares overlapping in a 2x2 corner
    assert int(t["masks"][0].sum()) == pytest.approx(100 + 100 - 4, abs=25)
    assert t["masks"][0, 5, 5] == 1 and t["masks"][0, 15, 15] == 1 and t["masks"][0, 5, 17] == 0
    # compressed and uncompressed RLE decode to exactly the rectangles they encode
    assert torch.equal(t["masks"][1], torch.from_numpy(rect_mask(48, 64, 30, 5, 50, 25)))
    assert torch.equal(t["masks"][2], torch.from_numpy(rect_mask(48, 64, 5, 30, 15, 40)))
    assert torch.equal(t["masks"][3], torch.from_numpy(rect_mask(48, 64, 40, 30, 60, 45)))
    # every mask lies inside its box
    for m, b in zip(t["masks"], t["boxes"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert xs.min() >= b[0] - 1 and xs.max() < b[2] + 1 and ys.min() >= b[1] - 1 and ys.max() < b[3] + 1
    assert ds.stats["degenerate_boxes"] == 2 and ds.stats["unknown_category"] == 1
    assert ds.stats["crowd"] == 2 and ds.stats["crowd_dropped"] == 0


def test_training_mode_drops_crowd_and_images_without_targets(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    ds = CocoInstances(images_dir, ann, masks=False, skip_empty=True, include_crowd=False)
    assert len(ds) == 2  # image 3 holds only a crowd region
    assert [ds.image_id(i) for i in range(len(ds))] == [1, 2]
    _, t = ds[0]
    assert t["iscrowd"].tolist() == [0, 0, 0] and "masks" not in t
    assert ds.stats["crowd_dropped"] == 2 and ds.stats["images_without_targets"] == 1


def test_category_subset_and_order(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    ds = CocoInstances(images_dir, ann, masks=False, category_ids=[18, 1])
    assert ds.category_names == ["__background__", "dog", "person"] and ds.num_classes == 3
    _, t = ds[0]
    assert t["labels"].tolist() == [2, 1, 2]  # person, dog, crowd person; car is not a target
    with pytest.raises(ValueError, match="category_ids \\[5\\]"):
        CocoInstances(images_dir, ann, category_ids=[5])


def test_corrupt_image_is_skipped_and_reported(tmp_path):
    images_dir, ann = make_coco(tmp_path, corrupt=True)
    report = BadImageReport()
    ds = CocoInstances(images_dir, ann, masks=True, report=report)
    with pytest.warns(RuntimeWarning, match="b.jpg"):
        _, t = ds[1]  # b.jpg is garbage: the next readable item is served instead
    assert t["image_id"].item() == 3
    assert len(report) == 1 and report.entries[0]["image"] == "2" and report.entries[0]["path"].endswith("b.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert ds[1][1]["image_id"].item() == 3  # remembered: no second attempt, no second entry
    assert len(report) == 1


def test_declared_size_mismatch_is_a_bad_image(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    Image.new("RGB", (30, 30)).save(images_dir / "a.jpg")
    report = BadImageReport()
    ds = CocoInstances(images_dir, ann, masks=False, report=report)
    with pytest.warns(RuntimeWarning):
        assert ds[0][1]["image_id"].item() == 2
    assert "declares 64x48" in report.entries[0]["reason"]


def test_all_images_unreadable_raises(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    for f in images_dir.iterdir():
        f.write_bytes(b"")
    ds = CocoInstances(images_dir, ann, masks=False)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no readable image"):
        ds[0]
    assert len(ds.report) == 3


def test_malformed_annotations_name_the_entry(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"][3]["bbox"] = [1, 2, 3]
    ann.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"annotations\[3\]: 'bbox' must be \[4 numbers\]"):
        CocoInstances(images_dir, ann)
    data["annotations"][3]["bbox"] = [1, 2, 3, 4]
    data["annotations"][0]["image_id"] = 555
    ann.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"annotations\[0\]: image_id 555"):
        CocoInstances(images_dir, ann)
    ann.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        CocoInstances(images_dir, ann)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoInstances(images_dir, tmp_path / "nope.json")


def test_dataset_pickles_for_spawned_workers(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    ds = CocoInstances(images_dir, ann, masks=True, report=BadImageReport(spool=tmp_path / "spool.jsonl"))
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[0][1]["masks"], ds[0][1]["masks"])


@pytest.mark.parametrize("masks", [True, False])
def test_items_carry_exactly_the_fields_detection_target_declares(tmp_path, masks):
    images_dir, ann = make_coco(tmp_path)
    declared = typing.get_type_hints(DetectionTarget)
    assert set(declared) == DetectionTarget.__required_keys__ | DetectionTarget.__optional_keys__
    for i in range(3):
        _, t = CocoInstances(images_dir, ann, masks=masks)[i]
        assert DetectionTarget.__required_keys__ <= set(t) <= set(declared)
        assert ("masks" in t) == masks and "orig_size" in t
        assert all(isinstance(v, torch.Tensor) for v in t.values())
