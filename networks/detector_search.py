"""The instance-search side shared by detectors that segment: detected instances become searchable
regions, given boxes get the same feature and a predicted category.

:class:`DetectorSearchMixin` implements :class:`~instsearch.structures.RegionSearchModel` on top of
three detector hooks, so FCIS and the Mask R-CNN comparison network (and any other detector that
can expose them) serve search the same way from one backbone pass per batch.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from instsearch.networks.contract import require_eval_mode
from instsearch.networks.region_features import RoIFeaturePooler
from instsearch.structures import Regions

__all__ = ["DetectorSearchMixin", "select_regions"]


def select_regions(det: dict[str, Tensor], score_thresh: float, min_regions: int) -> dict[str, Tensor]:
    """Detections scoring at least ``score_thresh``, and at least the best ``min_regions``, best first."""
    order = torch.argsort(det["scores"], descending=True)
    confident = det["scores"][order] >= score_thresh
    confident[:min_regions] = True
    keep = order[confident]
    return {k: v[keep] for k, v in det.items()}


class DetectorSearchMixin:
    """The instance-search interface on top of a detector (an ``nn.Module``).

    The detector provides

    * ``encode(images) -> (image_list, features)``: the resized batch and every backbone stage;
    * ``detections(image_list, features)``: torchvision-style dicts in network pixels, with
      ``masks (K, 1, M, M)`` on the boxes;
    * ``classify_rois(image_list, features, boxes, want_masks) -> (labels, mask probabilities
      (R, M, M) or None)`` for given boxes in network pixels;

    and the search options of :meth:`set_search_options`. Region features are pooled by ``pooler``
    from the same maps, optionally inside each instance's mask (``pool_in_mask``).
    """

    predicts_labels = True
    predicts_masks = True  # validation scores mask AP too (DetectorModule)
    training: bool
    pooler: RoIFeaturePooler
    pool_in_mask: bool
    region_score_thresh: float
    min_regions: int
    region_masks: bool

    def set_search_options(self, pooler: RoIFeaturePooler, pool_in_mask: bool = False,
                           region_score_thresh: float = 0.5, min_regions: int = 1, region_masks: bool = True) -> None:
        """Configure the search side (call once the module is initialised).

        Args:
            pooler: pools the instance feature from the backbone stages.
            pool_in_mask: pool inside the predicted mask, not the whole box.
            region_score_thresh: detections below this score are not returned as search regions.
            min_regions: each image keeps at least its best ``min_regions`` detections as regions
                even when below the threshold, so that no database image becomes unreachable.
            region_masks: return each region's mask (at the given image's resolution) in
                ``Regions.masks``.
        """
        self.pooler = pooler
        self.pool_in_mask = bool(pool_in_mask)
        self.region_score_thresh = float(region_score_thresh)
        self.min_regions = int(min_regions)
        self.region_masks = bool(region_masks)

    def encode(self, images: list[Tensor]) -> tuple[ImageList, Mapping[str, Tensor]]:
        raise NotImplementedError

    def detections(self, image_list: ImageList, features: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        raise NotImplementedError

    def classify_rois(self, image_list: ImageList, features: Mapping[str, Tensor], boxes: list[Tensor],
                      want_masks: bool) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: detected instances with their features, from one backbone pass.

        ``labels`` are the predicted categories (for category pruning); boxes and masks are in the
        pixels of the given images.
        """
        require_eval_mode(self, "detect_regions")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, features = self.encode(images)
        dets = [select_regions(d, self.region_score_thresh, self.min_regions)
                for d in self.detections(image_list, features)]
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
                               labels=d["labels"], masks=region_masks, image_size=orig))
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
        require_eval_mode(self, "describe_boxes" if features_wanted else "classify_boxes")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, features = self.encode(images)
        net_boxes = [resize_boxes(b.to(image_list.tensors), list(orig), list(size))
                     for b, orig, size in zip(boxes, original_sizes, image_list.image_sizes)]
        counts = [len(b) for b in net_boxes]
        if not features_wanted:
            labels, _ = self.classify_rois(image_list, features, net_boxes, want_masks=False)
            return [], list(labels.split(counts))
        masks = None
        if self.pool_in_mask:
            _, probs = self.classify_rois(image_list, features, net_boxes, want_masks=True)
            masks = [paste_masks_in_image(m[:, None], b, size)[:, 0]
                     for m, b, size in zip(probs.split(counts), net_boxes, image_list.image_sizes)]
        pooled = self.pooler(features, net_boxes, tuple(image_list.tensors.shape[-2:]), masks)
        return [f.float() for f in pooled.split(counts)], []
