"""FCIS's training RoIs: proposals matched to the ground truth, with class, box and mask targets,
either all kept for online hard example mining (FCIS's OHEM, Shrivastava et al. 2016) or
subsampled at a fixed foreground fraction (torchvision's balanced sampler)."""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou, roi_align

__all__ = ["RoISampling", "TrainingRoIs", "FCISRoISampler"]

RoISampling = Literal["ohem", "balanced"]


class TrainingRoIs(NamedTuple):
    """The RoIs of a training batch and their head targets."""

    rois: Tensor  # (R, 5) [image index, x1, y1, x2, y2] in network pixels
    labels: Tensor  # (R,) int64, 0 = background
    regression_targets: Tensor  # (R, 4) encoded deltas, zero for background
    mask_targets: Tensor  # (R, S, S) binary, zero for background
    counts: list[int]  # RoIs per image

    def select(self, index: Tensor) -> "TrainingRoIs":
        """The RoIs at ``index`` (e.g. the hard examples OHEM keeps); ``counts`` no longer apply."""
        return TrainingRoIs(self.rois[index], self.labels[index], self.regression_targets[index],
                            self.mask_targets[index], [])


class FCISRoISampler:
    """Match proposals (+ ground-truth boxes) to the ground truth and build the head targets.

    Args:
        box_coder: the detector's box coder (regression targets are encoded with it).
        mask_size: ``S``, the side of the mask targets (the assembled grid).
        sampling: ``"ohem"`` keeps every candidate (the hardest are chosen from their losses
            later); ``"balanced"`` draws ``batch_size_per_image`` at ``positive_fraction``
            foreground.
        fg_iou_thresh, bg_iou_thresh: RoIs with IoU >= fg are foreground, < bg background, in
            between ignored (FCIS: 0.5 and 0.5).
        sampling_ratio: RoIAlign samples per cell side when resampling the ground-truth masks.
    """

    def __init__(self, box_coder: det_utils.BoxCoder, mask_size: int, sampling: RoISampling = "ohem",
                 batch_size_per_image: int = 128, positive_fraction: float = 0.25, fg_iou_thresh: float = 0.5,
                 bg_iou_thresh: float = 0.5, sampling_ratio: int = 2) -> None:
        if sampling not in ("ohem", "balanced"):
            raise ValueError(f"roi_sampling must be 'ohem' or 'balanced', got {sampling!r}")
        self.box_coder = box_coder
        self.mask_size = int(mask_size)
        self.sampling = sampling
        self.batch_size_per_image = int(batch_size_per_image)
        self.sampling_ratio = int(sampling_ratio)
        self.proposal_matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)

    def __call__(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> TrainingRoIs:
        """The training RoIs of a batch.

        ``mask_targets`` are the matched ground-truth mask resampled on the RoI grid and binarised
        at 0.5, as FCIS's targets. With balanced sampling the RoIs are already subsampled; with
        OHEM they are all candidates.
        """
        all_rois, all_labels, all_reg, all_masks, counts = [], [], [], [], []
        matched_per_image, labels_per_image, candidates = [], [], []
        below, between = self.proposal_matcher.BELOW_LOW_THRESHOLD, self.proposal_matcher.BETWEEN_THRESHOLDS
        for proposals_i, t in zip(proposals, targets):
            gt_boxes = t["boxes"].to(proposals_i.dtype)
            cand = torch.cat([proposals_i.detach(), gt_boxes])
            if gt_boxes.shape[0] == 0:
                matched = torch.full((cand.shape[0],), below, dtype=torch.long, device=cand.device)
            else:
                matched = self.proposal_matcher(box_iou(gt_boxes, cand))
            labels = torch.zeros(cand.shape[0], dtype=torch.long, device=cand.device)
            if gt_boxes.shape[0]:
                labels = t["labels"].to(torch.long)[matched.clamp(min=0)]
            labels = torch.where(matched == below, 0, labels)
            labels = torch.where(matched == between, -1, labels)
            matched_per_image.append(matched.clamp(min=0))
            labels_per_image.append(labels)
            candidates.append(cand)

        if self.sampling == "balanced":
            pos, neg = self.fg_bg_sampler(labels_per_image)
            keeps = [torch.where(p | n)[0] for p, n in zip(pos, neg)]
        else:
            keeps = [torch.where(lab >= 0)[0] for lab in labels_per_image]

        for i, (cand, matched, labels, keep, t) in enumerate(zip(candidates, matched_per_image, labels_per_image,
                                                                 keeps, targets)):
            cand, matched, labels = cand[keep], matched[keep], labels[keep]
            gt_boxes = t["boxes"].to(cand.dtype)
            gt_masks = t["masks"]
            if gt_boxes.shape[0] == 0:  # background-only image: any target will do, nothing is foreground
                gt_boxes = cand.new_zeros(1, 4)
                gt_masks = cand.new_zeros(1, *gt_masks.shape[-2:])
            reg = self.box_coder.encode_single(gt_boxes[matched], cand)
            all_reg.append(torch.where((labels > 0)[:, None], reg, reg.new_zeros(())))  # bg: no box target
            index = torch.full((cand.shape[0], 1), float(i), dtype=cand.dtype, device=cand.device)
            all_rois.append(torch.cat([index, cand], dim=1))
            per_gt = torch.cat([matched[:, None].to(cand.dtype), cand], dim=1)
            projected = roi_align(gt_masks[:, None].to(cand.dtype), per_gt, (self.mask_size, self.mask_size),
                                  spatial_scale=1.0, sampling_ratio=self.sampling_ratio, aligned=True)[:, 0]
            all_masks.append((projected >= 0.5).to(cand.dtype) * (labels > 0).to(cand.dtype)[:, None, None])
            all_labels.append(labels)
            counts.append(int(cand.shape[0]))
        return TrainingRoIs(torch.cat(all_rois), torch.cat(all_labels), torch.cat(all_reg), torch.cat(all_masks),
                            counts)
