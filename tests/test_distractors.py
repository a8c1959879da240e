"""Distractor folders: deterministic lazy walk, sharding over workers x ranks, bad images."""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import instsearch.datamodules.distractors as distractors
from instsearch.datamodules.distractors import DistractorImages, count_image_files, iter_image_files
from instsearch.datamodules.image_io import BadImageReport

TREE = ["10.jpg", "9.jpg", "a/0.jpeg", "a/1.JPG", "a/z/3.png", "b/2.jpg", "d/e/f/4.webp", "d/e/f/g/5.Jpeg"]
NOT_IMAGES = ["c.txt", ".hidden.jpg", "a/._1.jpg", "b/readme", ".git/x.jpg"]


def make_tree(root: Path, files=TREE, size=(12, 8)) -> Path:
    for i, rel in enumerate(files):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[path.suffix[1:].lower()]
        Image.new("RGB", size, (i * 20, 0, 0)).save(path, fmt)
    for rel in NOT_IMAGES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("not an image")
    return root


def test_order_is_sorted_per_directory_depth_first(tmp_path):
    root = make_tree(tmp_path / "flickr")
    found = [p.relative_to(root).as_posix() for p in iter_image_files(root)]
    assert found == TREE
    # the same order as sorting the relative paths by their components
    assert found == sorted(found, key=lambda r: r.split("/"))
    assert count_image_files(root) == len(TREE)
    assert [p.relative_to(root).as_posix() for p in iter_image_files(root, frozenset({".PNG"}))] == ["a/z/3.png"]


def test_walk_is_lazy(tmp_path, monkeypatch):
    files = [f"{d}/{i}.jpg" for d in "abcd" for i in range(2)]
    root = make_tree(tmp_path / "lazy", files)
    calls = []
    real_scandir = os.scandir

    def counting_scandir(path):
        calls.append(Path(path).name)
        return real_scandir(path)

    monkeypatch.setattr(distractors.os, "scandir", counting_scandir)
    walk = iter_image_files(root)
    assert calls == []  # nothing read before the first item is asked for
    first = next(walk)
    assert first == root / "a" / "0.jpg"
    assert calls == ["lazy", "a"]  # folders b, c, d not opened yet
    rest = list(walk)
    assert len(rest) == 7 and calls == ["lazy", "a", "b", "c", "d"]


def test_symlink_cycle_is_walked_once(tmp_path):
    root = make_tree(tmp_path / "cyc", ["a/1.jpg"])
    os.symlink(root, root / "a" / "loop")
    assert [p.relative_to(root).as_posix() for p in iter_image_files(root)] == ["a/1.jpg"]


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        next(iter_image_files(tmp_path / "nothere"))
    with pytest.raises(FileNotFoundError, match="nothere"):
        DistractorImages(tmp_path / "nothere")


def test_items_ids_and_transform(tmp_path):
    root = make_tree(tmp_path / "d")
    items = list(DistractorImages(root, id_prefix="flickr/"))
    assert [i for _, i in items] == ["flickr/" + r for r in TREE]
    image, _ = items[0]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 12) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    sized = list(DistractorImages(root, transform=lambda im: im.size))
    assert all(size == (12, 8) for size, _ in sized)


def test_sharding_two_workers_two_ranks_covers_each_file_once(tmp_path):
    root = make_tree(tmp_path / "s")
    seen: list[str] = []
    per_process: list[set[str]] = []
    for rank in range(2):
        ds = DistractorImages(root, id_prefix="", rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        ids = [image_id for _, image_id in loader]
        seen += ids
        per_process.append(set(ids))
    assert sorted(seen) == sorted(TREE)  # every file exactly once across 2 ranks x 2 workers
    # rank r, worker w gets indices i with i % 4 == 2 r + w
    assert per_process[0] == {TREE[i] for i in range(len(TREE)) if i % 4 in (0, 1)}
    assert per_process[1] == {TREE[i] for i in range(len(TREE)) if i % 4 in (2, 3)}


def test_rank_from_torch_distributed(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "r")
    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True,
                                 get_rank=lambda: 1, get_world_size=lambda: 3)
    import instsearch.distributed

    monkeypatch.setattr(instsearch.distributed, "dist", fake)
    ds = DistractorImages(root, id_prefix="")
    assert ds.shard() == (1, 3)
    assert [i for _, i in ds] == [TREE[1], TREE[4], TREE[7]]
    with pytest.raises(ValueError):
        DistractorImages(root, rank=2, world_size=2)


def test_bad_images_are_skipped_and_recorded(tmp_path):
    root = make_tree(tmp_path / "b")
    (root / "a" / "1.JPG").write_bytes(b"")
    (root / "b" / "2.jpg").write_text("text named .jpg")
    report = BadImageReport()
    ids = [i for _, i in DistractorImages(root, report=report, id_prefix="x:")]
    assert ids == ["x:" + r for r in TREE if r not in ("a/1.JPG", "b/2.jpg")]
    assert [e["image"] for e in report.entries] == ["x:a/1.JPG", "x:b/2.jpg"]
    assert "zero-byte" in report.entries[0]["reason"] and "not a readable image" in report.entries[1]["reason"]
    report2 = BadImageReport()
    big = [i for _, i in DistractorImages(root, report=report2, max_pixels=50)]
    assert big == [] and len(report2) == len(TREE)


def test_bad_images_from_worker_processes_reach_the_report(tmp_path):
    root = make_tree(tmp_path / "w")
    (root / "10.jpg").write_bytes(b"")
    (root / "9.jpg").write_text("text named .jpg")
    report = BadImageReport(spool=tmp_path / "bad.jsonl")
    loader = DataLoader(DistractorImages(root, report=report, id_prefix=""), batch_size=None, num_workers=2)
    ids = [i for _, i in loader]
    assert sorted(ids) == sorted(TREE[2:])
    assert sorted(e["image"] for e in report.collect().entries) == ["10.jpg", "9.jpg"]
