"""Region features: RoI pooling of named feature maps, and fusion of an image's top-K regions.

Every region method in instsearch describes a region the same way: resample each chosen feature map
inside the box with RoIAlign, reduce the bins to one vector per layer (max, as FCIS+XD and the deep
region CNN's convolutional variant; or mean, as DASR and CLAID), l2-normalise per layer so that no
layer dominates by its activation scale, concatenate, and l2-normalise again so that the dot product
is the cosine similarity the search uses.
"""
from __future__ import annotations

from typing import Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["RoIFeaturePooler", "fuse_regions", "boxes_to_rois", "l2_concat"]

PoolingMode = Literal["max", "avg"]
FusionMode = Literal["concat", "mean", "max"]


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """``[(N_i, 4)]`` per image -> ``(sum N_i, 5)`` rows ``[batch_index, x1, y1, x2, y2]``.

    The single-tensor form lets one ``roi_align`` call serve every box of every image (no loop over
    images or boxes) and keeps the image index explicit, which the list form hides when an image has
    no box.
    """
    if len(boxes) == 0:
        return torch.zeros(0, 5)
    ref = boxes[0]
    index = torch.cat([torch.full((b.shape[0], 1), i, dtype=ref.dtype, device=ref.device)
                       for i, b in enumerate(boxes)])
    return torch.cat([index, torch.cat([b.to(ref.dtype) for b in boxes])], dim=1)


class RoIFeaturePooler(nn.Module):
    """RoI pooling of several named feature maps, l2 on each, concat, l2 again.

    Args:
        layers: names of the feature maps to pool, in the order their vectors are concatenated
            (e.g. ``["conv3", "conv4"]`` for FCIS+XD, ``["conv5"]`` for a VGG conv5_3 feature).
        pooling: ``"max"`` or ``"avg"`` over the ``output_size x output_size`` RoIAlign bins.
        output_size: RoIAlign grid size per side. 7 is the Fast R-CNN grid; since the bins are
            reduced to one vector anyway, it only sets how finely the box is sampled.
        sampling_ratio: bilinear samples per bin side (torchvision's convention; 2 as in
            Mask R-CNN / detectron2).
        normalize: l2-normalise per layer and after concatenation. Off only to inspect raw
            activations (e.g. before a learned PCA-whitening that normalises itself).
    """

    def __init__(self, layers: Sequence[str], pooling: PoolingMode = "max", output_size: int = 7,
                 sampling_ratio: int = 2, normalize: bool = True) -> None:
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        if len(layers) == 0:
            raise ValueError("RoIFeaturePooler needs at least one feature layer name")
        if pooling not in ("max", "avg"):
            raise ValueError(f"RoIFeaturePooler pooling must be 'max' or 'avg', got {pooling!r}")
        if output_size < 1:
            raise ValueError(f"RoIFeaturePooler output_size must be >= 1, got {output_size}")
        self.layers = list(layers)
        self.pooling = pooling
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.normalize = normalize

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, pooling={self.pooling!r}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, normalize={self.normalize}")

    def forward(self, features: Mapping[str, Tensor], boxes: list[Tensor], image_size: tuple[int, int],
                masks: Optional[list[Tensor]] = None) -> Tensor:
        """Pool one vector per box.

        Args:
            features: name -> ``(B, C, h, w)`` feature map of the batched image tensor.
            boxes: ``B`` tensors ``(N_i, 4)``, ``[x1, y1, x2, y2]`` in pixels of the ``(H, W) =
                image_size`` tensor the backbone saw (after resizing, before any output rescale).
            image_size: ``(H, W)`` of that batched (padded) tensor; the scale of each map is
                ``w / W`` so that boxes land on the right cells whatever the stride.
            masks: optional ``B`` tensors ``(N_i, H_i, W_i)`` with ``H_i <= H, W_i <= W`` in the
                same pixels, values in ``[0, 1]``: only bins whose resampled mask is ``>= 0.5``
                are pooled; a region whose mask covers no bin falls back to its whole box.

        Returns:
            ``(sum N_i, D)`` with ``D = sum of the layers' channels``, rows in the order of
            ``boxes``; l2-normalised per layer and overall when ``normalize``.
        """
        return l2_concat(self.pool_per_layer(features, boxes, image_size, masks), normalize=self.normalize)

    def pool_per_layer(self, features: Mapping[str, Tensor], boxes: list[Tensor], image_size: tuple[int, int],
                       masks: Optional[list[Tensor]] = None) -> list[Tensor]:
        """The un-normalised ``(sum N_i, C_layer)`` pooled vector of each layer, in ``layers`` order.

        For callers that join these with vectors from elsewhere (e.g. a detector's box head) before
        the shared :func:`l2_concat`.
        """
        missing = [name for name in self.layers if name not in features]
        if missing:
            raise KeyError(f"RoIFeaturePooler: feature map(s) {missing} not produced by the backbone; "
                           f"available: {sorted(features)}")
        batch = features[self.layers[0]].shape[0]
        if len(boxes) != batch:
            raise ValueError(f"RoIFeaturePooler: {len(boxes)} box lists for a batch of {batch} images")
        height, width = int(image_size[0]), int(image_size[1])
        first = features[self.layers[0]]
        rois = boxes_to_rois(boxes).to(device=first.device, dtype=first.dtype)
        if rois.shape[0] == 0:
            return [features[name].new_zeros(0, features[name].shape[1]) for name in self.layers]

        keep = None if masks is None else self._mask_bins(masks, boxes, rois, (height, width))

        parts = []
        for name in self.layers:
            fmap = features[name]
            # The scale comes from the map's own size rather than a nominal stride, so any backbone
            # works as long as its maps cover the padded tensor (h/H == w/W up to rounding; the
            # batch tensors are padded to a multiple of 32, which makes the ratios exact).
            scale = fmap.shape[-1] / width
            bins = roi_align(fmap, rois.to(fmap.dtype), output_size=self.output_size, spatial_scale=scale,
                             sampling_ratio=self.sampling_ratio, aligned=True)  # (N, C, S, S)
            parts.append(self._reduce(bins.flatten(2), keep))
        return parts

    def _reduce(self, bins: Tensor, keep: Optional[Tensor]) -> Tensor:
        """``(N, C, S*S)`` -> ``(N, C)`` by max or mean over the kept bins."""
        if keep is None:
            return bins.amax(dim=2) if self.pooling == "max" else bins.mean(dim=2)
        keep = keep[:, None, :]  # (N, 1, S*S), broadcast over channels
        if self.pooling == "max":
            return bins.masked_fill(~keep, float("-inf")).amax(dim=2)
        weights = keep.to(bins.dtype)
        return (bins * weights).sum(dim=2) / weights.sum(dim=2)

    def _mask_bins(self, masks: list[Tensor], boxes: list[Tensor], rois: Tensor,
                   image_size: tuple[int, int]) -> Tensor:
        """Which RoIAlign bins of each region lie inside its mask: ``(N, S*S)`` bool.

        Each region's mask is resampled with the very same RoIAlign grid (scale 1: masks are in
        image pixels), so a bin is kept exactly when the mask averaged over that bin's samples is
        at least 0.5. Masks of different sizes are zero-padded to the batch tensor's size (outside
        the image there is no object), then all regions are resampled in one call by treating the
        region index as the batch index.
        """
        if len(masks) != len(boxes):
            raise ValueError(f"RoIFeaturePooler: {len(masks)} mask lists for {len(boxes)} box lists")
        height, width = image_size
        padded = []
        for i, (m, b) in enumerate(zip(masks, boxes)):
            if m.ndim != 3 or m.shape[0] != b.shape[0]:
                raise ValueError(f"RoIFeaturePooler: masks[{i}] must be (N_i={b.shape[0]}, H, W), "
                                 f"got {tuple(m.shape)}")
            if m.shape[1] > height or m.shape[2] > width:
                raise ValueError(f"RoIFeaturePooler: masks[{i}] is {tuple(m.shape[1:])}, larger than the "
                                 f"image tensor {image_size}; masks must be in the backbone input's pixels")
            padded.append(F.pad(m.to(rois.dtype), (0, width - m.shape[2], 0, height - m.shape[1])))
        stacked = torch.cat(padded).to(rois.device)[:, None]  # (N, 1, H, W)
        per_region = rois.clone()
        per_region[:, 0] = torch.arange(rois.shape[0], dtype=rois.dtype, device=rois.device)
        resampled = roi_align(stacked, per_region, output_size=self.output_size, spatial_scale=1.0,
                              sampling_ratio=self.sampling_ratio, aligned=True).flatten(1)  # (N, S*S)
        keep = resampled >= 0.5
        empty = ~keep.any(dim=1, keepdim=True)
        return keep | empty  # an empty mask pools its whole box


def l2_concat(parts: Sequence[Tensor], normalize: bool = True) -> Tensor:
    """l2-normalise each ``(N, C_j)`` part, concatenate along features, l2-normalise again.

    Per-part normalisation gives every layer the same weight in the cosine similarity whatever its
    activation scale or width; the final one makes the dot product a cosine.
    """
    if normalize:
        parts = [F.normalize(p, dim=1) for p in parts]
    out = torch.cat(list(parts), dim=1)
    return F.normalize(out, dim=1) if normalize else out


def fuse_regions(features: Tensor, mode: FusionMode, k: Optional[int] = None) -> Tensor:
    """Fuse the ``(K, D)`` features of one image's top-K regions into one l2-normalised vector.

    The deep region CNN's image-level variants: ``concat`` keeps the regions in score order as a
    ``K*D`` vector (the paper's best, K = 2); ``mean`` / ``max`` pool them into ``D``. Regions are
    expected best first (``Regions.top_k`` order).

    Args:
        features: ``(n, D)`` region features, best first.
        mode: ``"concat"``, ``"mean"`` or ``"max"``.
        k: the number of regions fused. ``concat`` keeps the first ``k`` and zero-pads to ``k*D``
            when the image has fewer, so all images' vectors have the same length; defaults to ``n``.
    """
    if features.ndim != 2:
        raise ValueError(f"fuse_regions expects (K, D) features, got {tuple(features.shape)}")
    n, dim = features.shape
    k = n if k is None else int(k)
    if k < 1:
        raise ValueError(f"fuse_regions needs k >= 1, got {k}")
    top = features[:k]
    if mode == "concat":
        padded = features.new_zeros(k, dim)
        padded[: top.shape[0]] = top
        fused = padded.reshape(k * dim)
    elif mode == "mean":
        fused = top.mean(dim=0) if top.shape[0] else features.new_zeros(dim)
    elif mode == "max":
        fused = top.amax(dim=0) if top.shape[0] else features.new_zeros(dim)
    else:
        raise ValueError(f"fuse_regions mode must be 'concat', 'mean' or 'max', got {mode!r}")
    return F.normalize(fused, dim=0)
