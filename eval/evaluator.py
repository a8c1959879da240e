"""Retrieval evaluation: accumulate what a network produced on a benchmark, then search and score.

One code path serves the per-epoch callback, ``instsearch test`` and the demo. The network runs
elsewhere (:mod:`instsearch.eval.extraction`, called from the LightningModule's step);
:class:`RetrievalEvaluator` only ``process``-es the resulting :class:`SearchBatch` es and
``compute``-s the metrics of docs/metrics.md, as detectron2's ``DatasetEvaluator``.

Under DDP every rank processes a shard; ``compute`` gathers the shards **to rank 0 only**, which
alone builds the index and scores (other ranks get ``None``). Rank 0 then holds every region:
``4·D + 24`` bytes per region (feature, box, score, label), i.e. about 2.1 GB per million
512-D regions, plus a transient copy while the shards are unpickled. Sharded evaluation
(``retrieval.evaluation: sharded``, :mod:`instsearch.eval.sharded`) gathers no region.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from instsearch.distributed import is_distributed, rank_and_world
from instsearch.eval.extraction import QueryFeature, RegionCollection, SearchBatch, Step, extract
from instsearch.eval.metrics import recall_at_iou, retrieval_metrics
from instsearch.eval.search import RegionIndex
from instsearch.eval.searchers import ExactInnerProductSearcher, Searcher, searcher_bytes, searcher_from_factory
from instsearch.eval.whitening import PCAWhitening
from instsearch.formats import Benchmark, Run
from instsearch.structures import Regions

if TYPE_CHECKING:
    from instsearch.eval.sharded import SpilledCollection

log = logging.getLogger(__name__)

RECALL_THRESHOLDS = np.round(np.linspace(0.1, 0.9, 9), 2)
EVALUATION_MODES = ("auto", "gather", "sharded")
#: above this many database images, ``evaluation: auto`` evaluates sharded under DDP (rank 0 would
#: otherwise hold 4·D + 24 bytes for each of their regions)
SHARD_ABOVE_IMAGES = 100_000


@dataclass
class RetrievalConfig:
    """How a model's regions are searched and scored: the one source of these settings.

    The LightningModule holds it (``--model.retrieval.*``, saved in every checkpoint), so the
    per-epoch callback, ``instsearch test`` and the demo score a model the same way.

    Attributes:
        normalization: AP normalisation, ``relevant`` | ``min`` | ``retrieved`` (docs/metrics.md).
        protocol: ``standard`` or ``oxford`` (trapezoid AP of the official Oxford/Paris code).
        regions_per_image: keep at most this many regions per database image (highest scores).
        prune_by_label: compare a query only with regions of its predicted category (FCIS+XD).
        index_factory: ``Flat`` (exact, torch) or a faiss factory string (``IVF1024,Flat``, ``PQ32``).
        ranking_depth: images ranked per query (``None``: every database image with a region);
            the metrics are those of this ranking.
        run_depth: images per query kept in the written run (``run.json``, the result grid):
            ``None`` keeps the whole ranking. The metrics never depend on it: sharded evaluation
            computes them from the positives' ranks, so at scale ``run_depth`` is what bounds
            rank 0's memory (every process sends it its top ``run_depth`` images per query).
        grid_queries: queries shown in the logged result grid (0: no grid).
        whitening: PCA-whiten every region and query feature before the search (l2 -> whiten ->
            l2, :mod:`instsearch.eval.whitening`): ``False`` (none), ``True`` / ``"pca"`` (fitted on
            this database's region features, the DASR paper's post-processing), or the path of a
            whitening saved by :meth:`~instsearch.eval.whitening.PCAWhitening.save` (fitted on
            another set).
        whitening_dim: keep at most this many whitened dimensions (``None``: every axis with
            non-negligible variance, at most ``min(D, N - 1)`` for ``N`` fitting vectors).
        whitening_shrinkage: weight ``rho`` in ``[0, 1]`` of the mean variance in each whitened
            axis' variance, or ``"auto"`` (Ledoit-Wolf, estimated from the fitting set; see
            :mod:`instsearch.eval.whitening`). ``0`` is the textbook whitening, which maps a set
            of ``N <= D + 1`` vectors it was fitted on onto a simplex (all similarities equal) and
            is refused then. ``whitening_dim`` and ``whitening_shrinkage`` apply when fitting; a
            loaded file keeps what it was fitted with.
        evaluation: ``gather`` (every rank's regions to rank 0, which searches and scores),
            ``sharded`` (every rank searches its own images for every query and rank 0 merges the
            rankings: no process holds every region; a whitening only from a file) or ``auto``
            (sharded under DDP when the database has more than ``SHARD_ABOVE_IMAGES`` images or
            distractor folders, unless the whitening is fitted on it). Both give the same run and
            metrics. ``sharded`` in one process ranks the database the same way (with
            ``spill_dir``: streamed, in bounded memory).
        spill_dir: with sharded evaluation, each process writes its database regions as region
            shards to ``spill_dir/rank-NNNNN`` while the test runs (float32, the rows the
            in-memory path holds) and ranks them by an exact search streamed over the shards,
            instead of keeping them in memory: memory then stays flat in the database size. Needs
            the exact inner-product search (``index_factory: Flat`` and a model that searches
            its features, not codes). The folder is cleared at each evaluation.
    """

    normalization: str = "relevant"
    protocol: str = "standard"
    regions_per_image: Optional[int] = None
    prune_by_label: bool = False
    index_factory: str = "Flat"
    ranking_depth: Optional[int] = None
    grid_queries: int = 4
    whitening: Union[bool, str] = False
    whitening_dim: Optional[int] = None
    whitening_shrinkage: Union[float, str] = "auto"
    evaluation: str = "auto"
    run_depth: Optional[int] = None
    spill_dir: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("ranking_depth", "run_depth"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 image per query or null, got {value}")
        if self.spill_dir is not None and self.evaluation == "gather":
            raise ValueError("spill_dir is used by sharded evaluation; evaluation: gather keeps every region in "
                             "memory on rank 0 (use evaluation: sharded or auto)")
        if self.evaluation not in EVALUATION_MODES:
            raise ValueError(f"evaluation must be one of {', '.join(EVALUATION_MODES)}, got {self.evaluation!r}")
        if self.evaluation == "sharded" and self.fits_whitening:
            raise ValueError("whitening: pca is fitted on the whole database's region features, which sharded "
                             "evaluation never gathers: use evaluation: gather, or a whitening file fitted "
                             "beforehand (instsearch whitening)")
        if self.normalization not in ("relevant", "min", "retrieved"):
            raise ValueError(f"normalization must be relevant, min or retrieved, got {self.normalization!r}")
        if self.protocol not in ("standard", "oxford"):
            raise ValueError(f"protocol must be standard or oxford, got {self.protocol!r}")
        if isinstance(self.whitening, str) and self.whitening != "pca" and not Path(self.whitening).is_file():
            raise ValueError(f"whitening must be true/false, 'pca' or the path of a saved whitening (.npz), got "
                             f"{self.whitening!r} (no such file)")
        if self.whitening_dim is not None and self.whitening_dim < 1:
            raise ValueError(f"whitening_dim must be >= 1 or null, got {self.whitening_dim}")
        from instsearch.eval.whitening import check_shrinkage

        check_shrinkage(self.whitening_shrinkage)

    @property
    def fits_whitening(self) -> bool:
        """Whether the whitening is fitted on the evaluated database itself (not loaded)."""
        return self.whitening is True or self.whitening == "pca"

    def fit_whitening(self, features: np.ndarray) -> Optional[PCAWhitening]:
        """The whitening this config asks for, fitted on the database ``features`` when it is not
        loaded from a file (which must match the features' dimension); ``None`` when whitening
        is off."""
        if self.whitening is False or self.whitening is None:
            return None
        if self.whitening is True or self.whitening == "pca":
            return PCAWhitening.fit(features, dim=self.whitening_dim, shrinkage=self.whitening_shrinkage)
        return PCAWhitening.load(self.whitening, input_dim=np.asarray(features).shape[1])


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    run: Run
    recall_curve: dict[str, list[float]]
    bad_images: list[dict] = field(default_factory=list)
    num_regions: int = 0
    #: what the numbers cost on this machine (``costs.json``, beside ``metrics.json``, which stays
    #: deterministic): seconds to build the index, ms per query of the search, bytes per image
    costs: dict[str, Any] = field(default_factory=dict)


class RetrievalEvaluator:
    """Accumulates :class:`SearchBatch` es, then searches and scores them on rank 0 (or sharded:
    :mod:`instsearch.eval.sharded`)."""

    def __init__(self, benchmark: Benchmark, config: Optional[RetrievalConfig] = None, method: str = "regions",
                 device: torch.device | str = "cpu", make_searcher: Optional[Callable[[int], Searcher]] = None):
        self.benchmark = benchmark
        self.config = config or RetrievalConfig()
        self.method = method
        self.device = device
        #: ``dim -> an empty Searcher`` for the database (the model's choice,
        #: ``RegionSearchModule.make_searcher``); default: ``config.index_factory`` on ``device``
        self.make_searcher = make_searcher or (lambda dim: searcher_from_factory(self.config.index_factory, dim,
                                                                                 device=self.device))
        #: the index of the last :meth:`compute` (rank 0), e.g. to write the encoded database
        self.index: Optional[RegionIndex] = None
        self.searched_queries: Optional[tuple[list[str], np.ndarray]] = None
        self.reset()

    def reset(self) -> None:
        #: what extraction produced on this process: in memory, or spilled to region shards
        #: (``RetrievalConfig.spill_dir``); made on first use, when the process group is known
        self._collection: Optional[Union[RegionCollection, "SpilledCollection"]] = None

    @property
    def collection(self) -> Union[RegionCollection, "SpilledCollection"]:
        if self._collection is None:
            self._collection = self._new_collection()
        return self._collection

    @collection.setter
    def collection(self, value: Union[RegionCollection, "SpilledCollection"]) -> None:
        self._collection = value

    def spills(self) -> bool:
        """Whether this evaluation writes its database regions to ``spill_dir`` (sharded only)."""
        return self.config.spill_dir is not None and self.sharded()

    def _new_collection(self) -> Union[RegionCollection, "SpilledCollection"]:
        cfg = self.config
        if not self.spills():
            return RegionCollection(regions_per_image=cfg.regions_per_image)
        from instsearch.eval.sharded import SpilledCollection

        probe = self.make_searcher(1)
        if not isinstance(probe, ExactInnerProductSearcher):
            raise ValueError(f"spill_dir: spilled regions are ranked by an exact inner-product search streamed over "
                             f"them, but this model searches with {type(probe).__name__} "
                             f"(index_factory {cfg.index_factory!r}); use index_factory: Flat or leave spill_dir unset")
        rank, _ = rank_and_world()
        transform = None
        if cfg.whitening:  # a whitening from a file (a fitted one is refused for sharded evaluation)
            whitening = PCAWhitening.load(cfg.whitening)
            transform = whitening.transform
        return SpilledCollection(Path(cfg.spill_dir) / f"rank-{rank:05d}", regions_per_image=cfg.regions_per_image,
                                 transform=transform)

    # what was extracted so far (this rank's part until :meth:`gather`)
    @property
    def database(self) -> dict[str, Regions]:
        return self.collection.database

    @property
    def queries(self) -> dict[str, QueryFeature]:
        return self.collection.queries

    @property
    def bad_images(self) -> list[dict]:
        return self.collection.bad_images

    def process(self, batch: SearchBatch) -> None:
        self.collection.add(batch)

    # ------------------------------------------------------------------ scoring
    def gather(self) -> bool:
        """Merge every rank's shard on rank 0 (duplicates from padded samplers collapse by id).

        Returns whether this process holds the merged data (always true without DDP).
        """
        return self.collection.gather_to_rank0()

    def sharded(self) -> bool:
        """Whether :meth:`compute` evaluates sharded by image (``RetrievalConfig.evaluation``)."""
        mode = self.config.evaluation
        if mode != "auto":
            return mode == "sharded"
        large = len(self.benchmark.database) > SHARD_ABOVE_IMAGES or bool(self.benchmark.distractors)
        return is_distributed() and large and not self.config.fits_whitening

    def compute(self, gather: bool = True) -> Optional[EvaluationResult]:
        """The metrics on rank 0 (``None`` on the other ranks)."""
        if gather and self.sharded():
            return self.compute_sharded()
        if gather and not self.gather():
            return None
        bench, cfg = self.benchmark, self.config
        image_ids = [i for i in bench.database if i in self.database]
        if bench.distractors:
            listed = set(bench.database)
            image_ids += sorted(i for i in self.database if i not in listed and bench.is_distractor(i))
        store = self.collection.store(image_ids)
        whitening = cfg.fit_whitening(store.features) if len(store) > 1 else None
        if cfg.whitening and whitening is None:
            log.warning("whitening skipped: the database has %d region(s), too few to fit it", len(store))
        if whitening is not None:
            store.features = whitening.transform(store.features)
        t0 = time.perf_counter()
        index = RegionIndex(store, self.make_searcher(store.dim), device=self.device)
        t1 = time.perf_counter()
        self.index = index
        query_ids = [q.id for q in bench.queries if q.id in self.queries]
        if query_ids:
            features = torch.stack([self.queries[q].feature for q in query_ids]).numpy()
            if whitening is not None:
                features = whitening.transform(features)
            labels = [self.queries[q].label for q in query_ids] if cfg.prune_by_label else None
            rankings = index.search(features, top_images=cfg.ranking_depth, query_labels=labels,
                                    prune_by_label=cfg.prune_by_label)
        else:
            rankings = []
        t2 = time.perf_counter()
        #: the query features as searched (whitened when the database is): what re-ranking expands
        self.searched_queries = (query_ids, features if query_ids else np.zeros((0, store.dim), np.float32))
        costs = {"index_build_s": round(t1 - t0, 4),
                 "search_ms_per_query": round(1000 * (t2 - t1) / max(len(query_ids), 1), 4),
                 "index_bytes_per_image": round(searcher_bytes(index.searcher) / max(len(image_ids), 1), 1)}
        run = index.to_run(query_ids, rankings, method=self.method)
        metrics = retrieval_metrics(bench, run, normalization=cfg.normalization, protocol=cfg.protocol)
        if cfg.run_depth is not None:  # what is written; the metrics are the whole ranking's
            run = Run(method=run.method, rankings={q: hits[:cfg.run_depth] for q, hits in run.rankings.items()})
        curve = self.detector_recall()
        add_database_metrics(metrics, curve, num_regions=len(store), num_images=len(image_ids),
                             bad_items=len(self.bad_images))
        return EvaluationResult(metrics=metrics, run=run, recall_curve=curve, bad_images=list(self.bad_images),
                                num_regions=len(store), costs=costs)

    def compute_sharded(self) -> Optional[EvaluationResult]:
        """The metrics of :meth:`compute` without gathering the regions
        (:func:`~instsearch.eval.sharded.evaluate_sharded`)."""
        from instsearch.eval.sharded import evaluate_sharded

        return evaluate_sharded(self)

    def detector_recall(self, thresholds: Sequence[float] = RECALL_THRESHOLDS) -> dict[str, list[float]]:
        """:func:`detector_recall` of the extracted regions of the benchmark's database images (the
        images the ground truth judges; a box it gives elsewhere is not counted)."""
        listed = set(self.benchmark.database)
        return detector_recall(self.benchmark, lambda ids: [self.database[i].boxes for i in ids],
                               available=lambda i: i in listed and i in self.database, thresholds=thresholds)


def detector_recall(benchmark: Benchmark, boxes_of: Callable[[list[str]], Sequence[Any]],
                    available: Callable[[str], bool] = lambda image_id: True,
                    thresholds: Sequence[float] = RECALL_THRESHOLDS) -> dict[str, list[float]]:
    """Share of ground-truth instance boxes in database images covered by a region (IoU ≥ t).

    ``boxes_of(image_ids)`` gives each listed image's region boxes (original pixels); only images
    for which ``available`` holds count. Undefined (NaN; ``null`` in JSON, ``n/a`` in tables, not
    logged) when the benchmark gives no box for any positive: a recall over zero boxes is not zero.
    """
    ids, gt = gt_boxes(benchmark, available)
    if not ids:
        return {"thresholds": [float(t) for t in thresholds], "recall": [math.nan for _ in thresholds]}
    out = recall_at_iou(gt, [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes_of(ids)],
                        thresholds=np.asarray(thresholds))
    return {"thresholds": [float(t) for t in out["thresholds"]], "recall": [float(r) for r in out["recall"]]}


def gt_boxes(benchmark: Benchmark, available: Callable[[str], bool]) -> tuple[list[str], list[torch.Tensor]]:
    """The database images (for which ``available`` holds) with ground-truth instance boxes, sorted,
    and each one's distinct boxes."""
    gt: dict[str, set[tuple[float, ...]]] = {}
    for g in benchmark.ground_truth.values():
        for image_id, boxes in g.positives.items():
            if available(image_id):
                gt.setdefault(image_id, set()).update(tuple(b) for b in boxes)
    ids = sorted(i for i in gt if gt[i])
    return ids, [torch.tensor(sorted(gt[i]), dtype=torch.float32) for i in ids]


def add_database_metrics(metrics: dict[str, Any], curve: dict[str, list[float]], num_regions: int, num_images: int,
                         bad_items: int = 0) -> dict[str, Any]:
    """The database's figures beside the ranking metrics: detector recall@IoU 0.5 and 0.7,
    regions per image, the undecodable items (when any)."""
    for t, r in zip(curve["thresholds"], curve["recall"]):
        if round(t, 2) in (0.5, 0.7):
            metrics[f"recall@IoU{t:.1f}"] = float(r)
    metrics["regions_per_image"] = float(num_regions / max(num_images, 1))
    if bad_items:
        metrics["bad_images"] = int(bad_items)
    return metrics


def extract_and_score(model: torch.nn.Module, loaders: Iterable, evaluator: RetrievalEvaluator,
                      step: Optional[Step] = None, progress: bool = True,
                      desc: str = "retrieval evaluation") -> Optional[EvaluationResult]:
    """:func:`~instsearch.eval.extraction.extract` ``model`` over ``loaders`` (``step``: e.g. a
    module's ``search_step``) into ``evaluator``, then :meth:`RetrievalEvaluator.compute`
    (``None`` off rank 0)."""
    evaluator.reset()
    extract(model, loaders, step=step, with_labels=evaluator.config.prune_by_label,
            regions_per_image=evaluator.config.regions_per_image, progress=progress, desc=desc,
            collection=evaluator.collection)
    return evaluator.compute()
