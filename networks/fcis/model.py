"""FCIS (Li et al., CVPR 2017) with the instance-search extensions of FCIS+XD (Zhan & Zhao).

FCIS detects and segments instances with one set of position-sensitive inside/outside score maps
(:mod:`.heads`). The RPN sits on conv4; the score maps come from conv5 (stride 16, dilated) through
a 1x1 conv. Training evaluates every proposal and trains on the hardest (:mod:`.roi_sampling`);
inference scores 300 proposals, refines their boxes, scores the refined boxes again and keeps
class-wise NMS survivors with voted masks (:mod:`.inference`).

The instance-search paper adds a second path: every detected instance is described by RoI
max-pooling of conv3 and conv4 (l2 each, concatenated, l2: 512 + 1024 = 1536-D), with its predicted
category used to prune the search. :class:`FCIS` implements
:class:`~instsearch.structures.RegionSearchModel` (:class:`~instsearch.networks.detector_search.DetectorSearchMixin`)
so one backbone pass serves detection and description.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from instsearch.losses.fcis import FCISLoss, ohem_select
from instsearch.networks.backbones import IMAGENET_MEAN, IMAGENET_STD, STAGES, build_backbone
from instsearch.networks.fcis.heads import FCISHeadOutput, FCISRPNHead, PositionSensitiveHead
from instsearch.networks.fcis.inference import clip_boxes_per_roi, postprocess_candidates
from instsearch.networks.fcis.roi_sampling import FCISRoISampler, RoISampling, TrainingRoIs
from instsearch.networks.region_features import RoIFeaturePooler, boxes_to_rois
from instsearch.networks.detector_search import DetectorSearchMixin
from instsearch.networks.resnet import ResNetBackbone

__all__ = ["FCIS", "VARIANTS", "build_fcis"]

#: The four networks of the instance-search paper: backbone arch and deformable res5a-c.
VARIANTS: dict[str, tuple[str, bool]] = {
    "fcis": ("resnet101", False),
    "fcis_d": ("resnet101", True),
    "fcis_x": ("resnext101_32x4d", False),
    "fcis_xd": ("resnext101_32x4d", True),
}


class FCIS(DetectorSearchMixin, nn.Module):
    """Fully convolutional instance-aware semantic segmentation, with instance features.

    ``forward(images, targets=None)`` works like torchvision's detectors: ``images`` a list of
    ``(3, H, W)`` float tensors in ``[0, 1]``; in training ``targets`` a list of dicts with
    ``boxes (N, 4)`` (pixels), ``labels (N,)`` int64 in ``1..C`` and ``masks (N, H, W)`` uint8/bool,
    and the result a dict of losses (``loss_objectness``, ``loss_rpn_box_reg``,
    ``loss_classifier``, ``loss_box_reg``, ``loss_mask``); in eval mode one dict per image with
    ``boxes``, ``labels``, ``scores`` and ``masks (N, 1, H, W)`` probabilities, in original pixels.

    Args:
        num_classes: classes including background (81 for COCO), as in torchvision.
        backbone, deformable, weights, frozen_stages, norm: the ResNet / ResNeXt of
            :func:`instsearch.networks.resnet.resnet_body` (conv5 dilated to stride 16).
        group_size: ``k``, the position-sensitive grid (FCIS: 7).
        mask_size: ``S``, the assembled RoI grid, a multiple of ``k`` (FCIS: 21).
        head_channels: width of the 1x1 conv on conv5 (FCIS: 1024).
        sampling_ratio: RoIAlign samples per cell side for assembling and box pooling.
        min_size, max_size: resizing of the shorter / longer side (FCIS: 600 / 1000). A sequence
            of short sides trains at a random one per image and tests at the last.
        anchor_sizes, aspect_ratios: RPN anchors on the single stride-16 conv4 map (FCIS COCO:
            scales 4, 8, 16, 32 of 16 px = 64 .. 512 px, ratios 0.5, 1, 2).
        rpn_*: torchvision RPN settings (FCIS: 6000 pre-NMS, 300 post-NMS, NMS 0.7, anchors
            positive at IoU >= 0.7, negative < 0.3, 256 per image at half positives).
        roi_sampling: ``"ohem"`` (FCIS): all proposals (+ ground truth boxes) are evaluated and
            only the ``roi_batch_size_per_image`` with the highest total loss are trained on;
            ``"balanced"``: a random ``roi_batch_size_per_image`` at ``roi_positive_fraction``
            foreground (torchvision's sampler).
        roi_fg_iou_thresh, roi_bg_iou_thresh: RoIs with IoU >= fg are foreground, < bg
            background, in between ignored (FCIS: 0.5 and 0.5, i.e. bg in [0, 0.5)).
        bbox_reg_weights: delta normalisation (FCIS's stds 0.1, 0.1, 0.2, 0.2).
        box_beta: smooth-L1 transition of the head's box loss (FCIS: 1).
        box_score_thresh, box_nms_thresh, detections_per_img: test-time filtering (FCIS: 1e-3,
            class-wise NMS 0.3, 100 per image).
        refine_boxes: FCIS's two-pass inference (the refined boxes are classified again).
        mask_voting, mask_voting_iou: FCIS's mask voting at IoU 0.5.
        feature_layers, feature_pooling, feature_output_size: the instance feature
            (paper: conv3 + conv4, max-pooling); any of conv2 .. conv5.
        pool_in_mask: pool the instance feature inside the predicted mask, not the whole box.
        region_score_thresh: detections below this score are not returned as search regions
            (the paper does not state its threshold; it reports 1.65 instances per image on
            its distractors, i.e. confident detections only).
        min_regions: each image keeps at least its best ``min_regions`` detections as regions
            even when below the threshold, so that no database image becomes unreachable.
        region_masks: return each region's mask (at original resolution) in ``Regions.masks``.
    """

    def __init__(self, num_classes: int = 81, backbone: str = "resnext101_32x4d", deformable: bool = True,
                 weights: Optional[str | Path] = None, frozen_stages: int = 2, norm: str = "auto",
                 group_size: int = 7, mask_size: int = 21, head_channels: int = 1024, sampling_ratio: int = 2,
                 min_size: int | Sequence[int] = 600, max_size: int = 1000,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 anchor_sizes: Sequence[int] = (64, 128, 256, 512),
                 aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), rpn_channels: int = 512,
                 rpn_pre_nms_top_n_train: int = 6000, rpn_post_nms_top_n_train: int = 300,
                 rpn_pre_nms_top_n_test: int = 6000, rpn_post_nms_top_n_test: int = 300,
                 rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 roi_sampling: RoISampling = "ohem", roi_batch_size_per_image: int = 128,
                 roi_positive_fraction: float = 0.25, roi_fg_iou_thresh: float = 0.5,
                 roi_bg_iou_thresh: float = 0.5, bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 box_beta: float = 1.0, box_score_thresh: float = 1e-3, box_nms_thresh: float = 0.3,
                 detections_per_img: int = 100, refine_boxes: bool = True, mask_voting: bool = True,
                 mask_voting_iou: float = 0.5, feature_layers: Sequence[str] = ("conv3", "conv4"),
                 feature_pooling: Literal["max", "avg"] = "max", feature_output_size: int = 7,
                 pool_in_mask: bool = False, region_score_thresh: float = 0.5, min_regions: int = 1,
                 region_masks: bool = True) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        bad = [name for name in feature_layers if name not in STAGES[1:]]
        if bad or not feature_layers:
            raise ValueError(f"feature_layers must be a non-empty subset of conv2..conv5, got {list(feature_layers)}")
        self.num_classes = int(num_classes)
        self.sampling_ratio = int(sampling_ratio)

        self.backbone: ResNetBackbone = build_backbone(
            backbone, weights=weights, frozen_stages=frozen_stages, stages={"conv4", "conv5", *feature_layers},
            norm=norm, deformable=deformable, dilate_conv5=True)
        channels = self.backbone.feature_info.channels
        sizes = (int(min_size),) if isinstance(min_size, int) else tuple(int(v) for v in min_size)
        self.transform = GeneralizedRCNNTransform(sizes, max_size, list(image_mean), list(image_std))
        anchors = AnchorGenerator(sizes=(tuple(int(s) for s in anchor_sizes),),
                                  aspect_ratios=(tuple(float(r) for r in aspect_ratios),))
        self.rpn = RegionProposalNetwork(
            anchors, FCISRPNHead(channels("conv4"), anchors.num_anchors_per_location()[0], rpn_channels),
            fg_iou_thresh=rpn_fg_iou_thresh, bg_iou_thresh=rpn_bg_iou_thresh,
            batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=rpn_nms_thresh)
        self.head = PositionSensitiveHead(channels("conv5"), num_classes, group_size, head_channels,
                                          mask_size=mask_size, sampling_ratio=sampling_ratio)

        self.box_coder = det_utils.BoxCoder(tuple(float(w) for w in bbox_reg_weights))
        self.roi_sampler = FCISRoISampler(self.box_coder, self.head.mask_size, roi_sampling, roi_batch_size_per_image,
                                          roi_positive_fraction, roi_fg_iou_thresh, roi_bg_iou_thresh, sampling_ratio)
        self.loss = FCISLoss(box_beta=box_beta)

        self.box_score_thresh = float(box_score_thresh)
        self.box_nms_thresh = float(box_nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.refine_boxes = bool(refine_boxes)
        self.mask_voting = bool(mask_voting)
        self.mask_voting_iou = float(mask_voting_iou)

        self.set_search_options(RoIFeaturePooler(list(feature_layers), pooling=feature_pooling,
                                                 output_size=feature_output_size, sampling_ratio=sampling_ratio),
                                pool_in_mask, region_score_thresh, min_regions, region_masks)

    @property
    def roi_sampling(self) -> RoISampling:
        return self.roi_sampler.sampling

    @property
    def group_size(self) -> int:
        return self.head.group_size

    @property
    def mask_size(self) -> int:
        return self.head.mask_size

    @property
    def feature_dim(self) -> int:
        return sum(self.backbone.feature_info.channels(name) for name in self.pooler.layers)

    # ----------------------------------------------------------------------------- shared pieces
    def encode(self, images: list[Tensor]) -> tuple[ImageList, "OrderedDict[str, Tensor]"]:
        """The resized, normalised batch and its backbone stages (one pass)."""
        image_list, _ = self.transform(images)
        return image_list, self.backbone.forward_stages(image_list.tensors)

    def head_outputs(self, maps: tuple[Tensor, Tensor], rois: Tensor, image_width: int) -> FCISHeadOutput:
        """Class logits, mask logits and box deltas of ``rois`` ``(R, 5)`` (network-input pixels)."""
        return self.head.assemble(maps, rois, image_width)

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("FCIS in training mode needs targets (boxes, labels, masks per image)")
            self._check_targets(images, targets)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone.forward_stages(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, OrderedDict(conv4=features["conv4"]), targets)
        maps = self.head(features["conv5"])
        width = image_list.tensors.shape[-1]
        if self.training:
            return {**rpn_losses, **self._head_losses(maps, proposals, targets, width)}
        detections = self._detect(maps, proposals, image_list.image_sizes, width)
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def _check_targets(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
        if len(targets) != len(images):
            raise ValueError(f"FCIS: {len(images)} images but {len(targets)} targets")
        for i, (image, t) in enumerate(zip(images, targets)):
            for key in ("boxes", "labels", "masks"):
                if key not in t:
                    raise ValueError(f"FCIS: targets[{i}] has no {key!r}; expected boxes (N, 4), labels (N,), "
                                     f"masks (N, H, W)")
            boxes, labels, masks = t["boxes"], t["labels"], t["masks"]
            n = boxes.shape[0]
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"FCIS: targets[{i}]['boxes'] must be (N, 4) [x1, y1, x2, y2], got {tuple(boxes.shape)}")
            if n and bool(((boxes[:, 2:] <= boxes[:, :2]).any())):
                raise ValueError(f"FCIS: targets[{i}]['boxes'] has an empty or inverted box")
            if labels.shape != (n,):
                raise ValueError(f"FCIS: targets[{i}]['labels'] must be ({n},), got {tuple(labels.shape)}")
            if n and (int(labels.min()) < 1 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"FCIS: targets[{i}]['labels'] must lie in 1..{self.num_classes - 1} "
                                 f"(0 is background), got {labels.tolist()}")
            if masks.shape != (n, *image.shape[-2:]):
                raise ValueError(f"FCIS: targets[{i}]['masks'] must be ({n}, {image.shape[-2]}, {image.shape[-1]}) "
                                 f"like the image, got {tuple(masks.shape)}")

    # ----------------------------------------------------------------------------- training
    def _head_losses(self, maps: tuple[Tensor, Tensor], proposals: list[Tensor],
                     targets: list[dict[str, Tensor]], width: int) -> dict[str, Tensor]:
        rois = self.select_training_rois(proposals, targets)
        if self.roi_sampling == "ohem":
            # Rank every candidate by its loss without building a graph, then assemble only the
            # hardest again with gradients: same result as FCIS's backward through the selected
            # RoIs, without keeping the whole candidate set's activations.
            with torch.no_grad():
                out = self.head_outputs(maps, rois.rois, width)
                per_roi = self.loss.per_roi(out.class_logits, out.box_deltas, out.mask_logits, rois.labels,
                                            rois.regression_targets, rois.mask_targets)
            rois = rois.select(ohem_select(per_roi, rois.counts, self.roi_sampler.batch_size_per_image))
        out = self.head_outputs(maps, rois.rois, width)
        return self.loss(out.class_logits, out.box_deltas, out.mask_logits, rois.labels, rois.regression_targets,
                         rois.mask_targets)

    def select_training_rois(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> TrainingRoIs:
        """Match proposals (+ ground-truth boxes) to the ground truth and build the head targets
        (see :class:`~instsearch.networks.fcis.roi_sampling.FCISRoISampler`)."""
        return self.roi_sampler(proposals, targets)

    # ----------------------------------------------------------------------------- inference
    def _candidates(self, maps: tuple[Tensor, Tensor], rois: Tensor, image_sizes: list[tuple[int, int]],
                    width: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """All scored instances of FCIS's inference: ``(image_index, frames, boxes, probs, mask_logits)``.

        ``frames`` are the RoIs the masks were assembled on, ``boxes`` the regressed boxes.
        Pass 1 scores the proposals; with ``refine_boxes`` pass 2 scores the regressed boxes
        again, doubling the candidates as FCIS does.
        """
        sizes = torch.tensor(image_sizes, dtype=rois.dtype, device=rois.device)[rois[:, 0].long()]
        out = self.head_outputs(maps, rois, width)
        boxes = clip_boxes_per_roi(self.box_coder.decode_single(out.box_deltas, rois[:, 1:]), sizes)
        parts = [(rois, boxes, out)]
        if self.refine_boxes:
            rois2 = torch.cat([rois[:, :1], boxes], dim=1)
            out2 = self.head_outputs(maps, rois2, width)
            boxes2 = clip_boxes_per_roi(self.box_coder.decode_single(out2.box_deltas, boxes), sizes)
            parts.append((rois2, boxes2, out2))
        cat_rois = torch.cat([p[0] for p in parts])
        return (cat_rois[:, 0].long(), cat_rois[:, 1:], torch.cat([p[1] for p in parts]),
                torch.cat([F.softmax(p[2].class_logits, dim=1) for p in parts]),
                torch.cat([p[2].mask_logits for p in parts]))

    def _detect(self, maps: tuple[Tensor, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                width: int) -> list[dict[str, Tensor]]:
        rois = boxes_to_rois(proposals).to(maps[0].device)
        image_index, frames, boxes, probs, mask_logits = self._candidates(maps, rois, image_sizes, width)
        results = []
        for i in range(len(proposals)):
            sel = torch.where(image_index == i)[0]
            results.append(self.postprocess_candidates(frames[sel], boxes[sel], probs[sel], mask_logits[sel]))
        return results

    def postprocess_candidates(self, frames: Tensor, boxes: Tensor, probs: Tensor,
                               mask_logits: Tensor) -> dict[str, Tensor]:
        """One image's candidates -> detections with this network's test settings
        (:func:`~instsearch.networks.fcis.inference.postprocess_candidates`)."""
        return postprocess_candidates(frames, boxes, probs, mask_logits, score_thresh=self.box_score_thresh,
                                      nms_thresh=self.box_nms_thresh, detections_per_img=self.detections_per_img,
                                      mask_voting_iou=self.mask_voting_iou if self.mask_voting else None)

    # ----------------------------------------------------------------------------- instance search
    def detections(self, image_list: ImageList, features: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        proposals, _ = self.rpn(image_list, OrderedDict(conv4=features["conv4"]))
        width = image_list.tensors.shape[-1]
        return self._detect(self.head(features["conv5"]), proposals, image_list.image_sizes, width)

    def classify_rois(self, image_list: ImageList, features: Mapping[str, Tensor], boxes: list[Tensor],
                      want_masks: bool) -> tuple[Tensor, Optional[Tensor]]:
        rois = boxes_to_rois(boxes).to(image_list.tensors.device)
        out = self.head_outputs(self.head(features["conv5"]), rois, image_list.tensors.shape[-1])
        labels = out.class_logits[:, 1:].argmax(dim=1) + 1
        if not want_masks:
            return labels, None
        return labels, torch.sigmoid(out.mask_logits[torch.arange(len(labels), device=labels.device), labels])


def build_fcis(variant: str = "fcis_xd", **kwargs) -> FCIS:
    """One of the paper's four networks: ``fcis``, ``fcis_d``, ``fcis_x`` or ``fcis_xd``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FCIS variant {variant!r}; expected one of {sorted(VARIANTS)}")
    arch, deformable = VARIANTS[variant]
    return FCIS(backbone=kwargs.pop("backbone", arch), deformable=kwargs.pop("deformable", deformable), **kwargs)
