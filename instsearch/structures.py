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


@dataclass
class Regions:
    """The regions of one image.

    ``boxes`` are ``[x1, y1, x2, y2]`` in pixels of the original image (after EXIF orientation),
    whatever size the network saw. ``features`` rows are l2-normalised by the extractor when the
    method compares them by cosine similarity.
    """

    boxes: Tensor  # (N, 4) float32
    scores: Tensor  # (N,) float32, detector confidence (1.0 for a given query box)
    features: Optional[Tensor] = None  # (N, D) float32
    labels: Optional[Tensor] = None  # (N,) int64 predicted category, when the detector has one
    masks: Optional[Tensor] = None  # (N, H, W) float in [0, 1] at original resolution

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"Regions.boxes must be (N, 4), got {tuple(self.boxes.shape)}")
        n = self.boxes.shape[0]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"Regions.{f.name} has {value.shape[0]} rows, boxes have {n}")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device | str) -> "Regions":
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if getattr(self, f.name) is not None})

    def detach_cpu(self, keep_masks: bool = False) -> "Regions":
        """A CPU copy without autograd history; masks are dropped unless asked for (memory)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "masks" and not keep_masks):
                out[f.name] = None
            else:
                out[f.name] = value.detach().cpu()
        return Regions(**out)

    def top_k(self, k: int) -> "Regions":
        """The ``k`` highest-scoring regions, best first."""
        order = torch.argsort(self.scores, descending=True)[:k]
        return self.select(order)

    def select(self, index: Tensor) -> "Regions":
        return Regions(**{f.name: (getattr(self, f.name)[index] if getattr(self, f.name) is not None else None)
                          for f in fields(self)})

    @staticmethod
    def empty(feature_dim: int = 0) -> "Regions":
        return Regions(boxes=torch.zeros(0, 4), scores=torch.zeros(0),
                       features=torch.zeros(0, feature_dim) if feature_dim else None)


@dataclass
class ImageMeta:
    """What a benchmark loader tells the extractor about one image it serves."""

    image_id: str
    orig_size: tuple[int, int]  # (height, width) of the original image
    scale: float = 1.0  # network pixels per original pixel
    query_id: Optional[str] = None  # set for query items
    query_box: Optional[tuple[float, float, float, float]] = None  # original pixels
    extra: dict = field(default_factory=dict)


@runtime_checkable
class RegionSearchModel(Protocol):
    """What the evaluation side needs from any method's network (a plain ``nn.Module``).

    ``images`` are float RGB tensors ``(3, H, W)`` in ``[0, 1]`` at the resolution the loader
    served (the original resolution unless the loader had to shrink a huge image); the network
    does its own resizing and normalisation and returns boxes in the pixels of the images it was
    given. Both methods run under ``torch.no_grad()`` in eval mode.
    """

    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: the image's regions with one feature per region."""
        ...

    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: one feature per given box, ``(n_i, D)`` for ``boxes[i]`` of shape ``(n_i, 4)``.

        Labels for category pruning, when the method predicts them, come from
        :meth:`classify_boxes` if the network has it.
        """
        ...
