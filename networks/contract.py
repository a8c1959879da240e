"""What every network behind :class:`~instsearch.structures.RegionSearchModel` shares: the input
checks, the eval-mode guard, the class-agnostic default and the whole-frame fallback region.

The contract itself (images in ``[0, 1]``, boxes in pixels of the images given, eval mode set by
the caller) is written in :mod:`instsearch.structures`; these are its one implementation, so each
network states only what is its own.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

__all__ = ["check_images", "check_boxes", "check_box_lists", "require_eval_mode", "ClassAgnostic",
           "whole_frame_box"]


def check_images(images: Sequence[Tensor]) -> None:
    """Refuse anything but a non-empty list of float RGB ``(3, H, W)`` tensors, naming the culprit."""
    if len(images) == 0:
        raise ValueError("the network needs at least one image")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.ndim != 3 or img.shape[0] != 3 or not img.is_floating_point():
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i}: expected a float RGB tensor (3, H, W) in [0, 1], got {shape}")


def check_boxes(boxes: Tensor, image: Tensor, index: int) -> Tensor:
    """``boxes[index]`` as ``(N, 4)`` pixels of ``image`` (its dtype and device), clipped to it;
    empty or inverted boxes are refused."""
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes[{index}]: expected (N, 4) [x1, y1, x2, y2] pixels, got {tuple(boxes.shape)}")
    boxes = boxes.to(dtype=image.dtype, device=image.device)
    if len(boxes) and bool(((boxes[:, 2:] - boxes[:, :2]) <= 0).any()):
        raise ValueError(f"boxes[{index}]: every box needs x2 > x1 and y2 > y1, got {boxes.tolist()}")
    return clip_boxes_to_image(boxes, tuple(image.shape[-2:]))


def check_box_lists(images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor]:
    """The query side's boxes: one ``(N, 4)`` list per image, each checked and clipped by
    :func:`check_boxes`."""
    if len(images) != len(boxes):
        raise ValueError(f"describe_boxes: {len(images)} images but {len(boxes)} box lists")
    return [check_boxes(b, img, i) for i, (img, b) in enumerate(zip(images, boxes))]


def require_eval_mode(module: nn.Module, method: str) -> None:
    """Refuse to run a search method in training mode: the caller switches modes, never the network
    (in training mode an RPN samples training targets and batch norms use batch statistics)."""
    if module.training:
        raise RuntimeError(f"{type(module).__name__}.{method} needs eval mode (in train mode the RPN and box "
                           f"head sample training targets and batch norms use batch statistics); call .eval() first")


class ClassAgnostic:
    """Mixin of a network that predicts no category (region proposals without classes, global or
    aggregated descriptors): category pruning is refused with one message."""

    predicts_labels = False

    def classify_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """No categories: ``predicts_labels`` is ``False``, so category pruning cannot be asked of it."""
        raise TypeError(f"{type(self).__name__} is class-agnostic: it predicts no categories (predicts_labels is "
                        "False)")


def whole_frame_box(height: int, width: int, like: Tensor) -> Tensor:
    """``(1, 4)``: the whole ``height x width`` frame, the region an image keeps when a network
    finds none, so that it can still be found (dtype and device of ``like``)."""
    return torch.tensor([[0.0, 0.0, float(width), float(height)]], dtype=like.dtype, device=like.device)
