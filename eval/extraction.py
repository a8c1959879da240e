"""Extraction: running a network over benchmark images into regions and query features.

As detectron2 separates ``model(inputs)`` from ``DatasetEvaluator.process(inputs, outputs)``, the
network runs here and the :class:`~instsearch.eval.evaluator.RetrievalEvaluator` only scores what
comes out. A batch from the benchmark loaders is ``(images, metas)``: database items give the
image's regions, query items (``meta.query_id`` set) the feature of the query box, and
undecodable items (``image is None``) are reported, never run.

* :func:`extract_batch` -- the network on one batch (a LightningModule's ``search_step`` calls it
  inside Lightning's test and predict loops);
* :func:`iterate_batches` -- the one loop over loaders outside Lightning's (progress bar, batch
  limit, undecodable items dropped), also used by passes that describe other boxes (UDQ's rounds);
* :func:`extract` -- ``(model, loaders)`` -> :class:`RegionCollection` (every database image's
  regions, every query's feature, the bad items), whose :meth:`RegionCollection.store` is the
  :class:`~instsearch.eval.search.RegionStore` a searcher indexes. The evaluator, the per-epoch
  callback, the demo, UDQ's baselines, the VLAD vocabulary and the benchmark scripts all extract
  through it.

Box frames: a network sees and returns boxes in the pixels of the image it is given; the mapping
between those and the original image's pixels happens here only -- database regions mapped back
with :meth:`Regions.rescaled`, query boxes mapped into the served frame before the call -- as
torchvision's ``GeneralizedRCNNTransform.postprocess`` maps detections back once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from instsearch.distributed import gather_to_rank0
from instsearch.eval.search import RegionStore
from instsearch.structures import ImageMeta, RegionSearchModel, Regions, scale_boxes


@dataclass
class QueryFeature:
    """One query box's feature (and predicted label, for category pruning)."""

    meta: ImageMeta
    feature: Tensor  # (D,) on the CPU
    label: Optional[int] = None


@dataclass
class SearchBatch:
    """What a network produced for one benchmark batch, on the CPU, in original-image pixels."""

    database: list[tuple[ImageMeta, Regions]] = field(default_factory=list)
    queries: list[QueryFeature] = field(default_factory=list)
    bad: list[ImageMeta] = field(default_factory=list)  # items whose image could not be decoded


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def extract_batch(model: RegionSearchModel, images: Sequence[Optional[Tensor]], metas: Sequence[ImageMeta],
                  with_labels: bool = False, device: Optional[torch.device] = None,
                  keep_masks: bool = False) -> SearchBatch:
    """Run ``model`` (in eval mode, which the caller sets) on one ``(images, metas)`` batch.

    Database regions come back in the pixels of the served image (the network contract) and are
    mapped to the original image here with :meth:`Regions.rescaled`; query boxes, given in original
    pixels by the benchmark, are mapped into the served frame before the call. ``with_labels``
    also asks the network for each query box's category (category pruning).
    """
    if with_labels and not model.predicts_labels:
        raise TypeError(f"{type(model).__name__} predicts no categories: category pruning needs classify_boxes")
    device = device or model_device(model)
    out = SearchBatch(bad=[m for im, m in zip(images, metas) if im is None])
    db = [(im, m) for im, m in zip(images, metas) if im is not None and m.query_id is None]
    qs = [(im, m) for im, m in zip(images, metas) if im is not None and m.query_id is not None]
    if db:
        served = [im.to(device) for im, _ in db]
        for regions, image, (_, meta) in zip(model.detect_regions(served), served, db):
            regions = regions.detach_cpu(keep_masks=keep_masks)
            if regions.image_size is None:  # the contract: boxes are in the served image's pixels
                regions.image_size = (int(image.shape[-2]), int(image.shape[-1]))
            out.database.append((meta, regions.rescaled(meta.orig_size)))
    if qs:
        served = [im.to(device) for im, _ in qs]
        boxes = [_served_box(m, im) for im, (_, m) in zip(served, qs)]
        features = model.describe_boxes(served, boxes)
        labels = [int(lbl[0]) for lbl in model.classify_boxes(served, boxes)] if with_labels else [None] * len(qs)
        out.queries = [QueryFeature(m, f[0].detach().cpu(), lbl) for f, lbl, (_, m) in zip(features, labels, qs)]
    return out


def _served_box(meta: ImageMeta, image: Tensor) -> Tensor:
    """The query box (original pixels) in the frame of the served image."""
    return to_served_frame(torch.tensor([meta.query_box], dtype=torch.float32, device=image.device), meta, image)


def to_served_frame(boxes: Tensor, meta: ImageMeta, image: Tensor) -> Tensor:
    """``(N, 4)`` boxes in the original image's pixels (``meta.orig_size``) -> pixels of the served
    ``image``."""
    return scale_boxes(boxes, tuple(meta.orig_size), (int(image.shape[-2]), int(image.shape[-1])))


def to_original_frame(boxes: Tensor, meta: ImageMeta, image: Tensor) -> Tensor:
    """``(N, 4)`` boxes in pixels of the served ``image`` -> the original image's pixels (as
    :meth:`Regions.rescaled` maps a network's regions)."""
    return scale_boxes(boxes, (int(image.shape[-2]), int(image.shape[-1])), tuple(meta.orig_size))


# ---------------------------------------------------------------------- the loop
def iterate_batches(loaders: Iterable, *, progress: bool = True, desc: str = "extracting",
                    max_batches: Optional[int] = None) -> Iterator[tuple[list, list]]:
    """Every ``(images, metas)`` batch of ``loaders`` in order, with a progress bar; at most
    ``max_batches`` in all (``None``: every one)."""
    from tqdm.auto import tqdm

    seen = 0
    for loader in loaders:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            if max_batches is not None and seen >= max_batches:
                return
            seen += 1
            yield batch


def capped(regions: Regions, regions_per_image: Optional[int]) -> Regions:
    """At most ``regions_per_image`` regions, the highest-scoring (all when ``None``)."""
    if regions_per_image is not None and len(regions) > regions_per_image:
        return regions.top_k(regions_per_image)
    return regions


def add_bad_items(entries: list[dict], bad: Sequence[ImageMeta]) -> None:
    """Record each undecodable item once (file, image, query, reason) in ``entries``."""
    for m in bad:
        entry = {"path": m.extra.get("path"), "image": m.image_id, "query": m.query_id, "reason": m.extra.get("error")}
        if entry not in entries:
            entries.append(entry)


@dataclass
class RegionCollection:
    """What extraction produced: each database image's regions (original pixels), each query's
    feature, the undecodable items. Keyed by id, so padded samplers' duplicates collapse.

    ``regions_per_image``: keep at most that many regions per image (highest scores).
    """

    regions_per_image: Optional[int] = None
    database: dict[str, Regions] = field(default_factory=dict)
    queries: dict[str, QueryFeature] = field(default_factory=dict)
    bad_images: list[dict] = field(default_factory=list)

    def add(self, batch: SearchBatch) -> None:
        for meta, regions in batch.database:
            self.database[meta.image_id] = capped(regions, self.regions_per_image)
        for query in batch.queries:
            self.queries[query.meta.query_id] = query
        add_bad_items(self.bad_images, batch.bad)

    def __len__(self) -> int:
        """Database images collected."""
        return len(self.database)

    def clear(self) -> None:
        self.database, self.queries, self.bad_images = {}, {}, []

    def gather_to_rank0(self) -> bool:
        """Merge every rank's collection on rank 0; the others are cleared. Returns whether this
        process holds the merged collection (always true without DDP)."""
        parts = gather_to_rank0((self.database, self.queries, self.bad_images))
        self.clear()
        if parts is None:
            return False
        # an item a padded sampler served twice keeps the lower rank's copy (as sharded evaluation
        # does); the copies can differ in the last bits when their batches differed
        for database, queries, bad in parts:
            for image_id, regions in database.items():
                self.database.setdefault(image_id, regions)
            for query_id, query in queries.items():
                self.queries.setdefault(query_id, query)
            self.bad_images += [e for e in bad if e not in self.bad_images]
        return True

    def store(self, image_ids: Optional[Sequence[str]] = None) -> RegionStore:
        """The :class:`~instsearch.eval.search.RegionStore` of ``image_ids`` (default: every
        database image, in extraction order)."""
        ids = list(self.database) if image_ids is None else list(image_ids)
        return RegionStore.from_regions(ids, [self.database[i] for i in ids])


Step = Callable[[Any], SearchBatch]


def extract(model: torch.nn.Module, loaders: Iterable, *, step: Optional[Step] = None, with_labels: bool = False,
            regions_per_image: Optional[int] = None, progress: bool = True,
            desc: str = "extracting", collection: Optional[Any] = None) -> RegionCollection:
    """Every batch of ``loaders`` through ``step`` (default: :func:`extract_batch` on ``model``)
    with ``model`` in eval mode (its mode restored after), collected into ``collection`` (default:
    a new :class:`RegionCollection`; anything with its ``add``, e.g. a spilled one). ``step`` is
    how a LightningModule runs its network (``module.search_step``)."""
    if step is None:
        device = model_device(model)

        def step(batch):
            return extract_batch(model, *batch, with_labels=with_labels, device=device)

    if collection is None:
        collection = RegionCollection(regions_per_image=regions_per_image)
    was_training = model.training
    model.eval()
    try:
        for batch in iterate_batches(loaders, progress=progress, desc=desc):
            collection.add(step(batch))
    finally:
        model.train(was_training)
    return collection
