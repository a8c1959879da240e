"""Losses of the FCIS head (Li et al., CVPR 2017): classification, box regression, mask.

The RPN's objectness and box losses come from torchvision's ``RegionProposalNetwork``; these are
the per-RoI losses of the position-sensitive head. Each function can return one loss per RoI
(``reduction="none"``) so that online hard example mining (OHEM, which FCIS trains with) can rank
RoIs by their total loss before reducing; :class:`FCISLoss` does both.

Normalisations follow FCIS's training symbols: classification is the mean over RoIs; box
regression is summed over the foreground RoIs' four coordinates and divided by the number of RoIs
(not of foreground RoIs), so images with few positives do not get louder box gradients; the mask
loss is the mean over all pixels of the foreground RoIs ("valid" normalisation: background RoIs
are ignored, as their mask is undefined).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fcis_class_loss", "fcis_box_loss", "fcis_mask_loss", "FCISLoss", "ohem_select"]

Reduction = Literal["none", "mean"]


def fcis_class_loss(class_logits: Tensor, labels: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Softmax cross-entropy over the ``C + 1`` classes (0 = background).

    ``class_logits`` are FCIS's pooled scores (the RoI mean of ``max(inside, outside)``), ``(R, C+1)``;
    ``labels`` ``(R,)`` int64.
    """
    if labels.numel() == 0 and reduction == "mean":
        return class_logits.sum() * 0.0  # no RoI: zero, not the NaN of an empty mean
    return F.cross_entropy(class_logits, labels, reduction=reduction)


def fcis_box_loss(box_deltas: Tensor, regression_targets: Tensor, labels: Tensor, beta: float = 1.0,
                  reduction: Reduction = "mean") -> Tensor:
    """Smooth-L1 box regression on foreground RoIs (class-agnostic deltas, ``(R, 4)``).

    Per RoI: ``sum_j smoothL1(delta_j - target_j)`` for foreground RoIs (``labels > 0``), 0 for
    background. ``"mean"`` divides the sum by ``R``, the number of RoIs. ``beta = 1`` is FCIS's
    smooth-L1 (``sigma = 1``); torchvision's Mask R-CNN uses ``1 / 9``.
    """
    per_coord = F.smooth_l1_loss(box_deltas, regression_targets.to(box_deltas.dtype), beta=beta, reduction="none")
    # where, not a 0/1 product: a background RoI's target may be undefined (inf) and inf * 0 = NaN.
    per_roi = torch.where(labels > 0, per_coord.sum(dim=1), per_coord.new_zeros(()))
    if reduction == "none":
        return per_roi
    return per_roi.sum() / max(labels.numel(), 1)


def fcis_mask_loss(mask_logits: Tensor, mask_targets: Tensor, labels: Tensor,
                   reduction: Reduction = "mean") -> Tensor:
    """Per-pixel 2-way softmax cross-entropy (inside vs outside) of each RoI's ground-truth class.

    Args:
        mask_logits: ``(R, C+1, S, S)`` inside-minus-outside scores. The 2-way softmax
            ``softmax(inside, outside)[inside] = sigmoid(inside - outside)``, so its cross-entropy
            is the logistic loss of the difference -- computed that way for numerical stability.
        mask_targets: ``(R, S, S)`` in {0, 1}, the matched ground-truth mask on each RoI's grid.
        labels: ``(R,)``; only foreground RoIs (``> 0``) contribute, for their own class.

    Returns:
        ``"mean"``: the mean over all pixels of all foreground RoIs (0 without foreground);
        ``"none"``: ``(R,)`` per-RoI pixel means, 0 for background RoIs.
    """
    r = mask_logits.shape[0]
    fg = labels > 0
    picked = mask_logits[torch.arange(r, device=mask_logits.device), labels.clamp(min=0)]  # (R, S, S)
    per_pixel = F.binary_cross_entropy_with_logits(picked, mask_targets.to(picked.dtype), reduction="none")
    per_roi = torch.where(fg, per_pixel.flatten(1).mean(dim=1), per_pixel.new_zeros(()))
    if reduction == "none":
        return per_roi
    num_fg = int(fg.sum())
    if num_fg == 0:
        return mask_logits.sum() * 0.0  # keeps the graph connected for DDP
    return per_roi.sum() / num_fg


def ohem_select(per_roi_loss: Tensor, rois_per_image: Sequence[int], keep_per_image: int) -> Tensor:
    """Indices of the ``keep_per_image`` highest-loss RoIs of each image (OHEM).

    ``per_roi_loss`` is ``(sum R_i,)`` with the images' RoIs concatenated in order; the result
    indexes into it, images in order, hardest first within an image.
    """
    picked = []
    offset = 0
    for n in rois_per_image:
        k = min(int(keep_per_image), int(n))
        if k > 0:
            picked.append(per_roi_loss[offset:offset + n].topk(k).indices + offset)
        offset += n
    if not picked:
        return per_roi_loss.new_zeros(0, dtype=torch.long)
    return torch.cat(picked)


class FCISLoss(nn.Module):
    """The head's three losses, optionally on the OHEM-selected RoIs only.

    Args:
        box_beta: smooth-L1 transition point (FCIS: 1).
        weights: multipliers of the class, box and mask losses (FCIS: all 1).
    """

    def __init__(self, box_beta: float = 1.0, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.box_beta = float(box_beta)
        self.weights = tuple(float(w) for w in weights)

    def per_roi(self, class_logits: Tensor, box_deltas: Tensor, mask_logits: Tensor, labels: Tensor,
                regression_targets: Tensor, mask_targets: Tensor) -> Tensor:
        """``(R,)`` weighted sum of the three per-RoI losses: the quantity OHEM ranks by."""
        wc, wb, wm = self.weights
        return (wc * fcis_class_loss(class_logits, labels, "none")
                + wb * fcis_box_loss(box_deltas, regression_targets, labels, self.box_beta, "none")
                + wm * fcis_mask_loss(mask_logits, mask_targets, labels, "none"))

    def forward(self, class_logits: Tensor, box_deltas: Tensor, mask_logits: Tensor, labels: Tensor,
                regression_targets: Tensor, mask_targets: Tensor,
                index: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Loss dict ``loss_classifier``, ``loss_box_reg``, ``loss_mask`` (weighted).

        ``index`` restricts every input to those RoIs (e.g. from :func:`ohem_select`).
        """
        if index is not None:
            class_logits, box_deltas, mask_logits = class_logits[index], box_deltas[index], mask_logits[index]
            labels, regression_targets, mask_targets = labels[index], regression_targets[index], mask_targets[index]
        wc, wb, wm = self.weights
        return {
            "loss_classifier": wc * fcis_class_loss(class_logits, labels),
            "loss_box_reg": wb * fcis_box_loss(box_deltas, regression_targets, labels, self.box_beta),
            "loss_mask": wm * fcis_mask_loss(mask_logits, mask_targets, labels),
        }
