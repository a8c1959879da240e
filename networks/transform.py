"""Image input of the networks: checking images and boxes, cutting box crops (as they are, or
resized to a fixed square for a classification CNN), and the detector transform (normalise, resize, batch) that the deep region CNN and the whole-image descriptors share,
so that both see an image exactly alike."""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import clip_boxes_to_image

__all__ = ["DetectionTransform", "check_images", "check_boxes", "crop_boxes", "crop_corners", "resized_crops"]

log = logging.getLogger(__name__)

_warned_upscale = False


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform (normalise, resize so the short side is ``min_size`` and the
    long side at most ``max_size``, pad to a multiple of 32) with an optional cap on upscaling.

    Detectors resize every image to their training scale, so a 160 px image meets an 800 px
    setting by being upscaled five-fold: slow, and rarely what a user of tiny images wants. With
    ``max_upscale`` (e.g. 1.0) small images are left smaller; without it, a large upscale is logged
    once so it never happens silently.
    """

    def __init__(self, min_size: Union[int, Sequence[int]], max_size: int, image_mean: Sequence[float],
                 image_std: Sequence[float], max_upscale: Optional[float] = None, size_divisible: int = 32) -> None:
        super().__init__(min_size, max_size, list(image_mean), list(image_std), size_divisible=size_divisible)
        if max_upscale is not None and max_upscale <= 0:
            raise ValueError(f"max_upscale must be > 0, got {max_upscale}")
        self.max_upscale = max_upscale

    def scale_for(self, height: int, width: int, short_side: Optional[int] = None) -> float:
        """The resize factor an ``height x width`` image gets (at the test scale by default)."""
        short_side = self.min_size[-1] if short_side is None else short_side
        scale = min(short_side / min(height, width), self.max_size / max(height, width))
        if self.max_upscale is not None:
            scale = min(scale, self.max_upscale)
        return scale

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None
               ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        global _warned_upscale
        h, w = image.shape[-2:]
        short_side = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        scale = self.scale_for(h, w, short_side)
        if scale > 2.0 and not _warned_upscale:
            _warned_upscale = True
            log.warning("detector input of %dx%d px is upscaled %.1fx to a short side of %d px; set min_size to "
                        "the data's scale or max_upscale to cap it", w, h, scale, short_side)
        # Same call as torchvision's _resize_image_and_masks, so results match it when uncapped.
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
        if target is not None and "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], [h, w], list(image.shape[-2:]))
        return image, target


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
