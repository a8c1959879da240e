"""FCIS (Li et al., CVPR 2017) with the instance-search extensions of FCIS+XD (Zhan & Zhao).

FCIS detects and segments instances with one set of *position-sensitive inside/outside score maps*:
for every class, ``k x k`` pairs of maps each score "pixel inside the instance" / "outside" for one
relative position (top-left ... bottom-right) in an RoI. Assembling an RoI reads each of its
``k x k`` bins from the maps of that position; then, per class,

* mask probability per pixel = ``softmax(inside, outside)[inside]``,
* class score = mean over the RoI of ``max(inside, outside)``, softmax over the ``C + 1`` classes,

and a sibling set of ``4 k^2`` maps regresses the box by position-sensitive average pooling. The
RPN sits on conv4; the score maps come from conv5 (stride 16, dilated) through a 1x1 conv.

The instance-search paper adds a second path: every detected instance is described by RoI
max-pooling of conv3 and conv4 (l2 each, concatenated, l2: 512 + 1024 = 1536-D), with its predicted
category used to prune the search. :class:`FCIS` implements
:class:`~instsearch.structures.RegionSearchModel` so one backbone pass serves detection and
description. :func:`build_mask_rcnn` gives torchvision's Mask R-CNN on the same backbone, with the
same search interface, for comparison.

Inference follows FCIS's test procedure: 300 RPN proposals, box refinement, the refined boxes
passed through the head again (600 candidates), class-wise NMS at IoU 0.3 and mask voting (each
kept mask is the score-weighted mean of the masks of all candidates overlapping it at IoU >= 0.5).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, remove_small_boxes, roi_align

from instsearch.structures import Regions
from instsearch.losses.fcis import FCISLoss, ohem_select
from instsearch.networks.ps_roi import ps_roi_assemble, ps_roi_box_pool, resample_masks
from instsearch.networks.region_features import RoIFeaturePooler, boxes_to_rois
from instsearch.networks.resnet import STAGES, ResNetBackbone, build_resnet

__all__ = ["FCIS", "FCISHeadOutput", "FCISRPNHead", "PositionSensitiveHead", "MaskRCNNSearch", "VARIANTS",
           "build_fcis", "build_mask_rcnn", "fcis_scores"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The four networks of the instance-search paper: backbone arch and deformable res5a-c.
VARIANTS: dict[str, tuple[str, bool]] = {
    "fcis": ("resnet101", False),
    "fcis_d": ("resnet101", True),
    "fcis_x": ("resnext101_32x4d", False),
    "fcis_xd": ("resnext101_32x4d", True),
}

RoISampling = Literal["ohem", "balanced"]


# --------------------------------------------------------------------------------------------- heads
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
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        hidden = [F.relu(self.conv(f)) for f in x]
        # float32 outputs: under bf16 autocast the RPN would otherwise decode its proposals in
        # bf16, whose 8-bit mantissa rounds an 800-pixel coordinate to 4 pixels.
        return [self.cls_logits(h).float() for h in hidden], [self.bbox_pred(h).float() for h in hidden]


class PositionSensitiveHead(nn.Module):
    """conv5 -> 1x1 conv (1024) + ReLU -> inside/outside score maps and box maps.

    Outputs ``(B, 2 k^2 (C+1), H, W)`` score maps, channel ``(t * (C+1) + c) * k^2 + bin`` for
    ``t = 0`` inside / ``1`` outside, class ``c`` and RoI bin ``bin = i * k + j``; and
    ``(B, 4 k^2, H, W)`` class-agnostic box maps, channel ``d * k^2 + bin``.
    """

    def __init__(self, in_channels: int, num_classes: int, group_size: int = 7, mid_channels: int = 1024) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.group_size = int(group_size)
        k2 = self.group_size ** 2
        self.reduce = nn.Conv2d(in_channels, mid_channels, 1)
        self.cls_seg = nn.Conv2d(mid_channels, 2 * k2 * self.num_classes, 1)
        self.bbox = nn.Conv2d(mid_channels, 4 * k2, 1)
        for layer in (self.reduce, self.cls_seg, self.bbox):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.reduce(x))
        return self.cls_seg(h), self.bbox(h)


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


@dataclass
class FCISHeadOutput:
    class_logits: Tensor  # (R, C+1)
    mask_logits: Tensor  # (R, C+1, S, S) inside - outside
    box_deltas: Tensor  # (R, 4) class-agnostic, encoded with the head's BoxCoder


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run in eval mode (test-time proposal counts and post-processing), then restore."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _select_regions(det: dict[str, Tensor], score_thresh: float, min_regions: int) -> dict[str, Tensor]:
    """Detections scoring at least ``score_thresh``, and at least the best ``min_regions``, best first."""
    order = torch.argsort(det["scores"], descending=True)
    confident = det["scores"][order] >= score_thresh
    confident[:min_regions] = True
    keep = order[confident]
    return {k: v[keep] for k, v in det.items()}


def _clip_per_roi(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Clip ``(R, 4)`` boxes to per-RoI image sizes ``(R, 2)`` = (height, width)."""
    w = sizes[:, 1:2].to(boxes.dtype)
    h = sizes[:, 0:1].to(boxes.dtype)
    x = boxes[:, 0::2].clamp(min=0).minimum(w)
    y = boxes[:, 1::2].clamp(min=0).minimum(h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


class _RegionSearchMixin:
    """The instance-search interface (:class:`~instsearch.structures.RegionSearchModel`) on top of a
    detector, shared by :class:`FCIS` and :class:`MaskRCNNSearch`.

    The detector provides ``_backbone_pass(images) -> (image_list, features)`` (every backbone
    stage of the resized batch), ``_detections(image_list, features)`` (torchvision-style dicts in
    network pixels, ``masks (K, 1, M, M)`` on the boxes) and ``_classify(image_list, features,
    boxes, want_masks) -> (labels, mask probabilities (R, M, M) or None)`` for given boxes.
    """

    predicts_labels = True
    pooler: RoIFeaturePooler
    pool_in_mask: bool
    region_score_thresh: float
    min_regions: int
    region_masks: bool

    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: detected instances with their features, from one backbone pass.

        ``labels`` are the predicted categories (for category pruning); boxes and masks are in the
        pixels of the given images.
        """
        with _eval_mode(self):
            original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
            image_list, features = self._backbone_pass(images)
            dets = [_select_regions(d, self.region_score_thresh, self.min_regions)
                    for d in self._detections(image_list, features)]
            masks = None
            if self.pool_in_mask:
                masks = [paste_masks_in_image(d["masks"], d["boxes"], size)[:, 0]
                         for d, size in zip(dets, image_list.image_sizes)]
            pooled = self.pooler(features, [d["boxes"] for d in dets], tuple(image_list.tensors.shape[-2:]), masks)
            out = []
            for d, f, size, orig in zip(dets, pooled.split([len(d["boxes"]) for d in dets]),
                                        image_list.image_sizes, original_sizes):
                boxes = resize_boxes(d["boxes"], list(size), list(orig))
                region_masks = paste_masks_in_image(d["masks"], boxes, orig)[:, 0] if self.region_masks else None
                out.append(Regions(boxes=boxes.float(), scores=d["scores"].float(), features=f.float(),
                                   labels=d["labels"], masks=region_masks))
            return out

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: the same instance feature for given boxes (pixels of the given images).

        With ``pool_in_mask`` the feature is pooled inside the mask the detector predicts on the
        box for its predicted category, as on the database side.
        """
        return self._describe(images, boxes, features_wanted=True)[0]

    @torch.no_grad()
    def classify_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Predicted foreground category of each given box (the detector's class scores on that RoI)."""
        return self._describe(images, boxes, features_wanted=False)[1]

    def _describe(self, images: list[Tensor], boxes: list[Tensor],
                  features_wanted: bool) -> tuple[list[Tensor], list[Tensor]]:
        if len(boxes) != len(images):
            raise ValueError(f"{type(self).__name__}: {len(images)} images but {len(boxes)} box lists")
        with _eval_mode(self):
            original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
            image_list, features = self._backbone_pass(images)
            net_boxes = [resize_boxes(b.to(image_list.tensors), list(orig), list(size))
                         for b, orig, size in zip(boxes, original_sizes, image_list.image_sizes)]
            counts = [len(b) for b in net_boxes]
            if not features_wanted:
                labels, _ = self._classify(image_list, features, net_boxes, want_masks=False)
                return [], list(labels.split(counts))
            masks = None
            if self.pool_in_mask:
                _, probs = self._classify(image_list, features, net_boxes, want_masks=True)
                masks = [paste_masks_in_image(m[:, None], b, size)[:, 0]
                         for m, b, size in zip(probs.split(counts), net_boxes, image_list.image_sizes)]
            pooled = self.pooler(features, net_boxes, tuple(image_list.tensors.shape[-2:]), masks)
            return [f.float() for f in pooled.split(counts)], []


# --------------------------------------------------------------------------------------------- FCIS
class FCIS(_RegionSearchMixin, nn.Module):
    """Fully convolutional instance-aware semantic segmentation, with instance features.

    ``forward(images, targets=None)`` works like torchvision's detectors: ``images`` a list of
    ``(3, H, W)`` float tensors in ``[0, 1]``; in training ``targets`` a list of dicts with
    ``boxes (N, 4)`` (pixels), ``labels (N,)`` int64 in ``1..C`` and ``masks (N, H, W)`` uint8/bool,
    and the result a dict of losses (``loss_objectness``, ``loss_rpn_box_reg``,
    ``loss_classifier``, ``loss_box_reg``, ``loss_mask``); in eval mode one dict per image with
    ``boxes``, ``labels``, ``scores`` and ``masks (N, 1, H, W)`` probabilities, in original pixels.

    Args:
        num_classes: classes including background (81 for COCO), as in torchvision.
        backbone, deformable, weights, frozen_stages, norm: see :func:`instsearch.networks.resnet.build_resnet`.
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
        if mask_size % group_size != 0:
            raise ValueError(f"mask_size {mask_size} must be a multiple of group_size {group_size}")
        if roi_sampling not in ("ohem", "balanced"):
            raise ValueError(f"roi_sampling must be 'ohem' or 'balanced', got {roi_sampling!r}")
        bad = [name for name in feature_layers if name not in STAGES[1:]]
        if bad or not feature_layers:
            raise ValueError(f"feature_layers must be a non-empty subset of conv2..conv5, got {list(feature_layers)}")
        self.num_classes = int(num_classes)
        self.group_size = int(group_size)
        self.mask_size = int(mask_size)
        self.sampling_ratio = int(sampling_ratio)

        stages = sorted({"conv4", "conv5", *feature_layers}, key=STAGES.index)
        self.backbone: ResNetBackbone = build_resnet(backbone, deformable=deformable, dilate_conv5=True,
                                                     weights=weights, frozen_stages=frozen_stages, norm=norm,
                                                     return_stages=stages)
        sizes = (int(min_size),) if isinstance(min_size, int) else tuple(int(v) for v in min_size)
        self.transform = GeneralizedRCNNTransform(sizes, max_size, list(image_mean), list(image_std))
        anchors = AnchorGenerator(sizes=(tuple(int(s) for s in anchor_sizes),),
                                  aspect_ratios=(tuple(float(r) for r in aspect_ratios),))
        self.rpn = RegionProposalNetwork(
            anchors, FCISRPNHead(self.backbone.out_channels["conv4"], anchors.num_anchors_per_location()[0],
                                 rpn_channels),
            fg_iou_thresh=rpn_fg_iou_thresh, bg_iou_thresh=rpn_bg_iou_thresh,
            batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=rpn_nms_thresh)
        self.head = PositionSensitiveHead(self.backbone.out_channels["conv5"], num_classes, group_size, head_channels)

        self.roi_sampling = roi_sampling
        self.roi_batch_size_per_image = int(roi_batch_size_per_image)
        self.proposal_matcher = det_utils.Matcher(roi_fg_iou_thresh, roi_bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(roi_batch_size_per_image, roi_positive_fraction)
        self.box_coder = det_utils.BoxCoder(tuple(float(w) for w in bbox_reg_weights))
        self.loss = FCISLoss(box_beta=box_beta)

        self.box_score_thresh = float(box_score_thresh)
        self.box_nms_thresh = float(box_nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.refine_boxes = bool(refine_boxes)
        self.mask_voting = bool(mask_voting)
        self.mask_voting_iou = float(mask_voting_iou)

        self.pooler = RoIFeaturePooler(list(feature_layers), pooling=feature_pooling,
                                       output_size=feature_output_size, sampling_ratio=sampling_ratio)
        self.pool_in_mask = bool(pool_in_mask)
        self.region_score_thresh = float(region_score_thresh)
        self.min_regions = int(min_regions)
        self.region_masks = bool(region_masks)

    @property
    def feature_dim(self) -> int:
        return sum(self.backbone.out_channels[name] for name in self.pooler.layers)

    # ----------------------------------------------------------------------------- shared pieces
    def _features(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        return image_list, targets, features

    def head_outputs(self, maps: tuple[Tensor, Tensor], rois: Tensor, image_width: int) -> FCISHeadOutput:
        """Class logits, mask logits and box deltas of ``rois`` ``(R, 5)`` (network-input pixels)."""
        score_maps, box_maps = maps
        scale = score_maps.shape[-1] / image_width
        assembled = ps_roi_assemble(score_maps, rois, self.group_size, self.mask_size, scale, self.sampling_ratio)
        class_logits, mask_logits = fcis_scores(assembled, self.num_classes)
        box_deltas = ps_roi_box_pool(box_maps, rois, self.group_size, scale, self.sampling_ratio)
        return FCISHeadOutput(class_logits, mask_logits, box_deltas)

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("FCIS in training mode needs targets (boxes, labels, masks per image)")
            self._check_targets(images, targets)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, targets, features = self._features(images, targets)
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
        rois, labels, regression_targets, mask_targets, counts = self.select_training_rois(proposals, targets)
        index = None
        if self.roi_sampling == "ohem":
            # Rank every candidate by its loss without building a graph, then assemble only the
            # hardest again with gradients: same result as FCIS's backward through the selected
            # RoIs, without keeping the whole candidate set's activations.
            with torch.no_grad():
                out = self.head_outputs(maps, rois, width)
                per_roi = self.loss.per_roi(out.class_logits, out.box_deltas, out.mask_logits, labels,
                                            regression_targets, mask_targets)
            index = ohem_select(per_roi, counts, self.roi_batch_size_per_image)
            rois, labels = rois[index], labels[index]
            regression_targets, mask_targets = regression_targets[index], mask_targets[index]
        out = self.head_outputs(maps, rois, width)
        return self.loss(out.class_logits, out.box_deltas, out.mask_logits, labels, regression_targets, mask_targets)

    def select_training_rois(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Match proposals (+ ground-truth boxes) to the ground truth and build the head targets.

        Returns ``rois (R, 5)``, ``labels (R,)`` (0 background), ``regression_targets (R, 4)``,
        ``mask_targets (R, S, S)`` (the matched ground-truth mask resampled on the RoI grid and
        binarised at 0.5, as FCIS's targets; zero for background) and the RoI count per image.
        With balanced sampling the RoIs are already subsampled; with OHEM they are all candidates.
        """
        all_rois, all_labels, all_reg, all_masks, counts = [], [], [], [], []
        matched_per_image, labels_per_image, candidates = [], [], []
        for proposals_i, t in zip(proposals, targets):
            gt_boxes = t["boxes"].to(proposals_i.dtype)
            cand = torch.cat([proposals_i.detach(), gt_boxes])
            if gt_boxes.shape[0] == 0:
                matched = torch.full((cand.shape[0],), self.proposal_matcher.BELOW_LOW_THRESHOLD,
                                     dtype=torch.long, device=cand.device)
            else:
                matched = self.proposal_matcher(box_iou(gt_boxes, cand))
            labels = torch.zeros(cand.shape[0], dtype=torch.long, device=cand.device)
            if gt_boxes.shape[0]:
                labels = t["labels"].to(torch.long)[matched.clamp(min=0)]
            labels = torch.where(matched == self.proposal_matcher.BELOW_LOW_THRESHOLD, 0, labels)
            labels = torch.where(matched == self.proposal_matcher.BETWEEN_THRESHOLDS, -1, labels)
            matched_per_image.append(matched.clamp(min=0))
            labels_per_image.append(labels)
            candidates.append(cand)

        if self.roi_sampling == "balanced":
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
        return (torch.cat(all_rois), torch.cat(all_labels), torch.cat(all_reg), torch.cat(all_masks), counts)

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
        boxes = _clip_per_roi(self.box_coder.decode_single(out.box_deltas, rois[:, 1:]), sizes)
        parts = [(rois, boxes, out)]
        if self.refine_boxes:
            rois2 = torch.cat([rois[:, :1], boxes], dim=1)
            out2 = self.head_outputs(maps, rois2, width)
            boxes2 = _clip_per_roi(self.box_coder.decode_single(out2.box_deltas, boxes), sizes)
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
        """One image's candidates -> detections (class-wise NMS, top-N, masks on the final boxes).

        Every (candidate, foreground class) pair above ``box_score_thresh`` competes in class-wise
        NMS. A kept detection's mask is its own class's mask -- or, with mask voting, the
        probability-weighted mean over all candidates whose box overlaps it at
        ``IoU >= mask_voting_iou`` -- resampled from each candidate's RoI onto the detection box.
        (FCIS's implementation also pastes each mask into its regressed box, but averages over the
        candidates' union box and then takes the voted mask's bounding box as the new box; here the
        regressed box is kept and the vote is taken in its frame, so boxes and masks stay
        consistent and the vote is one vectorised resampling of all (detection, voter) pairs.)
        Returns ``boxes (K, 4)``, ``scores (K,)``, ``labels (K,)``, ``masks (K, 1, S, S)``.
        """
        n, c1 = probs.shape
        fg = probs[:, 1:]
        cand = torch.arange(n, device=probs.device)[:, None].expand_as(fg).reshape(-1)
        labels = torch.arange(1, c1, device=probs.device)[None, :].expand_as(fg).reshape(-1)
        scores = fg.reshape(-1)
        keep = torch.where(scores > self.box_score_thresh)[0]
        cand, labels, scores = cand[keep], labels[keep], scores[keep]
        keep = remove_small_boxes(boxes[cand], min_size=1e-2)
        cand, labels, scores = cand[keep], labels[keep], scores[keep]
        keep = batched_nms(boxes[cand], scores, labels, self.box_nms_thresh)[: self.detections_per_img]
        cand, labels, scores = cand[keep], labels[keep], scores[keep]
        det_boxes = boxes[cand]
        s = self.mask_size
        if self.mask_voting and cand.numel():
            det_idx, voter = torch.where(box_iou(det_boxes, boxes) >= self.mask_voting_iou)
            weight = probs[voter, labels[det_idx]]
            voter_masks = torch.sigmoid(mask_logits[voter, labels[det_idx]])
            moved = resample_masks(voter_masks, frames[voter], det_boxes[det_idx])
            total = probs.new_zeros(cand.numel(), s, s).index_add_(0, det_idx, moved * weight[:, None, None])
            norm = probs.new_zeros(cand.numel()).index_add_(0, det_idx, weight)
            masks = total / norm.clamp(min=torch.finfo(norm.dtype).tiny)[:, None, None]
        else:
            masks = resample_masks(torch.sigmoid(mask_logits[cand, labels]), frames[cand], det_boxes)
        return {"boxes": det_boxes, "scores": scores, "labels": labels, "masks": masks[:, None]}

    # ----------------------------------------------------------------------------- instance search
    def _backbone_pass(self, images: list[Tensor]):
        image_list, _, features = self._features(images)
        return image_list, features

    def _detections(self, image_list: ImageList, features: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        proposals, _ = self.rpn(image_list, OrderedDict(conv4=features["conv4"]))
        width = image_list.tensors.shape[-1]
        return self._detect(self.head(features["conv5"]), proposals, image_list.image_sizes, width)

    def _classify(self, image_list: ImageList, features: Mapping[str, Tensor], boxes: list[Tensor],
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


# --------------------------------------------------------------------------------------------- Mask R-CNN
class _SingleLevel(nn.Module):
    """Exposes one backbone stage as the single feature level torchvision's detectors expect."""

    def __init__(self, body: ResNetBackbone, level: str) -> None:
        super().__init__()
        self.body = body
        self.level = level
        self.out_channels = body.out_channels[level]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict([("0", self.body(x)[self.level])])


class MaskRCNNSearch(_RegionSearchMixin, nn.Module):
    """torchvision's Mask R-CNN on a single-level (conv4 or dilated conv5) ResNet/ResNeXt, with the
    same instance-search interface as :class:`FCIS` (for comparing the detectors under one feature).

    ``forward`` is Mask R-CNN's own; ``detect_regions`` runs its stages by hand so that the one
    backbone pass also yields the layers the region features are pooled from.
    """

    def __init__(self, model: MaskRCNN, pooler: RoIFeaturePooler, pool_in_mask: bool = False,
                 region_score_thresh: float = 0.5, min_regions: int = 1, region_masks: bool = True) -> None:
        super().__init__()
        if not isinstance(model.backbone, _SingleLevel):
            raise TypeError("MaskRCNNSearch expects a Mask R-CNN built by build_mask_rcnn (single-level backbone)")
        self.model = model
        self.level = model.backbone.level
        self.pooler = pooler
        self.pool_in_mask = bool(pool_in_mask)
        self.region_score_thresh = float(region_score_thresh)
        self.min_regions = int(min_regions)
        self.region_masks = bool(region_masks)

    @property
    def body(self) -> ResNetBackbone:
        """The backbone returning every stage (the detector itself sees only ``level``)."""
        return self.model.backbone.body

    @property
    def feature_dim(self) -> int:
        return sum(self.body.out_channels[name] for name in self.pooler.layers)

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        return self.model(images, targets)

    def _backbone_pass(self, images: list[Tensor]):
        image_list, _ = self.model.transform(images)
        return image_list, self.body(image_list.tensors)

    def _detections(self, image_list: ImageList, features: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        level = OrderedDict([("0", features[self.level])])
        proposals, _ = self.model.rpn(image_list, level)
        detections, _ = self.model.roi_heads(level, proposals, image_list.image_sizes)
        return detections

    def _classify(self, image_list: ImageList, features: Mapping[str, Tensor], boxes: list[Tensor],
                  want_masks: bool) -> tuple[Tensor, Optional[Tensor]]:
        level = OrderedDict([("0", features[self.level])])
        heads = self.model.roi_heads
        class_logits, _ = heads.box_predictor(heads.box_head(heads.box_roi_pool(level, boxes, image_list.image_sizes)))
        labels = class_logits[:, 1:].argmax(dim=1) + 1
        if not want_masks:
            return labels, None
        mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(level, boxes, image_list.image_sizes)))
        return labels, torch.sigmoid(mask_logits[torch.arange(len(labels), device=labels.device), labels])


def build_mask_rcnn(backbone: str = "resnext101_32x4d", num_classes: int = 81, level: Literal["conv4", "conv5"] = "conv5",
                    deformable: bool = False, weights: Optional[str | Path] = None, frozen_stages: int = 2,
                    norm: str = "auto", min_size: int = 600, max_size: int = 1000,
                    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), representation_size: int = 1024,
                    feature_layers: Sequence[str] = ("conv3", "conv4"),
                    feature_pooling: Literal["max", "avg"] = "max", pool_in_mask: bool = False,
                    region_score_thresh: float = 0.5, min_regions: int = 1, region_masks: bool = True,
                    **mask_rcnn_kwargs) -> MaskRCNNSearch:
    """torchvision Mask R-CNN on one stage (conv4 at stride 16, or the dilated conv5) of the same
    backbones as FCIS, wrapped with the instance-search interface.

    Extra keyword arguments go to :class:`torchvision.models.detection.MaskRCNN` (``rpn_*``,
    ``box_*`` thresholds ...).
    """
    if level not in ("conv4", "conv5"):
        raise ValueError(f"Mask R-CNN level must be 'conv4' or 'conv5', got {level!r}")
    stages = sorted({level, *feature_layers}, key=STAGES.index)
    body = build_resnet(backbone, deformable=deformable, dilate_conv5=True, weights=weights,
                        frozen_stages=frozen_stages, norm=norm, return_stages=stages)
    channels = body.out_channels[level]
    anchors = AnchorGenerator(sizes=(tuple(int(s) for s in anchor_sizes),),
                              aspect_ratios=(tuple(float(r) for r in aspect_ratios),))
    model = MaskRCNN(
        _SingleLevel(body, level), num_classes=None, min_size=min_size, max_size=max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2),
        mask_predictor=MaskRCNNPredictor(256, 256, num_classes),  # on torchvision's default 4x256 mask head
        **mask_rcnn_kwargs)
    pooler = RoIFeaturePooler(list(feature_layers), pooling=feature_pooling)
    return MaskRCNNSearch(model, pooler, pool_in_mask=pool_in_mask,
                          region_score_thresh=region_score_thresh, min_regions=min_regions, region_masks=region_masks)
