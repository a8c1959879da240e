"""Typed data every method hands to the rest of the system.

Search, evaluation, logging and the CLI know nothing about a method except this: for each image,
its regions (boxes in original-image pixels, scores, optional labels and masks) and one feature
per region.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """``(N, 4)`` xyxy boxes from a ``(height, width)`` frame to another of the same image, resized
    (per-axis scale; what torchvision's ``resize_boxes`` does)."""
    (h0, w0), (h1, w1) = from_size, to_size
    return boxes * boxes.new_tensor([w1 / w0, h1 / h0, w1 / w0, h1 / h0])


@dataclass
class Regions:
    """The regions of one image.

    ``boxes`` are ``[x1, y1, x2, y2]`` in pixels of the frame ``image_size`` names: a network
    returns them in the pixels of the image it was given, and :meth:`rescaled` maps them (and the
    masks) to the original image before anything is stored or searched. ``features`` rows are
    l2-normalised by the extractor when the method compares them by cosine similarity.
    """

    boxes: Tensor  # (N, 4) float32
    scores: Tensor  # (N,) float32, detector confidence (1.0 for a given query box)
    features: Optional[Tensor] = None  # (N, D) float32
    labels: Optional[Tensor] = None  # (N,) int64 predicted category, when the detector has one
    masks: Optional[Tensor] = None  # (N, H, W) float in [0, 1] over the image_size frame
    image_size: Optional[tuple[int, int]] = None  # (height, width) of the frame the boxes are in

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"Regions.boxes must be (N, 4), got {tuple(self.boxes.shape)}")
        n = self.boxes.shape[0]
        for f in _tensor_fields():
            value = getattr(self, f.name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"Regions.{f.name} has {value.shape[0]} rows, boxes have {n}")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def whole_frames(cls, images: list[Tensor], features: Tensor) -> list["Regions"]:
        """Each image's whole frame as its one region (score 1), described by its row of
        ``features`` ``(B, D)``: the database side of a whole-image descriptor."""
        return [cls(boxes=torch.tensor([[0.0, 0.0, float(img.shape[-1]), float(img.shape[-2])]], device=features.device),
                    scores=features.new_ones(1), features=features[i:i + 1],
                    image_size=(int(img.shape[-2]), int(img.shape[-1])))
                for i, img in enumerate(images)]

    def to(self, device: torch.device | str) -> "Regions":
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in _tensor_fields() if getattr(self, f.name) is not None})

    def detach_cpu(self, keep_masks: bool = False) -> "Regions":
        """A CPU copy without autograd history; masks are dropped unless asked for (memory)."""
        out = {}
        for f in _tensor_fields():
            value = getattr(self, f.name)
            if value is None or (f.name == "masks" and not keep_masks):
                out[f.name] = None
            else:
                out[f.name] = value.detach().cpu()
        return Regions(**out, image_size=self.image_size)

    def rescaled(self, size: tuple[int, int]) -> "Regions":
        """The same regions in a frame of ``size`` = (height, width): boxes scaled per axis, masks
        resampled bilinearly. The served image is the original one resized, so this maps a
        network's boxes back to original pixels."""
        if self.image_size is None:
            raise ValueError("Regions.image_size is not set: the frame of the boxes is unknown")
        (h0, w0), (h1, w1) = self.image_size, size
        if (h0, w0) == (h1, w1):
            return self
        masks = self.masks
        if masks is not None and len(masks):
            masks = torch.nn.functional.interpolate(masks[:, None].float(), size=(h1, w1), mode="bilinear",
                                                    align_corners=False)[:, 0]
        elif masks is not None:
            masks = masks.new_zeros((0, h1, w1))
        return replace(self, boxes=scale_boxes(self.boxes, (h0, w0), (h1, w1)), masks=masks, image_size=(int(h1), int(w1)))

    def top_k(self, k: int) -> "Regions":
        """The ``k`` highest-scoring regions, best first; equal scores keep the order the network
        returned them in (a stable sort), so a network's own ranking breaks ties."""
        order = torch.argsort(self.scores, descending=True, stable=True)[:k]
        return self.select(order)

    def select(self, index: Tensor) -> "Regions":
        return Regions(**{f.name: (getattr(self, f.name)[index] if getattr(self, f.name) is not None else None)
                          for f in _tensor_fields()}, image_size=self.image_size)

    @staticmethod
    def empty(feature_dim: int = 0, image_size: Optional[tuple[int, int]] = None) -> "Regions":
        return Regions(boxes=torch.zeros(0, 4), scores=torch.zeros(0),
                       features=torch.zeros(0, feature_dim) if feature_dim else None, image_size=image_size)


def _tensor_fields():
    return [f for f in fields(Regions) if f.name != "image_size"]


@dataclass
class ImageMeta:
    """What a benchmark loader tells the extractor about one image it serves."""

    image_id: str
    orig_size: tuple[int, int]  # (height, width) of the original image (the boxes' frame)
    query_id: Optional[str] = None  # set for query items
    query_box: Optional[tuple[float, float, float, float]] = None  # original pixels
    extra: dict = field(default_factory=dict)


@runtime_checkable
class RegionSearchModel(Protocol):
    """What the evaluation side needs from any method's network (a plain ``nn.Module``).

    The contract, true for every method:

    * ``images`` are float RGB tensors ``(3, H, W)`` in ``[0, 1]`` at the resolution the loader
      served; the network does its own resizing and normalisation.
    * **Boxes, in and out, are in pixels of the images given** (the served frame). Returned
      :class:`Regions` carry that frame as ``image_size``; the caller maps them to original pixels
      with :meth:`Regions.rescaled`, and maps query boxes into the served frame before the call.
    * The caller puts the network in eval mode and calls under ``torch.no_grad()``
      (:func:`instsearch.eval.extraction.extract_batch` does both); a network never switches modes.
    * ``feature_dim`` is the length of every feature it returns (database and query side).
    * ``predicts_labels`` says whether :meth:`classify_boxes` exists; category pruning needs it.
    """

    feature_dim: int
    predicts_labels: bool

    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: each image's regions with one feature per region."""
        ...

    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: one feature per given box, ``(n_i, D)`` for ``boxes[i]`` of shape ``(n_i, 4)``."""
        ...

    def classify_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Predicted category (int64 ``(n_i,)``) of each given box; only when ``predicts_labels``."""
        ...
