"""CLAID (class-agnostic instance-level descriptor): training-free regions from a hierarchical
bisecting of self-supervised ViT patch features, described by RoI pooling on a ResNet.

The CLAID paper's pipeline (its Fig. 5) has two networks and no training:

* **detector** -- the image, short side 360 and long side at most 800 (the paper's sizes), through
  a self-supervised ViT (DINO ViT-B/8): its last block's patch tokens after the final norm form an
  ``(h, w, D)`` grid (:meth:`CLAID.patch_grid`). :func:`~instsearch.networks.bisecting.build_hierarchy`
  splits the grid recursively (k-sums bisecting, seed selection, termination by internal
  connectivity, dummy nodes, 8-connected components; Algorithm 1); every kept node is a region,
  its patch mask upsampled to the image and its box the patches it covers.
* **descriptor** -- the image at its own (served) resolution through an ImageNet ResNet-50 up to
  ``layer4.0`` (``conv5.0`` here, :meth:`~instsearch.networks.staged.StagedBackbone.forward_layer`);
  each region is RoI-pooled (mean by default; max or GeM) and l2-normalised. The query box is
  pooled from the query image's map the same way (the paper feeds the query crop to the
  descriptor instead; pooling keeps query and database features on one map and one scale).

Any staged backbone can stand in for either network: another timm ViT, or -- for the CPU demo,
where no DINO weights exist -- the dense map of a trained CNN stage at stride 8 (the ViT-B/8 patch
grid's stride).

Choices where the paper is silent (each a parameter):

* **region score** -- the node's energy ratio xi(S) (Eq. 10), so ``RetrievalConfig.regions_per_image``
  keeps the most salient regions;
* **an image without regions** (its root is already coherent, c-bar >= tau1, or every node is
  dummy) keeps its whole frame as one region (``whole_image_fallback``), so that it can still be
  found; the paper does not say what such an image contributes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instsearch.networks.backbones import StagedBackbone, build_backbone
from instsearch.networks.bisecting import (RegionNode, bisect_regions, build_hierarchy, output_nodes, regions_to_boxes,
                                           upsample_masks)
from instsearch.networks.region_features import RoIFeaturePooler
from instsearch.networks.region_search import require_eval_mode
from instsearch.networks.transform import check_box_lists, check_images
from instsearch.structures import Regions

__all__ = ["CLAID", "bisect_regions", "build_hierarchy", "regions_to_boxes", "upsample_masks", "RegionNode",
           "resize_to_grid"]

BackboneArg = Union[str, StagedBackbone]


def resize_to_grid(height: int, width: int, min_size: int, max_size: int, stride: int) -> tuple[int, int]:
    """The size an image is resized to for the patch grid: short side ``min_size``, long side at most
    ``max_size`` (the paper's 360 / 800), each side then rounded to a multiple of ``stride`` (at
    least one patch), so that the grid covers the whole image with no padding and a patch column
    maps to ``W / w`` original pixels exactly."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    # half up (not Python's half-to-even round), so equal fractions always round the same way
    return (max(stride, math.floor(height * scale / stride + 0.5) * stride),
            max(stride, math.floor(width * scale / stride + 0.5) * stride))


class CLAID(nn.Module):
    """CLAID regions and features as a :class:`~instsearch.structures.RegionSearchModel`.

    Args:
        patch_backbone: the detector's backbone: a registry name (default DINO ViT-B/8 through timm;
            any timm ViT of the registry, or a CNN such as ``small``) or a built
            :class:`~instsearch.networks.staged.StagedBackbone`.
        patch_layer: the map whose cells are the "patches" (``None``: the backbone's last stage --
            ``tokens`` of a ViT; ``conv3`` of a CNN is stride 8 like ViT-B/8).
        patch_weights: weights file of a backbone given by name (a timm checkpoint, or any
            instsearch checkpoint holding that backbone).
        min_size / max_size: the detector's image size (short side / cap of the long side).
        describe_backbone / describe_layer / describe_weights: the descriptor network and its map
            (ResNet-50 ``conv5.0`` = torchvision's ``layer4.0``, the paper's choice).
        pooling: ``"avg"`` (the paper's RoI pooling, a mean), ``"max"`` or ``"gem"`` (exponent
            ``gem_p``).
        pool_in_mask: pool only inside each region's upsampled patch mask, not its whole box.
        tau1, tau2, alpha, energy_top, min_patches, seed_selection, method, max_depth,
            filter_dummy, solver, max_iters: the decomposition's options
            (:func:`~instsearch.networks.bisecting.build_hierarchy`; paper defaults).
        seed: generator seed of the random parts (random initialisation, the sequential
            solver's visiting order), reset per image so an image's regions do not depend on the
            batch it comes in.
        whole_image_fallback: an image with no region keeps its whole frame as one region.
        return_masks: attach the upsampled region masks to the returned regions.
    """

    predicts_labels = False

    def __init__(self, patch_backbone: BackboneArg = "vit_base_patch8_224.dino", patch_layer: Optional[str] = None,
                 patch_weights: Union[str, Path, None] = None, min_size: int = 360, max_size: int = 800,
                 describe_backbone: BackboneArg = "resnet50", describe_layer: str = "conv5.0",
                 describe_weights: Union[str, Path, None] = None,
                 pooling: Literal["avg", "max", "gem"] = "avg", gem_p: float = 3.0, pool_in_mask: bool = False,
                 tau1: float = 0.97, tau2: float = 0.2, alpha: float = 0.2, energy_top: float = 0.3,
                 min_patches: int = 15, seed_selection: bool = True, method: Literal["ksums", "ncut"] = "ksums",
                 max_depth: Optional[int] = None, filter_dummy: bool = True,
                 solver: Literal["batched", "sequential"] = "batched", max_iters: int = 100, seed: int = 0,
                 whole_image_fallback: bool = True, return_masks: bool = True) -> None:
        super().__init__()
        self.patch_backbone = _backbone(patch_backbone, patch_weights, "patch")
        self.patch_layer = self.patch_backbone.feature_info.names[-1] if patch_layer is None else patch_layer
        self.patch_stride = self.patch_backbone.layer_stride(self.patch_layer)
        self.describe_backbone = _backbone(describe_backbone, describe_weights, "describe")
        self.describe_layer = describe_layer
        self.describe_backbone.parse_layer(describe_layer)  # refuse an unknown layer now, not at the first image
        self.pooler = RoIFeaturePooler([describe_layer], pooling=pooling, p=gem_p)
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.pool_in_mask = bool(pool_in_mask)
        self.decomposition = dict(tau1=tau1, tau2=tau2, alpha=alpha, energy_top=energy_top, min_patches=min_patches,
                                  seed_selection=seed_selection, method=method, max_depth=max_depth,
                                  filter_dummy=filter_dummy, solver=solver, max_iters=max_iters)
        self.seed = int(seed)
        self.whole_image_fallback = bool(whole_image_fallback)
        self.return_masks = bool(return_masks)
        # the pad multiple of the descriptor batch: the deepest stride, so every map covers the
        # padded tensor exactly and the pooler's scale is the same on both axes
        self._pad_multiple = max(s.stride for s in self.describe_backbone.feature_info)

    @property
    def feature_dim(self) -> int:
        return self.describe_backbone.layer_channels(self.describe_layer)

    # ------------------------------------------------------------------ detector
    def patch_grid(self, image: Tensor) -> Tensor:
        """One ``(3, H, W)`` image in ``[0, 1]`` -> its ``(h, w, D)`` patch-feature grid (raw, not
        normalised: the dummy-node energy reads the raw l1 norms)."""
        height, width = image.shape[-2:]
        size = resize_to_grid(height, width, self.min_size, self.max_size, self.patch_stride)
        x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        x = self.patch_backbone.normalize_input(x)
        fmap = self.patch_backbone.forward_layer(x, self.patch_layer)[0]
        return fmap.permute(1, 2, 0)

    def hierarchy(self, image: Tensor) -> list[RegionNode]:
        """Every node of the image's decomposition (dummies and the root included), for inspection
        and figures; :meth:`detect_regions` keeps the output nodes."""
        return self.hierarchy_of_grid(self.patch_grid(image))

    def hierarchy_of_grid(self, grid: Tensor) -> list[RegionNode]:
        """The decomposition of an ``(h, w, D)`` patch grid with this network's options."""
        generator = torch.Generator().manual_seed(self.seed)
        return build_hierarchy(grid, generator=generator, **self.decomposition)

    # ------------------------------------------------------------------ descriptor
    def _describe(self, images: Sequence[Tensor], boxes: list[Tensor], masks: Optional[list[Tensor]] = None) -> Tensor:
        """RoI features of ``boxes`` (pixels of each image) on the descriptor map of the images at
        their own resolution, batched with zero padding to a common multiple of the deepest stride."""
        height = _round_up(max(int(i.shape[-2]) for i in images), self._pad_multiple)
        width = _round_up(max(int(i.shape[-1]) for i in images), self._pad_multiple)
        batch = torch.stack([F.pad(self.describe_backbone.normalize_input(img[None].float())[0],
                                   (0, width - img.shape[-1], 0, height - img.shape[-2])) for img in images])
        fmap = self.describe_backbone.forward_layer(batch, self.describe_layer)
        return self.pooler({self.describe_layer: fmap}, boxes, (height, width), masks)

    # ------------------------------------------------------------------ RegionSearchModel
    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: each image's kept hierarchy nodes as boxes (image pixels), energy-ratio
        scores, upsampled masks and RoI features."""
        require_eval_mode(self, "detect_regions")
        check_images(images)
        boxes, scores, masks = [], [], []
        for image in images:
            size = (int(image.shape[-2]), int(image.shape[-1]))
            nodes = self.hierarchy(image)
            kept = output_nodes(nodes, self.decomposition["filter_dummy"])
            if not kept and self.whole_image_fallback:
                kept = [nodes[0]]  # the root: every patch
            grid = (torch.stack([n.mask for n in kept]) if kept
                    else torch.zeros(0, *nodes[0].mask.shape, dtype=torch.bool))
            boxes.append(regions_to_boxes(grid, size).to(image.device, torch.float32))
            scores.append(torch.tensor([n.energy_ratio for n in kept], dtype=torch.float32, device=image.device))
            masks.append(upsample_masks(grid, size).to(image.device))
        features = self._describe(images, boxes, masks if self.pool_in_mask else None)
        out = []
        for image, b, s, m, f in zip(images, boxes, scores, masks, features.split([len(b) for b in boxes])):
            out.append(Regions(boxes=b, scores=s, features=f, masks=m if self.return_masks else None,
                               image_size=(int(image.shape[-2]), int(image.shape[-1]))))
        return out

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: each box RoI-pooled from its image's descriptor map, as a region is."""
        require_eval_mode(self, "describe_boxes")
        check_images(images)
        boxes = check_box_lists(images, boxes)
        return list(self._describe(images, boxes).split([len(b) for b in boxes]))

    def classify_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """CLAID is class-agnostic (``predicts_labels`` is ``False``): category pruning does not apply."""
        raise TypeError(f"{type(self).__name__} is class-agnostic: it predicts no categories (predicts_labels is False)")


def _backbone(backbone: BackboneArg, weights: Union[str, Path, None], role: str) -> StagedBackbone:
    if isinstance(backbone, str):
        return build_backbone(backbone, weights=weights, frozen_stages=0)
    if weights is not None:
        raise ValueError(f"{role}_weights only apply to a {role}_backbone given by name; load them into the instance")
    return backbone


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
