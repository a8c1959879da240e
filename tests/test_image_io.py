"""Robust image loading: every bad file is a BadImageError, every odd-but-valid file loads as RGB
in its displayed orientation. All files are written by the tests with PIL."""
from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from instsearch.datamodules.image_io import BadImageError, BadImageReport, image_size, load_rgb

ORIENTATION = 0x0112


def _pattern(h: int = 24, w: int = 36) -> np.ndarray:
    """An RGB image with no symmetry, so every flip / rotation is distinguishable."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * 7 + yy * 3) % 256], -1).astype(np.uint8)


# The EXIF orientation tag says how to turn the stored pixels into the displayed image (EXIF 2.3
# Table, "Orientation"): written here with numpy, independently of PIL's exif_transpose.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _save_with_orientation(path: Path, arr: np.ndarray, orientation: int, **kw) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(arr).save(path, exif=exif, **kw)


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------

def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("case, reason", [
    ("missing", "file not found"),
    ("empty", "zero-byte"),
    ("text", "not a readable image"),
    ("garbage_after_header", "not a readable image"),
    ("truncated_jpeg", "not a readable image"),
    ("truncated_png", "not a readable image"),
])
def test_bad_files_raise(tmp_path, case, reason):
    path = tmp_path / "x.jpg"
    data = _jpeg_bytes(_pattern(64, 64))
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello, I am not a picture\n" * 10)
    elif case == "garbage_after_header":
        path.write_bytes(data[:200] + bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)))
    elif case == "truncated_jpeg":
        path.write_bytes(data[: len(data) // 2])
    elif case == "truncated_png":
        path = tmp_path / "x.png"
        Image.fromarray(_pattern(64, 64)).save(path)
        path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(BadImageError, match=reason) as info:
        load_rgb(path)
    assert info.value.path == str(path) and info.value.reason


def test_truncation_is_not_hidden_by_pil_leniency(tmp_path, monkeypatch):
    data = _jpeg_bytes(_pattern(64, 64))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    # under the global flag PIL itself would serve a grey-filled image
    with Image.open(path) as im:
        im.load()
    with pytest.raises(BadImageError, match="truncated"):
        load_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_flag_restored_after_concurrent_loads(tmp_path, monkeypatch):
    good = tmp_path / "ok.jpg"
    good.write_bytes(_jpeg_bytes(_pattern()))
    cut = tmp_path / "cut.jpg"
    data = _jpeg_bytes(_pattern(64, 64))
    cut.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    failures = []

    def work():
        for _ in range(20):
            load_rgb(good)
            try:
                load_rgb(cut)
                failures.append("truncated image loaded")
            except BadImageError:
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (50, 40)).save(path)
    with pytest.raises(BadImageError, match="50x40 exceeds the 1999-pixel limit"):
        load_rgb(path, max_pixels=1999)
    assert load_rgb(path, max_pixels=2000).size == (50, 40)
    with pytest.raises(BadImageError, match="exceeds"):
        image_size(path, max_pixels=1999)


def test_image_size_refuses_an_oversized_png_before_reading_past_its_header(tmp_path, monkeypatch):
    """A PNG's EXIF may follow its pixel data, so reading it streams the whole file: the pixel
    limit is checked on the header's size first."""
    path = tmp_path / "big.png"
    Image.new("RGB", (50, 40)).save(path)
    read = []
    original = Image.Image.getexif
    monkeypatch.setattr(Image.Image, "getexif", lambda im: read.append(1) or original(im))
    with pytest.raises(BadImageError, match="50x40 exceeds the 1999-pixel limit"):
        image_size(path, max_pixels=1999)
    assert read == []
    assert image_size(path, max_pixels=2000) == (50, 40) and read == [1]


def test_image_size_errors(tmp_path):
    (tmp_path / "t.jpg").write_text("text")
    (tmp_path / "e.jpg").write_bytes(b"")
    for name, reason in [("t.jpg", "not a readable image"), ("e.jpg", "zero-byte"), ("m.jpg", "not found")]:
        with pytest.raises(BadImageError, match=reason):
            image_size(tmp_path / name)


def test_error_pickles():
    e = pickle.loads(pickle.dumps(BadImageError("/a/b.jpg", "zero-byte file")))
    assert (e.path, e.reason, str(e)) == ("/a/b.jpg", "zero-byte file", "/a/b.jpg: zero-byte file")


# ---------------------------------------------------------------------------------------------
# Odd but valid files
# ---------------------------------------------------------------------------------------------

def test_modes_load_as_rgb(tmp_path):
    rgb = _pattern()
    grey = rgb[..., 0]
    cases = {}
    Image.fromarray(grey).save(tmp_path / "l.png")
    cases["l.png"] = np.repeat(grey[..., None], 3, -1)
    Image.fromarray(grey > 127).save(tmp_path / "bilevel.png")
    cases["bilevel.png"] = np.repeat(np.where(grey > 127, 255, 0)[..., None], 3, -1)
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    cases["p.png"] = np.asarray(pal.convert("RGB"))
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    rgba[:, :10, 3] = 0  # fully transparent strip -> white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = rgb.copy()
    expected[:, :10] = 255
    cases["rgba.png"] = expected
    la = Image.fromarray(np.stack([grey, np.where(np.arange(36)[None] < 5, 0, 255).repeat(24, 0)], -1).astype(np.uint8),
                         mode="LA")
    la.save(tmp_path / "la.png")
    e = np.repeat(grey[..., None], 3, -1).copy()
    e[:, :5] = 255
    cases["la.png"] = e
    ptrans = Image.fromarray(rgb).quantize(8)
    ptrans.info["transparency"] = 0
    ptrans.save(tmp_path / "ptrans.png", transparency=0)
    idx = np.asarray(ptrans)
    e = np.asarray(ptrans.convert("RGB")).copy()
    e[idx == 0] = 255
    cases["ptrans.png"] = e
    for name, want in cases.items():
        got = load_rgb(tmp_path / name)
        assert got.mode == "RGB" and got.size == (36, 24), name
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red in CMYK
    got = load_rgb(tmp_path / "c.jpg")
    assert got.mode == "RGB" and got.size == (8, 6)
    np.testing.assert_allclose(np.asarray(got)[0, 0], [255, 0, 0], atol=3)


def test_16_bit_greyscale_keeps_its_full_range(tmp_path):
    values = np.array([[0, 257, 65535], [32896, 1000, 12850]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = np.asarray(load_rgb(tmp_path / "g16.png"))
    np.testing.assert_array_equal(got[..., 0], np.round(values / 257.0).astype(np.uint8))
    assert (got[..., 0] == got[..., 2]).all()
    # a dark 16-bit image stays dark (not stretched to its own maximum)
    Image.fromarray(np.full((4, 4), 2570, np.uint16)).save(tmp_path / "dark.png")
    assert np.asarray(load_rgb(tmp_path / "dark.png")).max() == 10


def test_float_image(tmp_path):
    arr = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    got = np.asarray(load_rgb(tmp_path / "f.tif"))[..., 0]
    np.testing.assert_array_equal(got, np.round(arr.astype(np.float64) * 255).astype(np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_is_exact(tmp_path, orientation):
    stored = _pattern()
    path = tmp_path / "o.png"
    _save_with_orientation(path, stored, orientation)
    want = DISPLAYED[orientation](stored)
    got = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(got, want)
    assert image_size(path) == (want.shape[1], want.shape[0])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_jpeg_and_boxes(tmp_path, orientation):
    """A camera JPEG: a red patch annotated in displayed pixels is where the box says."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[5:15, 40:55] = (255, 0, 0)
    path = tmp_path / "cam.jpg"
    _save_with_orientation(path, stored, orientation, quality=95)
    displayed = DISPLAYED[orientation](stored)
    ys, xs = np.nonzero(displayed[..., 0] > 128)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # expected box, displayed orientation
    got = np.asarray(load_rgb(path))
    assert got.shape == displayed.shape
    gy, gx = np.nonzero(got[..., 0] > 128)
    assert [gx.min(), gy.min(), gx.max() + 1, gy.max() + 1] == box
    assert image_size(path) == (displayed.shape[1], displayed.shape[0])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _add_in_child(report: BadImageReport, name: str) -> None:
    report.add(BadImageError(f"/data/{name}.jpg", "zero-byte file"), name)


def test_report_collects_entries_from_worker_processes(tmp_path):
    report = BadImageReport(spool=tmp_path / "spool.jsonl")
    report.add(BadImageError("/data/a.jpg", "file not found"), "a")
    report.add(BadImageError("/data/a.jpg", "file not found"), "a")  # one entry per path
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_in_child, args=(report, n)) for n in ("b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(report) == 1
    report.collect()
    assert sorted(e["image"] for e in report.entries) == ["a", "b", "c"]
    out = json.loads(report.write(tmp_path / "out" / "bad.json").read_text())
    assert out["skipped"] == 3
    clone = pickle.loads(pickle.dumps(report))
    clone.add(BadImageError("/data/d.jpg", "x"), "d")
    assert len(clone) == 4 and len(report.collect()) == 4
