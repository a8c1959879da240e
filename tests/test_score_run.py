"""``instsearch evaluate``: exit codes, messages, the printed table and the JSON it writes."""
from __future__ import annotations

import json
import math

import pytest

from instsearch.eval.score_run import format_metrics_table, main

METRIC_KEYS = {"mAP@10", "mAP@20", "mAP@50", "mAP@100", "mAP@all", "mIoU", "num_queries", "normalization", "protocol"}


def benchmark_dict():
    images = [{"id": f"d{i}", "file": f"d{i}.jpg", "width": 100, "height": 80} for i in range(6)]
    return {
        "format": "instsearch-benchmark/1",
        "name": "tiny",
        "image_root": "images",
        "images": images,
        "database": [f"d{i}" for i in range(1, 6)],
        "queries": [{"id": "q1", "image": "d0", "box": [10, 10, 50, 50]},
                    {"id": "q2", "image": "d0", "box": [0, 0, 30, 30]}],
        "ground_truth": {
            "q1": {"positives": [{"image": "d1", "boxes": [[0, 0, 20, 20]]},
                                 {"image": "d3", "boxes": [[10, 10, 30, 30]]}],
                   "junk": ["d2"]},
            "q2": {"positives": [{"image": "d5", "boxes": []}], "junk": []},
        },
    }


def run_dict():
    return {"format": "instsearch-run/1", "method": "toy", "rankings": {
        # q1: d2 is junk -> cleaned d1 d4 d3: rel 1 0 1, R = 2 -> AP = (1 + 2/3) / 2 = 5/6
        "q1": [{"image": "d1", "score": 0.9, "box": [0, 0, 20, 10]},     # IoU 200/400 = 0.5
               {"image": "d2", "score": 0.8},
               {"image": "d4", "score": 0.7},
               {"image": "d3", "score": 0.6, "box": [10, 10, 30, 30]}],  # IoU 1
        # q2: d5 at rank 2 of 2, R = 1 -> AP = 1/2
        "q2": [{"image": "d4", "score": 0.5}, {"image": "d5", "score": 0.4}],
    }}


@pytest.fixture
def files(tmp_path):
    b, r = tmp_path / "benchmark.json", tmp_path / "run.json"
    b.write_text(json.dumps(benchmark_dict()))
    r.write_text(json.dumps(run_dict()))
    return b, r


def test_main_prints_table_and_writes_json(files, tmp_path, capsys):
    b, r = files
    out = tmp_path / "sub" / "metrics.json"
    assert main(["--benchmark", str(b), "--run", str(r), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "mAP@all" in stdout and "0.6667" in stdout  # (5/6 + 1/2) / 2 = 2/3
    metrics = json.loads(out.read_text())
    assert set(metrics) == METRIC_KEYS
    assert metrics["mAP@all"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert metrics["mAP@10"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert metrics["mIoU"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["num_queries"] == 2
    assert (metrics["normalization"], metrics["protocol"]) == ("relevant", "standard")


def test_main_conventions(files, tmp_path):
    b, r = files
    out = tmp_path / "m.json"
    assert main(["--benchmark", str(b), "--run", str(r), "--normalization", "retrieved",
                 "--protocol", "oxford", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    # q1 positives at cleaned ranks 0, 2: trapezoids 1 and (1/2 + 2/3)/2 = 7/12, over 2 hits -> 19/24
    # q2 positive at rank 1: (0/1 + 1/2)/2 = 1/4, over 1 hit -> 1/4
    assert metrics["mAP@all"] == pytest.approx((19 / 24 + 1 / 4) / 2)
    assert (metrics["normalization"], metrics["protocol"]) == ("retrieved", "oxford")


def test_main_warns_about_unranked_queries_and_writes_null_miou(files, tmp_path, capsys):
    b, r = files
    data = run_dict()
    data["rankings"] = {"q2": data["rankings"]["q2"]}
    r.write_text(json.dumps(data))
    out = tmp_path / "m.json"
    assert main(["--benchmark", str(b), "--run", str(r), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 queries" in err and "q1" in err
    metrics = json.loads(out.read_text())
    assert metrics["mAP@all"] == pytest.approx(1 / 4)
    assert metrics["mIoU"] is None  # nothing to judge: NaN is written as null


def _expect_error(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_files(files, tmp_path, capsys):
    b, r = files
    _expect_error(["--benchmark", str(tmp_path / "nope.json"), "--run", str(r)], capsys, "nope.json", "not found")
    _expect_error(["--benchmark", str(b), "--run", str(tmp_path / "gone.json")], capsys, "gone.json", "not found")


@pytest.mark.parametrize("mutate, needles", [
    (lambda d: d["rankings"].__setitem__("q9", []), ["unknown query", "q9"]),
    (lambda d: d["rankings"]["q1"].append({"image": "zz", "score": 0.1}), ["unknown image", "zz", "rankings['q1'][4]"]),
    (lambda d: d["rankings"]["q2"][0].__setitem__("box", [5, 5, 1, 1]), ["inverted box", "rankings['q2'][0]"]),
    (lambda d: d["rankings"]["q2"][0].__setitem__("box", [1, 2, 3]), ["[x1, y1, x2, y2]", "rankings['q2'][0]"]),
    (lambda d: d.__setitem__("format", "trec"), ["'format' must be 'instsearch-run/1'"]),
])
def test_bad_run_entries_are_named(files, capsys, mutate, needles):
    b, r = files
    data = run_dict()
    mutate(data)
    r.write_text(json.dumps(data))
    _expect_error(["--benchmark", str(b), "--run", str(r)], capsys, str(r), *needles)


def test_bad_json_and_bad_benchmark(files, capsys):
    b, r = files
    r.write_text("{not json")
    _expect_error(["--benchmark", str(b), "--run", str(r)], capsys, "not valid JSON")
    data = benchmark_dict()
    data["queries"][0]["image"] = "ghost"
    b.write_text(json.dumps(data))
    _expect_error(["--benchmark", str(b), "--run", str(r)], capsys, "queries[0]", "ghost")


def test_command_line_errors(files, capsys):
    b, r = files
    assert main(["--benchmark", str(b), "--run", str(r), "--normalization", "mean"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["--run", str(r)]) == 2
    assert main(["--help"]) == 0


def test_unwritable_output(files, tmp_path, capsys):
    b, r = files
    blocker = tmp_path / "file"
    blocker.write_text("")
    _expect_error(["--benchmark", str(b), "--run", str(r), "--output", str(blocker / "m.json")], capsys, "cannot write")


def test_format_metrics_table_side_by_side():
    rows = {
        "untrained": {"mAP@10": 0.1, "mAP@all": 0.25, "mIoU": math.nan, "num_queries": 3,
                      "normalization": "relevant", "protocol": "standard"},
        "trained": {"mAP@10": 0.5, "mAP@all": 0.75, "mIoU": 0.6, "num_queries": 3,
                    "normalization": "relevant", "protocol": "standard"},
        "global_gem": {"mAP@10": 0.3, "mAP@all": 0.123456, "num_queries": 3,
                       "normalization": "relevant", "protocol": "standard"},
    }
    text = format_metrics_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["run", "mAP@10", "mAP@all", "mIoU", "num_queries"]
    assert lines[2].split() == ["untrained", "0.1000", "0.2500", "n/a", "3"]
    assert lines[3].split() == ["trained", "0.5000", "0.7500", "0.6000", "3"]
    assert lines[4].split() == ["global_gem", "0.3000", "0.1235", "n/a", "3"]  # missing key -> n/a
    assert lines[-1] == "(normalization=relevant, protocol=standard)"  # the shared convention
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up
    # A convention that differs between rows becomes a column instead.
    rows["trained"]["protocol"] = "oxford"
    text = format_metrics_table(rows)
    assert "protocol" in text.splitlines()[0] and "oxford" in text
    assert format_metrics_table({}) == ""
