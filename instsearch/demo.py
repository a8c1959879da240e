"""``instsearch demo``: the whole pipeline on the synthetic benchmark, in one run.

1. generate the tiny synthetic benchmark (or reuse it when already there);
2. evaluate the untrained deep region CNN (random initialisation);
3. fine-tune it (Faster R-CNN, conv1-2 frozen) with the retrieval callback attached;
4. evaluate the trained model, and a whole-image GeM descriptor from the same trained backbone;
5. write ``metrics.json`` (rows ``untrained``, ``trained``, ``global_gem``), ``results.png``,
   ``config.yaml`` (the full LightningCLI config) and ``checkpoints/last.ckpt``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch

DEFAULT_EPOCHS = 12


def build_args(out: Path, data: Path, accelerator: str, epochs: int, seed: int, num_classes: int,
               num_workers: int, wandb: bool = False) -> list[str]:
    """The LightningCLI arguments of the demo run (the same keys a YAML config would hold)."""
    loggers = [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}}]
    if wandb:
        loggers.append({"class_path": "instsearch.loggers.WandbLogger", "init_args": {"save_dir": str(out)}})
    return [
        f"--seed_everything={seed}",
        "--model=instsearch.lightning_modules.detector.DetectorModule",
        "--model.net=instsearch.networks.deep_region_cnn.DeepRegionCNN",
        "--model.net.backbone=small",
        f"--model.net.num_classes={num_classes}",
        "--model.net.top_k=10",
        "--model.net.fusion=none",  # each of the top-10 regions searchable on its own (best-region search)
        "--model.net.feature_layers=[conv2,conv3]",
        "--model.optim.lr=0.02",
        "--model.optim.warmup_steps=50",
        f"--model.optim.milestones=[{max(epochs - 2, 1)}]",
        "--data=instsearch.datamodules.synthetic.SyntheticDataModule",
        f"--data.root={data}",
        "--data.batch_size=8",
        f"--data.num_workers={num_workers}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.accelerator={accelerator}",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={out}",
        "--trainer.log_every_n_steps=10",
        f"--trainer.check_val_every_n_epoch={epochs}",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=" + json.dumps(loggers),
        # last.ckpt after every epoch: a killed demo resumes with --ckpt_path (docs/resuming.md)
        "--trainer.callbacks=" + json.dumps([{"class_path": "instsearch.checkpointing.LastCheckpoint",
                                              "init_args": {"dirpath": str(out / "checkpoints")}}]),
        f"--retrieval.every_n_epochs={epochs}",
    ]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="instsearch demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--wandb", action="store_true", help="also log to wandb (offline without an API key)")
    args = parser.parse_args(argv)

    from instsearch.synthetic import generate
    from instsearch.eval.callback import RetrievalEvaluation
    from instsearch.eval.score_run import format_metrics_table
    from instsearch.eval.evaluator import RetrievalEvaluator, extract_and_score
    from instsearch.eval.visualize import save_result_grid
    from instsearch.eval.metrics import json_ready
    from instsearch.networks.global_model import GlobalDescriptorModel
    from instsearch.lightning_cli import lightning_cli

    start = time.perf_counter()
    out: Path = args.out.resolve()
    data = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    bench_path = data / "benchmark.json"
    if not bench_path.is_file():
        print(f"[1/5] generating the {args.preset} synthetic benchmark in {data}")
        generate(data, preset=args.preset, seed=args.seed)
    else:
        print(f"[1/5] reusing the synthetic benchmark in {data}")
    num_classes = len(json.loads((data / "train.json").read_text())["categories"]) + 1

    cli_args = build_args(out, data, args.accelerator, args.epochs, args.seed, num_classes, args.num_workers,
                          wandb=args.wandb)
    cli = lightning_cli(cli_args, run=False)
    (out / "config.yaml").write_text(cli.parser.dump(cli.config, skip_none=False))
    model, trainer, datamodule = cli.model, cli.trainer, cli.datamodule
    benchmark = datamodule.load_benchmark()
    device = torch.device("cuda" if trainer.strategy.root_device.type == "cuda" else "cpu")

    print("[2/5] evaluating the untrained model")
    torch.manual_seed(args.seed)
    model.to(device)
    untrained = extract_and_score(model, datamodule.benchmark_dataloaders(), model.make_evaluator(benchmark),
                         step=model.search_step, desc="untrained")
    print(f"[3/5] training for {args.epochs} epochs on {trainer.strategy.root_device}")
    trainer.fit(model, datamodule=datamodule)
    print("[4/5] evaluating the trained model and the whole-image GeM baseline")
    cb = next(c for c in trainer.callbacks if isinstance(c, RetrievalEvaluation))
    trained = cb.last_result
    # same trained backbone and image preprocessing, whole-image GeM descriptor
    gem = GlobalDescriptorModel.from_detector(model.net, layer="conv5", pooling="gem").to(device)
    global_gem = extract_and_score(gem, datamodule.benchmark_dataloaders(),
                          RetrievalEvaluator(benchmark, model.retrieval, method="global_gem", device=device),
                          desc="global GeM")

    rows = {"untrained": untrained.metrics, "trained": trained.metrics, "global_gem": global_gem.metrics}
    (out / "metrics.json").write_text(json.dumps(json_ready(rows), indent=1) + "\n")
    trained.run.method = "deep_region_cnn"
    trained.run.save(out / "run.json")
    save_result_grid(out / "results.png", benchmark, trained.run, num_queries=6)
    print("[5/5] done in {:.0f} s".format(time.perf_counter() - start))
    print(format_metrics_table(rows))
    for name in ("metrics.json", "results.png", "config.yaml", "run.json", "checkpoints/last.ckpt"):
        print(f"  {out / name}")
    return 0
