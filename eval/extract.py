"""Running a network over one benchmark batch: the model side of retrieval evaluation.

As detectron2 separates ``model(inputs)`` from ``DatasetEvaluator.process(inputs, outputs)``, the
network runs here (inside a LightningModule's step, the callback or the demo) and the
:class:`~instsearch.eval.evaluator.RetrievalEvaluator` only accumulates what comes out and scores
it. A batch from the benchmark loaders is ``(images, metas)``: database items give the image's
regions, query items (``meta.query_id`` set) the feature of the query box, and undecodable items
(``image is None``) are reported, never run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from instsearch.structures import ImageMeta, RegionSearchModel, Regions


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
    h0, w0 = meta.orig_size
    h1, w1 = int(image.shape[-2]), int(image.shape[-1])
    scale = torch.tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0], dtype=torch.float32, device=image.device)
    return torch.tensor([meta.query_box], dtype=torch.float32, device=image.device) * scale
