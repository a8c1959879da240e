"""Retrieval evaluation of any :class:`~instsearch.structures.RegionSearchModel` on a benchmark.

One code path serves the per-epoch callback, ``instsearch test`` and the demo:
``update`` extracts regions (database items) or box features (query items) batch by batch,
``compute`` gathers them across ranks, builds the region index, searches, and scores the run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from instsearch.datamodules.image_io import BadImageReport
from instsearch.eval.metrics import recall_at_iou, retrieval_metrics
from instsearch.eval.search import RegionIndex, RegionStore
from instsearch.formats import Benchmark, Run
from instsearch.structures import ImageMeta, Regions

log = logging.getLogger(__name__)

RECALL_THRESHOLDS = np.round(np.linspace(0.1, 0.9, 9), 2)


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    run: Run
    recall_curve: dict[str, list[float]]
    bad_images: list[dict] = field(default_factory=list)
    num_regions: int = 0


class RetrievalEvaluator:
    """Accumulates extracted regions, then searches and computes the metrics of design.md §4.

    ``regions_per_image`` caps the regions kept per database image (their highest scores); the
    model's own cap applies first. ``prune_by_label`` compares a query only with regions of its
    predicted category (needs ``classify_boxes`` on the model and labels on the regions).
    """

    def __init__(self, benchmark: Benchmark, method: str = "regions", normalization: str = "relevant",
                 protocol: str = "standard", regions_per_image: Optional[int] = None,
                 prune_by_label: bool = False, index_factory: str = "Flat", ranking_depth: Optional[int] = None):
        self.benchmark = benchmark
        self.method = method
        self.normalization = normalization
        self.protocol = protocol
        self.regions_per_image = regions_per_image
        self.prune_by_label = prune_by_label
        self.index_factory = index_factory
        self.ranking_depth = ranking_depth
        self.reset()

    def reset(self) -> None:
        self.database: dict[str, Regions] = {}
        self.queries: dict[str, tuple[torch.Tensor, Optional[int]]] = {}
        self.report = BadImageReport()

    # ------------------------------------------------------------------ extraction
    @torch.no_grad()
    def update(self, model: Any, images: Sequence[Optional[torch.Tensor]], metas: Sequence[ImageMeta]) -> None:
        device = _device_of(model)
        db = [(im, m) for im, m in zip(images, metas) if im is not None and m.query_id is None]
        qs = [(im, m) for im, m in zip(images, metas) if im is not None and m.query_id is not None]
        for im, m in zip(images, metas):
            if im is None:
                self.report.entries.append({"path": m.extra.get("path"), "image": m.image_id,
                                            "query": m.query_id, "reason": m.extra.get("error")})
        if db:
            regions = model.detect_regions([im.to(device) for im, _ in db])
            for r, (_, m) in zip(regions, db):
                r = r.detach_cpu()
                if self.regions_per_image is not None and len(r) > self.regions_per_image:
                    r = r.top_k(self.regions_per_image)
                if m.scale != 1.0:
                    r.boxes = r.boxes / m.scale
                self.database[m.image_id] = r
        if qs:
            boxes = [torch.tensor([m.query_box], dtype=torch.float32, device=device) * m.scale for _, m in qs]
            query_images = [im.to(device) for im, _ in qs]
            features = model.describe_boxes(query_images, boxes)
            labels: list[Optional[int]] = [None] * len(qs)
            if self.prune_by_label:
                if not hasattr(model, "classify_boxes"):
                    raise TypeError(f"{type(model).__name__} predicts no categories: category pruning needs classify_boxes")
                labels = [int(lbl[0]) for lbl in model.classify_boxes(query_images, boxes)]
            for f, lbl, (_, m) in zip(features, labels, qs):
                self.queries[m.query_id] = (f[0].detach().cpu(), lbl)

    # ------------------------------------------------------------------ scoring
    def gather(self) -> None:
        """Merge every rank's extractions (duplicates from padded samplers collapse by id)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.database, self.queries, self.report.entries))
        self.database, self.queries, entries = {}, {}, []
        for database, queries, bad in parts:
            self.database.update(database)
            self.queries.update(queries)
            entries.extend(e for e in bad if e not in entries)
        self.report.entries = entries

    def compute(self, gather: bool = True) -> EvaluationResult:
        if gather:
            self.gather()
        bench = self.benchmark
        image_ids = [i for i in bench.database if i in self.database]
        if bench.distractors:
            listed = set(bench.database)
            image_ids += sorted(i for i in self.database if i not in listed and bench.is_distractor(i))
        store = RegionStore.from_regions(image_ids, [self.database[i] for i in image_ids])
        index = RegionIndex(store, index_factory=self.index_factory)
        query_ids = [q.id for q in bench.queries if q.id in self.queries]
        if query_ids:
            features = torch.stack([self.queries[q][0] for q in query_ids]).numpy()
            labels = [self.queries[q][1] for q in query_ids] if self.prune_by_label else None
            rankings = index.search(features, top_images=self.ranking_depth, query_labels=labels,
                                    prune_by_label=self.prune_by_label)
        else:
            rankings = []
        run = index.to_run(query_ids, rankings, method=self.method)
        metrics = retrieval_metrics(bench, run, normalization=self.normalization, protocol=self.protocol)
        curve = self.detector_recall()
        for t, r in zip(curve["thresholds"], curve["recall"]):
            if round(t, 2) in (0.5, 0.7):
                metrics[f"recall@IoU{t:.1f}"] = float(r)
        metrics["regions_per_image"] = float(len(store) / max(len(image_ids), 1))
        if len(self.report):
            metrics["bad_images"] = len(self.report)
        return EvaluationResult(metrics=metrics, run=run, recall_curve=curve, bad_images=list(self.report.entries),
                                num_regions=len(store))

    def detector_recall(self, thresholds: Sequence[float] = RECALL_THRESHOLDS) -> dict[str, list[float]]:
        """Share of ground-truth instance boxes in database images covered by a region (IoU ≥ t)."""
        gt: dict[str, set[tuple[float, ...]]] = {}
        for g in self.benchmark.ground_truth.values():
            for image_id, boxes in g.positives.items():
                if image_id in self.database:
                    gt.setdefault(image_id, set()).update(tuple(b) for b in boxes)
        ids = sorted(i for i in gt if gt[i])
        if not ids:
            return {"thresholds": [float(t) for t in thresholds], "recall": [0.0 for _ in thresholds]}
        out = recall_at_iou([torch.tensor(sorted(gt[i]), dtype=torch.float32) for i in ids],
                            [self.database[i].boxes for i in ids], thresholds=np.asarray(thresholds))
        return {"thresholds": [float(t) for t in out["thresholds"]], "recall": [float(r) for r in out["recall"]]}


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def run_evaluation(model: Any, loader, evaluator: RetrievalEvaluator, progress: bool = True,
                   desc: str = "retrieval evaluation") -> EvaluationResult:
    """Extract everything ``loader`` (or each loader of a list) serves with ``model`` (eval mode,
    no grad), then compute."""
    from tqdm.auto import tqdm

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    evaluator.reset()
    loaders = loader if isinstance(loader, (list, tuple)) else [loader]
    try:
        for one in loaders:
            for images, metas in tqdm(one, desc=desc, disable=not progress, leave=False):
                evaluator.update(model, images, metas)
    finally:
        if was_training:
            model.train()
    return evaluator.compute()
