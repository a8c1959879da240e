"""CLAID (class-agnostic instance-level descriptor): training-free regions from a hierarchical
bisecting of self-supervised ViT patch features, described by RoI pooling on a ResNet.

Paper: Q.-Y. Sun, W.-L. Zhao, H.-Y. Xie, Y.-B. Miao and C.-W. Ngo, "Class Agnostic Instance-level
Descriptor for Instance Search"; https://arxiv.org/abs/2506.16745.

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

Where the authors' public code (https://github.com/wlzhao22/CLAID, commit 8a2fd4c, ``CALID/``)
differs from the paper, both are options, the paper's the default (``configs/claid_public.yaml``
sets the public code's):

* **image size** (``resize``) -- ``"paper"``: every image to the paper's short side 360 / long side
  <= 800, each side rounded to whole patches so that the grid covers the whole image (the rounding,
  and enlarging images smaller than that, are instsearch's reading); ``"public"``
  (``detector.py: get_input_var``): torchvision's ``Resize(360, max_size=800)`` only for images whose
  short side exceeds 355, none for smaller ones, then the bottom and right edges cropped to a multiple
  of the patch (the grid covers the image but for those few pixels);
* **descriptor** -- the paper: ImageNet ResNet-50 ``layer4.0`` with RoI average pooling; the public
  ``descriptor.py``: a SwAV ResNet-50 weights file, ``layer4.1`` (``conv5.1``), GeM (p = 3);
* **decomposition rules** (seed split, k-sums move bar and sweep limit, cutting the root, the diagonal
  in c(S)) -- options of :func:`~instsearch.networks.bisecting.build_hierarchy`, passed through.

Choices where the paper is silent (each a parameter):

* **region score and order** -- the score is the node's energy ratio xi(S) (Eq. 10), so
  ``RetrievalConfig.regions_per_image`` keeps the most salient regions. xi is often exactly 1 (a node
  wholly inside the high-energy set), so the regions are returned sorted by xi (descending), then
  depth (shallower first: a whole object before its parts), then size (larger first), then the
  raster position of the first patch; the cap's stable sort keeps that order among equal scores;
* **batch independence** -- the descriptor runs on each image alone, padded to a multiple of its
  deepest stride, so a region's feature is the same whatever images share its batch (zero padding
  to the largest image of a batch would change it);
* **an image without regions** (its root is already coherent, c-bar >= tau1, or every node is
  dummy) keeps its whole frame as one region (``whole_image_fallback``), so that it can still be
  found; the paper does not say what such an image contributes.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instsearch.networks.backbones import StagedBackbone, build_backbone
from instsearch.networks.bisecting import (RegionNode, bisect_regions, build_hierarchy, output_nodes, regions_to_boxes,
                                           upsample_masks)
from instsearch.networks.region_features import RoIFeaturePooler
from instsearch.networks.contract import ClassAgnostic, check_box_lists, check_images, require_eval_mode
from instsearch.structures import Regions

__all__ = ["CLAID", "bisect_regions", "build_hierarchy", "regions_to_boxes", "upsample_masks", "RegionNode",
           "resize_to_grid", "resize_public", "PatchFrame", "rank_nodes"]

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


#: The public code resizes only images whose short side exceeds this (``get_input_var``: ``min(w, h) > 355``).
PUBLIC_RESIZE_ABOVE = 355


def resize_public(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """torchvision's ``Resize(min_size, max_size=max_size)`` output size (integer truncation, as
    ``transforms.Resize`` computes it): short side ``min_size``, long side ``int(min_size * long /
    short)``, and when that exceeds ``max_size`` the long side ``max_size`` and the short side
    ``int(max_size * min_size / long)``."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = min_size, int(min_size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


@dataclass(frozen=True)
class PatchFrame:
    """How an ``(H, W)`` image maps onto its patch grid.

    Attributes:
        resized: ``(rh, rw)``, the size the image is resized to before the patch backbone.
        grid: ``(h, w)`` patches; they cover the top-left ``(h * stride, w * stride)`` pixels of
            the resized image (all of it under ``resize="paper"``).
        covered: ``(h * stride * H / rh, w * stride * W / rw)``: the part of the original image the
            grid covers, in original pixels (exactly ``(H, W)`` when the grid covers all of it).
    """

    resized: tuple[int, int]
    grid: tuple[int, int]
    covered: tuple[float, float]


def rank_nodes(nodes: Sequence[RegionNode]) -> list[RegionNode]:
    """Output regions in their documented order: energy ratio xi descending, then depth (shallower
    first), then size (more patches first), then the raster index of the first patch."""
    def key(node: RegionNode) -> tuple[float, int, int, int]:
        flat = node.mask.reshape(-1)
        return (-node.energy_ratio, node.level, -int(flat.sum()), int(flat.to(torch.uint8).argmax()))

    return sorted(nodes, key=key)


class CLAID(ClassAgnostic, nn.Module):
    """CLAID regions and features as a :class:`~instsearch.structures.RegionSearchModel`.

    Args:
        patch_backbone: the detector's backbone: a registry name (default DINO ViT-B/8 through timm;
            any timm ViT of the registry, or a CNN such as ``small``) or a built
            :class:`~instsearch.networks.staged.StagedBackbone`.
        patch_layer: the map whose cells are the "patches" (``None``: the backbone's last stage --
            ``tokens`` of a ViT; ``conv3`` of a CNN is stride 8 like ViT-B/8).
        patch_weights: weights file of a backbone given by name (for a ViT: timm's state dict or
            DINO's checkpoint, see :mod:`~instsearch.networks.vit`; or any instsearch checkpoint
            holding that backbone).
        patch_backbone_options / describe_backbone_options: the registry builder's own options for a
            backbone given by name (e.g. ``{depth: 2}`` for a shallow timm ViT).
        min_size / max_size: the detector's image size (short side / cap of the long side).
        resize: ``"paper"`` or ``"public"`` (see the module docstring; :meth:`patch_frame`).
        describe_backbone / describe_layer / describe_weights: the descriptor network and its map
            (ResNet-50 ``conv5.0`` = torchvision's ``layer4.0``, the paper's choice).
        pooling: ``"avg"`` (the paper's RoI pooling, a mean), ``"max"`` or ``"gem"`` (exponent
            ``gem_p``).
        pool_in_mask: pool only inside each region's upsampled patch mask, not its whole box.
        tau1, tau2, alpha, energy_top, min_patches, seed_selection, method, max_depth,
            filter_dummy, solver, max_iters: the decomposition's options
            (:func:`~instsearch.networks.bisecting.build_hierarchy`; paper defaults).
        decomposition_rules: further :func:`~instsearch.networks.bisecting.build_hierarchy` options
            that choose between the paper's rules and the public code's (e.g. ``seed_rule``,
            ``move_rule``, ``cut_root``), passed through as given.
        seed: generator seed of the random parts (random initialisation, the sequential
            solver's visiting order), reset per image so an image's regions do not depend on the
            batch it comes in.
        whole_image_fallback: an image with no region keeps its whole frame as one region.
        return_masks: attach the upsampled region masks to the returned regions.
    """

    def __init__(self, patch_backbone: BackboneArg = "vit_base_patch8_224.dino", patch_layer: Optional[str] = None,
                 patch_weights: Union[str, Path, None] = None, patch_backbone_options: Optional[dict[str, Any]] = None,
                 min_size: int = 360, max_size: int = 800, resize: Literal["paper", "public"] = "paper",
                 describe_backbone: BackboneArg = "resnet50", describe_layer: str = "conv5.0",
                 describe_weights: Union[str, Path, None] = None,
                 describe_backbone_options: Optional[dict[str, Any]] = None,
                 pooling: Literal["avg", "max", "gem"] = "avg", gem_p: float = 3.0, pool_in_mask: bool = False,
                 tau1: float = 0.97, tau2: float = 0.2, alpha: float = 0.2, energy_top: float = 0.3,
                 min_patches: int = 15, seed_selection: bool = True, method: Literal["ksums", "ncut"] = "ksums",
                 max_depth: Optional[int] = None, filter_dummy: bool = True,
                 solver: Literal["batched", "sequential"] = "batched", max_iters: int = 100,
                 decomposition_rules: Optional[dict[str, Any]] = None, seed: int = 0,
                 whole_image_fallback: bool = True, return_masks: bool = True) -> None:
        super().__init__()
        if resize not in ("paper", "public"):
            raise ValueError(f"CLAID: resize must be 'paper' or 'public', got {resize!r}")
        rules = dict(decomposition_rules or {})
        explicit = set(inspect.signature(CLAID.__init__).parameters)
        known = set(inspect.signature(build_hierarchy).parameters) - {"features", "generator"} - explicit
        twice = sorted(set(rules) & explicit)
        if twice:
            raise ValueError(f"CLAID: {twice} are CLAID arguments of their own; set them there, not in "
                             f"decomposition_rules")
        unknown = sorted(set(rules) - known)
        if unknown:
            raise ValueError(f"CLAID: unknown decomposition_rules {unknown}; they can be {sorted(known)}")
        self.patch_backbone = _backbone(patch_backbone, patch_weights, patch_backbone_options, "patch")
        self.patch_layer = self.patch_backbone.feature_info.names[-1] if patch_layer is None else patch_layer
        self.patch_stride = self.patch_backbone.layer_stride(self.patch_layer)
        self.describe_backbone = _backbone(describe_backbone, describe_weights, describe_backbone_options, "describe")
        self.describe_layer = describe_layer
        self.describe_backbone.parse_layer(describe_layer)  # refuse an unknown layer now, not at the first image
        self.pooler = RoIFeaturePooler([describe_layer], pooling=pooling, p=gem_p)
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.resize = resize
        self.pool_in_mask = bool(pool_in_mask)
        self.decomposition = dict(tau1=tau1, tau2=tau2, alpha=alpha, energy_top=energy_top, min_patches=min_patches,
                                  seed_selection=seed_selection, method=method, max_depth=max_depth,
                                  filter_dummy=filter_dummy, solver=solver, max_iters=max_iters,
                                  **rules)
        self.seed = int(seed)
        self.whole_image_fallback = bool(whole_image_fallback)
        self.return_masks = bool(return_masks)
        # the pad multiple of a descriptor input: the deepest stride, so every map covers the
        # padded tensor exactly and the pooler's scale is the same on both axes
        self._pad_multiple = max(s.stride for s in self.describe_backbone.feature_info)
        #: running totals of :meth:`detect_regions` (:meth:`progress_metrics`): the paper's Table V
        #: reports cuts per image and time per cut
        self._cost = {"images": 0, "cuts": 0, "regions": 0, "grid_s": 0.0, "decomposition_s": 0.0}

    @property
    def feature_dim(self) -> int:
        return self.describe_backbone.layer_channels(self.describe_layer)

    # ------------------------------------------------------------------ detector
    def patch_frame(self, height: int, width: int) -> PatchFrame:
        """Where an ``height x width`` image's patches lie (:class:`PatchFrame`), by ``resize``."""
        stride = self.patch_stride
        if self.resize == "paper":
            resized = resize_to_grid(height, width, self.min_size, self.max_size, stride)
            return PatchFrame(resized, (resized[0] // stride, resized[1] // stride), (float(height), float(width)))
        resized = (resize_public(height, width, self.min_size, self.max_size)
                   if min(height, width) > PUBLIC_RESIZE_ABOVE else (height, width))
        resized = (max(resized[0], stride), max(resized[1], stride))  # at least one patch
        grid = (resized[0] // stride, resized[1] // stride)  # the bottom / right remainder is cropped
        covered = (grid[0] * stride * height / resized[0], grid[1] * stride * width / resized[1])
        return PatchFrame(resized, grid, covered)

    def patch_grid(self, image: Tensor) -> Tensor:
        """One ``(3, H, W)`` image in ``[0, 1]`` -> its ``(h, w, D)`` patch-feature grid (raw, not
        normalised: the dummy-node energy reads the raw l1 norms)."""
        height, width = int(image.shape[-2]), int(image.shape[-1])
        frame = self.patch_frame(height, width)
        x = image[None].float()
        if frame.resized != (height, width):
            x = F.interpolate(x, size=frame.resized, mode="bilinear", align_corners=False, antialias=True)
        x = x[..., : frame.grid[0] * self.patch_stride, : frame.grid[1] * self.patch_stride]
        x = self.patch_backbone.normalize_input(x)
        fmap = self.patch_backbone.forward_layer(x, self.patch_layer)[0]
        if tuple(fmap.shape[-2:]) != frame.grid:
            raise RuntimeError(f"{self.patch_layer} of {type(self.patch_backbone).__name__} gave a "
                               f"{tuple(fmap.shape[-2:])} map for a {frame.grid} patch grid (stride {self.patch_stride})")
        return fmap.permute(1, 2, 0)

    def nodes_in_pixels(self, nodes: Sequence[RegionNode], height: int, width: int) -> tuple[Tensor, Tensor]:
        """Boxes ``(R, 4)`` and masks ``(R, H, W)`` of hierarchy ``nodes`` in the original image's
        pixels (:meth:`region_boxes_and_masks` of their patch masks)."""
        grid = (torch.stack([n.mask for n in nodes]) if nodes
                else torch.zeros(0, *self.patch_frame(height, width).grid, dtype=torch.bool))
        return self.region_boxes_and_masks(grid, height, width)

    def region_boxes_and_masks(self, grid_masks: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """``(R, h, w)`` patch masks -> boxes ``(R, 4)`` and masks ``(R, H, W)`` in the original
        image's pixels: the patch cover of :func:`regions_to_boxes` over the covered part of the image
        (:class:`PatchFrame`), the cropped remainder outside every mask."""
        frame = self.patch_frame(height, width)
        boxes = regions_to_boxes(grid_masks, frame.covered)
        masks = upsample_masks(grid_masks, (round(frame.covered[0]), round(frame.covered[1])))
        pad_h, pad_w = height - masks.shape[-2], width - masks.shape[-1]
        if pad_h or pad_w:
            masks = F.pad(masks, (0, pad_w, 0, pad_h))
        return boxes, masks

    def hierarchy(self, image: Tensor) -> list[RegionNode]:
        """Every node of the image's decomposition (dummies and the root included), for inspection
        and figures; :meth:`detect_regions` keeps the output nodes."""
        return self.hierarchy_of_grid(self.patch_grid(image))

    def kept_nodes(self, nodes: list[RegionNode]) -> list[RegionNode]:
        """The regions an image yields from its hierarchy ``nodes``: the output nodes in
        :func:`rank_nodes` order; the root alone (its whole frame) when there are none and
        ``whole_image_fallback``."""
        kept = rank_nodes(output_nodes(nodes, self.decomposition["filter_dummy"]))
        if not kept and self.whole_image_fallback:
            kept = [nodes[0]]  # the root: every patch
        return kept

    def hierarchy_of_grid(self, grid: Tensor) -> list[RegionNode]:
        """The decomposition of an ``(h, w, D)`` patch grid with this network's options."""
        generator = torch.Generator().manual_seed(self.seed)
        return build_hierarchy(grid, generator=generator, **self.decomposition)

    # ------------------------------------------------------------------ descriptor
    def _describe(self, images: Sequence[Tensor], boxes: list[Tensor], masks: Optional[list[Tensor]] = None) -> Tensor:
        """RoI features of ``boxes`` (pixels of each image) on the descriptor map of each image at
        its own resolution. Each image goes through the descriptor alone, zero-padded to a multiple
        of the deepest stride, so its features do not depend on the other images of the batch."""
        features = []
        for i, image in enumerate(images):  # a loop over images: one descriptor pass each
            height, width = int(image.shape[-2]), int(image.shape[-1])
            padded = (_round_up(height, self._pad_multiple), _round_up(width, self._pad_multiple))
            x = F.pad(self.describe_backbone.normalize_input(image[None].float()),
                      (0, padded[1] - width, 0, padded[0] - height))
            fmap = self.describe_backbone.forward_layer(x, self.describe_layer)
            features.append(self.pooler({self.describe_layer: fmap}, [boxes[i]], padded,
                                        None if masks is None else [masks[i]]))
        return torch.cat(features)

    # ------------------------------------------------------------------ RegionSearchModel
    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: each image's kept hierarchy nodes (ordered by :func:`rank_nodes`) as boxes
        (image pixels), energy-ratio scores, upsampled masks and RoI features."""
        require_eval_mode(self, "detect_regions")
        check_images(images)
        boxes, scores, masks = [], [], []
        for image in images:
            height, width = int(image.shape[-2]), int(image.shape[-1])
            _synchronize(image)  # an accelerator's queued work is not the patch grid's
            start = time.perf_counter()
            grid = self.patch_grid(image)
            _synchronize(grid)
            split = time.perf_counter()
            nodes = self.hierarchy_of_grid(grid)
            self._count(nodes, split - start, time.perf_counter() - split)
            kept = self.kept_nodes(nodes)
            b, m = self.nodes_in_pixels(kept, height, width)
            boxes.append(b.to(image.device, torch.float32))
            scores.append(torch.tensor([n.energy_ratio for n in kept], dtype=torch.float32, device=image.device))
            masks.append(m.to(image.device))
        features = self._describe(images, boxes, masks if self.pool_in_mask else None)
        out = []
        for image, b, s, m, f in zip(images, boxes, scores, masks, features.split([len(b) for b in boxes])):
            out.append(Regions(boxes=b, scores=s, features=f, masks=m if self.return_masks else None,
                               image_size=(int(image.shape[-2]), int(image.shape[-1]))))
        return out

    def _count(self, nodes: Sequence[RegionNode], grid_s: float, decomposition_s: float) -> None:
        self._cost["images"] += 1
        self._cost["cuts"] += sum(n.bisected for n in nodes)
        self._cost["regions"] += len(output_nodes(nodes, self.decomposition["filter_dummy"]))
        self._cost["grid_s"] += grid_s
        self._cost["decomposition_s"] += decomposition_s

    def progress_metrics(self) -> dict[str, float]:
        """Per database image so far: cuts (bisections), output regions of the decomposition
        (before the whole-image fallback), seconds of the patch grid and of the decomposition, and
        seconds per cut (the CLAID paper's Table V columns; ``instsearch test`` shows them in its
        progress bar and writes them to ``costs.json``)."""
        c = self._cost
        n = max(c["images"], 1)
        return {"cuts/img": c["cuts"] / n, "regions/img": c["regions"] / n, "grid s/img": c["grid_s"] / n,
                "decomposition s/img": c["decomposition_s"] / n,
                "decomposition s/cut": c["decomposition_s"] / max(c["cuts"], 1)}

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: each box RoI-pooled from its image's descriptor map, as a region is."""
        require_eval_mode(self, "describe_boxes")
        check_images(images)
        boxes = check_box_lists(images, boxes)
        return list(self._describe(images, boxes).split([len(b) for b in boxes]))

def _synchronize(tensor: Tensor) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously) before reading a clock."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _backbone(backbone: BackboneArg, weights: Union[str, Path, None], options: Optional[dict[str, Any]],
              role: str) -> StagedBackbone:
    if isinstance(backbone, str):
        return build_backbone(backbone, weights=weights, frozen_stages=0, **(options or {}))
    if weights is not None or options:
        raise ValueError(f"{role}_weights and {role}_backbone_options only apply to a {role}_backbone given by name; "
                         f"set them on the instance")
    return backbone


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
