"""`instsearch compare`: each cell is exactly `instsearch test`; cells are cached by what decides
them; a failing method is a failed row; the paired bootstrap against a hand computation."""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from instsearch.cli import main
from instsearch.compare_cli import CheckpointOf, ComparisonSpec, compare
from instsearch.eval.shards import file_sha256
from instsearch.eval.significance import paired_bootstrap


# ------------------------------------------------------------------------------ the bootstrap
def test_paired_bootstrap_matches_the_exact_resampling_distribution():
    """Three queries, d = (0.6, 0, -0.3): all 27 resamples are equally likely, so the quantiles of
    their means are known by hand. The lowest mean, -0.3, has probability 1/27 = 3.7 % and the
    next, -0.2 (two -0.3 and a 0), 3/27: the 2.5 % point is -0.3 and the 10 % point -0.2. At the
    top, 0.6 has 1/27 and 0.4 (two 0.6 and a 0) 3/27: the 97.5 % point is 0.6, the 90 % point 0.4."""
    a, b = np.array([0.9, 0.5, 0.2]), np.array([0.3, 0.5, 0.5])
    d = a - b
    exact = np.array([d[list(i)].mean() for i in itertools.product(range(3), repeat=3)])
    assert np.mean(np.isclose(exact, -0.3)) == pytest.approx(1 / 27) and np.mean(np.isclose(exact, -0.2)) == \
        pytest.approx(3 / 27)
    got = paired_bootstrap(a, b, resamples=10_000, seed=1)
    assert got.mean == pytest.approx(0.1)
    assert got.low == pytest.approx(-0.3) and got.high == pytest.approx(0.6) and not got.excludes_zero
    eighty = paired_bootstrap(a, b, resamples=10_000, seed=1, confidence=0.8)
    assert eighty.low == pytest.approx(-0.2) and eighty.high == pytest.approx(0.4)
    same = paired_bootstrap(a, b, resamples=10_000, seed=1)
    assert (same.low, same.high) == (got.low, got.high)  # seeded


def test_paired_bootstrap_of_a_constant_gain_excludes_zero():
    a = np.linspace(0.2, 0.8, 50)
    got = paired_bootstrap(a + 0.05, a, resamples=2_000)
    assert got.mean == pytest.approx(0.05) and got.low == pytest.approx(0.05) and got.high == pytest.approx(0.05)
    assert got.excludes_zero
    with pytest.raises(ValueError, match="one value per query on both sides"):
        paired_bootstrap(a, a[:3])


def test_pareto_front_by_hand():
    from instsearch.compare_cli import pareto_front

    cost = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0]
    score = [0.5, 0.4, 0.7, 0.6, 0.2, 0.9]
    # 0.5 @ 0.2, 1 @ 0.5, 2 @ 0.7 (2 @ 0.4 is beaten), 3 @ 0.6 is beaten by 2 @ 0.7, 4 @ 0.9
    assert pareto_front(cost, score) == [4, 0, 2, 5]


# ------------------------------------------------------------------------------ the command
def _method_config(tmp_path: Path, name: str, num_classes: int, top_k: int) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "runs")},
        "model": {"class_path": "instsearch.lightning_modules.detector.DetectorModule",
                  "init_args": {"net": {"class_path": "instsearch.networks.deep_region_cnn.DeepRegionCNN",
                                        "init_args": {"backbone": "small", "num_classes": num_classes,
                                                      "top_k": top_k, "feature_layers": ["conv4"]}}}},
        "data": {"class_path": "instsearch.datamodules.benchmark.BenchmarkDataModule",
                 "init_args": {"batch_size": 4}},
        "retrieval": {"progress": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def comparison(tmp_path, small_benchmark, num_classes) -> Path:
    spec = {
        "out": str(tmp_path / "out"),
        "baseline": "three",
        "bootstrap": {"resamples": 2000, "seed": 0},
        "benchmarks": [{"name": "small", "benchmark": str(small_benchmark), "normalization": "min"}],
        "methods": [
            {"name": "three", "config": str(_method_config(tmp_path, "three", num_classes, 3))},
            {"name": "five", "config": str(_method_config(tmp_path, "five", num_classes, 5)),
             "overrides": {"model.init_args.retrieval.regions_per_image": 4,
                           "model.init_args.retrieval.normalization": "retrieved"}},  # the benchmark's wins
        ],
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def test_each_row_is_instsearch_test_and_cells_are_cached(comparison, tmp_path, small_benchmark, capsys):
    assert main(["compare", "--config", str(comparison)]) == 0
    out = tmp_path / "out"
    rows = _rows(out)
    # the row of "five" is `instsearch test` of its config and override, run on its own
    logs = tmp_path / "direct"
    assert main(["test", "--config", str(tmp_path / "five.yaml"), "--data.init_args.benchmark", str(small_benchmark),
                 "--model.init_args.retrieval.regions_per_image", "4",
                 "--model.init_args.retrieval.normalization", "min", "--model.init_args.retrieval.grid_queries", "0",
                 "--trainer.logger", json.dumps([{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                                   "init_args": {"save_dir": str(logs), "name": "t"}}])]) == 0
    direct = json.loads(next(logs.rglob("metrics.json")).read_text())
    for key in ("mAP@10", "mAP@100", "mAP@all", "mIoU"):
        assert float(rows["five"][key]) == pytest.approx(direct[key], abs=5e-7), key
    assert rows["five"]["vs_baseline"] == "three" and rows["three"].get("vs_baseline", "") == ""
    # per_query.csv: the mean of the AP column is the row's mAP@all
    with open(out / "per_query.csv", newline="") as f:
        per = [r for r in csv.DictReader(f) if r["method"] == "five"]
    assert len(per) == 4
    assert np.mean([float(r["AP@all"]) for r in per]) == pytest.approx(float(rows["five"]["mAP@all"]), abs=1e-5)
    cell_costs = json.loads(next((out / "cells").glob("five__*/costs.json")).read_text())
    assert float(rows["five"]["search_ms_per_query"]) == cell_costs["search_ms_per_query"] > 0
    assert float(rows["five"]["index_bytes_per_image"]) > float(rows["three"]["index_bytes_per_image"]) > 0
    assert (out / "cost_small.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "| queries | 4 |" in report and "| normalization | min |" in report
    assert "| imposed on every method | yes" in report
    assert "| images served at (long side at most; the network may resize further) | three: 1600, five: 1600 |" in report
    # a rerun reuses both cells; a changed option makes one new cell
    capsys.readouterr()
    assert main(["compare", "--config", str(comparison)]) == 0
    assert capsys.readouterr().out.count("[cached]") == 2
    spec = yaml.safe_load(comparison.read_text())
    spec["methods"][1]["overrides"]["model.init_args.retrieval.regions_per_image"] = 2
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[cached]") == 1 and "[run] five on small" in printed


def test_a_failing_method_is_a_failed_row_and_the_rest_goes_on(comparison, tmp_path):
    spec = yaml.safe_load(comparison.read_text())
    spec["methods"][1]["overrides"] = {"model.init_args.retrieval.prune_by_label": "nonsense"}
    comparison.write_text(yaml.safe_dump(spec))
    result = compare(ComparisonSpec.load(comparison), say=lambda *_: None)
    assert result["failed"] == 1
    rows = _rows(tmp_path / "out")
    assert rows["three"]["status"] == "ok" and rows["five"]["status"] == "failed"
    assert "prune_by_label" in rows["five"]["error"]


def test_missing_inputs_are_named_before_any_work(comparison, tmp_path, capsys):
    spec = yaml.safe_load(comparison.read_text())
    spec["methods"][0]["ckpt_path"] = str(tmp_path / "nothere.ckpt")
    spec["benchmarks"].append({"name": "gone", "benchmark": str(tmp_path / "gone.json")})
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 2
    err = capsys.readouterr().err
    assert "nothere.ckpt" in err and "gone.json" in err
    assert not (tmp_path / "out").exists()


def test_a_trainable_method_is_fitted_once_and_its_checkpoint_tested(tmp_path, synthetic_root, small_benchmark,
                                                                    num_classes, capsys):
    cfg = yaml.safe_load(_method_config(tmp_path, "trainable", num_classes, 3).read_text())
    cfg["trainer"].update({"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                           "num_sanity_val_steps": 0})
    cfg["data"] = {"class_path": "instsearch.datamodules.synthetic.SyntheticDataModule",
                   "init_args": {"root": str(synthetic_root), "batch_size": 2, "num_workers": 0}}
    (tmp_path / "trainable.yaml").write_text(yaml.safe_dump(cfg))
    spec = {"out": str(tmp_path / "out"), "bootstrap": {"resamples": 100},
            "benchmarks": [{"name": "small", "benchmark": str(small_benchmark)}],
            "methods": [{"name": "drcnn", "config": str(tmp_path / "trainable.yaml"), "train": True}]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(path)]) == 0
    assert "[train] drcnn" in capsys.readouterr().out
    ckpt = next((tmp_path / "out" / "checkpoints").rglob("last.ckpt"))
    row = _rows(tmp_path / "out")["drcnn"]
    assert row["checkpoint_sha256"] == file_sha256(ckpt)
    logs = tmp_path / "direct"
    assert main(["test", "--config", str(tmp_path / "trainable.yaml"), "--ckpt_path", str(ckpt),
                 "--data.init_args.benchmark", str(small_benchmark), "--model.init_args.retrieval.grid_queries", "0",
                 "--trainer.logger", json.dumps([{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                                   "init_args": {"save_dir": str(logs), "name": "t"}}])]) == 0
    direct = json.loads(next(logs.rglob("metrics.json")).read_text())
    assert float(row["mAP@all"]) == pytest.approx(direct["mAP@all"], abs=5e-7)
    capsys.readouterr()
    assert main(["compare", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "[cached] training drcnn" in printed and "[cached] drcnn on small" in printed


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "compare").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_comparisons_name_existing_configs(path, monkeypatch):
    """Every method config exists and each method's overrides are options its config accepts (the
    CLI parses them); the data and weights they name are the user's."""
    from instsearch.lightning_cli import lightning_cli

    monkeypatch.chdir(path.parents[2])  # paths in a comparison are relative to the repository, as configs' are
    spec = ComparisonSpec.load(path, check_inputs=False)
    assert spec.baseline is None or spec.baseline in {m.name for m in spec.methods} | {m.family for m in spec.methods}
    for m in spec.methods:
        assert m.config.is_file(), m.name
        argv = ["--config", str(m.config)]  # parsed as the test command parses it (no subcommand)
        for key, value in m.overrides.items():  # a checkpoint reference is a path on the command line
            value = "weights.ckpt" if isinstance(value, CheckpointOf) else value
            argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        lightning_cli(argv, run=False, cli_class=_parse_only())


def test_disagreement_order_by_hand():
    from instsearch.eval.report_html import disagreement_order

    aps = {"a": np.array([0.5, 1.0, 0.0, 0.2]), "b": np.array([0.5, 0.0, 0.4, 0.2])}
    # spreads: 0, 0.5, 0.2, 0 -> query 1, then 2, then 0 and 3 in the benchmark's order
    assert disagreement_order(aps).tolist() == [1, 2, 0, 3]


def _parse_only():
    from instsearch.lightning_cli import InstsearchCLI

    class ParseOnly(InstsearchCLI):
        def instantiate_classes(self) -> None:
            pass

    return ParseOnly


def _browser() -> str | None:
    import shutil

    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_report_html_renders_in_a_headless_browser(comparison, tmp_path):
    """The page opens from disk with everything inlined; a real browser lays it out (its DOM holds
    the tables and every thumbnail) and draws it (the screenshot is not blank)."""
    import subprocess

    from PIL import Image

    assert main(["compare", "--config", str(comparison)]) == 0
    page = tmp_path / "out" / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and 'src="data:image/' in text  # self-contained
    # 4 queries x (1 query crop + 2 methods x 5 hits) thumbnails, and the cost plot
    assert text.count('src="data:image/jpeg') == 4 * (1 + 2 * 5) and text.count('src="data:image/png') == 1
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium here: `apt-get update && apt-get install -y chromium` to run this check")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<img") == 4 * (1 + 2 * 5) + 1 and dom.count("<table") == 2
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # text, tables and thumbnails drawn


def test_the_table_and_plots_go_to_wandb_offline(comparison, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = yaml.safe_load(comparison.read_text())
    spec["wandb"] = {"project": "instsearch-tests", "name": "compare"}
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 0
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # the table (every row) and the plot as the run's media files
    tables = list(runs[0].rglob("media/table/comparison/results_*.table.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 2
    assert len(list(runs[0].rglob("media/images/comparison/cost_small_*.png"))) == 1


def test_reranked_rows_are_the_expanded_search_of_the_shortlist(comparison, tmp_path, small_benchmark):
    """AQE (k = 2) computed here by hand from the cell's features: the query plus the best region
    (for the query) of its two first images, normalised, scores every region of the shortlist; an
    image takes its best; the shortlist is re-sorted."""
    from instsearch.eval.metrics import retrieval_metrics
    from instsearch.formats import Benchmark, Hit, Run

    spec = yaml.safe_load(comparison.read_text())
    spec["rerankers"] = [{"type": "aqe", "k": 2}, {"type": "diffusion", "k": 3, "name": "diffusion3"}]
    spec["shortlist"] = 10
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 0
    out = tmp_path / "out"
    with open(out / "results.csv", newline="") as f:
        rows = {(r["method"], r["reranker"]): r for r in csv.DictReader(f)}
    assert {k[1] for k in rows} == {"none", "aqe", "diffusion3"} and all(r["status"] == "ok" for r in rows.values())
    folder = next((out / "cells").glob("three__*"))
    z = np.load(folder / "features.npz")
    ids, owner, feats = list(z["image_ids"]), z["image_index"], z["features"]
    run = json.loads((folder / "run.json").read_text())["rankings"]
    expanded = {}
    for qi, qid in enumerate(z["query_ids"]):
        q = z["queries"][qi]
        head = run[str(qid)][:10]
        best = []
        for h in head[:2]:
            mine = feats[owner == ids.index(h["image"])]
            best.append(mine[np.argmax(mine @ q)])
        q2 = q + best[0] + best[1]
        q2 = q2 / np.linalg.norm(q2)
        new = [max(feats[owner == ids.index(h["image"])] @ q2) for h in head]
        order = sorted(range(len(head)), key=lambda i: (-new[i], i))
        expanded[str(qid)] = [Hit(head[i]["image"], float(new[i]), tuple(head[i]["box"])) for i in order] + \
            [Hit(h["image"], h["score"], tuple(h["box"])) for h in run[str(qid)][10:]]
    bench = Benchmark.load(small_benchmark)
    by_hand = retrieval_metrics(bench, Run("aqe", expanded), normalization="min")
    assert float(rows[("three", "aqe")]["mAP@all"]) == pytest.approx(by_hand["mAP@all"], abs=2e-6)
    assert float(rows[("three", "aqe")]["mAP@all"]) != float(rows[("three", "none")]["mAP@all"])  # it moved
    assert rows[("three", "aqe")]["vs_baseline"] == "three"  # compared with the plain baseline
    # and with its own plain search: the mean of the per-query AP differences
    with open(out / "per_query.csv", newline="") as f:
        per = [r for r in csv.DictReader(f) if r["method"] == "three"]
    plain = {r["query"]: float(r["AP@all"]) for r in per if r["reranker"] == "none"}
    gain = np.mean([float(r["AP@all"]) - plain[r["query"]] for r in per if r["reranker"] == "aqe"])
    assert float(rows[("three", "aqe")]["vs_plain_delta_mAP@all"]) == pytest.approx(gain, abs=2e-6)
    assert rows[("three", "none")].get("vs_plain_delta_mAP@all", "") == ""


def test_a_method_without_features_gets_a_not_applicable_rerank_row(comparison, tmp_path):
    spec = yaml.safe_load(comparison.read_text())
    spec["methods"][1]["overrides"] = {"model.init_args.retrieval.evaluation": "sharded"}  # ranks without an index
    spec["rerankers"] = [{"type": "aqe", "k": 2}]
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 0  # not applicable is not a failure
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = {(r["method"], r["reranker"]): r for r in csv.DictReader(f)}
    assert rows[("five", "none")]["status"] == "ok" and rows[("three", "aqe")]["status"] == "ok"
    assert rows[("five", "aqe")]["status"] == "n/a" and "sharded evaluation" in rows[("five", "aqe")]["error"]
    # the sharded cell reports its costs too: float32 features of every region, per image, as the
    # gathered exact search of the same network (three) counts them
    three, five = rows[("three", "none")], rows[("five", "none")]
    dim = float(three["index_bytes_per_image"]) / float(three["regions_per_image"]) / 4
    assert dim == pytest.approx(round(dim)) and dim > 0
    assert float(five["index_bytes_per_image"]) == pytest.approx(float(five["regions_per_image"]) * dim * 4, abs=0.1)
    assert float(five["search_ms_per_query"]) > 0


def test_a_group_of_benchmark_sizes_is_plotted_against_database_size(comparison, tmp_path, small_benchmark,
                                                                      synthetic_root):
    """The small benchmark, and the same with a folder of 6 distractor images: distractors are never
    positive, so no method's mAP@all can rise with them."""
    import shutil

    bench = json.loads(small_benchmark.read_text())
    bench["image_root"] = str((small_benchmark.parent / bench["image_root"]).resolve())
    (tmp_path / "flickr").mkdir()
    for k, path in enumerate(sorted((synthetic_root / "images").rglob("*.jpg"))[-6:]):
        shutil.copy(path, tmp_path / "flickr" / f"d{k}.jpg")
    bench["distractors"] = [{"root": "flickr", "count": 6, "id_prefix": "distractor:"}]
    (tmp_path / "plus6.json").write_text(json.dumps(bench))
    spec = yaml.safe_load(comparison.read_text())
    spec["benchmarks"] = [{"name": "small", "benchmark": str(small_benchmark), "group": "sizes"},
                          {"name": "plus6", "benchmark": str(tmp_path / "plus6.json"), "group": "sizes"}]
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 0
    out = tmp_path / "out"
    with open(out / "results.csv", newline="") as f:
        rows = {(r["benchmark"], r["method"]): r for r in csv.DictReader(f) if r["reranker"] == "none"}
    for method in ("three", "five"):
        assert float(rows[("plus6", method)]["mAP@all"]) <= float(rows[("small", method)]["mAP@all"]) + 1e-9
    assert (out / "size_sizes.png").stat().st_size > 10_000
    # a method limited to some benchmarks (e.g. a detector fine-tuned on one) runs on those only
    # (its own override of the data's benchmark, which a fine-tuning may need, does not redirect the cell)
    spec["methods"].append({**spec["methods"][0], "name": "three_small_only", "benchmarks": ["small"],
                            "overrides": {"data.init_args.benchmark": str(tmp_path / "plus6.json")}})
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 0
    with open(out / "results.csv", newline="") as f:
        ran = {(r["benchmark"], r["method"]): r for r in csv.DictReader(f) if r["reranker"] == "none"}
    assert ("small", "three_small_only") in ran and ("plus6", "three_small_only") not in ran
    assert ran[("small", "three_small_only")]["mAP@all"] == ran[("small", "three")]["mAP@all"]
    assert ran[("small", "three")]["mAP@all"] != ran[("plus6", "three")]["mAP@all"]
    assert "](size_sizes.png)" in (out / "report.md").read_text()
    assert "| distractor images | 6 |" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------ variants, seeds, columns
def test_seeds_run_once_each_and_their_spread_is_reported(comparison, tmp_path):
    """A method with seeds is one row per seed (seed_everything and each seed option set to the
    seed); seeds.csv and report.md give the mean and the sample standard deviation over them."""
    spec = yaml.safe_load(comparison.read_text())
    spec["methods"].append({"name": "rand", "config": spec["methods"][0]["config"], "seeds": [0, 1, 2],
                            "seed_options": ["trainer.max_epochs"]})  # any option; tested: it is set
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 0
    out = tmp_path / "out"
    rows = _rows(out)
    seeded = [rows[f"rand@seed{s}"] for s in (0, 1, 2)]
    assert [r["family"] for r in seeded] == ["rand"] * 3 and [r["seed"] for r in seeded] == ["0", "1", "2"]
    cell = json.loads(next((out / "cells").glob("rand@seed2__*/cell.json")).read_text())
    assert cell["overrides"] == {"seed_everything": 2, "trainer.max_epochs": 2}
    # the seed draws the network's random initialisation: the rows differ
    maps = [float(r["mAP@all"]) for r in seeded]
    assert len(set(maps)) > 1
    with open(out / "seeds.csv", newline="") as f:
        (family,) = list(csv.DictReader(f))
    assert family["family"] == "rand" and family["seeds"] == "0 1 2" and family["n"] == "3"
    mean = sum(maps) / 3
    std = (sum((m - mean) ** 2 for m in maps) / 2) ** 0.5
    assert float(family["mAP@all mean"]) == pytest.approx(mean, abs=2e-6)
    assert float(family["mAP@all std"]) == pytest.approx(std, abs=2e-6)
    report = (out / "report.md").read_text()
    assert "| rand | none | 0 1 2 | " in report and f"{mean:.4f} ± {std:.4f}" in report


def test_checkpoint_of_reuses_a_trained_method_and_columns_read_its_training_log(tmp_path, synthetic_root,
                                                                               small_benchmark, num_classes, capsys):
    """A variant tests another method's trained checkpoint with its own options (trained once);
    columns read the training log (last value and per epoch), costs.json and metrics.json."""
    cfg = yaml.safe_load(_method_config(tmp_path, "trainable", num_classes, 3).read_text())
    cfg["trainer"].update({"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 1,
                           "num_sanity_val_steps": 0, "log_every_n_steps": 1})
    cfg["data"] = {"class_path": "instsearch.datamodules.synthetic.SyntheticDataModule",
                   "init_args": {"root": str(synthetic_root), "batch_size": 2, "num_workers": 0}}
    (tmp_path / "trainable.yaml").write_text(yaml.safe_dump(cfg))
    spec = {"out": str(tmp_path / "out"), "bootstrap": {"resamples": 100},
            "benchmarks": [{"name": "small", "benchmark": str(small_benchmark)}],
            "methods": [{"name": "drcnn", "config": str(tmp_path / "trainable.yaml"), "train": True},
                        {"name": "drcnn_k5", "config": str(tmp_path / "trainable.yaml"),
                         "ckpt_path": {"checkpoint_of": "drcnn"},
                         "overrides": {"model.init_args.net.init_args.top_k": 5}}],
            "columns": [{"name": "loss", "key": "train/loss"},
                        {"name": "loss", "key": "train/loss", "every_epoch": True},
                        {"name": "ms", "key": "search_ms_per_query", "from": "costs"},
                        {"name": "r07", "key": "recall@IoU0.7", "from": "metrics"},
                        {"name": "fit box AP", "key": "val/box_AP@0.5"},
                        {"name": "box AP", "key": "val/box_AP@0.5", "from": "validate"}]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(path)]) == 0
    assert capsys.readouterr().out.count("[train]") == 1
    out = tmp_path / "out"
    rows = _rows(out)
    ckpt = next((out / "checkpoints").rglob("last.ckpt"))
    assert rows["drcnn"]["checkpoint_sha256"] == rows["drcnn_k5"]["checkpoint_sha256"] == file_sha256(ckpt)
    assert float(rows["drcnn_k5"]["regions_per_image"]) > float(rows["drcnn"]["regions_per_image"])
    with open(next((out / "checkpoints").rglob("metrics.csv")), newline="") as f:
        logged = [(int(r["epoch"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
    for name in ("drcnn", "drcnn_k5"):
        row = rows[name]
        assert float(row["loss"]) == pytest.approx(logged[-1][1], abs=1e-6)
        assert float(row["loss e1"]) == pytest.approx([v for e, v in logged if e == 0][-1], abs=1e-6)
        assert float(row["loss e2"]) == pytest.approx([v for e, v in logged if e == 1][-1], abs=1e-6)
        cell = next((out / "cells").glob(f"{name}__*"))
        assert float(row["ms"]) == json.loads((cell / "costs.json").read_text())["search_ms_per_query"]
        assert float(row["r07"]) == pytest.approx(json.loads((cell / "metrics.json").read_text())["recall@IoU0.7"],
                                                  abs=1e-6)
    assert "| method | loss | loss e1 | loss e2 | ms | r07 | fit box AP | box AP |" in (out / "report.md").read_text()
    # `instsearch validate` of the trained checkpoint scores what the training's last validation did
    assert rows["drcnn"]["box AP"] != "" and float(rows["drcnn"]["box AP"]) == pytest.approx(
        float(rows["drcnn"]["fit box AP"]), abs=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"methods": [{"name": "a", "config": "a.yaml", "ckpt_path": {"checkpoint_of": "b"}}]}, "'b' is not a method"),
    ({"methods": [{"name": "a", "config": "a.yaml"}, {"name": "b", "config": "b.yaml",
                                                     "ckpt_path": {"checkpoint_of": "a"}}]}, "has no checkpoint"),
    ({"methods": [{"name": "a", "config": "a.yaml", "train": True,
                   "overrides": {"x.weights": {"checkpoint_of": "b"}}},
                  {"name": "b", "config": "b.yaml", "train": True,
                   "overrides": {"x.weights": {"checkpoint_of": "a"}}}]}, "lead back"),
    ({"methods": [{"name": "a", "config": "a.yaml", "seeds": [0, "one"]}]}, "distinct integers"),
    ({"methods": [{"name": "a", "config": "a.yaml", "seeds": [0, 1]}, {"name": "a@seed1", "config": "a.yaml"}]},
     "appear twice"),
    ({"methods": [{"name": "a", "config": "a.yaml", "seed_options": ["x"]}]}, "needs seeds"),
    ({"columns": [{"name": "c", "key": "k", "from": "somewhere"}]}, "columns\\[0\\].from"),
    ({"methods": [{"name": "a", "config": "a.yaml", "benchmarks": ["elsewhere"]}]}, "'elsewhere'\\] are not"),
    ({"columns": [{"name": "status", "key": "k"}]}, "column of every row"),
    ({"columns": [{"name": "c", "key": "k", "from": "costs", "every_epoch": True}]}, "every_epoch"),
])
def test_bad_references_seeds_and_columns_are_named(tmp_path, change, message):
    spec = {"benchmarks": [{"name": "b", "benchmark": "b.json"}],
            "methods": [{"name": "a", "config": "a.yaml"}], **change}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=message):
        ComparisonSpec.load(path, check_inputs=False)


def test_a_seeded_variant_names_the_checkpoint_of_the_same_seed(tmp_path):
    spec = {"benchmarks": [{"name": "b", "benchmark": "b.json"}],
            "methods": [{"name": "udq", "config": "u.yaml", "train": True, "seeds": [0, 1]},
                        {"name": "exact", "config": "u.yaml", "ckpt_path": {"checkpoint_of": "udq"},
                         "seeds": [0, 1]}]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = ComparisonSpec.load(path, check_inputs=False)
    by_name = {m.name: m for m in loaded.methods}
    assert list(by_name) == ["udq@seed0", "udq@seed1", "exact@seed0", "exact@seed1"]
    from instsearch.compare_cli import _referenced

    assert _referenced(loaded.methods, by_name["exact@seed1"], "udq") is by_name["udq@seed1"]


def test_only_keeps_the_named_methods_the_baseline_and_the_checkpoints_they_use(tmp_path):
    spec = {"benchmarks": [{"name": "b", "benchmark": "b.json"}], "baseline": "gem",
            "methods": [{"name": "gem", "config": "g.yaml"},
                        {"name": "stand_in", "config": "d.yaml", "train": True},
                        {"name": "udq", "config": "u.yaml", "train": True, "seeds": [0, 1],
                         "overrides": {"x.detector_weights": {"checkpoint_of": "stand_in"}}},
                        {"name": "exact", "config": "u.yaml", "ckpt_path": {"checkpoint_of": "udq"}, "seeds": [0, 1]},
                        {"name": "other", "config": "o.yaml"}]}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    loaded = ComparisonSpec.load(path, check_inputs=False)
    loaded.only(["exact"])
    assert [m.name for m in loaded.methods] == ["gem", "stand_in", "udq@seed0", "udq@seed1", "exact@seed0",
                                                "exact@seed1"]
    with pytest.raises(ValueError, match="nope"):
        ComparisonSpec.load(path, check_inputs=False).only(["nope"])


def test_a_family_baseline_is_compared_seed_by_seed(comparison, tmp_path):
    """baseline: a family run with seeds -> each seeded row against the baseline's row of its seed."""
    spec = yaml.safe_load(comparison.read_text())
    config = spec["methods"][0]["config"]
    spec["methods"] = [{"name": "a", "config": config, "seeds": [0, 1]},
                       {"name": "b", "config": config, "seeds": [0, 1],
                        "overrides": {"model.init_args.net.init_args.top_k": 1}}]
    spec["baseline"] = "a"
    comparison.write_text(yaml.safe_dump(spec))
    assert main(["compare", "--config", str(comparison)]) == 0
    out = tmp_path / "out"
    rows = _rows(out)
    assert rows["b@seed1"]["vs_baseline"] == "a@seed1" and rows["b@seed0"]["vs_baseline"] == "a@seed0"
    assert rows["a@seed1"].get("vs_baseline", "") == ""
    with open(out / "per_query.csv", newline="") as f:
        ap = {(r["method"], r["query"]): float(r["AP@all"]) for r in csv.DictReader(f)}
    queries = {q for _, q in ap}
    for seed in (0, 1):
        gain = np.mean([ap[(f"b@seed{seed}", q)] - ap[(f"a@seed{seed}", q)] for q in queries])
        assert float(rows[f"b@seed{seed}"]["delta_mAP@all"]) == pytest.approx(gain, abs=2e-6)
    with open(out / "seeds.csv", newline="") as f:
        family = {r["family"]: r for r in csv.DictReader(f)}
    deltas = [float(rows[f"b@seed{s}"]["delta_mAP@all"]) for s in (0, 1)]
    assert float(family["b"]["delta_mAP@all mean"]) == pytest.approx(np.mean(deltas), abs=2e-6)
    assert float(family["b"]["delta_mAP@all std"]) == pytest.approx(np.std(deltas, ddof=1), abs=2e-6)


def test_columns_read_every_attempt_of_a_resumed_training_and_skip_what_is_not_a_number(tmp_path):
    """A resumed training logs into a new version folder: the last value and the per-epoch values
    come from the latest attempt; a non-numeric figure is an empty cell, not a crash."""
    from instsearch.compare_cli import ExtraColumn, extra_columns

    log = tmp_path / "fit"
    for version, rows in ((0, [(0, 3.0), (1, 2.5)]), (1, [(1, 2.0), (2, 1.5)])):  # epoch 1 redone
        (log / f"version_{version}").mkdir(parents=True)
        lines = ["epoch,step,train/loss,val/ap"] + [f"{e},{10 * e},{v}," for e, v in rows]
        if version == 0:
            lines.append("0,5,,0.25")  # logged once, in the first attempt only
        (log / f"version_{version}" / "metrics.csv").write_text("\n".join(lines) + "\n")
    cell = {"training_log": str(log), "_costs": {"search_rule": "sharded: ...", "network": {"cuts/img": 2}},
            "_metrics": {"mAP@all": float("nan")}}
    columns = [ExtraColumn("loss", "train/loss"), ExtraColumn("loss", "train/loss", every_epoch=True),
               ExtraColumn("ap", "val/ap"), ExtraColumn("rule", "search_rule", "costs"),
               ExtraColumn("cuts", "network.cuts/img", "costs"), ExtraColumn("m", "mAP@all", "metrics")]
    assert extra_columns(columns, cell) == {"loss": 1.5, "loss e1": 3.0, "loss e2": 2.0, "loss e3": 1.5,
                                            "ap": 0.25, "rule": None, "cuts": 2.0, "m": None}


def test_a_weights_file_named_in_an_override_is_hashed_by_its_content(tmp_path):
    from instsearch.compare_cli import MethodSpec

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    method = MethodSpec("m", tmp_path / "c.yaml", overrides={"model.init_args.net.init_args.weights": str(weights),
                                                             "x.patch_weights": CheckpointOf("stand_in", weights)})
    before = method.hashed_overrides()
    weights.write_bytes(b"two!")  # retrained in place
    after = method.hashed_overrides()
    assert all(after[k] != before[k] for k in before)
    method.overrides.pop("x.patch_weights")
    assert method.command_overrides() == {"model.init_args.net.init_args.weights": str(weights)}
