"""Deep region CNN (Mei, Min, Duan & Jiang 2018): a fine-tuned Faster R-CNN finds the object
regions of each image, and the top-K regions are described by CNN features.

Paper: S. Mei, W. Min, H. Duan and S. Jiang, "Instance-level object retrieval via deep region CNN",
Multimedia Tools and Applications 78 (2019); https://doi.org/10.1007/s11042-018-6427-1.

Offline, the detector is fine-tuned on the instance dataset with the first two convolution stages
fixed (``frozen_stages=2``). Online, each image keeps its ``top_k`` highest-scoring boxes (K = 2 is
the paper's best) with one feature each, and the search runs over

* ``fusion="none"``: every one of the top-K regions, each its own searchable region (an image
  scores by its best region; the query box is described directly).
* ``fusion="concat" | "mean" | "max"``: one vector per image, the paper's three strategies "to
  fuse the features from top K's regions for each instance image" (Section 3.2 "Online instance
  retrieval"; concatenation with K = 2 is its best, 0.404 mAP on Oxford 5k). See
  :meth:`DeepRegionCNN.detect_regions` and :meth:`DeepRegionCNN.describe_boxes` for how this
  reads on each side.

With ``top_k=1`` both search each image by its highest-scoring region, the paper's basic setting
("we selected the bounding box with the highest score for each image as the target region"); they
differ on the query side, where ``none`` describes the query box itself and a fusion mode the top
detection inside the query crop.

A region is described by (``region_feature``)

* ``"roi"`` (default, fast): the configured ``feature_layers`` RoI-pooled from the *same* forward
  pass as the detection; ``["box_head"]`` is the detector's own box representation (fc6/fc7
  initialised from VGG-16's classifier, applied to RoIAlign-ed conv5_3), convolutional variants
  pool any stage (``["conv5"]``, ``["conv4", "conv5"]``, ...);
* ``"crop_fc7"`` (the paper's, Section 3.1.2): the box is cut out, resized to 224 x 224 and
  described by FC7 of an ImageNet VGG-16 of its own weights file (``crop_weights``), not the
  fine-tuned detector (:class:`~instsearch.networks.crop_features.CropFC7`); one more VGG-16 pass
  per region;
* ``"crop"``: the box is cut out, resized like an image and described by the *detector's* backbone
  with ``feature_layers`` (the whole crop pooled as one RoI); one more backbone pass per region.

Choices where the paper is silent or the library differs, all configurable: boxes come from
torchvision's post-processing (per-class NMS 0.5, scores = class softmax); the score threshold
defaults to 0, so every image has its K regions. An image with no detection at all (degenerate
input) falls back to its whole frame with score 0 so that it stays searchable.

The whole-image baseline the paper compares with (GeM / MAC / SPoC / R-MAC of a backbone stage) is
its own network, :class:`~instsearch.networks.global_model.GlobalDescriptorModel`, which can run
over this network's trained backbone (:meth:`~instsearch.networks.global_model.GlobalDescriptorModel.from_detector`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import clip_boxes_to_image

from instsearch.networks.backbones import IMAGENET_MEAN, IMAGENET_STD, StagedBackbone, build_backbone
from instsearch.networks.crop_features import CropFC7
from instsearch.networks.faster_rcnn import build_faster_rcnn
from instsearch.networks.region_features import RoIFeaturePooler, fuse_top_regions, l2_concat
from instsearch.networks.contract import check_box_lists, check_boxes, check_images, require_eval_mode, whole_frame_box
from instsearch.networks.crops import crop_boxes
from instsearch.networks.weights import load_weights
from instsearch.structures import Regions

__all__ = ["DeepRegionCNN", "BOX_HEAD", "FUSIONS", "REGION_FEATURES"]

#: The special feature layer name: the detector's box-head representation (FC7 for VGG-16).
BOX_HEAD = "box_head"
#: What is searched: each top-K region on its own, or one fused vector per image.
FUSIONS = ("none", "concat", "mean", "max")
#: How a region is described (see the module docstring).
REGION_FEATURES = ("roi", "crop_fc7", "crop")


class DeepRegionCNN(nn.Module):
    """Faster R-CNN on a staged backbone, with region features for instance search.

    Implements :class:`instsearch.structures.RegionSearchModel`.

    Args:
        backbone: a detection backbone of :mod:`instsearch.networks.backbones`: ``"vgg16"`` (the
            paper's), ``"resnet50_fpn"`` or ``"small"`` (CPU demo).
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
        top_k: the K highest-scoring detections kept per image (2 in the paper).
        fusion: what is searched: ``"none"`` (default) each of the top-K regions on its own;
            ``"concat"`` (the paper's best), ``"mean"`` or ``"max"`` one fused top-K vector per
            image (``feature_dim`` = K x region dimension for ``concat``).
        region_feature: how a region (detected or query box) is described: ``"roi"`` (default)
            ``feature_layers`` pooled from the detection pass; ``"crop_fc7"`` the paper's crop ->
            224 x 224 -> ImageNet VGG-16 FC7 (4096-D, ``crop_weights``); ``"crop"`` the crop through
            the detector's backbone with ``feature_layers``. Same on the database and query sides.
        feature_layers: what ``roi`` and ``crop`` describe a region with, concatenated in this
            order after per-part l2: ``"box_head"`` (the detector's box representation, FC7 for
            VGG-16), any stage ``"conv1"``..``"conv5"``, or an FPN level ``"p2"``..``"p6"``.
        pooling / output_size / sampling_ratio: RoI pooling of the stage layers.
        crop_weights: the ImageNet VGG-16 file of ``crop_fc7`` (torchvision's
            ``vgg16-397923af.pth``); ``None`` = random init, said once. Not part of checkpoints.
        crop_batch_size: crops per network batch of ``crop`` / ``crop_fc7``, and query crops per
            detector batch under fusion (bounds memory).
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
        fusion: Literal["none", "concat", "mean", "max"] = "none",
        region_feature: Literal["roi", "crop_fc7", "crop"] = "roi",
        crop_weights: Union[str, Path, None] = None,
        crop_batch_size: int = 16,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if crop_batch_size < 1:
            raise ValueError(f"crop_batch_size must be >= 1, got {crop_batch_size}")
        for option, value, allowed in (("fusion", fusion, FUSIONS), ("region_feature", region_feature, REGION_FEATURES)):
            if value not in allowed:
                raise ValueError(f"{option} must be one of {allowed}, got {value!r}")
        staged: StagedBackbone = build_backbone(backbone, weights=weights, frozen_stages=frozen_stages)
        self.detector = build_faster_rcnn(
            staged, backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
            max_upscale=max_upscale, anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios,
            rpn_fg_iou_thresh=rpn_fg_iou_thresh, rpn_bg_iou_thresh=rpn_bg_iou_thresh,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            box_batch_size_per_image=box_batch_size_per_image, box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh, box_detections_per_img=box_detections_per_img,
            image_mean=image_mean, image_std=image_std)
        if detector_weights is not None:
            load_weights(self.detector, detector_weights, name=f"deep_region_cnn[{backbone}]",
                         key_map=lambda k: k[len("detector."):] if k.startswith("detector.") else k)

        self.backbone_name = backbone
        self.num_classes = num_classes
        self.top_k = int(top_k)
        self.feature_layers = list(feature_layers)
        known = {BOX_HEAD, *self.backbone.pooling_info.names}
        unknown = [name for name in self.feature_layers if name not in known]
        if not self.feature_layers or unknown:
            raise ValueError(f"feature_layers {self.feature_layers} must name some of {sorted(known)}")
        conv_layers = [name for name in self.feature_layers if name != BOX_HEAD]
        self.pooler = (RoIFeaturePooler(conv_layers, pooling=pooling, output_size=output_size,
                                        sampling_ratio=sampling_ratio) if conv_layers else None)
        self.fusion = fusion
        self.region_feature = region_feature
        self.crop_batch_size = int(crop_batch_size)
        self.crop_fc7 = (CropFC7(crop_weights, batch_size=crop_batch_size) if region_feature == "crop_fc7"
                         else None)
        self.register_load_state_dict_pre_hook(_drop_global_pool_key)

    # -- structure ------------------------------------------------------------------------------
    @property
    def backbone(self) -> StagedBackbone:
        return self.detector.backbone

    def _channels(self, name: str) -> int:
        if name == BOX_HEAD:
            return self.backbone.representation_size
        return self.backbone.pooling_info.channels(name)

    @property
    def _needs_detection_maps(self) -> bool:
        """Whether region features read the detector maps (box head or FPN levels)."""
        return any(name not in self.backbone.feature_info for name in self.feature_layers)

    predicts_labels = True  # the detector's classifier labels query boxes (category pruning)

    @property
    def feature_dim(self) -> int:
        """Width of what is searched: a region feature, or the fused top-K vector."""
        return self.region_feature_dim * (self.top_k if self.fusion == "concat" else 1)

    @property
    def region_feature_dim(self) -> int:
        """Dimension of one region's feature (before any fusion)."""
        if self.region_feature == "crop_fc7":
            return CropFC7.feature_dim
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
        check_images(images)
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
        """Database side: what is searched of each image, boxes in the pixels of ``images``.

        ``fusion="none"``: the ``top_k`` detections, best first, one feature each.

        Under fusion, ONE region per image: its feature is the fused top-K vector
        (:func:`~instsearch.networks.region_features.fuse_top_regions`, l2-normalised; ``concat``
        zero-pads an image with fewer than K detections), and its box, score and label are those of
        the image's top-1 detection. The paper ranks images by the fused vector and says nothing of
        a box; the top-1 box is what this network localises (mIoU is scored on it).
        """
        regions = self._top_regions(images)
        if self.fusion == "none":
            return regions
        fused = self._fuse(regions)
        best = torch.zeros(1, dtype=torch.long, device=fused.device)
        return [replace(r.select(best), features=fused[i:i + 1]) for i, r in enumerate(regions)]

    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: ``(n_i, feature_dim)`` features of the given boxes (pixels of ``images[i]``).

        ``fusion="none"``: each box described as a region (``region_feature``).

        Under fusion the query box is read as the paper's *query instance image* ("given the query
        instance image, we extract the visual features based on the fine-tuned Faster R-CNN and
        CNN", Section 3.2): the crop of the box is processed exactly like a database image --
        detection, top-K regions of the crop, their features, fusion -- so that query and database
        vectors are the same kind of vector.
        """
        boxes = check_box_lists(images, boxes)
        counts = [len(b) for b in boxes]
        if self.fusion == "none":
            return list(self._describe_given_boxes(images, boxes).split(counts))
        require_eval_mode(self, "describe_boxes")  # the crops go through the detector
        crops = crop_boxes(images, boxes)
        fused = [self._fuse(self._top_regions(crops[start:start + self.crop_batch_size]))
                 for start in range(0, len(crops), self.crop_batch_size)]
        features = torch.cat(fused) if fused else images[0].new_zeros(0, self.feature_dim)
        return list(features.split(counts))

    @torch.no_grad()
    def classify_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """The detector's predicted class (background excluded) of each given box, for category
        pruning; ``(n_i,)`` int64 per image."""
        boxes = [check_boxes(b, img, i) for i, (img, b) in enumerate(zip(images, boxes))]
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

    # -- regions -------------------------------------------------------------------------------
    def _top_regions(self, images: Sequence[Tensor]) -> list[Regions]:
        """The ``top_k`` detections of each image, best first, one ``region_feature`` each.

        One pass: transform -> backbone (stages and detector maps together) -> RPN -> box head;
        ``roi`` features are pooled from the same maps. Boxes, scores and labels (predicted class)
        are in the pixels of ``images``.
        """
        require_eval_mode(self, "detect_regions")
        orig_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, maps, detection = self._encode(images)
        proposals, _ = self.detector.rpn(batch, detection)
        detections, _ = self.detector.roi_heads(detection, proposals, batch.image_sizes)

        boxes_net, scores, labels = [], [], []
        for det, (h, w) in zip(detections, batch.image_sizes):
            order = torch.argsort(det["scores"], descending=True)[: self.top_k]
            b, s, l = det["boxes"][order], det["scores"][order], det["labels"][order]
            if len(b) == 0:  # nothing detected at all: keep the image searchable by its whole frame
                b = whole_frame_box(h, w, b)
                s, l = s.new_zeros(1), l.new_zeros(1)
            boxes_net.append(b)
            scores.append(s)
            labels.append(l)
        boxes_orig = [clip_boxes_to_image(resize_boxes(b, list(net), list(orig)), orig)
                      for b, net, orig in zip(boxes_net, batch.image_sizes, orig_sizes)]
        if self.region_feature == "roi":
            features = self._describe(batch, maps, detection, boxes_net)
        else:
            features = self._describe_crops(images, boxes_orig)
        return [Regions(boxes=b, scores=s, features=f, labels=l, image_size=orig)
                for b, s, f, l, orig in zip(boxes_orig, scores, features.split([len(b) for b in boxes_net]),
                                            labels, orig_sizes)]

    def _fuse(self, regions: Sequence[Regions]) -> Tensor:
        """``(B, feature_dim)``: each image's top-K region features fused by ``fusion``."""
        return fuse_top_regions(torch.cat([r.features for r in regions]), [len(r) for r in regions],
                                self.fusion, self.top_k)

    def _describe_given_boxes(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """``(sum n_i, region_feature_dim)`` features of ``boxes`` (pixels of ``images``)."""
        if self.region_feature != "roi":
            return self._describe_crops(images, boxes)
        batch, maps, detection = self._encode(images, with_detection=self._needs_detection_maps)
        boxes_net = [resize_boxes(b, list(img.shape[-2:]), list(net))
                     for b, img, net in zip(boxes, images, batch.image_sizes)]
        return self._describe(batch, maps, detection, boxes_net)

    def _describe_crops(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """Describe each box as a picture of its own: ``crop_fc7`` (ImageNet VGG-16 FC7 of the
        224 x 224 crop) or ``crop`` (the crop resized like an image through the detector's backbone,
        pooled as one whole-crop RoI with ``feature_layers``)."""
        if self.region_feature == "crop_fc7":
            return self.crop_fc7(images, boxes)
        crops = crop_boxes(images, boxes)
        out = []
        for start in range(0, len(crops), self.crop_batch_size):
            chunk = crops[start:start + self.crop_batch_size]
            batch, maps, detection = self._encode(chunk, with_detection=self._needs_detection_maps)
            whole = [torch.tensor([[0.0, 0.0, float(w), float(h)]], device=batch.tensors.device)
                     for h, w in batch.image_sizes]
            out.append(self._describe(batch, maps, detection, whole))
        return torch.cat(out) if out else images[0].new_zeros(0, self.region_feature_dim)


def _drop_global_pool_key(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints saved while this network also served the whole-image baseline hold its GeM
    exponent (``global_pool.p``, a fixed buffer); the baseline is now
    :class:`~instsearch.networks.global_model.GlobalDescriptorModel`, so the key is dropped and those
    checkpoints still load strictly."""
    state_dict.pop(prefix + "global_pool.p", None)
