"""torchvision's Mask R-CNN on the backbones of FCIS, with the same instance-search interface, for
comparing the two detectors under one region feature."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from instsearch.networks.backbones import StagedBackbone, build_backbone
from instsearch.networks.region_features import RoIFeaturePooler
from instsearch.networks.detector_search import DetectorSearchMixin

__all__ = ["MaskRCNNSearch", "SingleLevelBackbone", "build_mask_rcnn"]


class SingleLevelBackbone(nn.Module):
    """Exposes one backbone stage as the single feature level torchvision's detectors expect."""

    def __init__(self, body: StagedBackbone, level: str) -> None:
        super().__init__()
        self.body = body
        self.level = level
        self.out_channels = body.feature_info.channels(level)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return OrderedDict([("0", self.body.forward_stages(x)[self.level])])


class MaskRCNNSearch(DetectorSearchMixin, nn.Module):
    """torchvision's Mask R-CNN on a single-level (conv4 or dilated conv5) ResNet/ResNeXt, with the
    same instance-search interface as :class:`~instsearch.networks.fcis.FCIS` (for comparing the
    detectors under one feature).

    ``forward`` is Mask R-CNN's own; ``detect_regions`` runs its stages by hand so that the one
    backbone pass also yields the layers the region features are pooled from.
    """

    def __init__(self, model: MaskRCNN, pooler: RoIFeaturePooler, pool_in_mask: bool = False,
                 region_score_thresh: float = 0.5, min_regions: int = 1, region_masks: bool = True) -> None:
        super().__init__()
        if not isinstance(model.backbone, SingleLevelBackbone):
            raise TypeError("MaskRCNNSearch expects a Mask R-CNN built by build_mask_rcnn (single-level backbone)")
        self.model = model
        self.level = model.backbone.level
        self.set_search_options(pooler, pool_in_mask, region_score_thresh, min_regions, region_masks)

    @property
    def body(self) -> StagedBackbone:
        """The backbone returning every stage (the detector itself sees only ``level``)."""
        return self.model.backbone.body

    @property
    def feature_dim(self) -> int:
        return sum(self.body.feature_info.channels(name) for name in self.pooler.layers)

    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        return self.model(images, targets)

    def encode(self, images: list[Tensor]) -> tuple[ImageList, "OrderedDict[str, Tensor]"]:
        image_list, _ = self.model.transform(images)
        return image_list, self.body.forward_stages(image_list.tensors)

    def detections(self, image_list: ImageList, features: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        level = OrderedDict([("0", features[self.level])])
        proposals, _ = self.model.rpn(image_list, level)
        detections, _ = self.model.roi_heads(level, proposals, image_list.image_sizes)
        return detections

    def classify_rois(self, image_list: ImageList, features: Mapping[str, Tensor], boxes: list[Tensor],
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
    body = build_backbone(backbone, weights=weights, frozen_stages=frozen_stages, stages={level, *feature_layers},
                          norm=norm, deformable=deformable, dilate_conv5=True)
    channels = body.feature_info.channels(level)
    anchors = AnchorGenerator(sizes=(tuple(int(s) for s in anchor_sizes),),
                              aspect_ratios=(tuple(float(r) for r in aspect_ratios),))
    model = MaskRCNN(
        SingleLevelBackbone(body, level), num_classes=None, min_size=min_size, max_size=max_size,
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
