"""Retrieval evaluation during training: mAP@k, mIoU and detector recall@IoU every epoch.

At the end of each validation epoch the callback extracts the benchmark's database and query
features with the current model (each rank a disjoint shard), gathers them, searches, and logs
the metrics and a result grid to every attached logger. ``instsearch test`` reaches the same
numbers through :meth:`RegionSearchModule.test_step`, and both publish through :func:`publish`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from instsearch.datamodules.benchmark import benchmark_dataloader, distractor_dataloaders
from instsearch.eval.evaluator import EvaluationResult, RetrievalEvaluator, run_evaluation
from instsearch.eval.visualize import result_grid
from instsearch.formats import Benchmark

log = logging.getLogger(__name__)


def resolve_benchmark(trainer: pl.Trainer, override: Optional[str] = None) -> Optional[Benchmark]:
    path = override or getattr(trainer.datamodule, "benchmark", None)
    if path is None:
        return None
    return path if isinstance(path, Benchmark) else Benchmark.load(path)


def publish(trainer: pl.Trainer, pl_module: pl.LightningModule, benchmark: Benchmark, result: EvaluationResult,
            prefix: str, grid_queries: int = 4, write_files: bool = False) -> dict[str, Path]:
    """Log scalar metrics and the result grid to every logger; optionally write run/metrics JSON."""
    scalars = {f"{prefix}{k}": float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    pl_module.log_dict(scalars, sync_dist=False, on_epoch=True, prog_bar=False, batch_size=1)
    written: dict[str, Path] = {}
    # trainer.log_dir broadcasts from rank 0: every rank must ask for it, or DDP deadlocks.
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    if not trainer.is_global_zero:
        return written
    grid = result_grid(benchmark, result.run, num_queries=grid_queries) if grid_queries else None
    for logger in trainer.loggers:
        if grid is not None and isinstance(logger, WandbLogger):
            logger.log_image(key=f"{prefix}results", images=[grid], step=trainer.global_step,
                             caption=["query | top-5 (green = true, red = false)"])
    if grid is not None:
        written["grid"] = log_dir / f"{prefix.strip('/').replace('/', '_') or 'results'}_results.png"
        written["grid"].parent.mkdir(parents=True, exist_ok=True)
        grid.save(written["grid"])
    if write_files:
        log_dir.mkdir(parents=True, exist_ok=True)
        written["run"] = result.run.save(log_dir / "run.json")
        written["metrics"] = log_dir / "metrics.json"
        written["metrics"].write_text(json.dumps(result.metrics, indent=1) + "\n")
        curve = log_dir / "recall_iou.json"
        curve.write_text(json.dumps(result.recall_curve) + "\n")
        if result.bad_images:
            written["bad_images"] = log_dir / "bad_images.json"
            written["bad_images"].write_text(json.dumps(result.bad_images, indent=1) + "\n")
    return written


class RetrievalEvaluation(pl.Callback):
    """Evaluate instance search on the DataModule's ``benchmark`` at the end of validation epochs."""

    def __init__(self, benchmark: Optional[str] = None, every_n_epochs: int = 1, batch_size: int = 4,
                 num_workers: int = 0, max_side: Optional[int] = 1600, normalization: str = "relevant",
                 protocol: str = "standard", regions_per_image: Optional[int] = None, prune_by_label: bool = False,
                 grid_queries: int = 4, prefix: str = "retrieval/", progress: bool = True):
        self.benchmark = benchmark
        self.every_n_epochs = every_n_epochs
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_side = max_side
        self.normalization = normalization
        self.protocol = protocol
        self.regions_per_image = regions_per_image
        self.prune_by_label = prune_by_label
        self.grid_queries = grid_queries
        self.prefix = prefix
        self.progress = progress
        self.last_result: Optional[EvaluationResult] = None
        self._warned = False

    def evaluator_for(self, benchmark: Benchmark, method: str) -> RetrievalEvaluator:
        return RetrievalEvaluator(benchmark, method=method, normalization=self.normalization, protocol=self.protocol,
                                  regions_per_image=self.regions_per_image, prune_by_label=self.prune_by_label)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[EvaluationResult]:
        benchmark = resolve_benchmark(trainer, self.benchmark)
        if benchmark is None:
            if not self._warned:
                rank_zero_info("RetrievalEvaluation: the DataModule has no `benchmark`; retrieval metrics are skipped")
                self._warned = True
            return None
        world, rank = trainer.world_size, trainer.global_rank
        num_items = len(benchmark.database) + len(benchmark.queries)
        loader = benchmark_dataloader(benchmark, "all", self.batch_size, self.num_workers, self.max_side,
                                      indices=list(range(rank, num_items, world)))
        loaders = [loader, *distractor_dataloaders(benchmark, self.batch_size, self.num_workers, self.max_side,
                                                   rank=rank, world_size=world)]
        evaluator = self.evaluator_for(benchmark, type(pl_module).__name__)
        return run_evaluation(pl_module, loaders, evaluator, progress=self.progress and trainer.is_global_zero)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        result = self.evaluate(trainer, pl_module)
        if result is None:
            return
        self.last_result = result
        publish(trainer, pl_module, resolve_benchmark(trainer, self.benchmark), result, self.prefix, self.grid_queries)
        m = result.metrics
        rank_zero_info(f"epoch {trainer.current_epoch}: retrieval mAP@all={m['mAP@all']:.4f} "
                       f"mAP@10={m['mAP@10']:.4f} mIoU={m['mIoU']:.4f}")

    def state_dict(self) -> dict[str, Any]:
        return {}
