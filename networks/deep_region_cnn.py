"""Deep region CNN (Mei, Min, Duan & Jiang 2018): a fine-tuned Faster R-CNN finds the object
regions of each image, and the top-K regions are described by CNN features.

Offline, the detector is fine-tuned on the instance dataset with the first two convolution stages
fixed (``frozen_stages=2``). Online, each database image keeps its ``top_k`` highest-scoring boxes
(K = 2 is the paper's best) with one feature each; the paper's feature is VGG-16 FC7 (4096-D),
which here is the detector's own box head (``feature_layers=["box_head"]``: fc6/fc7 initialised
from VGG-16's classifier, applied to RoIAlign-ed conv5_3). Convolutional variants pool any stage
instead (``["conv5"]``, ``["conv4", "conv5"]``, ...). The paper's image-level variants fuse the K
region features by concatenation, mean or max (:meth:`DeepRegionCNN.fuse_top_k`).

Choices where the paper is silent or the library differs, all configurable:

* Region features come from the *same* forward pass as the detection (RoIAlign on the fine-tuned
  maps). The paper crops each box and feeds it to an ImageNet VGG-16; ``database_mode="crop"``
  / ``query_mode="crop"`` reproduce that (the crop is resized like an image and described as one
  whole-crop RoI), at the price of one more backbone pass per region.
* Boxes come from torchvision's post-processing (per-class NMS 0.5, scores = class softmax); the
  score threshold defaults to 0, so every image has its K regions. An image with no detection at
  all (degenerate input) falls back to its whole frame with score 0 so that it stays searchable.
* ``search_mode="global"`` turns the network into the whole-image baseline the paper compares
  with: one region per image (its full frame) described by GeM / MAC / SPoC / R-MAC of a backbone
  stage, and queries described by the same pooling over the query crop.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image

from instsearch.structures import Regions
from instsearch.networks.backbones import STAGES, StagedBackbone, build_backbone
from instsearch.networks.global_descriptors import build_global_pooling, valid_mask
from instsearch.networks.region_features import RoIFeaturePooler, fuse_regions, l2_concat
from instsearch.networks.weights import load_weights

__all__ = ["DeepRegionCNN", "DetectionTransform", "BOX_HEAD"]

log = logging.getLogger(__name__)

#: The special feature layer name: the detector's box-head representation (FC7 for VGG-16).
BOX_HEAD = "box_head"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
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


class DeepRegionCNN(nn.Module):
    """Faster R-CNN on a staged backbone, with region features for instance search.

    Implements :class:`instsearch.structures.RegionSearchModel`.

    Args:
        backbone: ``"vgg16"`` (the paper's), ``"resnet50_fpn"`` or ``"small"`` (CPU demo).
        num_classes: detector classes including background (2 = class-agnostic "object").
        weights: backbone weights file (ImageNet); ``None`` = random init, said once.
        detector_weights: a whole-detector checkpoint (a torchvision Faster R-CNN state dict or a
            saved :class:`DeepRegionCNN`), loaded after ``weights``; heads of another class count
            are skipped.
        frozen_stages: leading backbone stages kept fixed (2: conv1 and conv2, as in the paper).
        min_size / max_size: detector resize (short side / long-side cap); ``None`` = the
            backbone's default (600/1000 VGG-16, 800/1333 ResNet-50-FPN, 160/320 small).
            ``min_size`` may be a tuple for multi-scale training.
        max_upscale: cap on the resize factor (``1.0`` never enlarges an image).
        anchor_sizes / aspect_ratios: per RPN level; ``None`` = the backbone's defaults.
        rpn_fg_iou_thresh / rpn_bg_iou_thresh: RPN anchor labels. The paper's rule -- positive
            above 0.7 IoU *or* the best anchor of a ground-truth box, negative below 0.3 -- is
            torchvision's: its RPN builds ``Matcher(0.7, 0.3, allow_low_quality_matches=True)``.
        rpn_pre_nms_top_n_train / ..._test, rpn_post_nms_top_n_train / ..._test,
            box_batch_size_per_image: ``None`` = the backbone's defaults.
        box_score_thresh: minimum class score of a detection (default 0: top-K always exists).
        box_nms_thresh / box_detections_per_img: torchvision's post-processing.
        top_k: regions kept per database image (2 in the paper; evaluators may ask for more).
        feature_layers: what describes a region, concatenated in this order after per-part l2:
            ``"box_head"`` (the detector's box representation, FC7 for VGG-16), any stage
            ``"conv1"``..``"conv5"``, or an FPN level ``"p2"``..``"p6"``.
        pooling / output_size / sampling_ratio: RoI pooling of the stage layers.
        fusion: default mode of :meth:`fuse_top_k` (``"concat"``, the paper's best).
        query_mode / database_mode: ``"roi"`` pools the box on the whole image's maps; ``"crop"``
            cuts the box out, resizes it like an image and describes the whole crop.
        search_mode: ``"regions"`` (the method) or ``"global"`` (whole-image baseline).
        global_layer / global_pooling / gem_p: the global descriptor (GeM p=3 over conv5).
        crop_batch_size: crops encoded per backbone batch in crop mode (bounds memory).
        image_mean / image_std: input normalisation (ImageNet's, as the pretrained backbones).
    """

    def __init__(
        self,
        backbone: str = "vgg16",
        num_classes: int = 2,
        weights: Union[str, Path, None] = None,
        detector_weights: Union[str, Path, None] = None,
        frozen_stages: int = 2,
        min_size: Union[int, Sequence[int], None] = None,
        max_size: Optional[int] = None,
        max_upscale: Optional[float] = None,
        anchor_sizes: Optional[Sequence[Sequence[int]]] = None,
        aspect_ratios: Optional[Sequence[float]] = None,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_pre_nms_top_n_train: Optional[int] = None,
        rpn_post_nms_top_n_train: Optional[int] = None,
        rpn_pre_nms_top_n_test: Optional[int] = None,
        rpn_post_nms_top_n_test: Optional[int] = None,
        box_batch_size_per_image: Optional[int] = None,
        box_score_thresh: float = 0.0,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        top_k: int = 2,
        feature_layers: Sequence[str] = (BOX_HEAD,),
        pooling: Literal["max", "avg"] = "max",
        output_size: int = 7,
        sampling_ratio: int = 2,
        fusion: Literal["concat", "mean", "max"] = "concat",
        query_mode: Literal["roi", "crop"] = "roi",
        database_mode: Literal["roi", "crop"] = "roi",
        search_mode: Literal["regions", "global"] = "regions",
        global_layer: str = "conv5",
        global_pooling: Literal["gem", "mac", "spoc", "rmac"] = "gem",
        gem_p: float = 3.0,
        crop_batch_size: int = 16,
        image_mean: Sequence[float] = _IMAGENET_MEAN,
        image_std: Sequence[float] = _IMAGENET_STD,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        for option, value, allowed in (("query_mode", query_mode, ("roi", "crop")),
                                       ("database_mode", database_mode, ("roi", "crop")),
                                       ("search_mode", search_mode, ("regions", "global")),
                                       ("fusion", fusion, ("concat", "mean", "max"))):
            if value not in allowed:
                raise ValueError(f"{option} must be one of {allowed}, got {value!r}")
        staged: StagedBackbone = build_backbone(backbone, weights=weights, frozen_stages=frozen_stages)
        d = staged.defaults
        anchor_sizes = tuple(tuple(int(s) for s in level) for level in (anchor_sizes or d.anchor_sizes))
        aspect_ratios = tuple(float(r) for r in (aspect_ratios or d.aspect_ratios))
        if len(anchor_sizes) != len(d.anchor_sizes):
            raise ValueError(f"backbone {backbone!r} feeds the RPN {len(d.anchor_sizes)} feature maps, so "
                             f"anchor_sizes needs {len(d.anchor_sizes)} tuples (one per map), got {len(anchor_sizes)}")
        if len({len(level) for level in anchor_sizes}) != 1:
            raise ValueError(f"every RPN level needs the same number of anchor sizes (one shared RPN head), "
                             f"got {anchor_sizes}")
        anchors = AnchorGenerator(anchor_sizes, (aspect_ratios,) * len(anchor_sizes))
        min_size = d.min_size if min_size is None else min_size
        max_size = d.max_size if max_size is None else max_size
        representation = staged.representation_size
        self.detector = FasterRCNN(
            staged,
            num_classes=None,
            min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=_or_default(rpn_pre_nms_top_n_train, d.rpn_pre_nms_top_n_train),
            rpn_post_nms_top_n_train=_or_default(rpn_post_nms_top_n_train, d.rpn_post_nms_top_n_train),
            rpn_pre_nms_top_n_test=_or_default(rpn_pre_nms_top_n_test, d.rpn_pre_nms_top_n_test),
            rpn_post_nms_top_n_test=_or_default(rpn_post_nms_top_n_test, d.rpn_post_nms_top_n_test),
            rpn_fg_iou_thresh=rpn_fg_iou_thresh, rpn_bg_iou_thresh=rpn_bg_iou_thresh,
            box_roi_pool=MultiScaleRoIAlign(staged.detection_maps, output_size=7, sampling_ratio=2),
            box_head=staged.make_box_head(7),
            box_predictor=FastRCNNPredictor(representation, num_classes),
            box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
            box_batch_size_per_image=_or_default(box_batch_size_per_image, d.box_batch_size_per_image),
        )
        self.detector.transform = DetectionTransform(min_size, max_size, image_mean, image_std,
                                                     max_upscale=max_upscale)
        if detector_weights is not None:
            load_weights(self.detector, detector_weights, name=f"deep_region_cnn[{backbone}]",
                         key_map=lambda k: k[len("detector."):] if k.startswith("detector.") else k)

        self.backbone_name = backbone
        self.num_classes = num_classes
        self.top_k = int(top_k)
        self.feature_layers = list(feature_layers)
        known = set(STAGES) | {BOX_HEAD} | self._fpn_level_names()
        unknown = [name for name in self.feature_layers if name not in known]
        if not self.feature_layers or unknown:
            raise ValueError(f"feature_layers {self.feature_layers} must name some of {sorted(known)}")
        if global_layer not in set(STAGES) | self._fpn_level_names():
            raise ValueError(f"global_layer {global_layer!r} must be a stage {STAGES} or an FPN level "
                             f"{sorted(self._fpn_level_names())}")
        conv_layers = [name for name in self.feature_layers if name != BOX_HEAD]
        self.pooler = (RoIFeaturePooler(conv_layers, pooling=pooling, output_size=output_size,
                                        sampling_ratio=sampling_ratio) if conv_layers else None)
        self.fusion = fusion
        self.query_mode = query_mode
        self.database_mode = database_mode
        self.search_mode = search_mode
        self.global_layer = global_layer
        self.global_pool = build_global_pooling(global_pooling, p=gem_p)
        self.crop_batch_size = int(crop_batch_size)

    # -- structure ------------------------------------------------------------------------------
    @property
    def backbone(self) -> StagedBackbone:
        return self.detector.backbone

    def _fpn_level_names(self) -> set[str]:
        stages = getattr(self.backbone, "fpn_stages", None)
        if not stages:
            return set()
        first = int(stages[0][-1])
        return {f"p{first + i}" for i in range(len(self.backbone.defaults.anchor_sizes))}

    def _channels(self, name: str) -> int:
        if name == BOX_HEAD:
            return self.backbone.representation_size
        if name in self.backbone.stage_channels:
            return self.backbone.stage_channels[name]
        return self.backbone.out_channels  # FPN level

    @property
    def _needs_detection_maps(self) -> bool:
        """Whether region features read the detector maps (box head or FPN levels)."""
        return any(name not in STAGES for name in self.feature_layers)

    predicts_labels = True  # the detector's classifier labels query boxes (category pruning)

    @property
    def feature_dim(self) -> int:
        return self.region_feature_dim

    @property
    def region_feature_dim(self) -> int:
        """Dimension of one region feature (``describe_boxes`` / ``detect_regions`` rows)."""
        if self.search_mode == "global":
            return self._channels(self.global_layer)
        return sum(self._channels(name) for name in self.feature_layers)

    # -- detector -------------------------------------------------------------------------------
    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        """The detector's forward: a dict of the four losses in training (``loss_classifier``,
        ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``), detections in eval."""
        return self.detector(images, targets)

    def _encode(self, images: Sequence[Tensor], with_detection: bool = True
                ) -> tuple[ImageList, "OrderedDict[str, Tensor]", "OrderedDict[str, Tensor]"]:
        """Normalise, resize and batch ``images``; one backbone pass -> (batch, pooling maps,
        detector maps)."""
        _check_images(images)
        batch, _ = self.detector.transform(list(images))
        if with_detection:
            stages, detection = self.backbone.forward_features(batch.tensors)
        else:
            stages, detection = self.backbone.forward_stages(batch.tensors), OrderedDict()
        return batch, self.backbone.pooling_features(stages, detection), detection

    def _describe(self, batch: ImageList, maps: "OrderedDict[str, Tensor]", detection: "OrderedDict[str, Tensor]",
                  boxes: list[Tensor]) -> Tensor:
        """``(sum N_i, D)`` features of ``boxes`` (network pixels), all images and boxes at once."""
        conv_parts = iter(self.pooler.pool_per_layer(maps, boxes, tuple(batch.tensors.shape[-2:]))
                          if self.pooler is not None else [])
        parts = []
        for name in self.feature_layers:
            if name == BOX_HEAD:
                if sum(len(b) for b in boxes) == 0:
                    parts.append(batch.tensors.new_zeros(0, self._channels(BOX_HEAD)))
                    continue
                roi_heads = self.detector.roi_heads
                pooled = roi_heads.box_roi_pool(detection, boxes, batch.image_sizes)
                parts.append(roi_heads.box_head(pooled))
            else:
                parts.append(next(conv_parts))
        return l2_concat(parts)

    # -- RegionSearchModel ----------------------------------------------------------------------
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: the ``top_k`` detections of each image with one feature each.

        One pass: transform -> backbone (stages and detector maps together) -> RPN -> box head;
        the kept boxes are then pooled from the same maps. Boxes, scores and labels (predicted
        class) are returned in the pixels of ``images``.
        """
        if self.training:
            raise RuntimeError("DeepRegionCNN.detect_regions needs eval mode (the RPN and box head sample "
                               "training targets in train mode); call .eval() first")
        if self.search_mode == "global":
            return self._global_regions(images)
        orig_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, maps, detection = self._encode(images)
        proposals, _ = self.detector.rpn(batch, detection)
        detections, _ = self.detector.roi_heads(detection, proposals, batch.image_sizes)

        boxes_net, scores, labels = [], [], []
        for det, (h, w) in zip(detections, batch.image_sizes):
            order = torch.argsort(det["scores"], descending=True)[: self.top_k]
            b, s, l = det["boxes"][order], det["scores"][order], det["labels"][order]
            if len(b) == 0:  # nothing detected at all: keep the image searchable by its whole frame
                b = b.new_tensor([[0.0, 0.0, float(w), float(h)]])
                s, l = s.new_zeros(1), l.new_zeros(1)
            boxes_net.append(b)
            scores.append(s)
            labels.append(l)
        boxes_orig = [clip_boxes_to_image(resize_boxes(b, list(net), list(orig)), orig)
                      for b, net, orig in zip(boxes_net, batch.image_sizes, orig_sizes)]
        if self.database_mode == "roi":
            features = self._describe(batch, maps, detection, boxes_net).split([len(b) for b in boxes_net])
        else:
            features = self._describe_crops(images, boxes_orig)
        return [Regions(boxes=b, scores=s, features=f, labels=l)
                for b, s, f, l in zip(boxes_orig, scores, features, labels)]

    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: ``(n_i, D)`` features of the given boxes (pixels of ``images[i]``)."""
        if len(images) != len(boxes):
            raise ValueError(f"describe_boxes: {len(images)} images but {len(boxes)} box lists")
        boxes = [_check_boxes(b, img, i) for i, (img, b) in enumerate(zip(images, boxes))]
        if self.search_mode == "global":
            return self._global_crops(images, boxes)
        if self.query_mode == "crop":
            return self._describe_crops(images, boxes)
        batch, maps, detection = self._encode(images, with_detection=self._needs_detection_maps)
        boxes_net = [resize_boxes(b, list(img.shape[-2:]), list(net))
                     for b, img, net in zip(boxes, images, batch.image_sizes)]
        return list(self._describe(batch, maps, detection, boxes_net).split([len(b) for b in boxes]))

    @torch.no_grad()
    def classify_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """The detector's predicted class (background excluded) of each given box, for category
        pruning; ``(n_i,)`` int64 per image."""
        boxes = [_check_boxes(b, img, i) for i, (img, b) in enumerate(zip(images, boxes))]
        batch, _, detection = self._encode(images)
        boxes_net = [resize_boxes(b, list(img.shape[-2:]), list(net))
                     for b, img, net in zip(boxes, images, batch.image_sizes)]
        roi_heads = self.detector.roi_heads
        if sum(len(b) for b in boxes_net) == 0:
            return [b.new_zeros(0, dtype=torch.long) for b in boxes]
        logits, _ = roi_heads.box_predictor(roi_heads.box_head(
            roi_heads.box_roi_pool(detection, boxes_net, batch.image_sizes)))
        labels = logits[:, 1:].argmax(dim=1) + 1
        return list(labels.split([len(b) for b in boxes]))

    # -- crops and global descriptors -----------------------------------------------------------
    def _crops(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor]:
        """Cut every box out of its image (outer integer pixels, at least 1 px), in box order."""
        crops = []
        for img, b in zip(images, boxes):
            h, w = img.shape[-2:]
            x1y1 = b[:, :2].floor().clamp_min(0)
            x2y2 = torch.maximum(b[:, 2:].ceil(), x1y1 + 1)
            corners = torch.cat([x1y1, x2y2], dim=1).long().tolist()
            crops += [img[:, min(y1, h - 1):min(y2, h), min(x1, w - 1):min(x2, w)] for x1, y1, x2, y2 in corners]
        return crops

    def _describe_crops(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor]:
        """Describe each box as its own image: crop, resize like an image, pool the whole crop as
        one RoI with the configured feature layers."""
        crops = self._crops(images, boxes)
        out = []
        for start in range(0, len(crops), self.crop_batch_size):
            chunk = crops[start:start + self.crop_batch_size]
            batch, maps, detection = self._encode(chunk, with_detection=self._needs_detection_maps)
            whole = [torch.tensor([[0.0, 0.0, float(w), float(h)]], device=batch.tensors.device)
                     for h, w in batch.image_sizes]
            out.append(self._describe(batch, maps, detection, whole))
        features = torch.cat(out) if out else images[0].new_zeros(0, self.region_feature_dim)
        return list(features.split([len(b) for b in boxes]))

    def global_descriptor(self, images: list[Tensor]) -> Tensor:
        """``(B, D)`` whole-image descriptor: ``global_pooling`` (GeM by default) over
        ``global_layer`` of each image, ignoring the batch padding."""
        need_fpn = self.global_layer not in STAGES
        batch, maps, _ = self._encode(images, with_detection=need_fpn)
        fmap = maps[self.global_layer]
        valid = valid_mask(batch.image_sizes, tuple(batch.tensors.shape[-2:]), tuple(fmap.shape[-2:]),
                           device=fmap.device)
        return self.global_pool(fmap, valid)

    def _global_regions(self, images: list[Tensor]) -> list[Regions]:
        features = self.global_descriptor(images)
        return [Regions(boxes=torch.tensor([[0.0, 0.0, float(img.shape[-1]), float(img.shape[-2])]],
                                           device=features.device),
                        scores=features.new_ones(1), features=features[i:i + 1])
                for i, img in enumerate(images)]

    def _global_crops(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor]:
        crops = self._crops(images, boxes)
        out = [self.global_descriptor(crops[s:s + self.crop_batch_size])
               for s in range(0, len(crops), self.crop_batch_size)]
        features = torch.cat(out) if out else images[0].new_zeros(0, self.region_feature_dim)
        return list(features.split([len(b) for b in boxes]))

    # -- image-level fusion ---------------------------------------------------------------------
    def fuse_top_k(self, regions: Regions, mode: Optional[Literal["concat", "mean", "max"]] = None) -> Tensor:
        """The paper's image-level vector: the top-``top_k`` region features fused by ``mode``
        (default ``fusion``); ``concat`` is ``top_k * D`` long, zero-padded for fewer regions."""
        if regions.features is None:
            raise ValueError("fuse_top_k needs Regions with features (from detect_regions)")
        best = regions.top_k(self.top_k)
        return fuse_regions(best.features, mode or self.fusion, k=self.top_k)


def _or_default(value: Optional[int], default: int) -> int:
    return default if value is None else int(value)


def _check_images(images: Sequence[Tensor]) -> None:
    if len(images) == 0:
        raise ValueError("DeepRegionCNN needs at least one image")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.ndim != 3 or img.shape[0] != 3 or not img.is_floating_point():
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i}: expected a float RGB tensor (3, H, W) in [0, 1], got {shape}")


def _check_boxes(boxes: Tensor, image: Tensor, index: int) -> Tensor:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes[{index}]: expected (N, 4) [x1, y1, x2, y2] pixels, got {tuple(boxes.shape)}")
    boxes = boxes.to(dtype=image.dtype, device=image.device)
    if len(boxes) and bool(((boxes[:, 2:] - boxes[:, :2]) <= 0).any()):
        raise ValueError(f"boxes[{index}]: every box needs x2 > x1 and y2 > y1, got {boxes.tolist()}")
    return clip_boxes_to_image(boxes, tuple(image.shape[-2:]))
