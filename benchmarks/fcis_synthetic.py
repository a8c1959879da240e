"""FCIS+XD on the synthetic benchmark: does training help, and do conv3+conv4 instance features
beat a single layer and a whole-image descriptor of the same network (the claim of Zhan & Zhao's
FCIS+XD paper, Fig. 4/5)?

1. untrained model: box / mask AP@0.5 on the synthetic val set, retrieval mAP on the benchmark;
2. training (SGD, warm-up, step decay; the settings of ``configs/fcis_xd_synthetic.yaml``);
3. trained model: box / mask AP, and retrieval with conv3+conv4 (the paper's feature), conv4 alone,
   whole-image GeM over conv4 of the same backbone, and conv3+conv4 with category pruning, with the
   search time of pruned and unpruned search on the same features.

    python benchmarks/fcis_synthetic.py --out runs/fcis_synthetic --epochs 6
    python benchmarks/fcis_synthetic.py --arch resnext50_32x4d   # shallower, for a 2-core CPU
    python benchmarks/fcis_synthetic.py --variant fcis_d --max-minutes 20
    python benchmarks/fcis_synthetic.py --config configs/fcis_xd_small.yaml --epochs 12 --max-minutes 15

The network and the SGD schedule come from ``--config`` (default ``configs/<variant>_synthetic.yaml``);
``--arch`` / ``--no-deformable`` override its backbone, and the table names the backbone actually trained.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from instsearch.config_files import load_config
from instsearch.datamodules.benchmark import benchmark_dataloader
from instsearch.datamodules.synthetic import SyntheticDataModule
from instsearch.console import quiet_framework_noise
from instsearch.eval.callback import RetrievalEvaluation
from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator, extract_and_score
from instsearch.eval.search import RegionIndex, RegionStore
from instsearch.formats import Benchmark
from instsearch.lightning_modules.base import OptimizerConfig
from instsearch.lightning_modules.detector import DetectorModule
from instsearch.networks.fcis import FCIS, VARIANTS
from instsearch.networks.global_model import GlobalDescriptorModel
from instsearch.networks.region_features import RoIFeaturePooler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def validate(module: DetectorModule, dm: SyntheticDataModule, accelerator: str, precision: str) -> dict[str, float]:
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RetrievalEvaluation(progress=False)])
    trainer.validate(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def retrieval(model, bench: Benchmark, prune: bool = False) -> tuple[dict, RetrievalEvaluator]:
    evaluator = RetrievalEvaluator(bench, RetrievalConfig(prune_by_label=prune))
    result = extract_and_score(model, [benchmark_dataloader(bench, batch_size=4)], evaluator, progress=False)
    return result.metrics, evaluator


def search_time(evaluator: RetrievalEvaluator, prune: bool, repeats: int = 50) -> float:
    ids = [i for i in evaluator.benchmark.database if i in evaluator.database]
    index = RegionIndex(RegionStore.from_regions(ids, [evaluator.database[i] for i in ids]))
    qids = list(evaluator.queries)
    q = torch.stack([evaluator.queries[i].feature for i in qids]).numpy()
    labels = np.array([evaluator.queries[i].label for i in qids]) if prune else None
    start = time.perf_counter()
    for _ in range(repeats):
        index.search(q, query_labels=labels, prune_by_label=prune)
    return (time.perf_counter() - start) / repeats / len(qids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/fcis_synthetic"))
    p.add_argument("--data", type=Path, default=None, help="synthetic benchmark folder (generated if missing)")
    p.add_argument("--variant", default="fcis_xd", choices=sorted(VARIANTS),
                   help="paper network; its configs/<variant>_synthetic.yaml gives the head settings")
    p.add_argument("--config", type=Path, default=None,
                   help="FCIS config whose network and optimiser settings are used (default: the variant's)")
    p.add_argument("--arch", default=None, help="backbone override, e.g. resnext50_32x4d (default: the variant's)")
    p.add_argument("--no-deformable", action="store_true", help="plain res5 even for a deformable variant")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    p.add_argument("--low-thresh", type=float, default=0.05,
                   help="extra conv3+conv4 row with search regions down to this detection score, since a "
                        "briefly trained detector rarely reaches the config's region_score_thresh")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on a GPU")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this long (then validate); the table reports the epochs reached")
    a = p.parse_args()
    quiet_framework_noise()
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    data = a.data or a.out / "data"
    a.out.mkdir(parents=True, exist_ok=True)
    dm = SyntheticDataModule(root=data, batch_size=a.batch_size, num_workers=0, seed=a.seed)
    dm.prepare_data()
    bench = Benchmark.load(data / "benchmark.json")
    config = load_config(a.config or CONFIGS / f"{a.variant}_synthetic.yaml")
    net_args = config["model"]["init_args"]["net"]["init_args"]
    net_args.update(num_classes=dm.num_classes)
    if a.arch:
        net_args["backbone"] = a.arch
    if a.no_deformable:
        net_args["deformable"] = False
    arch, deformable = net_args["backbone"], net_args["deformable"]
    pl.seed_everything(a.seed)
    # the config's SGD schedule, its step-decay epochs scaled to the shorter run
    optim = dict(config["model"]["init_args"]["optim"])
    scale = a.epochs / config["trainer"]["max_epochs"]
    optim["milestones"] = sorted({max(1, round(m * scale)) for m in optim.get("milestones", [])})
    if a.lr is not None:
        optim["lr"] = a.lr
    module = DetectorModule(FCIS(**net_args), optim=OptimizerConfig(**optim),
                        retrieval=RetrievalConfig(grid_queries=0))
    tag = ("X" if arch.startswith("resnext") else "") + ("D" if deformable else "")
    name = f"FCIS{'+' + tag if tag else ''} on {arch}"
    if arch != VARIANTS[a.variant][0]:
        name += f" (smaller stand-in for {a.variant}'s {VARIANTS[a.variant][0]})"
    print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f} M parameters")
    rows: dict[str, dict] = {"untrained": validate(module, dm, a.accelerator, a.precision)}
    print("untrained:", {k: round(v, 4) for k, v in rows["untrained"].items() if "AP@0.5" in k or "mAP@all" in k})

    logger = pl.loggers.CSVLogger(a.out, name="logs")
    max_time = None if a.max_minutes is None else {"seconds": int(60 * a.max_minutes)}
    trainer = pl.Trainer(accelerator=a.accelerator, devices=1, precision=a.precision, max_epochs=a.epochs, max_time=max_time, logger=logger,
                         enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                         gradient_clip_val=10.0, log_every_n_steps=5)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    # validate once after training, whether it ran all epochs or stopped at --max-minutes
    rows["trained"] = validate(module, dm, a.accelerator, a.precision)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        losses = [(int(r["epoch"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
    first = np.mean([l for e, l in losses if e == 0])
    last_epoch = max(e for e, _ in losses)
    last = np.mean([l for e, l in losses if e == last_epoch])
    # an epoch cut short by --max-minutes still counts in the loss curve, so say it was partial
    done = trainer.global_step / max(trainer.num_training_batches, 1)
    epochs_run = a.epochs if done >= a.epochs else f"{done:.1f} (time limit)"

    net = module.net.cpu().eval()
    variants = {}
    variants["conv3+conv4"], ev = retrieval(net, bench)
    variants["conv3+conv4, category pruning"], ev_pruned = retrieval(net, bench, prune=True)
    t_flat, t_pruned = search_time(ev, prune=False), search_time(ev_pruned, prune=True)
    pooler = net.pooler
    net.pooler = RoIFeaturePooler(["conv4"], pooling="max")
    variants["conv4"], _ = retrieval(net, bench)
    net.pooler = pooler
    variants["whole-image GeM (conv4)"], _ = retrieval(GlobalDescriptorModel.from_detector(net, layer="conv4", pooling="gem"), bench)
    thresh = net.region_score_thresh
    net.region_score_thresh = a.low_thresh
    low = f"conv3+conv4, regions scoring >= {a.low_thresh:g}"
    variants[low], ev_low = retrieval(net, bench)
    variants[f"{low}, category pruning"], ev_low_pruned = retrieval(net, bench, prune=True)
    # timing on the larger store too: with one region per image both searches are too small to differ
    t_low_flat, t_low_pruned = search_time(ev_low, prune=False), search_time(ev_low_pruned, prune=True)
    net.region_score_thresh = thresh
    torch.save(net.state_dict(), a.out / "fcis_trained.pt")
    # pruning can only change a ranking when the classifier spreads its predictions over categories
    db_labels = torch.cat([r.labels for r in ev_pruned.database.values() if len(r)]).unique().tolist()
    q_labels = sorted({int(q.label) for q in ev_pruned.queries.values()})

    table = [f"| {name}, synthetic tiny, {a.accelerator.upper()} ({a.threads} threads, {a.precision}), {epochs_run} epochs in {train_s / 60:.1f} min | value |",
             "|---|---|",
             f"| SGD lr {optim['lr']:g}, warm-up {optim.get('warmup_steps', 100)} steps, decay at epochs "
             f"{optim['milestones']}, batch {a.batch_size}, {trainer.global_step} steps | |",
             f"| train loss, epoch 1 → {last_epoch + 1} (mean) | {first:.3f} → {last:.3f} |"]
    for tag in ("box", "mask"):
        table.append(f"| {tag} AP@0.5 untrained → trained | {rows['untrained'].get(f'val/{tag}_AP@0.5', float('nan')):.4f}"
                     f" → {rows['trained'].get(f'val/{tag}_AP@0.5', float('nan')):.4f} |")
    table.append(f"| retrieval mAP@all untrained (conv3+conv4) | {rows['untrained']['retrieval/mAP@all']:.4f} |")
    for k, m in variants.items():
        table.append(f"| retrieval mAP@all / mAP@10, trained, {k} ({m['regions_per_image']:.1f} regions/image) "
                     f"| {m['mAP@all']:.4f} / {m['mAP@10']:.4f} |")
    table.append(f"| predicted categories, queries / database regions | {q_labels} / {db_labels} |")
    for tag, (tf, tp), evx in (("", (t_flat, t_pruned), ev), (f", regions scoring >= {a.low_thresh:g}",
                                                             (t_low_flat, t_low_pruned), ev_low)):
        n = sum(len(r) for r in evx.database.values())
        table.append(f"| search time per query, unpruned → pruned ({n} database regions{tag}) "
                     f"| {1e3 * tf:.3f} ms → {1e3 * tp:.3f} ms (×{tf / max(tp, 1e-12):.2f}) |")
    table.append(f"| wall time | {(time.perf_counter() - start) / 60:.1f} min |")
    print("\n".join(table))
    (a.out / "fcis_synthetic.json").write_text(json.dumps(
        {"model": name, "epochs": epochs_run, "optim": optim, "steps": trainer.global_step,
         "predicted_categories": {"queries": q_labels, "database": db_labels}, "train_seconds": train_s, "loss_first_epoch": first,
         "loss_last_epoch": last, "untrained": rows["untrained"], "trained": rows["trained"],
         "variants": variants, "search_ms_per_query": {"unpruned": 1e3 * t_flat, "pruned": 1e3 * t_pruned,
                                 "low_thresh_unpruned": 1e3 * t_low_flat, "low_thresh_pruned": 1e3 * t_low_pruned}},
        indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
