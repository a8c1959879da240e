"""`instsearch extract`: Lightning's predict loop writes region shards, restartably and without
extracting an item twice; the two-stage search over them reproduces `instsearch test`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from instsearch.cli import main
from instsearch.eval.shard_extraction import PartSampler
from instsearch.eval.shard_search import search_shards
from instsearch.eval.searchers import FaissSearcher
from instsearch.eval.shards import RegionShards
from instsearch.formats import Run


def _config(tmp_path: Path, benchmark: Path, num_classes: int) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path),
                    "logger": [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp_path), "name": "logs"}}]},
        "model": {"class_path": "instsearch.lightning_modules.detector.DetectorModule",
                  "init_args": {"net": {"class_path": "instsearch.networks.deep_region_cnn.DeepRegionCNN",
                                        "init_args": {"backbone": "small", "num_classes": num_classes, "top_k": 5,
                                                      "feature_layers": ["conv4"]}}}},
        "data": {"class_path": "instsearch.datamodules.benchmark.BenchmarkDataModule",
                 "init_args": {"benchmark": str(benchmark), "batch_size": 3}},
        "retrieval": {"progress": False},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _files(root: Path) -> dict[str, bytes]:
    """Every part file's bytes (the manifest aside)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("part-*"))}


# ---------------------------------------------------------------------------------------- sampler
def test_part_sampler_hands_whole_parts_round_robin_and_skips_complete_ones():
    ranks = [list(PartSampler(11, 3, rank=r, world_size=2)) for r in range(2)]
    assert ranks == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]
    assert sorted(ranks[0] + ranks[1]) == list(range(11))  # nothing twice, nothing padded
    sampler = PartSampler(11, 3, skip=[0, 3], rank=0, world_size=2)
    assert list(sampler) == [6, 7, 8] and len(sampler) == 3
    assert list(PartSampler(5, 10, rank=0, world_size=1)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="part_size"):
        PartSampler(5, 0)


# ---------------------------------------------------------------------------------------- extraction
@pytest.fixture(scope="module")
def extracted(tmp_path_factory, small_benchmark, num_classes):
    tmp = tmp_path_factory.mktemp("extract")
    config = _config(tmp, small_benchmark, num_classes)
    shards = tmp / "shards"
    assert main(["extract", "--config", str(config), "--out", str(shards), "--dtype", "float32",
                 "--part-size", "6"]) == 0
    return tmp, config, shards


def test_extraction_then_exact_search_gives_the_test_run(extracted, small_benchmark, capsys):
    tmp, config, shards_dir = extracted
    capsys.readouterr()
    assert main(["test", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    run_path = Path(next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("run: ")))
    shards = RegionShards(shards_dir)
    index = faiss.IndexFlatIP(shards.dim)  # an exact index, built here independently of the command
    for _, rows in shards.iter_features():
        index.add(np.asarray(rows, np.float32))
    query_ids, features, _ = shards.queries()
    run = search_shards(FaissSearcher(index), shards, query_ids, features, shortlist=None, method="DeepRegionCNN")
    expected = Run.load(run_path).to_dict()
    got = run.to_dict()
    assert set(got["rankings"]) == set(expected["rankings"])
    assert {q: got["rankings"][q] for q in expected["rankings"]} == expected["rankings"]


def test_manifest_counts_and_layout(extracted, small_benchmark):
    _, _, shards_dir = extracted
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    bench = json.loads(small_benchmark.read_text())
    items = len(bench["database"]) + len(bench["queries"])
    assert manifest["complete"] and manifest["num_items"] == items and manifest["num_parts"] == -(-items // 6)
    assert manifest["images"] == len(bench["database"]) and manifest["queries"] == len(bench["queries"])
    assert manifest["model"] == "DeepRegionCNN" and manifest["dtype"] == "float32"
    shards = RegionShards(shards_dir)
    assert shards.image_ids == bench["database"]  # the benchmark's order, whatever the parts
    assert shards.num_regions == manifest["regions"] == 5 * len(bench["database"])  # top_k 5 per image


def test_rerun_skips_complete_parts_and_rewrites_a_missing_one(extracted, capsys):
    tmp, config, shards_dir = extracted
    before = _files(shards_dir)
    (shards_dir / "parts" / "part-00002.json").unlink()  # as if killed before the part was committed
    capsys.readouterr()
    assert main(["extract", "--config", str(config), "--out", str(shards_dir), "--dtype", "float32",
                 "--part-size", "6"]) == 0
    out = capsys.readouterr().out
    parts = len(list((shards_dir / "parts").glob("part-*.json")))
    assert f"1 written, {parts - 1} already complete" in out
    assert _files(shards_dir) == before


def test_another_config_is_refused_in_the_same_folder(extracted):
    tmp, config, shards_dir = extracted
    with pytest.raises(ValueError, match="another extraction.*dtype"):
        main(["extract", "--config", str(config), "--out", str(shards_dir), "--dtype", "float16", "--part-size", "6"])


def test_part_size_is_rounded_up_to_whole_batches(extracted, tmp_path):
    _, config, _ = extracted
    assert main(["extract", "--config", str(config), "--out", str(tmp_path / "s"), "--part-size", "4"]) == 0
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["part_size"] == 6  # batches of 3


def test_two_gloo_processes_write_the_parts_of_one(extracted, tmp_path):
    _, config, shards_dir = extracted
    two = tmp_path / "two"
    assert main(["extract", "--config", str(config), "--out", str(two), "--dtype", "float32", "--part-size", "6",
                 "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]) == 0
    assert _files(two) == _files(shards_dir)  # bitwise: every image once, in its part
    assert json.loads((two / "manifest.json").read_text())["complete"]


def test_sigkill_midway_then_rerun_gives_the_same_parts(extracted, tmp_path):
    _, config, shards_dir = extracted

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "instsearch.cli", "extract", "--config", str(config), "--out", str(out),
                "--dtype", "float32", "--part-size", "6"]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the reference is an uninterrupted run in a process like the killed one (same thread count)
    clean = tmp_path / "clean"
    assert subprocess.run(command(clean), capture_output=True, env=env, timeout=300).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "parts" / "part-00001.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "parts").glob("part-*.json")))
    total = json.loads((shards_dir / "manifest.json").read_text())["num_parts"]
    assert 2 <= done < total, "the extraction was not interrupted midway"
    result = subprocess.run(command(out), capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{total - done} written, {done} already complete" in result.stdout
    assert _files(out) == _files(clean)


# ---------------------------------------------------------------------------------------- sharded test
def _test_outputs(config: Path, tmp_path: Path, name: str, *options: str) -> tuple[dict, dict]:
    logs = tmp_path / name
    assert main(["test", "--config", str(config), "--trainer.logger.init_args.save_dir", str(logs),
                 "--model.init_args.retrieval.grid_queries", "0", *options]) == 0
    folder = next(logs.rglob("metrics.json")).parent
    return json.loads((folder / "metrics.json").read_text()), json.loads((folder / "run.json").read_text())


def test_sharded_evaluation_on_two_gloo_processes_equals_the_gathered_one(extracted, tmp_path):
    _, config, _ = extracted
    one = _test_outputs(config, tmp_path, "one")
    two_options = ("--trainer.devices", "2", "--trainer.strategy", "ddp_spawn")
    sharded = _test_outputs(config, tmp_path, "sharded", *two_options, "--model.init_args.retrieval.evaluation",
                            "sharded")
    gathered = _test_outputs(config, tmp_path, "gathered", *two_options, "--model.init_args.retrieval.evaluation",
                             "gather")
    assert sharded == gathered  # metrics.json and run.json; the padded sampler's repeated image counts once
    # regions spilled to shards and ranked streamed; run.json trimmed to 3 images, the metrics not
    spilled = _test_outputs(config, tmp_path, "spilled", *two_options, "--model.init_args.retrieval.evaluation",
                            "sharded", "--model.init_args.retrieval.spill_dir", str(tmp_path / "spill"),
                            "--model.init_args.retrieval.run_depth", "3")
    assert spilled[0] == gathered[0]
    assert spilled[1]["rankings"] == {q: hits[:3] for q, hits in gathered[1]["rankings"].items()}
    # one process batches other images together than two (Lightning's sampler strides the items),
    # which moves features in their last bits: the same numbers to float32 rounding
    assert sharded[0].keys() == one[0].keys()
    for key, value in one[0].items():
        assert sharded[0][key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


def test_evaluation_mode_is_checked():
    from instsearch.eval.evaluator import RetrievalConfig

    with pytest.raises(ValueError, match="evaluation must be one of auto, gather, sharded"):
        RetrievalConfig(evaluation="scatter")
    with pytest.raises(ValueError, match="whitening: pca is fitted on the whole database"):
        RetrievalConfig(evaluation="sharded", whitening="pca")
    assert RetrievalConfig(whitening=True).fits_whitening and not RetrievalConfig().fits_whitening


# ---------------------------------------------------------------------------------------- distractors
@pytest.fixture(scope="module")
def distractor_setup(tmp_path_factory, small_benchmark, synthetic_root, num_classes):
    """The small benchmark plus a distractor folder of 7 files at two depths, one undecodable."""
    import shutil

    tmp = tmp_path_factory.mktemp("distractors")
    bench = json.loads(small_benchmark.read_text())
    source = sorted((synthetic_root / bench["image_root"]).rglob("*.jpg"))[-6:]
    assert len(source) == 6
    for k, path in enumerate(source):
        folder = tmp / "flickr" / ("a" if k < 3 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"im{k}.jpg")
    (tmp / "flickr" / "a" / "broken.jpg").write_bytes(b"not an image")
    bench["image_root"] = str((synthetic_root / bench["image_root"]).resolve())
    bench["distractors"] = [{"root": "flickr", "count": 7, "id_prefix": "distractor:"}]
    path = tmp / "benchmark.json"
    path.write_text(json.dumps(bench))
    return tmp, _config(tmp, path, num_classes)


def test_distractor_folders_go_through_the_same_writer(distractor_setup, tmp_path):
    tmp, config = distractor_setup
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["extract", "--config", str(config), "--out", str(one), "--dtype", "float32", "--part-size", "3"]) == 0
    assert main(["extract", "--config", str(config), "--out", str(two), "--dtype", "float32", "--part-size", "3",
                 "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"]) == 0
    assert _files(two) == _files(one)
    shards = RegionShards(one)
    manifest = shards.manifest
    main_items = manifest["num_items"]
    first = -(-main_items // 3) * 3  # the folder starts a new part
    assert manifest["distractors"] == [{"root": str(tmp / "flickr"), "id_prefix": "distractor:", "count": 7,
                                        "first_item": first}]
    assert manifest["num_parts"] == first // 3 + 3 and manifest["complete"]
    walk = ["a/im0.jpg", "a/im1.jpg", "a/im2.jpg", "b/c/im3.jpg", "b/c/im4.jpg", "b/c/im5.jpg"]
    assert shards.image_ids[-6:] == [f"distractor:{p}" for p in walk]  # the walk's order; broken.jpg comes first
    assert [b["image"] for b in shards.bad_images] == ["distractor:a/broken.jpg"]
    assert shards.num_regions == 5 * len(shards.image_ids)


def test_distractors_rank_as_in_the_gathered_test(distractor_setup, tmp_path):
    tmp, config = distractor_setup
    out = tmp_path / "shards"
    shrink = ("--data.init_args.max_side", "40")  # every image served smaller than it is
    assert main(["extract", "--config", str(config), "--out", str(out), "--dtype", "float32", "--part-size", "3",
                 *shrink]) == 0
    _, expected = _test_outputs(config, tmp_path, "test", *shrink)
    shards = RegionShards(out)
    index = faiss.IndexFlatIP(shards.dim)
    for _, rows in shards.iter_features():
        index.add(np.asarray(rows, np.float32))
    query_ids, features, _ = shards.queries()
    got = search_shards(FaissSearcher(index), shards, query_ids, features, shortlist=None).to_dict()
    assert any(h["image"].startswith("distractor:") for hits in got["rankings"].values() for h in hits)
    for qid, hits in expected["rankings"].items():
        # the gathered path lists distractors by id, the shards by the folder walk: only the order
        # of images with equal scores may differ; every box, a distractor's included, is in its
        # original pixels on both paths
        assert sorted((h["score"], h["image"], h["box"]) for h in got["rankings"][qid]) == \
            sorted((h["score"], h["image"], h["box"]) for h in hits)


def test_extract_index_search_evaluate_equals_instsearch_test(extracted, small_benchmark, tmp_path, capsys):
    _, config, shards_dir = extracted
    expected_metrics, expected_run = _test_outputs(config, tmp_path, "test")
    assert main(["index", "build", "--shards", str(shards_dir), "--out", str(tmp_path / "index"),
                 "--factory", "Flat"]) == 0
    run_path = tmp_path / "search" / "run.json"
    assert main(["search", "--index", str(tmp_path / "index"), "--shards", str(shards_dir), "--config", str(config),
                 "--out", str(run_path), "--shortlist", "0"]) == 0
    assert json.loads(run_path.read_text()) == expected_run
    searched = json.loads((run_path.parent / "metrics.json").read_text())
    assert {k: searched[k] for k in expected_metrics} == expected_metrics
    assert searched["search"] == "exact" and searched["index_key"] == "Flat"
    assert searched["database_images"] == len(json.loads(small_benchmark.read_text())["database"])
    assert searched["distractor_images"] == 0 and searched["database_regions"] == 5 * searched["database_images"]
    scored = tmp_path / "scored.json"
    assert main(["evaluate", "--benchmark", str(small_benchmark), "--run", str(run_path), "--output", str(scored)]) == 0
    again = json.loads(scored.read_text())
    assert {k: again[k] for k in again if k != "mIoU"} == {k: expected_metrics[k] for k in again if k != "mIoU"}
    assert again["mIoU"] == pytest.approx(expected_metrics["mIoU"], abs=1e-4)  # run.json keeps boxes to 0.01 px


def test_extract_generates_a_missing_synthetic_benchmark_as_test_does(tmp_path):
    # the synthetic DataModule generates its data in prepare_data; extract calls it before reading
    # the benchmark, so the shipped synthetic config extracts on a fresh machine
    root = tmp_path / "fresh_synthetic"
    assert main(["extract", "--config", "configs/deep_region_cnn_synthetic.yaml", "--out", str(tmp_path / "s"),
                 "--data.init_args.root", str(root), "--trainer.enable_progress_bar", "false"]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    bench = json.loads((root / "benchmark.json").read_text())
    assert manifest["complete"] and manifest["images"] == len(bench["database"])
    assert manifest["queries"] == len(bench["queries"])
