"""Detection transforms on ``(image, target)`` pairs, torchvision-detection style.

``image`` is a PIL image or a ``(C, H, W)`` tensor; ``target`` is the dict the instance datasets
produce (``boxes`` ``(N, 4)`` xyxy pixels, ``masks`` ``(N, H, W)`` uint8, ``area`` ...). Every
geometric transform moves the image, the boxes and the masks together, on whole tensors at once
(no loop over instances), so they stay consistent by construction.

Resizing follows the shortest-edge rule of Faster R-CNN / FCIS / detectron2: the short side goes
to ``short_side`` unless the long side would then exceed ``max_size``, in which case the long side
goes to ``max_size``. Keeping images as PIL until :class:`ToTensor` lets the resize run on 8-bit
pixels (cheaper than on floats).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor

ImageLike = Union[Image.Image, Tensor]
Target = dict[str, Tensor]
Transform = Callable[[ImageLike, Target], tuple[ImageLike, Target]]

__all__ = ["Compose", "Resize", "RandomResize", "RandomHorizontalFlip", "ToTensor",
           "shortest_edge_size", "resize_sample", "hflip_sample", "image_hw"]


def image_hw(image: ImageLike) -> tuple[int, int]:
    """(height, width) of a PIL image or a ``(..., H, W)`` tensor."""
    h, w = F.get_size(image)
    return int(h), int(w)


def shortest_edge_size(height: int, width: int, short_side: int, max_size: Optional[int]) -> tuple[int, int]:
    """Output (height, width) of the shortest-edge resize, long side capped at ``max_size``."""
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    scale = short_side / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_sample(image: ImageLike, target: Target, size: tuple[int, int]) -> tuple[ImageLike, Target]:
    """Resize image, boxes, masks and areas to ``size = (height, width)``.

    Boxes scale by the exact per-axis ratio of the output to the input size (not by the nominal
    scale), since rounding the output size makes the two axes differ slightly. Masks use nearest
    neighbour so they stay binary.
    """
    h, w = image_hw(image)
    nh, nw = size
    if (nh, nw) == (h, w):
        return image, target
    image = F.resize(image, [nh, nw], antialias=True)
    sx, sy = nw / w, nh / h
    target = dict(target)
    if "boxes" in target:
        target["boxes"] = target["boxes"] * target["boxes"].new_tensor([sx, sy, sx, sy])
    if "area" in target:
        target["area"] = target["area"] * (sx * sy)
    if "masks" in target:
        masks = target["masks"]
        if masks.shape[0] == 0:
            target["masks"] = masks.new_zeros((0, nh, nw))
        else:
            target["masks"] = F.resize_mask(masks, [nh, nw])
    return image, target


def hflip_sample(image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
    """Mirror image, boxes and masks left-right.

    Boxes are continuous pixel-edge coordinates, so ``x -> W - x`` and the two x ends swap.
    """
    _, w = image_hw(image)
    image = F.horizontal_flip(image)
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image, target


class Compose:
    """Apply ``transforms`` in order to ``(image, target)``."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"{type(self).__name__}([{inner}\n])"


class Resize:
    """Deterministic shortest-edge resize (evaluation): short side ``short_side``, long ≤ ``max_size``."""

    def __init__(self, short_side: int, max_size: Optional[int] = None):
        self.short_side = int(short_side)
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        h, w = image_hw(image)
        return resize_sample(image, target, shortest_edge_size(h, w, self.short_side, self.max_size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(short_side={self.short_side}, max_size={self.max_size})"


class RandomResize:
    """Multi-scale training: the short side is drawn uniformly from ``short_sides`` per sample.

    Draws use ``torch``'s generator, which DataLoader seeds per worker, so augmentation is
    reproducible under ``torch.manual_seed`` / ``seed_everything`` and differs between workers.
    """

    def __init__(self, short_sides: Sequence[int], max_size: Optional[int] = None):
        if len(short_sides) == 0:
            raise ValueError("RandomResize needs at least one short side")
        self.short_sides = [int(s) for s in short_sides]
        self.max_size = max_size

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        short = self.short_sides[int(torch.randint(len(self.short_sides), ()).item())]
        h, w = image_hw(image)
        return resize_sample(image, target, shortest_edge_size(h, w, short, self.max_size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(short_sides={self.short_sides}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror the sample with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        if self.p > 0 and torch.rand(()).item() < self.p:
            return hflip_sample(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class ToTensor:
    """PIL or uint8 tensor → float ``(3, H, W)`` tensor in ``[0, 1]``; float tensors pass through."""

    def __call__(self, image: ImageLike, target: Target) -> tuple[Tensor, Target]:
        return to_float_tensor(image), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def to_float_tensor(image: ImageLike) -> Tensor:
    if isinstance(image, Image.Image):
        image = F.pil_to_tensor(image)
    image = image.as_subclass(Tensor) if type(image) is not Tensor else image
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if not image.is_floating_point():
        raise TypeError(f"expected a uint8 or float image tensor, got {image.dtype}")
    return image
