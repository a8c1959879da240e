"""Box crops of images: the outer integer pixels of each box, as they are or resized to a fixed
square for a classification CNN (the deep region CNN's Crop-FC7, the global descriptors of a
query box)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["crop_corners", "crop_boxes", "resized_crops"]


def crop_corners(boxes: Tensor, height: int, width: int) -> Tensor:
    """``(N, 4)`` int64 ``[x0, y0, x1, y1)``: the outer integer pixels of each box (at least 1 px),
    inside a ``height x width`` image -- the pixels :func:`crop_boxes` cuts."""
    x1y1 = boxes[:, :2].floor().clamp_min(0)
    x2y2 = torch.maximum(boxes[:, 2:].ceil(), x1y1 + 1)
    corners = torch.cat([x1y1, x2y2], dim=1).long()
    limit = torch.tensor([width, height], device=corners.device)
    return torch.cat([torch.minimum(corners[:, :2], limit - 1), torch.minimum(corners[:, 2:], limit)], dim=1)


def crop_boxes(images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor]:
    """Cut every box out of its image (outer integer pixels, at least 1 px), in box order."""
    crops = []
    for img, b in zip(images, boxes):
        corners = crop_corners(b, *img.shape[-2:]).tolist()
        crops += [img[:, y0:y1, x0:x1] for x0, y0, x1, y1 in corners]
    return crops


def resized_crops(images: Sequence[Tensor], boxes: Sequence[Tensor], size: int) -> Tensor:
    """``(sum N_i, C, size, size)``: every box's crop (the pixels of :func:`crop_boxes`) resized to
    ``size x size``, in box order.

    The resize is ``F.interpolate(crop[None], (size, size), mode="bilinear", align_corners=False)``
    (no antialiasing) computed for all crops of an image at once: each output pixel blends the
    four crop pixels around its source position, which never leaves its own crop.
    """
    out = []
    for img, b in zip(images, boxes):
        if len(b) == 0:
            continue
        corners = crop_corners(b, *img.shape[-2:])
        y0, y1, wy = _bilinear_taps(corners[:, 1], corners[:, 3], size)  # (N, size) each
        x0, x1, wx = _bilinear_taps(corners[:, 0], corners[:, 2], size)
        rows0, rows1 = y0[:, :, None], y1[:, :, None]
        cols0, cols1 = x0[:, None, :], x1[:, None, :]
        wx, wy = wx[:, None, :].to(img.dtype), wy[:, :, None].to(img.dtype)
        # (C, N, size, size) per tap, blended along x then y as torch's bilinear kernel
        top = img[:, rows0, cols0] * (1 - wx) + img[:, rows0, cols1] * wx
        bottom = img[:, rows1, cols0] * (1 - wx) + img[:, rows1, cols1] * wx
        out.append((top * (1 - wy) + bottom * wy).transpose(0, 1))
    if not out:
        return images[0].new_zeros(0, images[0].shape[0], size, size)
    return torch.cat(out)


def _bilinear_taps(start: Tensor, end: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """For crops spanning pixels ``[start, end)`` of one axis, the two source pixels (absolute
    indices) and the weight of the second one for each of ``size`` output pixels: torch's
    ``align_corners=False`` rule (source ``(j + 0.5) * length / size - 0.5``, clamped to the crop)."""
    length = (end - start)[:, None]
    scale = length.float() / size
    source = ((torch.arange(size, device=start.device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    first = torch.minimum(source.floor().long(), length - 1)
    weight = (source - first).clamp(0, 1)
    second = first + (first < length - 1).long()
    return start[:, None] + first, start[:, None] + second, weight
