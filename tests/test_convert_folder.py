"""``instsearch convert folder``: any image folder -> a database-only benchmark (optionally with
unjudged queries), served by the DataModules and searched by the evaluator."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layout_files import H, W, jpeg, text
from instsearch.datamodules.converters import CONVERTERS, convert, main
from instsearch.datamodules.converters.common import REPORT_NAME
from instsearch.datamodules.distractors import iter_image_files
from instsearch.formats import Benchmark, FormatError, Run

# Relative path -> kind. Images at every depth, names with spaces, an upper-case extension;
# files the walk must not take: other extensions, hidden files and folders, a macOS fork.
IMAGES = ["a/1.jpg", "a/b c/2 x.PNG", "a/b c/d/3.jpeg", "z.jpg"]
IGNORED = ["notes.txt", "a/readme", ".hidden.jpg", "a/._1.jpg", ".git/x.jpg", "a/b c/meta.json"]


def make_folder(root: Path) -> Path:
    for rel in IMAGES:
        if rel.endswith(".PNG"):
            root.joinpath(rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (W, H), (10, 20, 30)).save(root / rel, "PNG")
        else:
            jpeg(root / rel)
    for rel in IGNORED:
        text(root / rel, "not an image")
    return root


def jpeg_bomb(path: Path, width: int, height: int) -> Path:
    """A JPEG whose frame header claims ``width`` x ``height`` (a decompression bomb as headers
    see it) over the data of a tiny image: cheap to write, refused before any decoding."""
    data = bytearray(jpeg(path).read_bytes())
    sof = data.find(b"\xff\xc0")  # baseline frame: marker, length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def load(result) -> Benchmark:
    return Benchmark.load(result.path)


# ============================================================================ the walk
def test_registered_with_its_option():
    spec = CONVERTERS["folder"]
    assert spec.options == frozenset({"queries"})


def test_nested_folders_spaces_and_ignored_files(tmp_path):
    root = make_folder(tmp_path / "My Photos")
    result = convert("folder", root, tmp_path / "out" / "b.json")
    b = load(result)
    # ids = POSIX paths relative to DIR, in the walk's order (paths sorted by component)
    assert b.database == ["a/1.jpg", "a/b c/2 x.PNG", "a/b c/d/3.jpeg", "z.jpg"]
    assert list(b.images) == b.database
    assert all(b.images[i].file == i and (b.images[i].width, b.images[i].height) == (W, H) for i in b.database)
    assert all(b.image_path(i).is_file() for i in b.database)
    assert b.image_root == "../My Photos"
    assert b.name == "My Photos" and b.extra == {"dataset": "folder", "protocol": "folder"}
    assert b.queries == [] and b.ground_truth == {}
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report == result.report
    assert report["counts"]["database"] == 4 and report["counts"]["queries"] == 0
    assert report["counts"]["bad_images"] == 0 and report["protocol"] == "folder"


def test_ids_are_the_distractor_walk_and_deterministic(tmp_path):
    root = make_folder(tmp_path / "photos")
    for rel in ("b/10.jpg", "b/9.jpg", "B/1.jpg", "a0.jpg"):
        jpeg(root / rel)
    first = convert("folder", root, tmp_path / "1" / "b.json")
    second = convert("folder", root, tmp_path / "2" / "b.json")
    walked = [p.relative_to(root).as_posix() for p in iter_image_files(root)]
    assert load(first).database == walked == load(second).database
    assert first.path.read_text() == second.path.read_text()


def test_symlinks_followed_once_and_broken_ones_reported(tmp_path):
    root = make_folder(tmp_path / "photos")
    outside = tmp_path / "elsewhere"
    jpeg(outside / "o.jpg")
    os.symlink(outside, root / "linked")  # a folder outside DIR, reached through DIR
    os.symlink(root / "a", root / "a" / "loop")  # a cycle: walked once
    os.symlink(tmp_path / "gone.jpg", root / "broken.jpg")
    result = convert("folder", root, tmp_path / "b.json")
    b = load(result)
    assert "linked/o.jpg" in b.database and b.image_path("linked/o.jpg").is_file()
    assert not any(i.startswith("a/loop") for i in b.images)
    assert all(".." not in i.split("/") for i in b.images)
    assert [(e["image"], e["reason"]) for e in result.report["bad_images"]] == [("broken.jpg", "file not found")]
    assert "broken.jpg" not in b.images


def test_hostile_files_are_skipped_and_reported_by_convert(tmp_path):
    root = make_folder(tmp_path / "photos")
    (root / "bad" / "zero.jpg").parent.mkdir()
    (root / "bad" / "zero.jpg").write_bytes(b"")
    text(root / "bad" / "text.jpg", "this is not a JPEG")
    (root / "bad" / "cut.jpg").write_bytes(jpeg(tmp_path / "x.jpg").read_bytes()[:20])  # header cut
    jpeg_bomb(root / "bad" / "bomb.jpg", 9000, 8000)  # 72 Mpx > MAX_PIXELS (64 Mpx)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(root / "bad" / "truncated.jpg", "JPEG")
    data = (root / "bad" / "truncated.jpg").read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 2])  # header intact, data cut

    result = convert("folder", root, tmp_path / "b.json")
    reasons = {e["image"]: e["reason"] for e in result.report["bad_images"]}
    assert set(reasons) == {"bad/zero.jpg", "bad/text.jpg", "bad/cut.jpg", "bad/bomb.jpg"}
    assert reasons["bad/zero.jpg"] == "zero-byte file"
    assert reasons["bad/text.jpg"].startswith("not a readable image")
    assert reasons["bad/bomb.jpg"] == "9000x8000 exceeds the 64000000-pixel limit"
    assert result.report["counts"]["bad_images"] == 4 and result.report["counts"]["images_listed"] == 9
    assert load(result).database == IMAGES[:3] + ["bad/truncated.jpg", "z.jpg"]
    on_disk = json.loads((tmp_path / REPORT_NAME).read_text())
    assert on_disk["bad_images"] == result.report["bad_images"]

    # as for every converter, --verify-images decodes fully and also catches truncated data
    verified = convert("folder", root, tmp_path / "v.json", verify_images=True)
    assert {e["image"] for e in verified.report["bad_images"]} == set(reasons) | {"bad/truncated.jpg"}
    assert "bad/truncated.jpg" not in load(verified).images


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)image folder not found.*expected layout.*\.jpeg.*\.webp"):
        convert("folder", tmp_path / "nope", tmp_path / "b.json")
    text(tmp_path / "empty" / "notes.txt", "x")
    jpeg(tmp_path / "empty" / ".hidden.jpg")
    with pytest.raises(FileNotFoundError, match=r"no image files under .*empty"):
        convert("folder", tmp_path / "empty", tmp_path / "b.json")


# ============================================================================ queries
def test_queries_parsed_with_ids_boxes_and_no_ground_truth(tmp_path):
    root = make_folder(tmp_path / "photos")
    queries = text(tmp_path / "queries.txt",
                   "a/b c/2 x.PNG 1 2 20 25\r\n"
                   "\n"
                   "./z.jpg 0 0 100 100\r\n"  # clipped to the 40x30 image
                   "a\\1.jpg   3.5 4 10 12.25  \r\n"
                   "z.jpg 5 5 15 15\r\n")  # a second query on one image
    result = convert("folder", root, tmp_path / "b.json", queries=queries)
    b = load(result)
    assert [(q.id, q.image, q.box) for q in b.queries] == [
        ("001", "a/b c/2 x.PNG", (1.0, 2.0, 20.0, 25.0)),
        ("003", "z.jpg", (0.0, 0.0, 40.0, 30.0)),
        ("004", "a/1.jpg", (3.5, 4.0, 10.0, 12.25)),
        ("005", "z.jpg", (5.0, 5.0, 15.0, 15.0))]
    assert b.database == IMAGES  # query images stay database images
    for q in b.queries:  # no positive known; its own image never counts for or against it
        assert b.ground_truth[q.id].positives == {} and b.ground_truth[q.id].junk == {q.image}
    c = result.report["counts"]
    assert c["queries"] == 4 and c["queries_without_positives"] == 4 and c["positives_total"] == 0
    assert c["boxes_clipped"] == 1 and result.report["clipped_boxes"][0]["where"] == f"{queries}, line 3"


def test_query_ids_padded_to_the_last_line(tmp_path):
    root = make_folder(tmp_path / "photos")
    queries = text(tmp_path / "q.txt", "\n" * 1200 + "z.jpg 1 1 9 9\n")
    assert [q.id for q in load(convert("folder", root, tmp_path / "b.json", queries=queries)).queries] == ["1201"]


def test_missing_query_image_is_reported_and_its_query_dropped(tmp_path):
    root = make_folder(tmp_path / "photos")
    queries = text(tmp_path / "q.txt", "gone.jpg 1 1 9 9\nz.jpg 1 1 9 9\n")
    result = convert("folder", root, tmp_path / "b.json", queries=queries)
    assert [q.id for q in load(result).queries] == ["002"]
    assert result.report["bad_images"][0]["image"] == "gone.jpg"
    assert result.report["dropped_queries"][0]["query"] == "001"


@pytest.mark.parametrize("line, match", [
    ("z.jpg 1 2 3", r"expected '<path> x1 y1 x2 y2'"),
    ("1 2 3 4", r"expected '<path> x1 y1 x2 y2'"),
    ("z.jpg 1 2 x 4", r"four numbers last, got '1 2 x 4'"),
    ("/abs/z.jpg 1 2 3 4", r"must be relative"),
    ("../z.jpg 1 2 3 4", r"no '\.\.'"),
    ("z.jpg 5 5 1 1", r"empty or inverted box"),
    ("z.jpg 1 2 nan 4", r"empty or inverted box"),
    ("z.jpg 100 100 200 200", r"lies outside the 40x30 image 'z.jpg'"),
])
def test_malformed_query_lines_name_file_and_line(tmp_path, line, match):
    root = make_folder(tmp_path / "photos")
    queries = text(tmp_path / "queries.txt", f"a/1.jpg 1 1 9 9\n{line}\n")
    with pytest.raises(FormatError, match=rf"queries\.txt, line 2: .*({match})"):
        convert("folder", root, tmp_path / "b.json", queries=queries)


def test_query_file_missing_or_empty(tmp_path):
    root = make_folder(tmp_path / "photos")
    with pytest.raises(FileNotFoundError, match=r"query list not found"):
        convert("folder", root, tmp_path / "b.json", queries=tmp_path / "nope.txt")
    with pytest.raises(FormatError, match=r"no queries listed"):
        convert("folder", root, tmp_path / "b.json", queries=text(tmp_path / "q.txt", "\n \n"))
    with pytest.raises(ValueError, match=r"option 'queries' does not apply to holidays \(it applies to: folder\)"):
        convert("holidays", root, tmp_path / "b.json", queries=tmp_path / "q.txt")


# ============================================================================ served and searched
def test_served_by_database_images_datamodule(tmp_path):
    from instsearch.datamodules.benchmark import BenchmarkDataModule
    from instsearch.datamodules.unlabelled import DatabaseImagesDataModule

    root = make_folder(tmp_path / "photos")
    out = convert("folder", root, tmp_path / "b.json").path
    dm = DatabaseImagesDataModule(benchmark=str(out), batch_size=3)
    dm.setup("fit")
    images, metas = next(iter(dm.round_dataloader()))
    assert [m.image_id for m in metas] == IMAGES[:3]
    assert all(im.shape == (3, H, W) for im in images)
    images, metas = next(iter(dm.train_dataloader()))  # shuffled, no trainer: one process
    assert len(images) == 3 and {m.image_id for m in metas} <= set(IMAGES)
    predict = BenchmarkDataModule(benchmark=str(out), batch_size=8).predict_dataloader()
    _, metas = next(iter(predict))  # predict: the database, no query item
    assert [m.image_id for m in metas] == IMAGES and all(m.query_id is None for m in metas)


@pytest.fixture(scope="module")
def global_net():
    import torch

    from instsearch.networks.global_model import GlobalDescriptorModel

    torch.manual_seed(0)
    return GlobalDescriptorModel("small", min_size=64, max_size=64).eval()


def test_unjudged_queries_are_ranked_and_score_zero(tmp_path, global_net):
    from instsearch.datamodules.benchmark import BenchmarkDataModule
    from instsearch.eval.evaluator import RetrievalEvaluator, extract_and_score

    root = make_folder(tmp_path / "photos")
    queries = text(tmp_path / "q.txt", "a/b c/2 x.PNG 1 2 20 25\nz.jpg 0 0 40 30\n")
    bench = load(convert("folder", root, tmp_path / "b.json", queries=queries))
    dm = BenchmarkDataModule(benchmark=str(bench.root / "b.json"), batch_size=4)
    result = extract_and_score(global_net, dm.benchmark_dataloaders(), RetrievalEvaluator(bench), progress=False)
    assert set(result.run.rankings) == {"001", "002"}
    assert all({h.image for h in hits} == set(IMAGES) for hits in result.run.rankings.values())
    Run.from_dict(result.run.to_dict(), benchmark=bench)  # a valid run.json of this benchmark
    m = result.metrics  # no positive: AP 0 for every query, localisation undefined
    assert m["num_queries"] == 2 and m["mAP@all"] == 0.0 and m["mAP@10"] == 0.0
    assert math.isnan(m["mIoU"]) and math.isnan(m["recall@IoU0.5"])


def test_database_only_benchmark_is_not_scored(tmp_path):
    from instsearch.eval.metrics import retrieval_metrics

    bench = load(convert("folder", make_folder(tmp_path / "photos"), tmp_path / "b.json"))
    with pytest.raises(ValueError, match=r"benchmark 'photos' has no queries to evaluate"):
        retrieval_metrics(bench, Run("any", {}))


# ============================================================================ command line
def test_cli(tmp_path, capsys):
    from instsearch.cli import main as instsearch

    root = make_folder(tmp_path / "photos")
    queries = text(tmp_path / "queries.txt", "a/b c/2 x.PNG 1 2 20 25\n")
    out = tmp_path / "bench" / "b.json"
    assert instsearch(["convert", "folder", "--root", str(root), "--out", str(out), "--queries", str(queries)]) == 0
    printed = capsys.readouterr().out
    assert "photos: 1 queries, 4 database images" in printed and f"wrote {out}" in printed
    b = Benchmark.load(out)
    assert [q.id for q in b.queries] == ["001"] and b.database == IMAGES

    assert instsearch(["convert", "folder", "--root", str(root), "--out", str(tmp_path / "db.json")]) == 0
    assert "photos: 0 queries, 4 database images" in capsys.readouterr().out

    text(queries, "a/1.jpg 1 2 20 25\nz.jpg 1 2\n")
    assert main(["folder", "--root", str(root), "--out", str(out), "--queries", str(queries)]) == 2
    assert f"{queries}, line 2: expected" in capsys.readouterr().err


def test_retrieval_evaluation_skips_a_database_only_benchmark(tmp_path, global_net, caplog):
    """Training on one's own collection (UDQ, fine-tuning) keeps the evaluation callback attached:
    with no query to score it says so once and skips, instead of stopping the run."""
    import logging

    import pytorch_lightning as pl

    from instsearch.datamodules.benchmark import BenchmarkDataModule
    from instsearch.eval.callback import RetrievalEvaluation
    from instsearch.lightning_modules.training_free import TrainingFreeModule

    bench = load(convert("folder", make_folder(tmp_path / "photos"), tmp_path / "b.json"))
    evaluation = RetrievalEvaluation(progress=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[evaluation],
                         default_root_dir=tmp_path)
    dm = BenchmarkDataModule(benchmark=str(bench.root / "b.json"), batch_size=4)
    with caplog.at_level(logging.INFO):
        evaluation._evaluate_and_publish(_AttachedTrainer(trainer, dm), TrainingFreeModule(global_net))
    assert evaluation.last_result is None
    assert "benchmark 'photos' has no queries (a database-only collection)" in caplog.text


class _AttachedTrainer:
    """A trainer as the callback sees it during fit: its DataModule attached."""

    def __init__(self, trainer, datamodule):
        self._trainer, self.datamodule = trainer, datamodule

    def __getattr__(self, name):
        return getattr(self._trainer, name)


def test_instsearch_test_refuses_a_database_only_benchmark_before_extracting(tmp_path, global_net):
    import pytorch_lightning as pl

    from instsearch.datamodules.benchmark import BenchmarkDataModule
    from instsearch.lightning_modules.training_free import TrainingFreeModule

    bench = load(convert("folder", make_folder(tmp_path / "photos"), tmp_path / "b.json"))
    module, described = TrainingFreeModule(global_net), []
    search_step = module.search_step
    module.search_step = lambda batch: described.append(batch) or search_step(batch)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"benchmark 'photos' \(.*b\.json\) has no queries .*instsearch predict"):
        trainer.test(module, BenchmarkDataModule(benchmark=str(bench.root / "b.json"), batch_size=4))
    assert described == []
