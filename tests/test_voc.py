"""VOC 2007 detection, VOC 2012 + SBD instance masks, on tiny copies of the real layouts."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instsearch.datamodules.samplers import GroupedBatchSampler
from instsearch.datamodules.voc import (VOC_CLASSES, VOCDetectionDataModule, VOCDetectionDataset, VOCInstanceDataModule,
                             VOCInstanceDataset, instances_from_label_maps)
from instsearch.formats import FormatError

PERSON, DOG, CAR = VOC_CLASSES.index("person") + 1, VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("car") + 1


def _jpeg(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _xml(objects: list[tuple[str, tuple[int, int, int, int], int]], w: int, h: int, name: str) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>")


def make_voc2007(root: Path) -> Path:
    voc = root / "VOC2007"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    anns = {
        "000005": ([("person", (1, 1, 10, 20), 0), ("dog", (11, 5, 30, 25), 1), ("car", (7, 5, 5, 9), 0)], 40, 30),
        "000007": ([("car", (2, 3, 20, 40), 1)], 30, 50),  # only a difficult object
        "000009": ([("car", (1, 1, 40, 30), 0)], 40, 30),
        "000012": ([("dog", (3, 3, 9, 9), 0)], 40, 30),
    }
    for i, (voc_id, (objs, w, h)) in enumerate(anns.items()):
        (voc / "Annotations" / f"{voc_id}.xml").write_text(_xml(objs, w, h, voc_id))
        _jpeg(voc / "JPEGImages" / f"{voc_id}.jpg", w, h, seed=i)
    main = voc / "ImageSets" / "Main"
    main.joinpath("trainval.txt").write_text("000005\n000007\n000009\n")
    main.joinpath("test.txt").write_text("000012\n")
    main.joinpath("train.txt").write_text("000005\n000009\n")
    main.joinpath("val.txt").write_text("000007\n")
    return voc


def _palette_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette([c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    im.save(path)


def _voc2012_maps(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Two instances (person, dog) with a void (255) band around the person, as VOC draws it."""
    inst = np.zeros((h, w), np.uint8)
    cls = np.zeros((h, w), np.uint8)
    inst[4:14, 2:12] = 255
    inst[5:13, 3:11] = 1
    cls[4:14, 2:12] = 255
    cls[5:13, 3:11] = PERSON
    inst[10:20, 20:30] = 2
    cls[10:20, 20:30] = DOG
    return inst, cls


def make_voc2012(root: Path) -> Path:
    voc = root / "VOC2012"
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    for i, voc_id in enumerate(["2008_000001", "2008_000002", "2008_000003"]):
        _jpeg(voc / "JPEGImages" / f"{voc_id}.jpg", 32, 24, seed=i)
        inst, cls = _voc2012_maps(24, 32)
        if voc_id == "2008_000003":
            inst[:], cls[:] = 0, 0  # no instance at all
        _palette_png(voc / "SegmentationObject" / f"{voc_id}.png", inst)
        _palette_png(voc / "SegmentationClass" / f"{voc_id}.png", cls)
    seg.joinpath("train.txt").write_text("2008_000001\n2008_000003\n")
    seg.joinpath("val.txt").write_text("2008_000002\n")
    return voc


def make_sbd(root: Path) -> Path:
    scipy_io = pytest.importorskip("scipy.io")
    ds = root / "dataset"
    for sub in ("inst", "cls", "img"):
        (ds / sub).mkdir(parents=True)
    entries = {"2008_000002": 28, "2009_000010": 20}  # the first one is VOC 2012 val: must not leak
    for i, (voc_id, w) in enumerate(entries.items()):
        _jpeg(ds / "img" / f"{voc_id}.jpg", w, 16, seed=10 + i)
        inst = np.zeros((16, w), np.uint8)
        inst[2:8, 2:6] = 1
        inst[9:15, 8:w - 1] = 2
        cls = np.where(inst == 1, CAR, np.where(inst == 2, PERSON, 0)).astype(np.uint8)
        scipy_io.savemat(ds / "inst" / f"{voc_id}.mat", {"GTinst": {
            "Segmentation": inst, "Categories": np.array([[CAR], [PERSON]], np.uint8),
            "Boundaries": np.zeros((2, 1), dtype=object)}})
        scipy_io.savemat(ds / "cls" / f"{voc_id}.mat", {"GTcls": {
            "Segmentation": cls, "CategoriesPresent": np.array([[PERSON], [CAR]], np.uint8)}})
    (ds / "train.txt").write_text("2009_000010\n")
    (ds / "val.txt").write_text("2008_000002\n")
    return root


# ---------------------------------------------------------------------------------------------

def test_instances_from_label_maps_against_loop_reference():
    rng = np.random.default_rng(0)
    inst = rng.integers(0, 5, (20, 30)).astype(np.uint8)
    inst[0, :5] = 255
    cls = np.zeros_like(inst)
    truth = {1: 3, 2: 7, 3: 15, 4: 20}
    for k, c in truth.items():
        cls[inst == k] = c
    cls[(inst == 2) & (np.arange(30)[None] < 3)] = 9  # a minority of other votes
    out = instances_from_label_maps(inst, class_map=cls)
    assert out["labels"].tolist() == [truth[k] for k in (1, 2, 3, 4)]
    for j, k in enumerate((1, 2, 3, 4)):
        ys, xs = np.nonzero(inst == k)
        assert out["boxes"][j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert torch.equal(out["masks"][j], torch.from_numpy((inst == k).astype(np.uint8)))
        assert out["area"][j] == (inst == k).sum()
    sbd = instances_from_label_maps(inst, instance_classes=np.array([2, 4, 6, 8]))
    assert sbd["labels"].tolist() == [2, 4, 6, 8]
    empty = instances_from_label_maps(np.zeros((4, 4)), class_map=np.zeros((4, 4)))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 4, 4)


def test_voc2007_detection_boxes_and_difficult(tmp_path):
    voc = make_voc2007(tmp_path)
    ds = VOCDetectionDataset(voc, "trainval", include_difficult=True)
    assert len(ds) == 3 and ds.num_classes == 21 and ds.category_names[PERSON] == "person"
    image, t = ds[0]
    assert image.shape == (3, 30, 40)
    # 1-based inclusive (1, 1, 10, 20) covers pixels 0..9 x 0..19 -> edges [0, 0, 10, 20]; degenerate car dropped
    assert t["boxes"].tolist() == [[0, 0, 10, 20], [10, 4, 30, 25]]
    assert t["labels"].tolist() == [PERSON, DOG] and t["difficult"].tolist() == [0, 1]
    assert t["image_id"].item() == 5 and t["iscrowd"].tolist() == [0, 0] and "masks" not in t
    assert ds.stats["degenerate_boxes"] == 1
    train = VOCDetectionDataset(voc, "trainval", include_difficult=False, skip_empty=True)
    assert train.ids == ["000005", "000009"]  # 000007 holds only a difficult object
    assert train[0][1]["labels"].tolist() == [PERSON] and train.stats["difficult_dropped"] == 2
    np.testing.assert_allclose(train.aspect_ratios(), [40 / 30, 40 / 30])


def test_voc_xml_errors_name_the_file(tmp_path):
    voc = make_voc2007(tmp_path)
    (voc / "Annotations" / "000009.xml").write_text(_xml([("unicorn", (1, 1, 5, 5), 0)], 40, 30, "000009"))
    with pytest.raises(FormatError, match="000009.xml: object 0 has class 'unicorn'"):
        VOCDetectionDataset(voc, "trainval")
    (voc / "Annotations" / "000009.xml").write_text("<annotation><object>")
    with pytest.raises(FormatError, match="000009.xml: not valid XML"):
        VOCDetectionDataset(voc, "trainval")
    (voc / "Annotations" / "000009.xml").unlink()
    with pytest.raises(FileNotFoundError, match="000009.xml"):
        VOCDetectionDataset(voc, "trainval")


def test_voc_detection_datamodule(tmp_path):
    make_voc2007(tmp_path)
    (tmp_path / "VOC2007" / "JPEGImages" / "000009.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dm = VOCDetectionDataModule(tmp_path, batch_size=2, num_workers=0, train_short_sides=(15,), max_size=40,
                                test_short_side=15)
    assert dm.num_classes == 21 and dm.category_names[DOG] == "dog"
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
    with pytest.warns(RuntimeWarning, match="000009.jpg"):
        images, targets = next(iter(loader))
    assert [t["image_id"].item() for t in targets] == [5, 5]  # the truncated 000009 is replaced
    assert all(min(img.shape[-2:]) == 15 for img in images)
    assert [e["image"] for e in dm.bad_image_report().entries] == ["000009"]
    val_images, val_targets = next(iter(dm.val_dataloader()))
    assert val_targets[0]["image_id"].item() == 12
    with pytest.raises(TypeError, match="masks"):  # boxes only: VOC 2007 has no instance masks
        VOCDetectionDataModule(tmp_path, masks=True)


def test_voc_detection_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC root not found: .*nowhere.*expected layout"):
        VOCDetectionDataModule(tmp_path / "nowhere")
    make_voc2007(tmp_path)
    (tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"'test' split list not found: .*ImageSets/Main/test.txt"):
        VOCDetectionDataModule(tmp_path)
    assert VOCDetectionDataModule(tmp_path, val_split=None, num_workers=0).val_dataloader() == []
    with pytest.raises(FileNotFoundError, match="VOC2012 folder not found"):
        VOCDetectionDataModule(tmp_path, year=2012)


def test_voc2012_instances_exclude_void_and_skip_empty(tmp_path):
    voc = make_voc2012(tmp_path)
    ds = VOCInstanceDataset([("voc", voc, ["2008_000001", "2008_000003"])])
    image, t = ds[0]
    assert image.shape == (3, 24, 32)
    assert t["labels"].tolist() == [PERSON, DOG]
    assert t["boxes"].tolist() == [[3, 5, 11, 13], [20, 10, 30, 20]]  # void band not in the person's mask
    inst, _ = _voc2012_maps(24, 32)
    assert torch.equal(t["masks"][0], torch.from_numpy((inst == 1).astype(np.uint8)))
    assert t["area"].tolist() == [64, 100] and t["image_id"].item() == 2008000001
    assert len(ds[1][1]["labels"]) == 0  # evaluation serves an image without instances
    train = VOCInstanceDataset([("voc", voc, ["2008_000003", "2008_000001"])], skip_empty=True)
    assert train[0][1]["image_id"].item() == 2008000001  # the empty image is skipped, silently
    assert len(train.report) == 0


def test_voc_instance_label_map_of_wrong_size_is_skipped(tmp_path):
    voc = make_voc2012(tmp_path)
    _palette_png(voc / "SegmentationObject" / "2008_000001.png", np.zeros((10, 10)))
    ds = VOCInstanceDataset([("voc", voc, ["2008_000001", "2008_000002"])])
    with pytest.warns(RuntimeWarning, match="does not match"):
        assert ds[0][1]["image_id"].item() == 2008000002
    assert ds.report.entries[0]["image"] == "2008_000001"


def test_sbd_mat_instances(tmp_path):
    sbd = make_sbd(tmp_path / "sbd")
    ds = VOCInstanceDataset([("sbd", sbd / "dataset", ["2009_000010"])])
    _, t = ds[0]
    assert t["labels"].tolist() == [CAR, PERSON]
    assert t["boxes"].tolist() == [[2, 2, 6, 8], [8, 9, 19, 15]]
    assert t["masks"].shape == (2, 16, 20) and t["area"].tolist() == [24, 66]


def test_voc_instance_datamodule_protocols(tmp_path):
    make_voc2012(tmp_path)
    dm = VOCInstanceDataModule(tmp_path, num_workers=0, batch_size=1, train_short_sides=(24,), max_size=64,
                               test_short_side=24)
    dm.setup("fit")
    assert dm.train_dataset.ids == ["2008_000001", "2008_000003"] and dm.val_dataset.ids == ["2008_000002"]
    assert dm.num_classes == 21
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        batches = list(dm.train_dataloader())
    assert all(b[1][0]["masks"].shape[-2:] == b[0][0].shape[-2:] for b in batches)
    assert all(len(b[1][0]["labels"]) == 2 for b in batches)  # the empty image never reaches training

    sbd_root = make_sbd(tmp_path / "sbd")
    both = VOCInstanceDataModule(tmp_path, sbd_root=sbd_root, num_workers=0)
    both.setup("fit")
    # SBD's copy of a VOC 2012 val image stays out of training
    assert both.train_dataset.ids == ["2008_000001", "2008_000003", "2009_000010"]
    sbd_only = VOCInstanceDataModule(tmp_path / "unused", sbd_root=sbd_root, protocol="sbd", num_workers=0)
    sbd_only.setup("fit")
    assert sbd_only.train_dataset.ids == ["2009_000010"] and sbd_only.val_dataset.ids == ["2008_000002"]


def test_voc_instance_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC root not found"):
        VOCInstanceDataModule(tmp_path / "none")
    make_voc2012(tmp_path)
    (tmp_path / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation/val.txt"):
        VOCInstanceDataModule(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"SBD dataset folder not found: .*nosbd/dataset"):
        VOCInstanceDataModule(tmp_path, sbd_root=tmp_path / "nosbd", protocol="sbd")
    with pytest.raises(ValueError, match="needs sbd_root"):
        VOCInstanceDataModule(tmp_path, protocol="sbd")
