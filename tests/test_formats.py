"""benchmark.json and run.json: round trips, every validation error naming its entry, box
clipping and the TREC run conversion."""
from __future__ import annotations

import copy
import json

import pytest

from instsearch.formats import Benchmark, FormatError, Hit, Run, parse_box


def benchmark_dict():
    return {
        "format": "instsearch-benchmark/1",
        "name": "tiny",
        "image_root": "images",
        "images": [{"id": "a", "file": "a.jpg", "width": 100, "height": 50},
                   {"id": "b", "file": "sub/b.png", "width": 40, "height": 40},
                   {"id": "c", "file": "c.jpg", "width": 64, "height": 64}],
        "database": ["b", "c"],
        "queries": [{"id": "q1", "image": "a", "box": [10, 5, 60, 45]}],
        "ground_truth": {"q1": {"positives": [{"image": "b", "boxes": [[1, 2, 30, 31.5]]}], "junk": ["c"]}},
        "split": "test",  # unknown keys survive a round trip
    }


def run_dict():
    return {"format": "instsearch-run/1", "method": "toy",
            "rankings": {"q1": [{"image": "b", "score": 0.9, "box": [1, 2, 30, 31]},
                                {"image": "c", "score": 0.25}]}}


def load_benchmark(tmp_path, data):
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(data))
    return Benchmark.load(path)


# --------------------------------------------------------------------------- round trips
def test_benchmark_round_trip(tmp_path):
    bench = load_benchmark(tmp_path, benchmark_dict())
    assert bench.root == tmp_path.resolve()
    assert bench.image_path("b") == tmp_path.resolve() / "images" / "sub" / "b.png"
    assert bench.queries[0].box == (10.0, 5.0, 60.0, 45.0)
    assert bench.ground_truth["q1"].positives == {"b": [(1.0, 2.0, 30.0, 31.5)]}
    assert bench.ground_truth["q1"].junk == {"c"}
    assert bench.extra == {"split": "test"}
    again = Benchmark.load(bench.save(tmp_path / "copy" / "benchmark.json"))
    assert again.to_dict() == bench.to_dict()
    assert again.database == ["b", "c"] and again.images == bench.images


def test_query_without_box_is_the_whole_image(tmp_path):
    data = benchmark_dict()
    del data["queries"][0]["box"]
    assert load_benchmark(tmp_path, data).queries[0].box == (0.0, 0.0, 100.0, 50.0)


def test_run_round_trip(tmp_path):
    bench = load_benchmark(tmp_path, benchmark_dict())
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_dict()))
    run = Run.load(path, benchmark=bench)
    assert run.method == "toy"
    assert run.rankings["q1"] == [Hit("b", 0.9, (1.0, 2.0, 30.0, 31.0)), Hit("c", 0.25, None)]
    again = Run.load(run.save(tmp_path / "out" / "run2.json"), benchmark=bench)
    assert again.rankings == run.rankings and again.method == run.method


def test_trec_round_trip():
    run = Run("m1", {"q1": [Hit("b", 0.9), Hit("c", 0.25), Hit("a", -1.5)], "q2": [Hit("c", 3.0)]})
    text = run.to_trec()
    assert text.splitlines()[0] == "q1 Q0 b 1 0.900000 m1"
    back = Run.from_trec(text)
    assert back.method == "m1" and back.rankings == run.rankings
    # Ranks, not line order, decide the order read back.
    shuffled = "\n".join(reversed(text.splitlines()))
    assert Run.from_trec(shuffled).rankings == run.rankings
    assert Run.from_trec(text, method="other").method == "other"


@pytest.mark.parametrize("line, needle", [
    ("q1 Q0 b 1 0.9", "expected 'qid Q0 docid rank score tag'"),
    ("q1 Q0 b first 0.9 tag", "rank must be an integer"),
    ("q1 Q0 b 1 high tag", "score a number"),
])
def test_trec_errors_name_the_line(line, needle):
    with pytest.raises(FormatError, match="line 2") as e:
        Run.from_trec("q1 Q0 a 1 1.0 tag\n" + line)
    assert needle in str(e.value)


# --------------------------------------------------------------------------- boxes
def test_parse_box_clips_to_the_image():
    assert parse_box([-5, 10, 120, 60], "here", size=(100, 50)) == (0.0, 10.0, 100.0, 50.0)
    assert parse_box([-5, 10, 120, 60], "here", size=(100, 50), clip=False) == (-5.0, 10.0, 120.0, 60.0)


def test_boxes_in_files_are_clipped(tmp_path):
    data = benchmark_dict()
    data["queries"][0]["box"] = [-10, -10, 150, 20]  # image a is 100 x 50
    data["ground_truth"]["q1"]["positives"][0]["boxes"] = [[30, 30, 90, 90]]  # image b is 40 x 40
    bench = load_benchmark(tmp_path, data)
    assert bench.queries[0].box == (0.0, 0.0, 100.0, 20.0)
    assert bench.ground_truth["q1"].positives["b"] == [(30.0, 30.0, 40.0, 40.0)]


@pytest.mark.parametrize("box, needle", [
    ([10, 10, 5, 20], "empty or inverted"),
    ([10, 10, 10, 20], "empty or inverted"),
    ([1, 2, 3], "[x1, y1, x2, y2]"),
    ("0 0 1 1", "[x1, y1, x2, y2]"),
    ([0, 0, "x", 1], "must be numbers"),
    ([0, 0, float("inf"), 1], "non-finite"),
    ([200, 200, 300, 300], "outside the 100x50 image"),
])
def test_bad_query_box_names_the_query(tmp_path, box, needle):
    data = benchmark_dict()
    data["queries"][0]["box"] = box
    with pytest.raises(FormatError) as e:
        Benchmark.from_dict(data, root=tmp_path, source="B.json")
    assert "B.json: queries[0] (q1)" in str(e.value) and needle in str(e.value)


# --------------------------------------------------------------------------- benchmark errors
def _set(path, value):
    def mutate(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(key):
    return lambda d: d.pop(key)


BENCHMARK_ERRORS = [
    (_set(["format"], "v0"), "'format' must be 'instsearch-benchmark/1'"),
    (_delete("images"), "missing key 'images'"),
    (_delete("database"), "missing key 'database'"),
    (_delete("queries"), "missing key 'queries'"),
    (_delete("ground_truth"), "missing key 'ground_truth'"),
    (_set(["images"], {"a": 1}), "'images' must be a list"),
    (_set(["images", 1], {"id": "b", "file": "b.png"}), "images[1]: needs 'id', 'file', 'width', 'height'"),
    (_set(["images", 2], {"id": "c", "file": "c.jpg", "width": 0, "height": 4}), "images[2] (c): width and height must be positive"),
    (_set(["images", 2], {"id": "a", "file": "x.jpg", "width": 4, "height": 4}), "images[2]: duplicate image id 'a'"),
    (_set(["database"], ["b", "zz"]), "database names unknown image 'zz'"),
    (_set(["database"], ["b", "c", "b"]), "database lists image 'b' twice"),
    (_set(["queries", 0, "image"], "zz"), "queries[0] (q1): unknown image 'zz'"),
    (_set(["queries", 0], {"image": "a"}), "queries[0]: needs 'id', 'image', 'box'"),
    (lambda d: d["queries"].append({"id": "q1", "image": "a"}), "queries[1]: duplicate query id 'q1'"),
    (lambda d: d["queries"].append({"id": "q2", "image": "a"}), "ground_truth has no entry for query 'q2'"),
    (_set(["ground_truth", "q7"], {"positives": []}), "ground_truth names unknown query 'q7'"),
    (_set(["ground_truth", "q1", "positives", 0, "image"], "zz"), "ground_truth['q1'].positives[0]: unknown image 'zz'"),
    (_set(["ground_truth", "q1", "positives", 0, "boxes"], [[5, 5, 1, 1]]), "ground_truth['q1'].positives[0]: empty or inverted box"),
    (_set(["ground_truth", "q1", "positives", 0, "boxes"], [5, 5, 1, 1]), "ground_truth['q1'].positives[0]: box must be"),
    (_set(["ground_truth", "q1", "positives", 0, "boxes"], 3), "ground_truth['q1'].positives[0]: 'boxes' must be a list"),
    (_set(["ground_truth", "q1", "junk"], ["zz"]), "ground_truth['q1'].junk names unknown image 'zz'"),
    (_set(["ground_truth", "q1", "junk"], "c"), "ground_truth['q1'] must be an object"),
    (_set(["ground_truth", "q1"], ["b"]), "ground_truth['q1'] must be an object"),
]


@pytest.mark.parametrize("mutate, needle", BENCHMARK_ERRORS)
def test_benchmark_errors_name_the_entry(tmp_path, mutate, needle):
    data = copy.deepcopy(benchmark_dict())
    mutate(data)
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError) as e:
        Benchmark.load(path)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_benchmark_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Benchmark.load(tmp_path / "missing.json")
    path = tmp_path / "b.json"
    path.write_text("{broken")
    with pytest.raises(FormatError, match="not valid JSON"):
        Benchmark.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(FormatError, match="JSON object at the top level"):
        Benchmark.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FormatError, match="UTF-8"):
        Benchmark.load(path)


# --------------------------------------------------------------------------- run errors
RUN_ERRORS = [
    (_set(["format"], None), "'format' must be 'instsearch-run/1'"),
    (_set(["rankings"], [1]), "'rankings' must be an object"),
    (_set(["rankings", "q9"], []), "rankings name unknown query 'q9'"),
    (_set(["rankings", "q1"], {"b": 1}), "rankings['q1'] must be a list"),
    (_set(["rankings", "q1", 1], "c"), "rankings['q1'][1]: needs 'image'"),
    (_set(["rankings", "q1", 1], {"image": "zz"}), "rankings['q1'][1]: unknown image 'zz'"),
    (_set(["rankings", "q1", 1], {"image": "c", "score": "high"}), "rankings['q1'][1]: score must be a number"),
    (_set(["rankings", "q1", 0, "box"], [9, 9, 1, 1]), "rankings['q1'][0] (b): empty or inverted box"),
]


@pytest.mark.parametrize("mutate, needle", RUN_ERRORS)
def test_run_errors_name_the_entry(tmp_path, mutate, needle):
    bench = Benchmark.from_dict(benchmark_dict(), root=tmp_path)
    data = copy.deepcopy(run_dict())
    mutate(data)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError) as e:
        Run.load(path, benchmark=bench)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_run_without_benchmark_skips_id_checks_and_defaults_scores(tmp_path):
    data = {"format": "instsearch-run/1", "rankings": {"anything": [{"image": "x"}, {"image": "y"}]}}
    run = Run.from_dict(data)
    assert run.method == "unknown"
    assert [h.score for h in run.rankings["anything"]] == [0.0, -1.0]  # list order kept
    with pytest.raises(FileNotFoundError, match="run file not found"):
        Run.load(tmp_path / "none.json")
    (tmp_path / "r.json").write_text('"just a string"')
    with pytest.raises(FormatError, match="JSON object at the top level"):
        Run.load(tmp_path / "r.json")
