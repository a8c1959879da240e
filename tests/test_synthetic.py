"""The synthetic benchmark: equations of its shapes/textures/rasteriser, and the generated files."""
from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image
from pycocotools.coco import COCO

from instsearch import synthetic as S
from instsearch.formats import Benchmark
from instsearch.synthetic.raster import rasterise
from instsearch.synthetic.rendering import Canvas

TINY = S.PRESETS["tiny"]
MICRO = replace(TINY, name="micro", n_train_images=6, n_val_images=3, n_distractor_images=2,
                positives_per_query=4, train_instances_per_category=2, test_instances_per_category=1,
                unseen_instances_per_category=1, n_categories=4, n_unseen_categories=1)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    np_state, py_state = np.random.get_state(), random.getstate()
    out = tmp_path_factory.mktemp("synth_tiny")
    bench = S.generate(out, "tiny", seed=0)
    assert bench == out / "benchmark.json"
    # No global RNG is touched: generation draws only from its own default_rng(seed).
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(np_state[1:3], after[1:3])) and random.getstate() == py_state
    return out


@pytest.fixture(scope="module")
def coco(tiny) -> dict[str, COCO]:
    return {s: COCO(str(tiny / f"{s}.json")) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def bench(tiny) -> Benchmark:
    return Benchmark.load(tiny / "benchmark.json")


def _grid(n: int = 801, extent: float = 1.5) -> tuple[np.ndarray, np.ndarray, float]:
    t = np.linspace(-extent, extent, n)
    u, v = np.meshgrid(t, t)
    return u, v, (t[1] - t[0]) ** 2


def _instance(texture: str, n_colors: int = 2, **kw) -> S.Instance:
    base = dict(id=0, category="disc", role="train", colors=((1, 0, 0), (0, 1, 0), (0, 0, 1))[:n_colors],
                texture=texture, frequency=2.0, texture_angle=0.0, phase=0.0, aspect=1.0, shape_param=0.5)
    base.update(kw)
    return S.Instance(**base)


# --------------------------------------------------------------------------- equations
@pytest.mark.parametrize("family", sorted(S.SHAPES))
@pytest.mark.parametrize("param", [0.0, 1.0])
def test_every_shape_fits_the_unit_disc_and_is_substantial(family, param):
    u, v, cell = _grid()
    inside = S.shape_mask(family, u, v, param)
    assert not inside[u * u + v * v > 1.0 + 1e-9].any(), f"{family} leaves its bounding disc"
    area = inside.sum() * cell
    assert 0.15 * math.pi < area <= 1.01 * math.pi  # 1 %: grid discretisation


def test_shape_areas_match_closed_forms():
    u, v, cell = _grid(1201, 1.0)
    area = lambda fam, p: S.shape_mask(fam, u, v, p).sum() * cell  # noqa: E731
    assert area("disc", 0.0) == pytest.approx(math.pi * 0.81, rel=5e-3)
    assert area("square", 0.0) == pytest.approx(2.0, rel=5e-3)  # side sqrt(2)
    assert area("ring", 0.0) == pytest.approx(math.pi * (1 - 0.42 ** 2), rel=5e-3)
    w = 0.24
    arm = math.sqrt(1 - w * w)
    assert area("cross", 0.0) == pytest.approx(2 * (2 * w) * (2 * arm) - (2 * w) ** 2, rel=5e-3)
    assert area("diamond", 1.0) == pytest.approx(2.0, rel=5e-3)  # |u| + |v| <= 1
    assert area("hexagon", 0.5) == pytest.approx(3 * math.sqrt(3) / 2, rel=5e-3)
    assert area("triangle", 0.5) == pytest.approx(3 * math.sqrt(3) / 4, rel=5e-3)


@pytest.mark.parametrize("family,n,start", [("triangle", 3, -math.pi / 2), ("hexagon", 6, 0.0)])
def test_polygons_agree_with_matplotlib_point_in_polygon(family, n, start):
    u, v, _ = _grid(301, 1.1)
    angles = start + 2 * math.pi * np.arange(n) / n
    poly = MplPath(np.stack([np.cos(angles), np.sin(angles)], 1))
    ref = poly.contains_points(np.stack([u.ravel(), v.ravel()], 1)).reshape(u.shape)
    ours = S.shape_mask(family, u, v)
    # Points exactly on an edge may go either way; the grid has none off by more than a hair.
    assert (ours != ref).mean() < 2e-3


def test_star_radius_function_hits_tips_and_notches():
    p = 0.0
    r_in = 0.38
    tips = [-math.pi / 2 + 2 * math.pi * k / 5 for k in range(5)]
    notches = [t + math.pi / 5 for t in tips]
    for a in tips:  # just inside / outside the tip at radius 1
        assert S.shape_mask("star", np.array(0.99 * math.cos(a)), np.array(0.99 * math.sin(a)), p)
    for a in notches:
        assert S.shape_mask("star", np.array((r_in - 0.01) * math.cos(a)), np.array((r_in - 0.01) * math.sin(a)), p)
        assert not S.shape_mask("star", np.array((r_in + 0.01) * math.cos(a)), np.array((r_in + 0.01) * math.sin(a)), p)


def test_textures_by_hand():
    u = np.array([0.1, 0.3, 0.6, -0.1])
    v = np.zeros(4)
    # stripes: floor(f * u + phase) mod n with f = 2: [0.2, 0.6, 1.2, -0.2] -> [0, 0, 1, -1 mod 2 = 1]
    assert S.texture_index(u, v, _instance("stripes")).tolist() == [0, 0, 1, 1]
    # rotated by 90 degrees the stripes run along v: u no longer matters
    assert S.texture_index(u, v + 0.2, _instance("stripes", texture_angle=math.pi / 2)).tolist() == [0, 0, 0, 0]
    # checker: cell parity of (floor(2u) + floor(2v)) with v = 0.3 -> floor(0.6) = 0
    assert S.texture_index(u, v + 0.3, _instance("checker")).tolist() == [0, 0, 1, 1]
    # rings: floor(f * 1.5 * r) mod 3 at r = 0.1, 0.3, 0.6, 0.1 -> floor(0.3, 0.9, 1.8, 0.3)
    assert S.texture_index(u, v, _instance("rings", n_colors=3)).tolist() == [0, 0, 1, 0]
    # dots: cell centres at (k + 0.5) / f; a dot of radius 0.3 cells there
    uu, vv = np.array([0.25, 0.0]), np.array([0.25, 0.0])
    assert S.texture_index(uu, vv, _instance("dots")).tolist() == [1, 0]


@pytest.mark.parametrize("texture", sorted(S.TEXTURES))
@pytest.mark.parametrize("n_colors", [2, 3])
def test_every_texture_uses_its_palette(texture, n_colors):
    u, v, _ = _grid(201, 1.0)
    idx = S.texture_index(u, v, _instance(texture, n_colors, frequency=3.0, texture_angle=0.4, phase=0.3))
    assert idx.min() >= 0 and idx.max() < n_colors
    assert len(np.unique(idx[u * u + v * v <= 1])) >= 2


def test_rasterise_ellipse_area_and_rotation():
    size = (64, 64)
    disc = lambda u, v: u * u + v * v <= 1.0  # noqa: E731
    layer = rasterise(disc, 32.0, 32.0, 20.0, 0.0, 0.5, size)
    assert layer.alpha.sum() == pytest.approx(math.pi * 20 * 10, rel=0.01)  # ellipse 20 x 10
    ys, xs = np.nonzero(layer.mask)
    assert np.ptp(xs) + 1 == 40 and np.ptp(ys) + 1 == 20  # long axis along x at theta = 0
    turned = rasterise(disc, 32.0, 32.0, 20.0, math.pi / 2, 0.5, size)
    full = np.zeros((64, 64), bool)
    full[turned.slices] = turned.mask
    ref = np.zeros((64, 64), bool)
    ref[layer.slices] = layer.mask
    assert np.array_equal(full, ref.T)  # a quarter turn about the pixel grid's centre transposes it


def test_canvas_visibility_against_brute_force():
    preset = replace(TINY, image_size=(40, 40))
    canvas = Canvas(preset)
    square = lambda u, v: (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)  # noqa: E731
    a = rasterise(square, 15.0, 15.0, 12.0, 0.0, 1.0, (40, 40))  # 18 x 18 at [6, 24)
    b = rasterise(square, 24.0, 24.0, 12.0, 0.0, 1.0, (40, 40))  # 18 x 18 at [15, 33)
    inst = _instance("stripes")
    assert canvas.try_add(inst, a, lambda vis: True)
    assert not canvas.try_add(inst, b, lambda vis: bool(np.all(vis >= 0.9)))  # would hide 1/4 of a
    assert canvas.try_add(inst, b, lambda vis: bool(np.all(vis >= 0.5)))
    ma, mb = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    ma[a.slices], mb[b.slices] = a.mask, b.mask
    expected = [(ma & ~mb).sum() / ma.sum(), 1.0]
    assert canvas.visible() == pytest.approx(expected)
    assert expected[0] == pytest.approx(1 - 81 / 324)


def test_instances_of_a_category_differ():
    rng = np.random.default_rng(3)
    insts = S.sample_instances(rng, "star", ["train"] * 4, first_id=10)
    assert [i.id for i in insts] == [10, 11, 12, 13]
    assert len({i.texture for i in insts}) == 4  # textures drawn without replacement
    assert all(2 <= i.n_colors <= 3 and i.category == "star" for i in insts)
    assert len({i.colors[0] for i in insts}) == 4


# --------------------------------------------------------------------------- generated files
def test_same_seed_gives_identical_bytes_whatever_the_workers(tiny, tmp_path):
    other = tmp_path / "again"
    S.generate(other, "tiny", seed=0, workers=2)
    files_a = sorted(p.relative_to(tiny) for p in tiny.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 400
    for rel in files_a:
        assert (tiny / rel).read_bytes() == (other / rel).read_bytes(), f"{rel} differs"


def test_coco_masks_boxes_and_images_agree(tiny, coco):
    for split, c in coco.items():
        assert c.getAnnIds(), split
        for ann in c.loadAnns(c.getAnnIds()):
            img = c.imgs[ann["image_id"]]
            mask = c.annToMask(ann)
            assert mask.shape == (img["height"], img["width"])
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            assert isinstance(ann["instance_id"], int) and isinstance(ann["segmentation"]["counts"], str)
            if split != "test":
                assert ann["visible"] >= TINY.min_visibility
        for img in c.imgs.values():
            with Image.open(tiny / "images" / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"]) == TINY.image_size


def test_several_objects_per_image_with_scale_change(coco):
    for split in ("train", "val"):
        c = coco[split]
        counts = Counter(a["image_id"] for a in c.anns.values())
        assert all(2 <= counts[i] <= 4 for i in c.imgs), split
        assert np.mean([counts[i] for i in c.imgs]) > 2.5
    sizes = [max(a["bbox"][2:]) for a in coco["train"].anns.values() if a["visible"] == 1.0]
    assert max(sizes) / min(sizes) >= 2.0


def test_several_instances_per_category(coco, bench):
    c = coco["train"]
    per_cat = defaultdict(set)
    for a in c.anns.values():
        per_cat[a["category_id"]].add(a["instance_id"])
    assert len(per_cat) >= 4 and all(len(s) >= 2 for s in per_cat.values())
    test_per_cat = defaultdict(set)
    for a in coco["test"].anns.values():
        test_per_cat[a["category_id"]].add(a["instance_id"])
    assert all(len(s) >= 2 for s in test_per_cat.values())


def test_train_and_test_instances_are_disjoint_with_an_unseen_category(tiny, coco, bench):
    train_ids = {a["instance_id"] for s in ("train", "val") for a in coco[s].anns.values()}
    test_ids = {a["instance_id"] for a in coco["test"].anns.values()}
    info = bench.extra["query_info"]
    assert train_ids and test_ids and not train_ids & test_ids
    assert not train_ids & {q["instance_id"] for q in info.values()}
    train_cats = {c["name"] for c in coco["train"].cats.values()}
    query_cats = {q["category"] for q in info.values()}
    assert query_cats - train_cats, "no category unseen in training"
    assert query_cats & train_cats, "no new instance of a known category"
    assert all(q["seen_category"] == (q["category"] in train_cats) for q in info.values())
    synth = json.loads((tiny / "synth.json").read_text())
    assert synth["seed"] == 0 and synth["preset"] == "tiny"
    assert {c["name"] for c in synth["categories"] if not c["seen_in_training"]} == query_cats - train_cats


def test_benchmark_queries_positives_and_junk(bench, coco):
    assert 16 <= len(bench.queries) <= 24 and 120 <= len(bench.database) <= 200
    database = set(bench.database)
    test = coco["test"]
    by_file = {img["file_name"]: i for i, img in test.imgs.items()}

    def objects(image_id: str) -> dict[int, dict]:
        iid = by_file[bench.images[image_id].file]
        return {a["instance_id"]: a for a in test.imgToAnns[iid]}

    info = bench.extra["query_info"]
    for q in bench.queries:
        inst = info[q.id]["instance_id"]
        gt = bench.ground_truth[q.id]
        assert q.image not in database
        qa = objects(q.image)[inst]
        x, y, w, h = qa["bbox"]
        assert qa["visible"] == 1.0 and q.box == (x, y, x + w, y + h)
        assert len(gt.positives) >= 4 and set(gt.positives) <= database and not gt.junk & set(gt.positives)
        for image, boxes in gt.positives.items():
            a = objects(image)[inst]
            x, y, w, h = a["bbox"]
            assert a["visible"] >= TINY.junk_visibility and boxes == [(x, y, x + w, y + h)]
        for image in gt.junk:
            a = objects(image).get(inst)
            assert a is None or a["visible"] < TINY.junk_visibility  # None: hidden entirely
        # Every database image that shows the instance is a positive or junk, and no other is.
        shown = {im for im in bench.database if inst in objects(im)}
        assert shown <= set(gt.positives) | gt.junk
    assert sum(len(g.junk) for g in bench.ground_truth.values()) >= 1


def test_same_category_distractors_in_the_database(bench, coco):
    test = coco["test"]
    by_file = {img["file_name"]: i for i, img in test.imgs.items()}
    cat_of = {c["name"]: k for k, c in test.cats.items()}
    info = bench.extra["query_info"]
    for q in bench.queries:
        inst, cat = info[q.id]["instance_id"], cat_of[info[q.id]["category"]]
        gt = bench.ground_truth[q.id]
        negatives_same_cat = [im for im in bench.database if im not in gt.positives and im not in gt.junk and any(
            a["category_id"] == cat and a["instance_id"] != inst for a in test.imgToAnns[by_file[bench.images[im].file]])]
        assert len(negatives_same_cat) >= 2, q.id


def test_cli_writes_files_and_returns_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(S.PRESETS, "micro", MICRO)
    out = tmp_path / "micro"
    assert S.main(["--out", str(out), "--preset", "micro", "--seed", "1", "--workers", "1"]) == 0
    for name in ("train.json", "val.json", "test.json", "benchmark.json", "synth.json"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out
    assert "benchmark.json" in printed and "queries" in printed
    bench = Benchmark.load(out / "benchmark.json")
    assert len(bench.queries) == 4 and all(bench.image_path(i).is_file() for i in bench.images)
    # Regenerating over its own output is allowed; a different seed gives different data.
    first = (out / "benchmark.json").read_bytes()
    assert S.main(["--out", str(out), "--preset", "micro", "--seed", "2", "--workers", "1"]) == 0
    assert (out / "benchmark.json").read_bytes() != first


def test_cli_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert S.main(["--out", str(tmp_path), "--preset", "tiny"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match="available"):
        S.generate(tmp_path / "x", "huge")
