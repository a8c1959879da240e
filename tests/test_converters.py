"""Benchmark converters: each one on a tiny copy of its distributor's exact layout."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layout_files import jpeg, text
from instsearch.datamodules.converters import CONVERTERS, convert, main
from instsearch.datamodules.restricted_pickle import UnsafePickleError
from instsearch.formats import Benchmark, FormatError


def load(result) -> Benchmark:
    """Reload from disk: checks the file itself, not only the in-memory object."""
    return Benchmark.load(result.path)


def gt(b: Benchmark, qid: str) -> tuple[dict, set]:
    g = b.ground_truth[qid]
    return {k: [list(x) for x in v] for k, v in g.positives.items()}, set(g.junk)


def test_registry_names():
    assert set(CONVERTERS) == {"instre", "oxford5k", "paris6k", "roxford5k", "rparis6k", "holidays",
                               "instance160", "instance335", "folder"}


# ============================================================================ INSTRE
# class -> number of images; the M class has two boxes per image.
INSTRE_CLASSES = {"INSTRE-S1": {"01a_book": 7, "02b_cup": 6}, "INSTRE-S2": {"01_toy": 6},
                  "INSTRE-M": {"01_pair": 6}}


def instre_box(subset: str, i: int) -> list[list[float]]:
    """Ground-truth [x1, y1, x2, y2] boxes of image i (1-based) as written below ('x y w h')."""
    if subset == "INSTRE-M":
        return [[1.0, 2.0, 11.0, 12.0], [20.0, 5.0, 30.0 + i, 25.0]]
    return [[i, 1.0, i + 10.0, 21.0]]


def make_instre(root: Path) -> Path:
    for subset, classes in INSTRE_CLASSES.items():
        for cls, n in classes.items():
            for i in range(1, n + 1):
                jpeg(root / subset / cls / f"{i:03d}.jpg")
                lines = [f"{b[0]:g} {b[1]:g} {b[2] - b[0]:g} {b[3] - b[1]:g}" for b in instre_box(subset, i)]
                text(root / subset / cls / f"{i:03d}.txt", "\n".join(lines) + "\n")
    return root


def test_instre_1250_protocol_exact_split(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    b = load(convert("instre", root, tmp_path / "out" / "instre.json"))
    assert b.image_root == "../INSTRE"
    expected_queries, expected_db = [], []
    for subset, classes in INSTRE_CLASSES.items():
        for cls, n in classes.items():
            ids = [f"{subset}/{cls}/{i:03d}" for i in range(1, n + 1)]
            expected_queries += ids[:5]
            expected_db += ids[5:]
    assert [q.id for q in b.queries] == expected_queries
    assert b.database == expected_db
    assert not set(b.database) & {q.image for q in b.queries}  # query images are not in the database
    for q in b.queries:
        subset, cls, num = q.id.split("/")
        n = INSTRE_CLASSES[subset][cls]
        positives, junk = gt(b, q.id)
        assert positives == {f"{subset}/{cls}/{i:03d}": instre_box(subset, i) for i in range(6, n + 1)}
        assert junk == set()
        boxes = np.array(instre_box(subset, int(num)))
        union = [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()]
        assert list(q.box) == union
        assert b.image_path(q.image).is_file()
    assert b.extra["protocol"] == "1250"
    report = json.loads((tmp_path / "out" / "convert_report.json").read_text())
    assert report["counts"]["queries"] == 20 and report["counts"]["database"] == 5
    assert report["counts"]["positives_mean"] == pytest.approx((2 * 5 + 1 * 15) / 20)


def test_instre_m_protocol_keeps_database(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    b = load(convert("instre", root, tmp_path / "m.json", protocol="instre-m"))
    assert [q.id for q in b.queries] == [f"INSTRE-M/01_pair/{i:03d}" for i in range(1, 6)]
    assert len(b.database) == 5  # the same database as the 1,250 protocol
    for q in b.queries:
        assert list(q.box) == [1.0, 2.0, 30.0 + int(q.id[-3:]), 25.0]  # the union of the pair
        positives, _ = gt(b, q.id)
        assert positives == {"INSTRE-M/01_pair/006": instre_box("INSTRE-M", 6)}


def test_instre_clipped_box_bad_images_and_dropped_query(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    # database image 007 of 01a_book: box sticks out on the right and bottom -> clipped to 40x30
    text(root / "INSTRE-S1/01a_book/007.txt", "30 20 25 25\n")
    # a zero-byte database image and a text file named .jpg as a query image
    (root / "INSTRE-S1/01a_book/006.jpg").write_bytes(b"")
    (root / "INSTRE-S2/01_toy/002.jpg").write_text("this is not a jpeg")
    result = convert("instre", root, tmp_path / "b.json")
    b = load(result)
    c = result.report["counts"]
    assert c["bad_images"] == 2 and c["queries_dropped"] == 1 and c["boxes_clipped"] == 1
    bad = {e["image"]: e["reason"] for e in result.report["bad_images"]}
    assert set(bad) == {"INSTRE-S1/01a_book/006", "INSTRE-S2/01_toy/002"}
    assert "zero-byte" in bad["INSTRE-S1/01a_book/006"]
    assert result.report["dropped_queries"][0]["query"] == "INSTRE-S2/01_toy/002"
    assert "INSTRE-S2/01_toy/002" not in {q.id for q in b.queries}
    assert "INSTRE-S1/01a_book/006" not in b.database and "INSTRE-S1/01a_book/006" not in b.images
    positives, _ = gt(b, "INSTRE-S1/01a_book/001")
    assert positives == {"INSTRE-S1/01a_book/007": [[30.0, 20.0, 40.0, 30.0]]}
    clipped = result.report["clipped_boxes"][0]
    assert clipped["image"] == "INSTRE-S1/01a_book/007" and clipped["clipped"] == [30.0, 20.0, 40.0, 30.0]
    assert "007.txt, line 1" in clipped["where"]


def test_instre_inverted_box_names_file_and_line(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    text(root / "INSTRE-M/01_pair/003.txt", "1 2 10 10\n5 5 -3 4\n")
    with pytest.raises(FormatError, match=r"INSTRE-M/01_pair/003\.txt, line 2.*inverted"):
        convert("instre", root, tmp_path / "b.json")
    text(root / "INSTRE-M/01_pair/003.txt", "1 2 0 10\n")  # empty (zero width)
    with pytest.raises(FormatError, match=r"003\.txt, line 1"):
        convert("instre", root, tmp_path / "b.json")


def test_instre_missing_files(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    os.remove(root / "INSTRE-S2/01_toy/004.txt")
    with pytest.raises(FileNotFoundError, match=r"INSTRE-S2/01_toy/004\.txt"):
        convert("instre", root, tmp_path / "b.json")
    other = make_instre(tmp_path / "other")
    shutil.rmtree(other / "INSTRE-M")
    with pytest.raises(FileNotFoundError, match=r"other/INSTRE-M\n(.|\n)*expected layout"):
        convert("instre", other, tmp_path / "b.json")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert("instre", tmp_path / "nowhere", tmp_path / "b.json")


# ============================================================================ Oxford / Paris
def make_oxford(root: Path, paris: bool = False) -> Path:
    """Two landmarks, 3 + 3 images, one query each; Paris nests per landmark and has no prefix."""
    names = {"all_souls": [f"all_souls_{i:06d}" for i in range(1, 4)],
             "bodleian": [f"bodleian_{i:06d}" for i in range(1, 4)]}
    for landmark, stems in names.items():
        for stem in stems:
            jpeg(root / "jpg" / (landmark if paris else "") / f"{stem}.jpg")
    prefix = "" if paris else "oxc1_"
    gtd = root / "gt_files"
    text(gtd / "all_souls_1_query.txt", f"{prefix}all_souls_000001 2.5 3 20.5 25\n")
    text(gtd / "all_souls_1_good.txt", "all_souls_000001\nall_souls_000002\n")
    text(gtd / "all_souls_1_ok.txt", "all_souls_000003\n")
    text(gtd / "all_souls_1_junk.txt", "bodleian_000003\n")
    text(gtd / "bodleian_1_query.txt", f"{prefix}bodleian_000002 -5 1 39 50\n")  # partly outside: clipped
    text(gtd / "bodleian_1_good.txt", "bodleian_000001\n")
    text(gtd / "bodleian_1_ok.txt", "")
    text(gtd / "bodleian_1_junk.txt", "bodleian_000003\nall_souls_000002\n")
    return root


@pytest.mark.parametrize("dataset", ["oxford5k", "paris6k"])
def test_oxford_paris_classic(tmp_path, dataset):
    root = make_oxford(tmp_path / dataset, paris=dataset == "paris6k")
    result = convert(dataset, root, tmp_path / "out.json")
    b = load(result)
    assert [q.id for q in b.queries] == ["all_souls_1", "bodleian_1"]
    assert b.query_by_id["all_souls_1"].image == "all_souls_000001"
    assert b.query_by_id["all_souls_1"].box == (2.5, 3.0, 20.5, 25.0)
    assert b.query_by_id["bodleian_1"].box == (0.0, 1.0, 39.0, 30.0)
    assert result.report["counts"]["boxes_clipped"] == 1
    assert len(b.database) == 6 and "all_souls_000001" in b.database  # the query image stays in
    assert gt(b, "all_souls_1") == ({"all_souls_000001": [], "all_souls_000002": [], "all_souls_000003": []},
                                    {"bodleian_000003"})
    assert gt(b, "bodleian_1") == ({"bodleian_000001": []}, {"bodleian_000003", "all_souls_000002"})
    assert b.image_root == dataset + "/jpg"
    if dataset == "paris6k":
        assert b.images["bodleian_000002"].file == "bodleian/bodleian_000002.jpg"
    assert all(b.image_path(i).is_file() for i in b.images)


def test_oxford_missing_list_and_missing_image(tmp_path):
    root = make_oxford(tmp_path / "ox")
    os.remove(root / "jpg/all_souls_000003.jpg")  # listed in all_souls_1_ok.txt
    result = convert("oxford5k", root, tmp_path / "b.json")
    bad = result.report["bad_images"]
    assert [e["image"] for e in bad] == ["all_souls_000003"]
    assert "all_souls_1_ok.txt, line 1" in bad[0]["reason"]
    assert set(load(result).ground_truth["all_souls_1"].positives) == {"all_souls_000001", "all_souls_000002"}
    os.remove(root / "gt_files/bodleian_1_ok.txt")
    with pytest.raises(FileNotFoundError, match=r"gt_files/bodleian_1_ok\.txt"):
        convert("oxford5k", root, tmp_path / "b.json")
    text(root / "gt_files/bodleian_1_ok.txt", "")
    text(root / "gt_files/bodleian_1_query.txt", "oxc1_bodleian_000002 30 1 10 20\n")
    with pytest.raises(FormatError, match=r"bodleian_1_query\.txt, line 1.*inverted"):
        convert("oxford5k", root, tmp_path / "b.json")


# ============================================================================ revisited
def make_revisited(root: Path, dataset: str = "roxford5k", protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    imlist = [f"img{i}" for i in range(8)]
    qimlist = ["img0", "qonly"]  # img0 is also in the database
    for name in imlist + qimlist:
        jpeg(root / "jpg" / f"{name}.jpg")
    gnd = [{"bbx": np.array([1.0, 2.0, 30.0, 20.0]), "easy": np.array([1, 2]), "hard": np.array([3]),
            "junk": np.array([4])},
           {"bbx": [0.0, 0.0, 50.0, 10.0], "easy": [5], "hard": np.array([6, 7], dtype=np.int32),
            "junk": np.array([], dtype=np.int64)}]
    with open(root / f"gnd_{dataset}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=protocol)
    return root


@pytest.mark.parametrize("setting,q0,q1", [
    ("easy", ({"img1", "img2"}, {"img4", "img3", "img0"}), ({"img5"}, {"img6", "img7"})),
    ("medium", ({"img1", "img2", "img3"}, {"img4", "img0"}), ({"img5", "img6", "img7"}, set())),
    ("hard", ({"img3"}, {"img4", "img1", "img2", "img0"}), ({"img6", "img7"}, {"img5"})),
])
def test_revisited_settings(tmp_path, setting, q0, q1):
    root = make_revisited(tmp_path / "roxford5k")
    b = load(convert("roxford5k", root, tmp_path / "b.json", setting=setting))
    assert b.name == f"roxford5k-{setting}" and b.extra["setting"] == setting
    assert b.database == [f"img{i}" for i in range(8)]
    assert [(q.id, q.image) for q in b.queries] == [("img0", "img0"), ("qonly", "qonly")]
    assert b.queries[0].box == (1.0, 2.0, 30.0, 20.0)
    assert b.queries[1].box == (0.0, 0.0, 40.0, 10.0)  # clipped to the 40-pixel width
    for qid, (pos, junk) in (("img0", q0), ("qonly", q1)):
        g = b.ground_truth[qid]
        assert set(g.positives) == pos and g.junk == junk
        assert all(boxes == [] for boxes in g.positives.values())


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_revisited_pickle_protocols_and_paris(tmp_path, protocol):
    root = make_revisited(tmp_path / "rparis6k", "rparis6k", protocol=protocol)
    b = load(convert("rparis6k", root, tmp_path / "b.json"))  # default: medium
    assert b.extra["setting"] == "medium" and len(b.queries) == 2


def test_revisited_refuses_malicious_pickle_and_bad_indices(tmp_path):
    root = make_revisited(tmp_path / "roxford5k")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [Evil()]}, f)
    with pytest.raises(UnsafePickleError, match="system"):
        convert("roxford5k", root, tmp_path / "b.json")
    assert not marker.exists()
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": ["img0"], "qimlist": ["img0"],
                     "gnd": [{"bbx": [0, 0, 5, 5], "easy": [3], "hard": [], "junk": []}]}, f)
    with pytest.raises(FormatError, match=r"gnd\[0\]\['easy'\]: index 3 outside"):
        convert("roxford5k", root, tmp_path / "b.json")
    os.remove(root / "gnd_roxford5k.pkl")
    with pytest.raises(FileNotFoundError, match=r"gnd_roxford5k\.pkl"):
        convert("roxford5k", root, tmp_path / "b.json")


def test_setting_only_for_revisited(tmp_path):
    with pytest.raises(ValueError, match="roxford5k, rparis6k"):
        convert("holidays", tmp_path, tmp_path / "b.json", setting="hard")


# ============================================================================ Holidays
def make_holidays(root: Path) -> Path:
    for stem in ("100000", "100001", "100002", "100100", "100200", "100201"):
        jpeg(root / "jpg" / f"{stem}.jpg")
    jpeg(root / "jpg" / "100101.jpg", w=40, h=30, orientation=6)  # displayed rotated: 30x40
    return root


def test_holidays_groups_and_exif(tmp_path):
    b = load(convert("holidays", make_holidays(tmp_path / "holidays"), tmp_path / "b.json"))
    assert [q.id for q in b.queries] == ["100000", "100100", "100200"]
    assert len(b.database) == 7 and b.database[0] == "100000"  # every image, queries included
    assert gt(b, "100000") == ({"100001": [], "100002": []}, {"100000"})
    assert gt(b, "100100") == ({"100101": []}, {"100100"})
    assert gt(b, "100200") == ({"100201": []}, {"100200"})
    assert all(q.box == (0.0, 0.0, 40.0, 30.0) for q in b.queries)
    assert (b.images["100101"].width, b.images["100101"].height) == (30, 40)


def test_holidays_bad_images_and_too_large(tmp_path):
    root = make_holidays(tmp_path / "holidays")
    jpeg(root / "jpg" / "100001.jpg", w=80, h=60)  # 4,800 pixels
    data = (root / "jpg" / "100002.jpg").read_bytes()
    (root / "jpg" / "100002.jpg").write_bytes(data[:20])  # header cut: corrupt
    (root / "jpg" / "100200.jpg").write_bytes(b"")  # a zero-byte query image
    result = convert("holidays", root, tmp_path / "b.json", max_pixels=2000)
    b = load(result)
    reasons = {e["image"]: e["reason"] for e in result.report["bad_images"]}
    assert set(reasons) == {"100001", "100002", "100200"}
    assert "pixel limit" in reasons["100001"] and "zero-byte" in reasons["100200"]
    assert [q.id for q in b.queries] == ["100000", "100100"]
    assert result.report["dropped_queries"] == [
        {"query": "100200", "image": "100200", "reason": f"query image unusable: {reasons['100200']}"}]
    assert gt(b, "100000") == ({}, {"100000"})
    assert result.report["queries_without_positives"] == ["100000"]
    assert set(b.database) == {"100000", "100100", "100101", "100201"}


def test_holidays_refuses_unexpected_names(tmp_path):
    root = make_holidays(tmp_path / "holidays")
    jpeg(root / "jpg" / "IMG_1.jpg")
    with pytest.raises(FormatError, match=r"IMG_1\.jpg.*six digits"):
        convert("holidays", root, tmp_path / "b.json")


def test_verify_images_catches_truncated_data(tmp_path):
    root = make_holidays(tmp_path / "holidays")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(root / "jpg" / "100002.jpg", "JPEG")
    data = (root / "jpg" / "100002.jpg").read_bytes()
    (root / "jpg" / "100002.jpg").write_bytes(data[: len(data) // 2])  # header intact, data cut
    assert convert("holidays", root, tmp_path / "a.json").report["counts"]["bad_images"] == 0
    verified = convert("holidays", root, tmp_path / "b.json", verify_images=True)
    assert [e["image"] for e in verified.report["bad_images"]] == ["100002"]


# ============================================================================ Instance-160 / 335
def make_instance(root: Path) -> Path:
    for rel in ("Car1/0001.jpg", "Car1/0002.jpg", "Car1/0003.jpg", "Dog 2/0001.jpg", "Dog 2/0005.jpg",
                "Bird/0001.jpg"):
        jpeg(root / rel)
    text(root / "query.txt", "Car1/0001.jpg>001 1 2 20 25\nDog 2/0001.jpg>002 5 5 35 45\n")
    text(root / "reference.txt", "Car1/0002.jpg\nCar1/0003.jpg\nDog 2/0005.jpg\nBird/0001.jpg\nCar1/0001.jpg\n")
    text(root / "groundtruth/001.txt", "Car1/0002.jpg 3 4 30 20\nCar1/0003.jpg\nCar1/0003.jpg 1 1 5 5 6 6 9 9\n")
    text(root / "groundtruth/002.txt", "Dog 2/0005.jpg 2 2 12 12\n")
    return root


@pytest.mark.parametrize("dataset", ["instance160", "instance335"])
def test_instance_layout(tmp_path, dataset):
    b = load(convert(dataset, make_instance(tmp_path / dataset), tmp_path / "out" / "b.json"))
    assert b.name == dataset and b.image_root == f"../{dataset}"
    assert b.database == ["Car1/0002.jpg", "Car1/0003.jpg", "Dog 2/0005.jpg", "Bird/0001.jpg", "Car1/0001.jpg"]
    assert [(q.id, q.image, q.box) for q in b.queries] == [
        ("001", "Car1/0001.jpg", (1.0, 2.0, 20.0, 25.0)), ("002", "Dog 2/0001.jpg", (5.0, 5.0, 35.0, 30.0))]
    assert gt(b, "001") == ({"Car1/0002.jpg": [[3.0, 4.0, 30.0, 20.0]],
                             "Car1/0003.jpg": [[1.0, 1.0, 5.0, 5.0], [6.0, 6.0, 9.0, 9.0]]},
                            {"Car1/0001.jpg"})  # the query image is a reference: junk for itself
    assert gt(b, "002") == ({"Dog 2/0005.jpg": [[2.0, 2.0, 12.0, 12.0]]}, set())
    assert "Dog 2/0001.jpg" in b.images and "Dog 2/0001.jpg" not in b.database


@pytest.mark.parametrize("path,content,match", [
    ("query.txt", "Car1/0001.jpg 001 1 2 20 25\n", r"query\.txt, line 1: expected '<path>>NNN"),
    ("query.txt", "Car1/0001.jpg>001 1 2 20\n", r"query\.txt, line 1"),
    ("query.txt", "Car1/0001.jpg>001 20 2 1 25\n", r"query\.txt, line 1.*inverted"),
    ("query.txt", "/etc/0001.jpg>001 1 2 20 25\n", r"query\.txt, line 1: image path must be relative"),
    ("groundtruth/001.txt", "Car1/0002.jpg\nCar1/9999.jpg\n", r"001\.txt, line 2: 'Car1/9999\.jpg' is not listed"),
    ("groundtruth/001.txt", "Car1/0002.jpg 1 2 3\n", r"001\.txt, line 1: boxes need 4 numbers"),
    ("groundtruth/001.txt", "Car1/0002.jpg 1 2 a 4\n", r"001\.txt, line 1: expected"),
    ("reference.txt", "Car1/0002.jpg\nCar1/0002.jpg\n", r"reference\.txt, line 2: 'Car1/0002\.jpg' is listed twice"),
    # paths leaving the dataset folder stay refused, however the list spells them
    ("reference.txt", "Car1/0002.jpg\n../Car1/0003.jpg\n", r"reference\.txt, line 2: .*no '\.\.'"),
    ("reference.txt", "Car1/0002.jpg\nC:\\data\\0003.jpg\n", r"reference\.txt, line 2: .*must be relative"),
    ("groundtruth/001.txt", "./Car1/../Car1/0002.jpg\n", r"001\.txt, line 1: .*no '\.\.'"),
    ("query.txt", "\\\\server\\Car1\\0001.jpg>001 1 2 20 25\n", r"query\.txt, line 1: .*must be relative"),
])
def test_instance_strict_errors(tmp_path, path, content, match):
    root = make_instance(tmp_path / "inst")
    text(root / path, content)
    with pytest.raises(FormatError, match=match):
        convert("instance160", root, tmp_path / "b.json")


SPELLINGS = {
    "dot-slash": lambda p: "./" + p,
    "backslashes": lambda p: p.replace("/", "\\"),
    "doubled separators": lambda p: p.replace("/", "//"),
    "trailing whitespace": lambda p: p + " \t",
    "dot segments": lambda p: "./" + p.replace("/", "/./"),
}


def write_instance_lists(root: Path, ref, query, truth, newline: str = "\n", bom: bool = False) -> None:
    """The lists of make_instance with each path spelled by ``ref`` / ``query`` / ``truth``."""
    def put(path: Path, lines: list[str]) -> None:
        path.write_bytes((("\ufeff" if bom else "") + newline.join(lines) + newline).encode("utf-8"))

    put(root / "reference.txt", [ref(p) for p in ("Car1/0002.jpg", "Car1/0003.jpg", "Dog 2/0005.jpg", "Bird/0001.jpg",
                                                  "Car1/0001.jpg")])
    put(root / "query.txt", [f"{query('Car1/0001.jpg')}>001 1 2 20 25", f"{query('Dog 2/0001.jpg')}>002 5 5 35 45"])
    put(root / "groundtruth/001.txt", [f"{truth('Car1/0002.jpg')} 3 4 30 20", truth("Car1/0003.jpg"),
                                       f"{truth('Car1/0003.jpg')} 1 1 5 5 6 6 9 9"])
    put(root / "groundtruth/002.txt", [f"{truth('Dog 2/0005.jpg')} 2 2 12 12"])


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("where", ["reference", "ground truth", "all lists", "query"])
def test_instance_lists_written_another_way_name_the_same_images(tmp_path, spelling, where):
    canonical = load(convert("instance160", make_instance(tmp_path / "a"), tmp_path / "a.json")).to_dict()
    root = make_instance(tmp_path / "b")
    same, other = (lambda p: p), SPELLINGS[spelling]
    write_instance_lists(root, ref=other if where in ("reference", "all lists") else same,
                         query=other if where in ("query", "all lists") else same,
                         truth=other if where in ("ground truth", "all lists") else same)
    again = load(convert("instance160", root, tmp_path / "b.json")).to_dict()
    for key in ("images", "database", "queries", "ground_truth"):
        assert again[key] == canonical[key], key


@pytest.mark.parametrize("newline,bom", [("\r\n", False), ("\n", True), ("\r\n", True)])
def test_instance_lists_with_crlf_and_bom(tmp_path, newline, bom):
    canonical = load(convert("instance160", make_instance(tmp_path / "a"), tmp_path / "a.json")).to_dict()
    root = make_instance(tmp_path / "b")
    write_instance_lists(root, SPELLINGS["dot-slash"], SPELLINGS["backslashes"], SPELLINGS["trailing whitespace"],
                         newline=newline, bom=bom)
    again = load(convert("instance160", root, tmp_path / "b.json")).to_dict()
    assert again["database"] == canonical["database"] and again["ground_truth"] == canonical["ground_truth"]




def test_oxford_lists_written_with_dot_slash_and_whitespace(tmp_path):
    canonical = load(convert("oxford5k", make_oxford(tmp_path / "a"), tmp_path / "a.json")).to_dict()
    root = make_oxford(tmp_path / "b")
    text(root / "gt_files/all_souls_1_good.txt", "./all_souls_000001\r\nall_souls_000002  \r\n")
    text(root / "gt_files/bodleian_1_junk.txt", "\ufeff./bodleian_000003\n.//all_souls_000002\n")
    again = load(convert("oxford5k", root, tmp_path / "b.json")).to_dict()
    assert again["ground_truth"] == canonical["ground_truth"]


def test_instance_missing_files(tmp_path):
    root = make_instance(tmp_path / "inst")
    os.remove(root / "groundtruth/002.txt")
    with pytest.raises(FileNotFoundError, match=r"groundtruth/002\.txt"):
        convert("instance160", root, tmp_path / "b.json")
    os.remove(root / "reference.txt")
    with pytest.raises(FileNotFoundError, match=r"inst/reference\.txt(.|\n)*expected layout"):
        convert("instance160", root, tmp_path / "b.json")


def test_instance_missing_reference_image_is_reported(tmp_path):
    root = make_instance(tmp_path / "inst")
    os.remove(root / "Car1/0003.jpg")
    result = convert("instance160", root, tmp_path / "b.json")
    assert [e["image"] for e in result.report["bad_images"]] == ["Car1/0003.jpg"]
    assert set(load(result).ground_truth["001"].positives) == {"Car1/0002.jpg"}


# ============================================================================ CLI and distractors
def test_cli_main_with_distractors(tmp_path, capsys):
    root = make_holidays(tmp_path / "data" / "holidays")
    for rel in ("a/1.jpg", "a/b/2.JPG", "c.png", "notes.txt"):
        (jpeg if rel.lower().endswith((".jpg", ".png")) else lambda p: text(p, "x"))(tmp_path / "flickr" / rel)
    out = tmp_path / "bench" / "holidays.json"
    assert main(["holidays", "--root", str(root), "--out", str(out), "--distractors", str(tmp_path / "flickr")]) == 0
    printed = capsys.readouterr().out
    assert "3 queries, 7 database images (+3 distractors)" in printed and "1.33 positives per query" in printed
    b = Benchmark.load(out)
    assert b.image_root == "../data/holidays/jpg"
    assert b.extra["distractors"] == [{"root": "../flickr", "count": 3, "id_prefix": "distractor:"}]
    assert len(b.database) == 7  # distractors are referenced, not listed
    assert Benchmark.from_dict(b.to_dict(), root=b.root).extra["distractors"] == b.extra["distractors"]
    report = json.loads((out.parent / "convert_report.json").read_text())
    assert report["counts"]["queries"] == 3 and report["counts"]["distractors"] == 3


def test_cli_main_errors(tmp_path, capsys):
    assert main(["oxford5k", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "gt_files" in err  # names where and the expected layout
    with pytest.raises(SystemExit):
        main(["nope", "--root", str(tmp_path), "--out", str(tmp_path / "b.json")])
