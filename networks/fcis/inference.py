"""FCIS's test-time post-processing: class-wise NMS over all scored candidates and mask voting.

FCIS's test procedure scores 300 RPN proposals, refines their boxes and scores the refined boxes
again (600 candidates); every (candidate, foreground class) pair then competes in class-wise NMS at
IoU 0.3, and each kept mask is the score-weighted mean of the masks of all candidates overlapping
it at IoU >= 0.5 (mask voting).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, remove_small_boxes

from instsearch.networks.ps_roi import resample_masks

__all__ = ["clip_boxes_per_roi", "postprocess_candidates"]


def clip_boxes_per_roi(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clip ``(R, 4)`` boxes to per-RoI image sizes ``(R, 2)`` = (height, width)."""
    w = sizes[:, 1:2].to(boxes.dtype)
    h = sizes[:, 0:1].to(boxes.dtype)
    x = boxes[:, 0::2].clamp(min=0).minimum(w)
    y = boxes[:, 1::2].clamp(min=0).minimum(h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def postprocess_candidates(frames: Tensor, boxes: Tensor, probs: Tensor, mask_logits: Tensor, *,
                           score_thresh: float, nms_thresh: float, detections_per_img: int,
                           mask_voting_iou: Optional[float]) -> dict[str, Tensor]:
    """One image's candidates -> detections (class-wise NMS, top-N, masks on the final boxes).

    Args:
        frames: ``(N, 4)`` the RoIs the masks were assembled on.
        boxes: ``(N, 4)`` the regressed boxes.
        probs: ``(N, C+1)`` class probabilities.
        mask_logits: ``(N, C+1, S, S)`` per-class mask logits in the frames.
        score_thresh, nms_thresh, detections_per_img: every (candidate, foreground class) pair
            above ``score_thresh`` competes in class-wise NMS; the best ``detections_per_img`` stay.
        mask_voting_iou: ``None`` takes each detection's own class mask; otherwise its mask is the
            probability-weighted mean over all candidates whose box overlaps it at this IoU.

    Masks are resampled from each candidate's RoI onto the detection box. (FCIS's implementation
    also pastes each mask into its regressed box, but averages over the candidates' union box and
    then takes the voted mask's bounding box as the new box; here the regressed box is kept and the
    vote is taken in its frame, so boxes and masks stay consistent and the vote is one vectorised
    resampling of all (detection, voter) pairs.)

    Returns:
        ``boxes (K, 4)``, ``scores (K,)``, ``labels (K,)``, ``masks (K, 1, S, S)``.
    """
    n, c1 = probs.shape
    fg = probs[:, 1:]
    cand = torch.arange(n, device=probs.device)[:, None].expand_as(fg).reshape(-1)
    labels = torch.arange(1, c1, device=probs.device)[None, :].expand_as(fg).reshape(-1)
    scores = fg.reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    cand, labels, scores = cand[keep], labels[keep], scores[keep]
    keep = remove_small_boxes(boxes[cand], min_size=1e-2)
    cand, labels, scores = cand[keep], labels[keep], scores[keep]
    keep = batched_nms(boxes[cand], scores, labels, nms_thresh)[:detections_per_img]
    cand, labels, scores = cand[keep], labels[keep], scores[keep]
    det_boxes = boxes[cand]
    s = mask_logits.shape[-1]
    if mask_voting_iou is not None and cand.numel():
        det_idx, voter = torch.where(box_iou(det_boxes, boxes) >= mask_voting_iou)
        weight = probs[voter, labels[det_idx]]
        voter_masks = torch.sigmoid(mask_logits[voter, labels[det_idx]])
        moved = resample_masks(voter_masks, frames[voter], det_boxes[det_idx])
        total = probs.new_zeros(cand.numel(), s, s).index_add_(0, det_idx, moved * weight[:, None, None])
        norm = probs.new_zeros(cand.numel()).index_add_(0, det_idx, weight)
        masks = total / norm.clamp(min=torch.finfo(norm.dtype).tiny)[:, None, None]
    else:
        masks = resample_masks(torch.sigmoid(mask_logits[cand, labels]), frames[cand], det_boxes)
    return {"boxes": det_boxes, "scores": scores, "labels": labels, "masks": masks[:, None]}
