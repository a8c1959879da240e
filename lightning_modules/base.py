"""The thin LightningModule every instsearch method shares.

A subclass builds ``self.net`` (a plain ``nn.Module`` implementing
:class:`~instsearch.structures.RegionSearchModel` whose ``forward(images, targets)`` returns a
loss dict in training and detections in eval mode, as torchvision's detectors do) and nothing
else is method-specific: optimisation, detection AP on the validation set, and retrieval
evaluation live here. Retrieval settings are ``self.retrieval`` (a
:class:`~instsearch.eval.evaluator.RetrievalConfig`, saved in the checkpoint); :meth:`search_step`
runs the network on a benchmark batch for ``instsearch test``, ``predict``, the per-epoch
callback and the demo alike, and the evaluator only scores what it returns.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from instsearch.eval.callback import benchmark_of, publish
from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator
from instsearch.eval.extraction import SearchBatch, extract_batch
from instsearch.eval.searchers import Searcher, searcher_from_factory
from instsearch.seeding import StepSeeding


#: COCO's IoU thresholds .50:.05:.95 (they include the 0.5 and 0.7 that FCIS reports).
COCO_IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
#: Single-threshold APs logged next to AP@[.5:.95] (FCIS: mAP^r@0.5 and @0.7).
AP_THRESHOLDS = (0.5, 0.7)


def ap_at_threshold(precision: torch.Tensor, iou_thresholds: list[float], threshold: float) -> torch.Tensor:
    """COCO AP at one IoU threshold from COCOeval's precision array ``(T, R, K, A, M)``.

    As ``COCOeval.summarize``: area range "all" (index 0), the largest max-detections setting
    (last index), mean over recall thresholds and classes of the defined (> -1) entries; -1 when
    nothing is defined (no ground truth).
    """
    index = min(range(len(iou_thresholds)), key=lambda i: abs(iou_thresholds[i] - threshold))
    if abs(iou_thresholds[index] - threshold) > 1e-6:
        raise ValueError(f"IoU threshold {threshold} is not among the evaluated {iou_thresholds}")
    p = precision[index, :, :, 0, -1]
    defined = p[p > -1]
    return defined.mean().float() if defined.numel() else torch.tensor(-1.0)


@dataclass
class OptimizerConfig:
    """SGD with linear warm-up and step decay, the schedule of the detection papers."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    milestones: list[int] = field(default_factory=list)  # epochs at which lr *= gamma
    gamma: float = 0.1


# A module built in Python (not through LightningCLI, which stores plain dicts) keeps these
# dataclasses in its hyper-parameters; resuming loads the checkpoint with ``weights_only=True``,
# which accepts them only when allow-listed.
torch.serialization.add_safe_globals([OptimizerConfig, RetrievalConfig])


class RegionSearchModule(pl.LightningModule):
    net: nn.Module
    #: COCO AP computed on the validation set ("bbox", "segm"); empty: none (a training-free,
    #: class-agnostic method has no detections to score against category ground truth)
    box_iou_types: Sequence[str] = ("bbox",)

    def __init__(self, optim: Optional[OptimizerConfig] = None, retrieval: Optional[RetrievalConfig] = None):
        super().__init__()
        self.optim = optim or OptimizerConfig()
        self.retrieval = retrieval or RetrievalConfig()
        self._evaluator: Optional[RetrievalEvaluator] = None
        self._val_map = None

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None):
        return self.net(images, targets)

    # ------------------------------------------------------------ retrieval: run the network
    def search_step(self, batch: tuple[list, list]) -> SearchBatch:
        """The network on one benchmark batch: regions of database images, features of query boxes."""
        images, metas = batch
        return extract_batch(self.net, images, metas, with_labels=self.retrieval.prune_by_label, device=self.device)

    def make_searcher(self, dim: int) -> Searcher:
        """The engine the database is searched with (:mod:`instsearch.eval.searchers`): the retrieval
        settings' ``index_factory`` (``Flat``: exact inner product on this module's device). A method
        whose model brings its own index (a product quantiser) overrides it."""
        return searcher_from_factory(self.retrieval.index_factory, dim, device=self.device)

    @property
    def method_name(self) -> str:
        """The run's ``method``: the network's class (``FCIS``, ``DeepRegionCNN``, ``CLAID``, ...),
        which says more than the module's."""
        return type(self.net).__name__ if isinstance(getattr(self, "net", None), nn.Module) else type(self).__name__

    def make_evaluator(self, benchmark) -> RetrievalEvaluator:
        return RetrievalEvaluator(benchmark, self.retrieval, method=self.method_name, device=self.device,
                                  make_searcher=self.make_searcher)

    # ------------------------------------------------------------ training
    def configure_callbacks(self) -> list[pl.Callback]:
        """Every fit reseeds the global generators per step from ``seed_everything``'s seed, so that a
        resumed run repeats the uninterrupted one (docs/resuming.md)."""
        return [StepSeeding()]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.net(list(images), list(targets))
        loss = sum(losses.values())
        batch_size = len(images)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    def on_fit_start(self) -> None:
        dm_classes = getattr(self.trainer.datamodule, "num_classes", None)
        net_classes = getattr(self.net, "num_classes", None)
        if dm_classes is not None and net_classes is not None and dm_classes != net_classes:
            raise ValueError(f"the data has {dm_classes} classes (background included) but {type(self.net).__name__} "
                             f"predicts {net_classes}: set model.net.init_args.num_classes={dm_classes}")
        if not self.net.training:
            # Lightning keeps each module's mode; its own "modules in eval mode" warning is silenced
            # (instsearch.console) because frozen backbone stages are in eval mode on purpose.
            raise RuntimeError(f"{type(self.net).__name__} is in eval mode at the start of training: it would return "
                               "detections instead of losses; call .train() on the network (or the module) first")

    def on_validation_epoch_start(self) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        if not self.box_iou_types:  # a method without detection ground truth (class-agnostic regions)
            return
        if self._val_map is None:
            # extended_summary exposes COCOeval's precision array, from which AP@0.7 is read
            # (torchmetrics itself reports only AP@0.5 and AP@0.75 besides AP@[.5:.95]).
            self._val_map = MeanAveragePrecision(iou_type=list(self.box_iou_types), iou_thresholds=COCO_IOU_THRESHOLDS,
                                                 extended_summary=True, backend="pycocotools")
        self._val_map.to(self.device)
        self._val_map.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        if self._val_map is None:
            return
        images, targets = batch
        detections = self.net(list(images))
        preds = [{k: v for k, v in d.items() if k in ("boxes", "scores", "labels", "masks")} for d in detections]
        if "segm" in self.box_iou_types:
            for p in preds:
                p["masks"] = p["masks"].squeeze(1) > 0.5
        gts = []
        for t in targets:
            g = {"boxes": t["boxes"], "labels": t["labels"]}
            if "iscrowd" in t:
                g["iscrowd"] = t["iscrowd"]
            if "segm" in self.box_iou_types:
                g["masks"] = t["masks"].bool()
            gts.append(g)
        self._val_map.update(preds, gts)

    def on_validation_epoch_end(self) -> None:
        """COCO box (and mask) AP: ``val/{box,mask}_AP@0.5``, ``@0.7`` and ``_AP`` (IoU .5:.95)."""
        if self._val_map is None:
            return
        if self.trainer.sanity_checking:
            self._val_map.reset()
            return
        result = self._val_map.compute()
        metrics = {}
        for iou_type in self.box_iou_types:
            key = "" if len(self.box_iou_types) == 1 else f"{iou_type}_"
            tag = "box" if iou_type == "bbox" else "mask"
            for t in AP_THRESHOLDS:
                metrics[f"val/{tag}_AP@{t}"] = ap_at_threshold(result[f"{key}precision"], COCO_IOU_THRESHOLDS, t)
            metrics[f"val/{tag}_AP"] = result[f"{key}map"]
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()},
                      sync_dist=False, batch_size=1)
        self._val_map.reset()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        o = self.optim
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        steps_per_epoch = max(1, math.ceil(self.trainer.estimated_stepping_batches / max(self.trainer.max_epochs or 1, 1)))
        milestones = [m * steps_per_epoch for m in o.milestones]

        def factor(step: int) -> float:
            warm = 1.0
            if step < o.warmup_steps:
                alpha = step / max(o.warmup_steps, 1)
                warm = o.warmup_factor * (1 - alpha) + alpha
            return warm * o.gamma ** sum(step >= m for m in milestones)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ instsearch test / predict
    def on_test_epoch_start(self) -> None:
        benchmark = benchmark_of(self.trainer, required=True)
        if not benchmark.queries:  # refused before the database is extracted for nothing
            path = getattr(self.trainer.datamodule, "benchmark", None)
            raise ValueError(f"benchmark {benchmark.name!r}{f' ({path})' if path else ''} has no queries (a "
                             f"database-only collection): `instsearch test` scores queries. Extract its regions "
                             f"with `instsearch predict`, or add queries with `instsearch convert folder "
                             f"--queries queries.txt` ('<path> x1 y1 x2 y2' per line)")
        self._evaluator = self.make_evaluator(benchmark)
        self._test_started = time.perf_counter()

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluator.process(self.search_step(batch))
        self._show_progress_metrics()

    def _network_metrics(self) -> dict[str, float]:
        """A network's running cost figures (``progress_metrics()``, e.g. DASR's peaks and seconds
        per image, CLAID's cuts per image); empty for a network without them."""
        metrics = getattr(getattr(self, "net", None), "progress_metrics", None)
        return {k: float(v) for k, v in metrics().items()} if callable(metrics) else {}

    def _show_progress_metrics(self) -> None:
        """The network's running figures in the progress bar, not in the logs (``costs.json``
        gets their final values)."""
        for name, value in self._network_metrics().items():
            self.log(name, value, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def on_test_epoch_end(self) -> None:
        extraction_s = time.perf_counter() - self._test_started
        items = len(self._evaluator.queries) + len(self._evaluator.collection)
        result = self._evaluator.compute()
        if result is not None:  # this process's extraction: every process runs as fast under DDP
            result.costs.update({"extraction_s": round(extraction_s, 3),  # rank 0's images and queries
                                 "extraction_items_per_s": round(items / max(extraction_s, 1e-9), 2)})
            network = self._network_metrics()
            if network:  # the network's own running figures over rank 0's images (e.g. CLAID's cuts)
                result.costs["network"] = network
        self.test_result = result
        written = publish(self.trainer, self, self._evaluator.benchmark, result, prefix="test/",
                          grid_queries=self.retrieval.grid_queries, write_files=True)
        if self.trainer.is_global_zero:
            from instsearch.eval.score_run import format_metrics_table

            print(format_metrics_table({"test": result.metrics}))
            for name in ("run", "metrics", "grid"):
                if name in written:
                    print(f"{name}: {written[name]}")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> SearchBatch:
        """What ``test_step`` extracts: each database image's regions (original pixels, with
        features), each query box's feature, the undecodable items (``instsearch extract`` writes
        it to region shards)."""
        return self.search_step(batch)
