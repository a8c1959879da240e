"""Retrieval evaluation during training: mAP@k, mIoU and detector recall@IoU every epoch.

At the end of each validation epoch the callback runs the module's own
:meth:`~instsearch.lightning_modules.base.RegionSearchModule.search_step` over the DataModule's
benchmark loaders (each rank a disjoint shard), the module's evaluator scores on rank 0, and the
metrics and a result grid go to every attached logger. ``instsearch test`` reaches the same
numbers through the module's ``test_step`` over the same loaders with the same
``model.retrieval`` settings; both publish through :func:`publish`. The callback itself only
decides *when* (``every_n_epochs``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

from instsearch.distributed import broadcast_from_rank0
from instsearch.eval.evaluator import EvaluationResult, extract_and_score
from instsearch.eval.metrics import json_ready, loggable
from instsearch.eval.visualize import result_grid
from instsearch.formats import Benchmark

log = logging.getLogger(__name__)


def benchmark_of(trainer: pl.Trainer, required: bool = False) -> Optional[Benchmark]:
    """The DataModule's benchmark (see :class:`~instsearch.datamodules.benchmark.ServesBenchmark`)."""
    dm = trainer.datamodule
    bench = dm.load_benchmark() if dm is not None and hasattr(dm, "load_benchmark") else None
    if bench is None and required:
        raise ValueError("retrieval evaluation needs a benchmark: pass --data.benchmark path/to/benchmark.json "
                         f"(DataModule: {type(dm).__name__})")
    return bench


def _broadcast_metrics(result: Optional[EvaluationResult]) -> dict[str, float]:
    """Rank 0's defined scalar metrics on every rank: checkpointing and early stopping read them
    everywhere. Undefined ones (NaN: no box to judge) are not logged."""
    return broadcast_from_rank0(loggable(result.metrics) if result else {})


def publish(trainer: pl.Trainer, pl_module: pl.LightningModule, benchmark: Benchmark,
            result: Optional[EvaluationResult], prefix: str, grid_queries: int = 4,
            write_files: bool = False) -> dict[str, Path]:
    """Log scalar metrics (every rank) and the result grid (rank 0) to every logger; optionally
    write ``run.json``, ``metrics.json``, ``costs.json`` (timings and sizes on this machine),
    ``recall_iou.json`` and ``bad_images.json``.

    ``result`` is rank 0's (``None`` on the other ranks).
    """
    scalars = {f"{prefix}{k}": v for k, v in _broadcast_metrics(result).items()}
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
        written["metrics"].write_text(json.dumps(json_ready(result.metrics), indent=1) + "\n")
        if result.costs:
            written["costs"] = log_dir / "costs.json"
            written["costs"].write_text(json.dumps(json_ready(result.costs), indent=1) + "\n")
        curve = log_dir / "recall_iou.json"
        curve.write_text(json.dumps(json_ready(result.recall_curve)) + "\n")
        if result.bad_images:
            written["bad_images"] = log_dir / "bad_images.json"
            written["bad_images"].write_text(json.dumps(result.bad_images, indent=1) + "\n")
    return written


class RetrievalEvaluation(pl.Callback):
    """Evaluate instance search on the DataModule's benchmark at the end of validation epochs.

    How regions are searched and scored is the module's ``retrieval`` config, which loaders serve
    the benchmark is the DataModule's; this callback only says when: every ``every_n_epochs``
    training epochs, at the end of that epoch's validation, or at the end of the training epoch
    when no validation ran.
    """

    def __init__(self, every_n_epochs: int = 1, prefix: str = "retrieval/", progress: bool = True):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.progress = progress
        self.last_result: Optional[EvaluationResult] = None
        self._evaluated_epoch: Optional[int] = None
        self._warned = False

    def run_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 benchmark: Benchmark) -> Optional[EvaluationResult]:
        """Run the module over this rank's shard of ``benchmark``; the result on rank 0 only."""
        loaders = trainer.datamodule.benchmark_dataloaders(rank=trainer.global_rank, world_size=trainer.world_size)
        return extract_and_score(pl_module, loaders, pl_module.make_evaluator(benchmark), step=pl_module.search_step,
                        progress=self.progress and trainer.is_global_zero)

    def _due(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._due(trainer):
            return
        self._evaluate_and_publish(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A due epoch that ran no validation (no validation data, e.g. fine-tuning on Oxford's 55
        query images, or ``check_val_every_n_epoch`` > 1) is evaluated here, after the epoch's
        validation would have run and before checkpoints are saved, so they can monitor it."""
        if self._due(trainer) and self._evaluated_epoch != trainer.current_epoch:
            self._evaluate_and_publish(trainer, pl_module)

    def _evaluate_and_publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluated_epoch = trainer.current_epoch
        benchmark = benchmark_of(trainer)
        if benchmark is None or not benchmark.queries:
            if not self._warned:
                reason = ("the DataModule has no `benchmark`" if benchmark is None else
                          f"benchmark {benchmark.name!r} has no queries (a database-only collection)")
                rank_zero_info(f"RetrievalEvaluation: {reason}; retrieval metrics are skipped")
                self._warned = True
            return
        result = self.run_evaluation(trainer, pl_module, benchmark)
        self.last_result = result
        publish(trainer, pl_module, benchmark, result, self.prefix, pl_module.retrieval.grid_queries)
        if result is not None:
            m = result.metrics
            rank_zero_info(f"epoch {trainer.current_epoch}: retrieval mAP@all={m['mAP@all']:.4f} "
                           f"mAP@10={m['mAP@10']:.4f} mIoU={m['mIoU']:.4f}")

    def state_dict(self) -> dict[str, Any]:
        return {}
