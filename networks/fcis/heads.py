"""FCIS's heads: the RPN head on conv4, the position-sensitive head on conv5, and the assembling of
an RoI's class, mask and box outputs from its score maps (Li et al., CVPR 2017).

For every class, ``k x k`` pairs of maps each score "pixel inside the instance" / "outside" for
one relative position (top-left ... bottom-right) in an RoI. Assembling an RoI reads each of its
``k x k`` bins from the maps of that position; then, per class,

* mask probability per pixel = ``softmax(inside, outside)[inside]``,
* class score = mean over the RoI of ``max(inside, outside)``, softmax over the ``C + 1`` classes,

and a sibling set of ``4 k^2`` maps regresses the box by position-sensitive average pooling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instsearch.networks.ps_roi import ps_roi_assemble, ps_roi_box_pool

__all__ = ["FCISRPNHead", "PositionSensitiveHead", "FCISHeadOutput", "fcis_scores"]


def _init_normal(*layers: nn.Conv2d) -> None:
    """FCIS's initialisation of its head convs: N(0, 0.01) weights, zero biases."""
    for layer in layers:
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(layer.bias)


class FCISRPNHead(nn.Module):
    """FCIS's RPN head: 3x3 conv (512 channels) + ReLU, then 1x1 objectness and box-delta convs.

    Same interface as torchvision's ``RPNHead`` (lists of maps in, lists out), which uses
    ``in_channels`` (1024 on conv4) for the 3x3 conv instead of FCIS's 512.
    """

    def __init__(self, in_channels: int, num_anchors: int, mid_channels: int = 512) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(mid_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(mid_channels, 4 * num_anchors, 1)
        _init_normal(self.conv, self.cls_logits, self.bbox_pred)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        hidden = [F.relu(self.conv(f)) for f in x]
        # float32 outputs: under bf16 autocast the RPN would otherwise decode its proposals in
        # bf16, whose 8-bit mantissa rounds an 800-pixel coordinate to 4 pixels.
        return [self.cls_logits(h).float() for h in hidden], [self.bbox_pred(h).float() for h in hidden]


@dataclass
class FCISHeadOutput:
    class_logits: Tensor  # (R, C+1)
    mask_logits: Tensor  # (R, C+1, S, S) inside - outside
    box_deltas: Tensor  # (R, 4) class-agnostic, encoded with the detector's BoxCoder


def fcis_scores(assembled: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """FCIS's joint classification and segmentation from assembled inside/outside maps.

    Args:
        assembled: ``(R, 2 (C+1), S, S)``: inside maps of the ``C + 1`` classes, then outside.

    Returns:
        ``class_logits (R, C+1)``: per class the RoI mean of ``max(inside, outside)``; a softmax
        over classes gives the class probabilities. ``mask_logits (R, C+1, S, S)``:
        ``inside - outside``, whose sigmoid is the 2-way ``softmax(inside, outside)[inside]``.
    """
    r, ch, s1, s2 = assembled.shape
    if ch != 2 * num_classes:
        raise ValueError(f"fcis_scores: expected 2 * {num_classes} assembled channels, got {ch}")
    inside, outside = assembled.view(r, 2, num_classes, s1, s2).unbind(dim=1)
    class_logits = torch.maximum(inside, outside).mean(dim=(2, 3))
    return class_logits, inside - outside


class PositionSensitiveHead(nn.Module):
    """conv5 -> 1x1 conv (1024) + ReLU -> inside/outside score maps and box maps, and the
    assembling of RoIs from them (:meth:`assemble`).

    Outputs ``(B, 2 k^2 (C+1), H, W)`` score maps, channel ``(t * (C+1) + c) * k^2 + bin`` for
    ``t = 0`` inside / ``1`` outside, class ``c`` and RoI bin ``bin = i * k + j``; and
    ``(B, 4 k^2, H, W)`` class-agnostic box maps, channel ``d * k^2 + bin``.

    Args:
        group_size: ``k``, the position-sensitive grid (FCIS: 7).
        mask_size: ``S``, the assembled RoI grid, a multiple of ``k`` (FCIS: 21).
        sampling_ratio: RoIAlign samples per cell side for assembling and box pooling.
    """

    def __init__(self, in_channels: int, num_classes: int, group_size: int = 7, mid_channels: int = 1024,
                 mask_size: int = 21, sampling_ratio: int = 2) -> None:
        super().__init__()
        if mask_size % group_size != 0:
            raise ValueError(f"mask_size {mask_size} must be a multiple of group_size {group_size}")
        self.num_classes = int(num_classes)
        self.group_size = int(group_size)
        self.mask_size = int(mask_size)
        self.sampling_ratio = int(sampling_ratio)
        k2 = self.group_size ** 2
        self.reduce = nn.Conv2d(in_channels, mid_channels, 1)
        self.cls_seg = nn.Conv2d(mid_channels, 2 * k2 * self.num_classes, 1)
        self.bbox = nn.Conv2d(mid_channels, 4 * k2, 1)
        _init_normal(self.reduce, self.cls_seg, self.bbox)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.reduce(x))
        return self.cls_seg(h), self.bbox(h)

    def assemble(self, maps: tuple[Tensor, Tensor], rois: Tensor, image_width: int) -> FCISHeadOutput:
        """Class logits, mask logits and box deltas of ``rois`` ``(R, 5)`` (network-input pixels)
        from the ``forward`` output ``maps`` of a batch ``image_width`` pixels wide."""
        score_maps, box_maps = maps
        scale = score_maps.shape[-1] / image_width
        assembled = ps_roi_assemble(score_maps, rois, self.group_size, self.mask_size, scale, self.sampling_ratio)
        class_logits, mask_logits = fcis_scores(assembled, self.num_classes)
        box_deltas = ps_roi_box_pool(box_maps, rois, self.group_size, scale, self.sampling_ratio)
        return FCISHeadOutput(class_logits, mask_logits, box_deltas)
