"""End to end: CLI, evaluation of a real model, fit -> checkpoint -> test -> evaluate, loggers, DDP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from instsearch.datamodules.benchmark import benchmark_dataloader
from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator, extract_and_score
from instsearch.cli import main
from instsearch.formats import Benchmark, Run

METRIC_KEYS = {"mAP@10", "mAP@20", "mAP@50", "mAP@100", "mAP@all", "mIoU", "num_queries", "normalization", "protocol"}


def small_net(num_classes: int):
    from instsearch.networks.deep_region_cnn import DeepRegionCNN

    torch.manual_seed(0)
    return DeepRegionCNN(backbone="small", num_classes=num_classes, top_k=5, feature_layers=["conv4"]).eval()


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "synth", "evaluate", "demo", "convert"):
        assert f"  {command} " in out


def test_unknown_command_fails(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_evaluation_of_a_region_model(small_benchmark, num_classes):
    bench = Benchmark.load(small_benchmark)
    result = extract_and_score(small_net(num_classes), [benchmark_dataloader(bench, batch_size=8)],
                      RetrievalEvaluator(bench), progress=False)
    assert METRIC_KEYS <= set(result.metrics)
    assert result.metrics["num_queries"] == 4
    for qid, hits in result.run.rankings.items():
        # every database image with a region is ranked once, best first, with a box inside the image
        assert len({h.image for h in hits}) == len(hits) == len(bench.database)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
        for h in hits:
            e = bench.images[h.image]
            assert 0 <= h.box[0] < h.box[2] <= e.width and 0 <= h.box[1] < h.box[3] <= e.height
    # mAP@all against a plain loop over the run and the ground truth (relevant normalisation)
    aps = []
    for q in bench.queries:
        gt = bench.ground_truth[q.id]
        positives = (set(gt.positives) - set(gt.junk)) & set(bench.database)
        cleaned = [h.image for h in result.run.rankings[q.id] if h.image not in gt.junk]
        hits, precision_sum = 0, 0.0
        for rank, image in enumerate(cleaned, start=1):
            if image in positives:
                hits += 1
                precision_sum += hits / rank
        aps.append(precision_sum / len(positives) if positives else 0.0)
    assert result.metrics["mAP@all"] == pytest.approx(sum(aps) / len(aps), abs=1e-9)
    curve = result.recall_curve
    assert curve["recall"] == sorted(curve["recall"], reverse=True)


def test_query_box_matters(small_benchmark, num_classes):
    """A query is described by its box: the same image with another box gives another feature."""
    net = small_net(num_classes)
    bench = Benchmark.load(small_benchmark)
    q = bench.queries[0]
    image, _ = benchmark_dataloader(bench, "queries").dataset[0]
    whole = torch.tensor([[0.0, 0.0, image.shape[-1], image.shape[-2]]])
    box = torch.tensor([q.box])
    with torch.no_grad():
        f_box, f_whole = net.describe_boxes([image, image], [box, whole])
    assert torch.allclose(f_box.norm(dim=1), torch.ones(1), atol=1e-4)
    assert (f_box - f_whole).abs().max() > 1e-3


def _fit_config(tmp_path: Path, root: Path, num_classes: int, benchmark: Path) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0, "accelerator": "cpu",
                    "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path),
                    "logger": [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp_path), "name": "logs"}}],
                    "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]},
        "model": {"class_path": "instsearch.lightning_modules.detector.DetectorModule",
                  "init_args": {"net": {"class_path": "instsearch.networks.deep_region_cnn.DeepRegionCNN",
                                        "init_args": {"backbone": "small", "num_classes": num_classes, "top_k": 5,
                                                      "feature_layers": ["conv4"]}}}},
        "data": {"class_path": "instsearch.datamodules.synthetic.SyntheticDataModule",
                 "init_args": {"root": str(root), "benchmark": str(benchmark), "batch_size": 2, "num_workers": 0}},
        "retrieval": {"progress": False},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_fit_checkpoint_test_evaluate(tmp_path, synthetic_root, small_benchmark, num_classes, capsys):
    config = _fit_config(tmp_path, synthetic_root, num_classes, small_benchmark)
    assert main(["fit", "--config", str(config)]) == 0
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    # retrieval metrics were logged at validation end, next to the detector's AP
    rows = list((tmp_path / "logs").glob("version_*/metrics.csv"))
    header = rows[0].read_text().splitlines()[0]
    assert "retrieval/mAP@all" in header and "val/box_AP@0.5" in header and "val/box_AP@0.7" in header
    capsys.readouterr()
    assert main(["test", "--config", str(config), "--ckpt_path", str(ckpt), "--data.benchmark", str(small_benchmark)]) == 0
    out = capsys.readouterr().out
    run_path = Path(next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("run: ")))
    metrics_path = Path(next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("metrics: ")))
    metrics = json.loads(metrics_path.read_text())
    assert METRIC_KEYS <= set(metrics)
    # one evaluation path: the callback's numbers at the end of training are the test's numbers
    import csv

    with rows[0].open() as f:
        logged = [r for r in csv.DictReader(f) if r.get("retrieval/mAP@all")]
    assert len(logged) == 1
    compared = [k for k in metrics if isinstance(metrics[k], float) and f"retrieval/{k}" in logged[0]]
    assert {"mAP@10", "mAP@all", "mIoU", "recall@IoU0.5", "regions_per_image"} <= set(compared)
    for key in compared:
        assert float(logged[0][f"retrieval/{key}"]) == pytest.approx(metrics[key], abs=1e-6), key
    Run.load(run_path, benchmark=Benchmark.load(small_benchmark))
    out_json = tmp_path / "m.json"
    assert main(["evaluate", "--benchmark", str(small_benchmark), "--run", str(run_path), "--output", str(out_json)]) == 0
    again = json.loads(out_json.read_text())
    for key in ("mAP@10", "mAP@all"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9)
    assert again["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-4)  # run.json keeps boxes to 0.01 px


def _validate(devices: int, root: Path, benchmark: Path, num_classes: int, tmp_path: Path) -> dict:
    from instsearch.datamodules.synthetic import SyntheticDataModule
    from instsearch.eval.callback import RetrievalEvaluation
    from instsearch.lightning_modules.detector import DetectorModule

    pl.seed_everything(0)
    model = DetectorModule(small_net(num_classes), retrieval=RetrievalConfig(grid_queries=0))
    dm = SyntheticDataModule(root=root, benchmark=str(benchmark), batch_size=2, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         limit_val_batches=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         callbacks=[RetrievalEvaluation(progress=False)], default_root_dir=tmp_path)
    trainer.validate(model, datamodule=dm)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("retrieval/")}


def test_two_process_gloo_gives_the_same_metrics(tmp_path, synthetic_root, small_benchmark, num_classes):
    one = _validate(1, synthetic_root, small_benchmark, num_classes, tmp_path / "one")
    two = _validate(2, synthetic_root, small_benchmark, num_classes, tmp_path / "two")
    assert "retrieval/mAP@all" in one and set(one) == set(two)
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_wandb_offline_run_receives_metrics_and_image(tmp_path, synthetic_root, small_benchmark, num_classes, monkeypatch):
    from instsearch.datamodules.synthetic import SyntheticDataModule
    from instsearch.eval.callback import RetrievalEvaluation
    from instsearch.loggers import WandbLogger
    from instsearch.lightning_modules.detector import DetectorModule

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), project="instsearch-test")
    model = DetectorModule(small_net(num_classes))
    dm = SyntheticDataModule(root=synthetic_root, benchmark=str(small_benchmark), batch_size=2, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, limit_val_batches=1, logger=logger, enable_progress_bar=False,
                         enable_checkpointing=False, callbacks=[RetrievalEvaluation(progress=False)],
                         default_root_dir=tmp_path)
    trainer.validate(model, datamodule=dm)
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].rglob("files/media/images/**/*.png"))
    assert images, "the result grid was not logged"
    # read the logged value back from the run file's history and summary records; wandb's service
    # process writes the file and may still be flushing its last records when finish() returns
    import time

    deadline = time.monotonic() + 30
    while True:
        values = _logged_values(next(runs[0].glob("run-*.wandb")).read_bytes(), "retrieval/mAP@all")
        if len(values) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    logged = float(trainer.callback_metrics["retrieval/mAP@all"])
    assert values and all(v == pytest.approx(logged, abs=1e-6) for v in values)  # history and summary


def _logged_values(raw: bytes, key: str) -> list[float]:
    """The values of ``key`` in the history and summary records of an offline wandb run file.

    The file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks, each with
    a 7-byte header (checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last); a record
    that crosses a block boundary is split into chunks, so it must be reassembled before decoding.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    records, pending, pos = [], b"", header
    while pos + header <= len(raw):
        left = block - pos % block
        if left < header:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + header])
        pos += header
        data, pos = raw[pos:pos + length], pos + length
        if kind == 1:
            records.append(data)
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            records.append(pending + data)
    values = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        items = (record.history.item if record.HasField("history")
                 else record.summary.update if record.HasField("summary") else [])
        values += [float(item.value_json) for item in items if item.key == key or list(item.nested_key) == [key]]
    return values


def test_retrieval_is_evaluated_every_epoch_even_without_validation_data(tmp_path, synthetic_root, small_benchmark,
                                                                        num_classes):
    """Fine-tuning sets without a validation split (Oxford's 55 query images) still get their
    per-epoch retrieval metrics, at the end of the training epoch, before checkpoints are saved."""
    from instsearch.datamodules.synthetic import SyntheticDataModule
    from instsearch.eval.callback import RetrievalEvaluation
    from instsearch.lightning_modules.detector import DetectorModule

    pl.seed_everything(0)
    model = DetectorModule(small_net(num_classes), retrieval=RetrievalConfig(grid_queries=0))
    dm = SyntheticDataModule(root=synthetic_root, benchmark=str(small_benchmark), batch_size=2, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="eval mode at the start of training"):
        trainer.fit(model, datamodule=dm)  # small_net() is in eval mode
    model.train()
    callback = RetrievalEvaluation(progress=False)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="retrieval/mAP@all", mode="max")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=1, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, checkpoint], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert callback._evaluated_epoch == 1 and callback.last_result is not None
    assert float(trainer.callback_metrics["retrieval/mAP@all"]) == pytest.approx(
        callback.last_result.metrics["mAP@all"], abs=1e-6)
    assert checkpoint.best_model_path  # the checkpoint could monitor the retrieval metric
