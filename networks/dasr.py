"""DASR and DASR* (deeply activated salient regions): training-free regions from the activation
peaks of a classification CNN, localised by probabilistic back-propagation to the input.

Paper: H.-C. Xiao, W.-L. Zhao, J. Lin, Y.-G. Hong and C.-W. Ngo, "Deeply Activated Salient Region
for Instance Search", ACM TOMM (2022), https://doi.org/10.1145/3510004; https://arxiv.org/abs/2002.00185.

The DASR paper's pipeline (Xiao & Zhao, "Deeply Activated Salient Region for Instance Search"):

* **activation map** -- the image, 512 px on its long side, through an ImageNet CNN (ResNet-50 by
  default, VGG-16 in the paper's ablation); ``X̄`` is the channel mean of the last convolutional
  map (:class:`MeanActivation`).
* **peaks** -- DASR: the 3x3 local maxima of ``X̄`` (:func:`local_maxima`); DASR*: every position
  of ``X̄`` above its mean (:func:`above_mean_positions`), the redundancy removed by NMS below.
* **probabilistic back-propagation** (Eqn. 2-3, :func:`peak_response_maps`) -- each peak becomes a
  map ``M`` over the input pixels: the probability that a pixel contributes to the peak, obtained by
  back-propagating the peak through the network with every convolution's gradient replaced by a
  winner-take-all rule (Zhang et al.'s excitation back-propagation, as the paper). One forward per
  image records what the rule needs; the peaks then go through an explicit reverse pass
  (:mod:`instsearch.networks.excitation_backprop`), one at a time on a CPU (faster there) or as the
  batch dimension on an accelerator, in chunks sized by a memory budget (``strategy``,
  :func:`resolve_strategy`).
* **regions** -- pixels with ``M >= tau * max M`` (:func:`threshold_maps`), an ellipse from their
  second moments (Eqn. 4) and its circumscribed rectangle as the box (:func:`ellipse_boxes`), then
  NMS at IoU ``beta`` ranked by the peak's ``X̄`` value.
* **features** -- average RoI pooling of each box on ResNet-50 ``layer4.0`` (``conv5.0`` here),
  l2-normalised; the PCA-whitening of the paper is fitted on the database by the evaluator
  (``RetrievalConfig.whitening``), so it is the same for every method.

The back-propagation rule is the one of the authors' public implementation
(https://github.com/wlzhao22/DASR at commit e71d16743e1bdf764d5fd178c43f080264a55577; "the public
code" below): for a convolution with input ``A`` (of one image), weights ``W`` and output
gradient ``g``, the input gradient is

    ``(A - min A) * conv_transpose(g / Z, W⁺)``,  ``Z = conv(A - min A, W⁺)``

(``W⁺`` = the positive part of ``W``, the bias left out; ``g / Z`` set to 0 where ``Z < 1e-10``),
while batch norm, ReLU and pooling pass their ordinary gradients
(:class:`~instsearch.networks.excitation_backprop.ReversePass`).

Choices where the paper is ambiguous (each a parameter):

* ``min A`` is taken per image (the public code takes it over its one-image batch); the paper
  writes ``A`` itself, i.e. assumes non-negative inputs, which the first layer's normalised
  image is not.
* Max pooling passes its ordinary gradient, as the public code; the paper's text instead treats it
  as an all-ones convolution.
* A DASR peak must also lie above the mean of ``X̄`` (the public code's filter for DASR) and both
  detectors skip the map's one-cell border and peaks with ``X̄ <= 0`` (which back-propagate
  nothing); ``exclude_border`` / ``local_max_above_mean`` switch these off.
* DASR*'s peaks are every above-mean position of ``X̄`` (the paper, ``star_peaks="above_mean"``:
  ~130 per image at 512 px); the public code's DASR* back-propagates only the 3x3 local maxima,
  without the mean filter (``star_peaks="local_max"``), fewer peaks for less time.
* The region threshold is ``tau`` times the map's maximum (the paper's "normalised to [0, 1]" and
  ``tau = 0.1``); the public code instead keeps the top 5 % of pixels (``threshold="percentile"``).
* The ellipse's axes are ``2 sqrt(eigenvalue)`` of the pixels' covariance (the public code's
  factor; ``ellipse_scale``), so the box is ``centre ± 2 sqrt(var)`` per axis -- the exact
  circumscribed rectangle of that ellipse.
* NMS at ``beta = 0.3`` applies to DASR as well as DASR* (``nms_iou=None`` switches it off, the
  paper's ablation setting).
* An image without any region keeps its whole frame as one region of score 0
  (``whole_image_fallback``) so that it can still be found.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from instsearch.networks.backbones import StagedBackbone, build_backbone
from instsearch.networks.contract import (ClassAgnostic, check_box_lists, check_images, require_eval_mode,
                                          whole_frame_box)
from instsearch.networks.excitation_backprop import (Z_EPS, MeanChannels, Rule, Strategy, check_rule,
                                                      chunk_for_budget, peak_gradients, peak_response_maps,
                                                      peaks_per_pass, resolve_strategy, reverse_pass_of)
from instsearch.networks.region_features import RoIFeaturePooler
from instsearch.networks.salient_regions import (above_mean_positions, ellipse_boxes, local_maxima, pixel_moments,
                                                 resize_long_side, threshold_maps)
from instsearch.networks.vgg import VGG16Backbone
from instsearch.structures import Regions, scale_boxes

__all__ = ["DASR", "MeanActivation", "DASRDetection", "peak_response_maps", "resolve_strategy", "chunk_for_budget",
           "local_maxima", "above_mean_positions", "threshold_maps", "pixel_moments", "ellipse_boxes",
           "resize_long_side", "Z_EPS"]


# ---------------------------------------------------------------------- the activation map
class MeanActivation(nn.Module):
    """``X̄``: the channel mean of a backbone stage (the last convolutional map), optionally
    max-pooled 2x2 first (VGG-16's pool5, where the paper starts the back-propagation).

    :meth:`as_sequential` is the same function as one traceable module, and
    :meth:`sequential_path` names another layer inside it (the descriptor's ``conv5.0`` lies on
    the way to ``conv5``), so that detection runs the backbone once.
    """

    def __init__(self, backbone: StagedBackbone, layer: str, pool: bool = False) -> None:
        super().__init__()
        stage, block = backbone.parse_layer(layer)
        if block is not None:
            raise ValueError(f"the activation layer must be a stage (e.g. 'conv5'), got {layer!r}")
        self.backbone = backbone
        self.layer = layer
        self.pool = bool(pool)

    def forward(self, x: Tensor) -> Tensor:
        for name, module in self.backbone.stage_modules().items():
            x = module(x)
            if name == self.layer:
                break
        if self.pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        return x.mean(dim=1, keepdim=True)

    def as_sequential(self) -> nn.Sequential:
        """The same function as one ``nn.Sequential`` -- the stages up to :attr:`layer`, the
        optional 2x2 max pool, the channel mean -- which the reverse pass traces (its modules are
        this backbone's own, not copies)."""
        modules: list[nn.Module] = []
        for name, module in self.backbone.stage_modules().items():
            modules.append(module)
            if name == self.layer:
                break
        if self.pool:
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        return nn.Sequential(*modules, MeanChannels())

    def sequential_path(self, layer: str) -> Optional[str]:
        """The module path of the backbone's ``layer`` (e.g. ``conv5.0``) inside
        :meth:`as_sequential`; ``None`` when it comes after the activation layer."""
        stage, block = self.backbone.parse_layer(layer)
        names = list(self.backbone.stage_modules())
        index = names.index(stage)
        if index > names.index(self.layer):
            return None
        return f"{index}" if block is None else f"{index}.{block}"


@dataclass
class DASRDetection:
    """Everything detection computed for one image (network pixels), for figures and inspection.

    ``peaks`` ``(P, 2)`` = ``(y, x)`` on ``xbar``; ``maps`` ``(P, H, W)`` (``None`` unless asked
    for); ``centres`` / ``covs`` the ellipses; ``boxes`` / ``scores`` every peak's region;
    ``kept`` the indices that survive the empty-region filter and NMS, best first.
    """

    xbar: Tensor
    peaks: Tensor
    values: Tensor
    maps: Optional[Tensor]
    centres: Tensor
    covs: Tensor
    boxes: Tensor
    kept: Tensor
    size: tuple[int, int]
    describe_map: Optional[Tensor] = None


# ---------------------------------------------------------------------- the network
class DASR(ClassAgnostic, nn.Module):
    """DASR / DASR* regions and features as a :class:`~instsearch.structures.RegionSearchModel`.

    Args:
        backbone: a registry name (``resnet50`` default, ``vgg16`` as the paper's ablation, any
            CNN such as ``small``) or a built :class:`~instsearch.networks.staged.StagedBackbone`.
        weights: weights file of a backbone given by name (an ImageNet state dict, or any
            instsearch checkpoint holding that backbone); ``None`` runs randomly initialised.
        star: DASR* (every above-mean position of ``X̄``) instead of DASR (local maxima).
        long_side: images are resized to this long side (512, the paper's).
        activation_layer: the stage whose channel mean is ``X̄`` (``None``: the last stage).
        pool_activation: max-pool 2x2 before the mean (VGG-16's pool5); ``None``: only for VGG-16.
        describe_layer: the map regions are pooled from (``conv5.0`` = ResNet-50's ``layer4.0``,
            the paper's Block4_unit1; any layer, its Fig. 4 ablation).
        pooling: ``"avg"`` (the paper's) or ``"max"`` / ``"gem"``.
        window / exclude_border / local_max_above_mean: peak finding (see the module docstring).
        tau / threshold / percentile: the activated pixels of a map (:func:`threshold_maps`).
        ellipse_scale: ellipse axes in standard deviations (:func:`ellipse_boxes`).
        nms_iou: NMS threshold ``beta`` on the regions ranked by peak value (``None``: no NMS).
        max_peaks: back-propagate at most this many peaks per image (highest ``X̄`` first;
            ``None``: all), a bound on time for very large images.
        star_peaks: DASR*'s peaks, ``"above_mean"`` (the paper) or ``"local_max"`` (the public code).
        chunk_size / memory_budget_mb / strategy / rule / backprop_dtype: the back-propagation
            (:func:`peak_response_maps`; ``backprop_dtype`` ``"float32"`` or ``"bfloat16"``).
        whole_image_fallback: an image without regions keeps its whole frame (score 0).
    """

    def __init__(self, backbone: Union[str, StagedBackbone] = "resnet50", weights: Union[str, Path, None] = None,
                 star: bool = False, long_side: int = 512, activation_layer: Optional[str] = None,
                 pool_activation: Optional[bool] = None, describe_layer: str = "conv5.0",
                 pooling: Literal["avg", "max", "gem"] = "avg", window: int = 3, exclude_border: bool = True,
                 local_max_above_mean: bool = True, tau: float = 0.1,
                 threshold: Literal["relative", "percentile"] = "relative", percentile: float = 95.0,
                 ellipse_scale: float = 2.0, nms_iou: Optional[float] = 0.3, max_peaks: Optional[int] = None,
                 star_peaks: Literal["above_mean", "local_max"] = "above_mean",
                 chunk_size: Optional[int] = None, memory_budget_mb: float = 1024.0,
                 strategy: Strategy = "auto", rule: Rule = "probabilistic",
                 backprop_dtype: Literal["float32", "bfloat16"] = "float32",
                 whole_image_fallback: bool = True) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, weights=weights, frozen_stages=0)
        elif weights is not None:
            raise ValueError("weights only apply to a backbone given by name; load them into the instance")
        check_rule(rule)
        resolve_strategy(strategy, torch.device("cpu"))  # refuse an unknown one now
        if threshold not in ("relative", "percentile"):
            raise ValueError(f"threshold must be 'relative' or 'percentile', got {threshold!r}")
        if star_peaks not in ("above_mean", "local_max"):
            raise ValueError(f"star_peaks must be 'above_mean' or 'local_max', got {star_peaks!r}")
        if backprop_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"backprop_dtype must be 'float32' or 'bfloat16', got {backprop_dtype!r}")
        if chunk_size is not None and chunk_size < 1 or not memory_budget_mb > 0:
            raise ValueError(f"need chunk_size >= 1 (or null) and memory_budget_mb > 0, got {chunk_size}, "
                             f"{memory_budget_mb}")
        # training-free: nothing is ever fitted
        self.backbone = backbone.requires_grad_(False)
        layer = backbone.feature_info.names[-1] if activation_layer is None else activation_layer
        pool = isinstance(backbone, VGG16Backbone) if pool_activation is None else pool_activation
        self.activation = MeanActivation(backbone, layer, pool)
        self.describe_layer = describe_layer
        backbone.parse_layer(describe_layer)  # refuse an unknown layer now, not at the first image
        self.pooler = RoIFeaturePooler([describe_layer], pooling=pooling)
        self.star = bool(star)
        self.long_side = int(long_side)
        self.window, self.exclude_border = int(window), bool(exclude_border)
        self.local_max_above_mean = bool(local_max_above_mean)
        self.tau, self.threshold, self.percentile = float(tau), threshold, float(percentile)
        self.ellipse_scale = float(ellipse_scale)
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.max_peaks = max_peaks
        self.star_peaks = star_peaks
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.memory_budget_mb, self.strategy, self.rule = float(memory_budget_mb), strategy, rule
        self.backprop_dtype = getattr(torch, backprop_dtype)
        #: running totals of :meth:`detect_regions` (:meth:`progress_metrics`)
        self._cost = {"images": 0, "peaks": 0, "seconds": 0.0}
        self.whole_image_fallback = bool(whole_image_fallback)

    @property
    def feature_dim(self) -> int:
        return self.backbone.layer_channels(self.describe_layer)

    # ------------------------------------------------------------------ detector
    def network_input(self, image: Tensor) -> Tensor:
        """One ``(3, H, W)`` image in ``[0, 1]`` -> the normalised ``(1, 3, H', W')`` network input
        (long side ``long_side``)."""
        size = resize_long_side(int(image.shape[-2]), int(image.shape[-1]), self.long_side)
        x = image[None].float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.backbone.normalize_input(x)

    def find_peaks(self, xbar: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, h, w)`` -> peaks ``(P, 3)`` and values, by the DASR or DASR* rule, capped at
        ``max_peaks`` per image (highest first)."""
        if self.star and self.star_peaks == "above_mean":
            peaks, values = above_mean_positions(xbar, self.exclude_border)
        elif self.star:  # the public code's DASR*: every 3x3 local maximum, without DASR's mean filter
            peaks, values = local_maxima(xbar, self.window, self.exclude_border, above_mean=False)
        else:
            peaks, values = local_maxima(xbar, self.window, self.exclude_border, self.local_max_above_mean)
        if self.max_peaks is not None and len(values) > self.max_peaks:
            top = torch.topk(values, self.max_peaks).indices.sort().values  # a single image here
            peaks, values = peaks[top], values[top]
        return peaks, values

    def explain(self, image: Tensor, keep_maps: bool = True) -> DASRDetection:
        """Detection of one ``(3, H, W)`` image with every intermediate (network pixels)."""
        x = self.network_input(image)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        reverse = reverse_pass_of(self.activation, self.rule, self.backprop_dtype)
        xbar, recorded = reverse.forward(x, capture=self.activation.sequential_path(self.describe_layer))
        fmap = recorded["captured"]
        peaks, values = self.find_peaks(xbar[:, 0])
        positions = peaks[:, 1:]
        if len(positions) == 0:
            maps = x.new_zeros(0, *size)
        else:
            chunk = peaks_per_pass(self.strategy, x.device, recorded, self.chunk_size, self.memory_budget_mb)
            maps = peak_gradients(reverse, recorded, positions, chunk)
        del recorded
        masks = threshold_maps(maps, self.tau, self.threshold, self.percentile)
        centres, covs, count = pixel_moments(masks)
        boxes = ellipse_boxes(centres, covs, self.ellipse_scale, size) if len(masks) else x.new_zeros(0, 4)
        valid = (count > 0).nonzero().flatten()
        kept = valid
        if self.nms_iou is not None and len(valid):
            kept = valid[nms(boxes[valid], values[valid].float(), self.nms_iou)]
        else:
            kept = valid[torch.argsort(values[valid], descending=True)]
        return DASRDetection(xbar=xbar[0, 0], peaks=positions, values=values, maps=maps if keep_maps else None,
                             centres=centres.float(), covs=covs.float(), boxes=boxes, kept=kept, size=size,
                             describe_map=fmap)

    # ------------------------------------------------------------------ descriptor
    def _pool(self, fmap: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
        return self.pooler({self.describe_layer: fmap}, [boxes], size)

    def _describe_map(self, x: Tensor) -> Tensor:
        return self.backbone.forward_layer(x, self.describe_layer)

    # ------------------------------------------------------------------ RegionSearchModel
    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: each image's DASR (or DASR*) boxes in its own pixels, scored by the
        peak's ``X̄`` value, with their pooled features."""
        require_eval_mode(self, "detect_regions")
        check_images(images)
        out = []
        for image in images:  # one forward (and its peaks' reverse passes) per image
            start = time.perf_counter()
            det = self.explain(image, keep_maps=False)
            self._cost["images"] += 1
            self._cost["peaks"] += len(det.peaks)
            self._cost["seconds"] += time.perf_counter() - start
            fmap = det.describe_map if det.describe_map is not None else self._describe_map(self.network_input(image))
            boxes, scores = det.boxes[det.kept], det.values[det.kept].float()
            if len(boxes) == 0 and self.whole_image_fallback:
                boxes = whole_frame_box(det.size[0], det.size[1], det.boxes)
                scores = torch.zeros(1, device=image.device)
            features = self._pool(fmap, boxes.to(fmap), det.size)
            regions = Regions(boxes=boxes.to(image.device), scores=scores.to(image.device),
                              features=features.to(image.device), image_size=det.size)
            out.append(regions.rescaled((int(image.shape[-2]), int(image.shape[-1]))))
        return out

    def progress_metrics(self) -> dict[str, float]:
        """Mean peaks and detection seconds per database image so far (shown in the progress bar
        of ``instsearch test`` / ``predict``: back-propagating the peaks is where DASR spends its time)."""
        n = max(self._cost["images"], 1)
        return {"peaks/img": self._cost["peaks"] / n, "s/img": self._cost["seconds"] / n}

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: each box average-pooled from its image's map at the network size, as a region is."""
        require_eval_mode(self, "describe_boxes")
        check_images(images)
        out = []
        for image, b in zip(images, check_box_lists(images, boxes)):
            x = self.network_input(image)
            size = (int(x.shape[-2]), int(x.shape[-1]))
            fmap = self._describe_map(x)
            boxes = scale_boxes(b, (int(image.shape[-2]), int(image.shape[-1])), size)
            out.append(self._pool(fmap, boxes.to(fmap), size).to(image.device))
        return out
