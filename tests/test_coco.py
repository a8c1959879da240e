"""COCO-format datasets, transforms, grouped batching and the COCO / synthetic DataModules.

Each test builds a tiny copy of the real on-disk layout (COCO 2014 and 2017) with polygon,
compressed-RLE, uncompressed-RLE and crowd annotations, so the checks run against what
pycocotools and the real files do, not against a mock.
"""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DistributedSampler, SequentialSampler

from instsearch.datamodules.coco import (CocoDataModule, CocoInstances, DetectionDataModule, GroupedBatchSampler,
                                         aspect_ratio_groups, detection_collate)
from instsearch.datamodules.synthetic import SyntheticDataModule
from instsearch.datamodules.image_io import BadImageReport
from instsearch.datamodules.transforms import (Compose, RandomHorizontalFlip, RandomResize, Resize, ToTensor, hflip_sample,
                                    resize_sample, shortest_edge_size)
from instsearch.formats import FormatError

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]


def _rect_mask(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of 0/1 in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def _write_image(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def make_coco(root: Path, split: str = "train2017", n_extra: int = 0, corrupt: bool = False) -> tuple[Path, Path]:
    """A COCO split: image 1 (64x48) with polygon / RLE / uncompressed RLE / crowd / degenerate /
    unknown-category annotations, image 2 (40x60, portrait) with one polygon object, image 3
    (50x50) with only a crowd region, plus ``n_extra`` landscape images with one box each."""
    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
              {"id": 2, "file_name": "b.jpg", "width": 40, "height": 60},
              {"id": 3, "file_name": "c.jpg", "width": 50, "height": 50}]
    rle = mask_utils.encode(np.asfortranarray(_rect_mask(48, 64, 30, 5, 50, 25)))
    rle["counts"] = rle["counts"].decode()
    anns = [
        # two-part polygon object (two squares) -> mask is their union
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 18, 18], "area": 200.0, "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12], [10, 10, 20, 10, 20, 20, 10, 20]], "instance_id": 7},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [30, 5, 20, 20], "area": 400.0, "iscrowd": 0,
         "segmentation": rle},
        {"id": 12, "image_id": 1, "category_id": 18, "bbox": [5, 30, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": _uncompressed_rle(_rect_mask(48, 64, 5, 30, 15, 40))},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [40, 30, 20, 15], "area": 300.0, "iscrowd": 1,
         "segmentation": _uncompressed_rle(_rect_mask(48, 64, 40, 30, 60, 45))},
        {"id": 14, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "area": 0.0, "iscrowd": 0,
         "segmentation": [[5, 5, 5, 15, 5, 10]]},  # zero width
        {"id": 15, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "area": 25.0, "iscrowd": 0,
         "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},  # category not in the file
        {"id": 16, "image_id": 1, "category_id": 3, "bbox": [70, 50, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": [[70, 50, 80, 50, 80, 60]]},  # entirely outside the image
        {"id": 20, "image_id": 2, "category_id": 18, "bbox": [10, 20, 20, 30], "area": 600.0, "iscrowd": 0,
         "segmentation": [[10, 20, 30, 20, 30, 50, 10, 50]]},
        {"id": 30, "image_id": 3, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500.0, "iscrowd": 1,
         "segmentation": _uncompressed_rle(np.ones((50, 50), np.uint8))},
    ]
    for k in range(n_extra):
        images.append({"id": 100 + k, "file_name": f"x{k}.jpg", "width": 64, "height": 40})
        anns.append({"id": 1000 + k, "image_id": 100 + k, "category_id": 3, "bbox": [4, 4, 20, 20],
                     "area": 400.0, "iscrowd": 0, "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]})
    for i, im in enumerate(images):
        _write_image(images_dir / im["file_name"], im["width"], im["height"], seed=i)
    if corrupt:
        (images_dir / "b.jpg").write_bytes(b"this is not a jpeg")
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return images_dir, ann_file


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

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
    assert torch.equal(t["masks"][1], torch.from_numpy(_rect_mask(48, 64, 30, 5, 50, 25)))
    assert torch.equal(t["masks"][2], torch.from_numpy(_rect_mask(48, 64, 5, 30, 15, 40)))
    assert torch.equal(t["masks"][3], torch.from_numpy(_rect_mask(48, 64, 40, 30, 60, 45)))
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


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------

def test_shortest_edge_size():
    assert shortest_edge_size(480, 640, 600, 1000) == (600, 800)
    assert shortest_edge_size(300, 1200, 600, 1000) == (250, 1000)  # long side capped
    assert shortest_edge_size(640, 480, 800, None) == (1067, 800)


def _box_of_mask(m: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(m, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def test_resize_and_flip_keep_boxes_and_masks_consistent(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    ds = CocoInstances(images_dir, ann, masks=True)
    image, t = ds[0]
    t = {k: v for k, v in t.items()}
    rect = [1, 2, 3]  # the rectangle masks, whose box equals the mask's extent
    for k in rect:
        torch.testing.assert_close(_box_of_mask(t["masks"][k]), t["boxes"][k])
    img2, t2 = resize_sample(image, t, (96, 128))  # exactly 2x
    assert img2.shape == (3, 96, 128) and t2["masks"].shape == (4, 96, 128)
    torch.testing.assert_close(t2["boxes"], t["boxes"] * 2)
    torch.testing.assert_close(t2["area"], t["area"] * 4)
    img3, t3 = hflip_sample(img2, t2)
    torch.testing.assert_close(img3, img2.flip(-1))
    for k in rect:
        torch.testing.assert_close(_box_of_mask(t2["masks"][k]), t2["boxes"][k])
        torch.testing.assert_close(_box_of_mask(t3["masks"][k]), t3["boxes"][k])
    # flipping twice is the identity
    img4, t4 = hflip_sample(img3, t3)
    torch.testing.assert_close(t4["boxes"], t2["boxes"])
    assert torch.equal(t4["masks"], t2["masks"]) and torch.equal(img4, img2)


def test_transforms_work_on_pil_and_tensor_alike(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    pil_ds = CocoInstances(images_dir, ann, masks=True, transforms=Compose([Resize(24, 100), ToTensor()]))
    image, t = pil_ds[0]
    assert image.shape == (3, 24, 32) and t["masks"].shape[-2:] == (24, 32)
    torch.testing.assert_close(t["boxes"][1], torch.tensor([15, 2.5, 25, 12.5]))
    # an image with no instance goes through every transform
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 10, 20, dtype=torch.uint8), "area": torch.zeros(0)}
    timg, tt = Compose([RandomResize([5], 100), RandomHorizontalFlip(1.0), ToTensor()])(
        torch.zeros(3, 10, 20, dtype=torch.uint8), empty)
    assert timg.shape == (3, 5, 10) and tt["masks"].shape == (0, 5, 10) and tt["boxes"].shape == (0, 4)


def test_random_resize_and_flip_are_seeded():
    t = RandomResize([10, 20, 30], None)
    image = torch.zeros(3, 10, 10)
    torch.manual_seed(0)
    a = [t(image, {})[0].shape[-1] for _ in range(20)]
    torch.manual_seed(0)
    b = [t(image, {})[0].shape[-1] for _ in range(20)]
    assert a == b and set(a) == {10, 20, 30}
    flip = RandomHorizontalFlip(0.5)
    image = torch.arange(4.0).reshape(1, 1, 4)
    flipped = sum(bool(flip(image, {})[0][0, 0, 0] == 3) for _ in range(200))
    assert 60 < flipped < 140


# ---------------------------------------------------------------------------------------------
# Grouped batching
# ---------------------------------------------------------------------------------------------

def test_aspect_ratio_groups_separate_portrait_and_landscape():
    groups = aspect_ratio_groups(np.array([0.5, 0.75, 1.0, 1.333, 1.777, 3.0]))
    assert len(set(groups[:2].tolist()) & set(groups[3:].tolist())) == 0
    assert groups[0] != groups[-1] and (np.diff(groups) >= 0).all()


def _slow_grouped_batches(indices, groups, b):
    """torchvision-references algorithm with a Python loop: the reference for the vectorised one."""
    buffers, out = {}, []
    for i in indices:
        buffers.setdefault(groups[i], []).append(i)
        if len(buffers[groups[i]]) == b:
            out.append(buffers.pop(groups[i]))
    return out, buffers


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_grouped_batch_sampler_matches_reference(batch_size):
    rng = np.random.default_rng(batch_size)
    groups = rng.integers(0, 4, 37)
    order = rng.permutation(37).tolist()

    class ListSampler(SequentialSampler):
        def __iter__(self):
            return iter(order)

    sampler = GroupedBatchSampler(ListSampler(range(37)), groups, batch_size)
    batches = list(sampler)
    assert len(batches) == len(sampler) == -(-37 // batch_size)
    full, leftovers = _slow_grouped_batches(order, groups, batch_size)
    assert batches[:len(full)] == full  # same batches, same order
    for batch in batches:
        assert len(batch) == batch_size and len(set(groups[batch])) == 1
    for batch in batches[len(full):]:  # top-ups start with the group's leftovers
        assert batch[:len(leftovers[groups[batch[0]]])] == leftovers[groups[batch[0]]]
    dropped = GroupedBatchSampler(ListSampler(range(37)), groups, batch_size, drop_last=True)
    assert len(list(dropped)) == len(dropped) == 37 // batch_size
    assert list(dropped)[:len(full)] == full


def test_grouped_batches_shard_across_ranks():
    groups = np.array([0, 1] * 10)
    seen = []
    lengths = []
    for rank in range(2):
        ds_sampler = DistributedSampler(range(20), num_replicas=2, rank=rank, shuffle=True, seed=3)
        ds_sampler.set_epoch(1)
        sampler = GroupedBatchSampler(ds_sampler, groups, 2)
        batches = list(sampler)
        lengths.append(len(batches))
        shard = set(ds_sampler)
        assert all(set(b) <= shard for b in batches)  # a rank only sees its own shard
        seen.append(shard)
        assert all(len(set(groups[b])) == 1 for b in batches)
    assert lengths[0] == lengths[1] == 5  # equal step counts keep DDP ranks in lockstep
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(20))


# ---------------------------------------------------------------------------------------------
# DataModules
# ---------------------------------------------------------------------------------------------

def _dm(images_dir, ann, **kw) -> DetectionDataModule:
    defaults = dict(batch_size=2, num_workers=0, train_short_sides=(32, 40), max_size=80, test_short_side=32)
    defaults.update(kw)
    return DetectionDataModule(images_dir, ann, images_dir, ann, benchmark="bench.json", **defaults)


def test_detection_datamodule_batches(tmp_path):
    images_dir, ann = make_coco(tmp_path, n_extra=5)
    dm = _dm(images_dir, ann)
    assert dm.num_classes == 4 and dm.category_names[1:] == ["person", "car", "dog"]
    assert dm.benchmark == "bench.json"
    dm.setup("fit")
    assert len(dm.train_dataset) == 7 and len(dm.val_dataset) == 8
    torch.manual_seed(0)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
    ratios = dm.train_dataset.aspect_ratios()
    n = 0
    for images, targets in loader:
        assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
        # images of one batch share orientation (portrait b.jpg never batched with landscape ones)
        assert len({img.shape[-1] > img.shape[-2] for img in images}) == 1
        for img, t in zip(images, targets):
            assert min(img.shape[-2:]) in (32, 40) and max(img.shape[-2:]) <= 80
            assert t["masks"].shape[-2:] == img.shape[-2:] and (t["iscrowd"] == 0).all()
        n += 1
    assert n == len(loader) == 4
    assert ratios.shape == (7,)
    val_images, val_targets = next(iter(dm.val_dataloader()))
    assert min(val_images[0].shape[-2:]) == 32 and val_targets[0]["iscrowd"].tolist() == [0, 0, 0, 1]


def test_datamodule_without_grouping_and_without_val(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    dm = DetectionDataModule(images_dir, ann, batch_size=2, num_workers=0, group_by_aspect_ratio=False,
                             train_short_sides=(32,), max_size=64, masks=False)
    loader = dm.train_dataloader()
    assert type(loader.batch_sampler).__name__ == "BatchSampler"
    assert sum(len(b[0]) for b in loader) == 2
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="both val_images and val_annotations"):
        DetectionDataModule(images_dir, ann, val_images=images_dir)


def test_worker_processes_report_bad_images(tmp_path):
    images_dir, ann = make_coco(tmp_path, n_extra=3, corrupt=True)
    dm = _dm(images_dir, ann, num_workers=1, masks=False)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(dm.train_dataloader())
    assert sum(len(b[0]) for b in batches) == 6
    report = dm.bad_image_report()
    assert [e["image"] for e in report.entries] == ["2"]


def test_explicit_distributed_sampler_when_lightning_does_not_inject(tmp_path, monkeypatch):
    images_dir, ann = make_coco(tmp_path, n_extra=5)
    dm = _dm(images_dir, ann, masks=False)
    dm.setup("fit")
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    loader = dm.train_dataloader()
    sampler = loader.batch_sampler.sampler
    assert isinstance(sampler, DistributedSampler) and sampler.num_replicas == 2 and sampler.rank == 1
    assert len(loader) == 2  # ceil(ceil(7 / 2) / 2)


def test_lightning_injects_distributed_sampler_into_grouped_batches(tmp_path):
    """What Lightning does under DDP with use_distributed_sampler=True, without spawning processes."""
    from pytorch_lightning.utilities.data import _update_dataloader
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from torch.utils.data import BatchSampler, DataLoader

    images_dir, ann = make_coco(tmp_path, n_extra=5)
    dm = _dm(images_dir, ann, masks=False)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    for rank in range(2):
        injected = _update_dataloader(loader, DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank))
        assert isinstance(injected.batch_sampler, GroupedBatchSampler)
        assert injected.batch_sampler.sampler.rank == rank
        assert injected.collate_fn is detection_collate
        batches = list(injected.batch_sampler)
        assert len(batches) == 2 and all(set(b) <= set(injected.batch_sampler.sampler) for b in batches)


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


def test_synthetic_datamodule_reads_and_generates(tmp_path, monkeypatch):
    root = tmp_path / "synth"
    root.mkdir()
    make_coco(root, "images")
    (root / "annotations" / "instances_images.json").rename(root / "train.json")
    dm = SyntheticDataModule(root, generate=False, num_workers=0)
    assert dm.benchmark == str(root / "benchmark.json") and dm.val_dataloader() == []
    assert dm.num_classes == 4 and max(dm.train_short_sides) <= 1.25 * 160
    with pytest.raises(FileNotFoundError, match="train.json"):
        SyntheticDataModule(tmp_path / "empty", generate=False).prepare_data()

    calls = []

    def fake_generate(out, preset, seed):
        calls.append((Path(out), preset, seed))
        make_coco(Path(out), "images")
        (Path(out) / "annotations" / "instances_images.json").rename(Path(out) / "train.json")

    import types
    import sys
    monkeypatch.setitem(sys.modules, "instsearch.synthetic", types.SimpleNamespace(generate=fake_generate))
    gen = SyntheticDataModule(tmp_path / "new", preset="tiny", seed=5, num_workers=0)
    gen.prepare_data()
    assert calls == [(tmp_path / "new", "tiny", 5)]
    gen.prepare_data()  # idempotent
    assert len(calls) == 1 and gen.num_classes == 4


def test_fits_under_a_lightning_trainer(tmp_path):
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[int] = []

        def training_step(self, batch, batch_idx):
            images, targets = batch
            self.seen += [int(t["image_id"]) for t in targets]
            return (self.w - torch.stack([img.mean() for img in images]).mean()) ** 2

        def validation_step(self, batch, batch_idx):
            images, targets = batch
            assert self.trainer.datamodule.benchmark == "bench.json"
            self.log("val_boxes", float(sum(len(t["boxes"]) for t in targets)), batch_size=len(images))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    images_dir, ann = make_coco(tmp_path, n_extra=3, corrupt=True)
    dm = _dm(images_dir, ann, masks=True)
    model = Probe()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    # 5 training items (c.jpg holds only a crowd): ceil(5 / 2) = 3 batches of 2; b.jpg is unreadable
    assert len(model.seen) == 2 * 3 and 2 not in model.seen
    report = json.loads((tmp_path / "bad_images.json").read_text())
    assert report["skipped"] == 1 and report["images"][0]["path"].endswith("b.jpg")
