"""Whole-image baselines as a search network: one region per image, described by a global descriptor.

Every instance-search paper reports a global descriptor next to its region method -- GeM, MAC,
SPoC or R-MAC (:mod:`instsearch.networks.global_descriptors`) pooled over one layer of a backbone.
:class:`GlobalDescriptorModel` is that baseline as a
:class:`~instsearch.structures.RegionSearchModel`: the database side returns each image's whole
frame as its single region, the query side describes the crop of the query box the same way, so
the evaluation treats it like any region method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from instsearch.networks.backbones import StagedBackbone, build_backbone
from instsearch.networks.global_descriptors import build_global_pooling, valid_mask
from instsearch.networks.contract import ClassAgnostic, check_box_lists, check_images, require_eval_mode
from instsearch.networks.crops import crop_boxes
from instsearch.networks.detection_transform import DetectionTransform
from instsearch.structures import Regions

__all__ = ["GlobalDescriptorModel"]

PoolingName = Literal["gem", "mac", "spoc", "rmac"]


class GlobalDescriptorModel(ClassAgnostic, nn.Module):
    """A global descriptor (``pooling`` over ``layer`` of ``backbone``) as a search network.

    Args:
        backbone: a name of :func:`~instsearch.networks.backbones.list_backbones` (built with
            ``weights``), or an existing :class:`~instsearch.networks.staged.StagedBackbone`,
            shared, not copied (e.g. a trained detector's, see :meth:`from_detector`).
        layer: the map pooled: a stage, or an FPN level ``pk`` of an FPN backbone; ``None`` = the
            last stage (``conv5`` of the CNNs, ``tokens`` of a ViT).
        pooling: ``"gem"``, ``"mac"``, ``"spoc"`` or ``"rmac"``.
        p: the GeM exponent (3, Radenovic et al.).
        weights: weights file of a backbone given by name.
        min_size / max_size / max_upscale: image resizing (:class:`~instsearch.networks.detection_transform.DetectionTransform`):
            short side to ``min_size``, long side at most ``max_size``; the default 1024 / 1024
            resizes the long side to 1024 px, the usual retrieval setting.
        image_mean / image_std: input normalisation; ``None`` = what the backbone's weights expect.
        crop_batch_size: query crops encoded per backbone batch (bounds memory).
    """

    def __init__(self, backbone: Union[str, StagedBackbone] = "resnet50", layer: Optional[str] = None,
                 pooling: PoolingName = "gem", p: float = 3.0, weights: Union[str, Path, None] = None,
                 min_size: Union[int, Sequence[int]] = 1024, max_size: int = 1024, max_upscale: Optional[float] = None,
                 image_mean: Optional[Sequence[float]] = None, image_std: Optional[Sequence[float]] = None,
                 crop_batch_size: int = 16) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, weights=weights)
        elif weights is not None:
            raise ValueError("weights only apply to a backbone given by name; load them into the instance instead")
        self.backbone = backbone
        self.layer = backbone.feature_info.names[-1] if layer is None else layer
        if self.layer not in backbone.pooling_info:
            raise ValueError(f"layer {self.layer!r} must be one of {list(backbone.pooling_info.names)}")
        self.pool = build_global_pooling(pooling, p=p)
        self.transform = DetectionTransform(
            min_size, max_size, backbone.input_mean if image_mean is None else image_mean,
            backbone.input_std if image_std is None else image_std, max_upscale=max_upscale)
        self.crop_batch_size = int(crop_batch_size)

    @classmethod
    def from_detector(cls, net: nn.Module, layer: Optional[str] = None, pooling: PoolingName = "gem",
                      p: float = 3.0, **kwargs) -> "GlobalDescriptorModel":
        """The descriptor over a detector's (trained) backbone, with the detector's own image
        resizing and normalisation: the whole-image baseline of the very same network.

        ``net`` is a :class:`~instsearch.networks.deep_region_cnn.DeepRegionCNN` (its
        ``detector.transform``) or an :class:`~instsearch.networks.fcis.FCIS` (its ``transform``).
        """
        transform = net.detector.transform if hasattr(net, "detector") else net.transform
        return cls(net.backbone, layer=layer, pooling=pooling, p=p, min_size=transform.min_size,
                   max_size=transform.max_size, max_upscale=getattr(transform, "max_upscale", None),
                   image_mean=transform.image_mean, image_std=transform.image_std, **kwargs)

    @property
    def feature_dim(self) -> int:
        return self.backbone.pooling_info.channels(self.layer)

    def global_descriptor(self, images: Sequence[Tensor]) -> Tensor:
        """``(B, D)`` l2-normalised descriptors of whole images, pooled over each image's own cells
        (the batch padding excluded)."""
        check_images(images)
        batch, _ = self.transform(list(images))
        if self.layer in self.backbone.feature_info:
            maps = self.backbone.forward_stages(batch.tensors)
        else:  # an FPN level
            maps = self.backbone.pooling_features(*self.backbone.forward_features(batch.tensors))
        fmap = maps[self.layer]
        valid = valid_mask(batch.image_sizes, tuple(batch.tensors.shape[-2:]), tuple(fmap.shape[-2:]),
                           device=fmap.device)
        return self.pool(fmap, valid)

    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: each image's whole frame, described by its global descriptor."""
        require_eval_mode(self, "detect_regions")
        return Regions.whole_frames(images, self.global_descriptor(images))

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: the global descriptor of each box's crop, ``(n_i, D)`` per image."""
        require_eval_mode(self, "describe_boxes")
        boxes = check_box_lists(images, boxes)
        crops = crop_boxes(images, boxes)
        out = [self.global_descriptor(crops[s:s + self.crop_batch_size])
               for s in range(0, len(crops), self.crop_batch_size)]
        features = torch.cat(out) if out else images[0].new_zeros(0, self.feature_dim)
        return list(features.split([len(b) for b in boxes]))
