"""Region features: RoI pooling of named feature maps, and fusion of an image's top-K regions.

Every region method in instsearch describes a region the same way: reduce each chosen feature map
inside the box to one vector per layer, l2-normalise per layer so that no layer dominates by its
activation scale, concatenate, and l2-normalise again so that the dot product is the cosine
similarity the search uses. The reduction is

* ``max`` (FCIS+XD: "the maximum activation is extracted from the scaled ROI region"; the deep
  region CNN's convolutional variant): the true maximum over the feature-map **cells** inside the
  scaled box, not the maximum of RoIAlign bins (bins average bilinear samples, which on ReLU maps
  gave 24-67 % of the true channel maximum). A cell is inside when its centre is, in the
  half-pixel model of aligned RoIAlign (cell ``j`` covers ``[j, j + 1)`` of the scaled axis, centre
  ``j + 0.5``); a box too small to contain a centre takes the cell under its own centre.
* ``avg`` (DASR, CLAID): the mean of the RoIAlign bins, i.e. the bilinear average over the box.
* ``gem`` (CLAID's alternative): generalised mean ``(mean x^p)^(1/p)`` (Radenovic et al.) over the
  same bins: the bins average ``max(x, eps)^p``, so ``p = 1`` is ``avg`` and a large ``p``
  approaches the maximum.
"""
from __future__ import annotations

from typing import Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

__all__ = ["RoIFeaturePooler", "fuse_regions", "fuse_top_regions", "boxes_to_rois", "l2_concat"]

PoolingMode = Literal["max", "avg", "gem"]
FusionMode = Literal["concat", "mean", "max"]

#: Floor of GeM's input, as the whole-image GeM (a ReLU map's zeros would make ``x^p`` vanish).
GEM_EPS = 1e-6


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
        pooling: ``"max"``: the true maximum over the map cells inside the scaled box (see the module
            docstring); ``"avg"``: the mean of the ``output_size x output_size`` RoIAlign bins.
        output_size: RoIAlign grid size per side for ``avg`` (and the mask test of ``avg``). 7 is
            the Fast R-CNN grid; since the bins are reduced to one vector anyway, it only sets how
            finely the box is sampled.
        sampling_ratio: bilinear samples per bin side (torchvision's convention; 2 as in
            Mask R-CNN / detectron2).
        normalize: l2-normalise per layer and after concatenation. Off only to inspect raw
            activations (e.g. before a learned PCA-whitening that normalises itself).
        p: the GeM exponent of ``pooling="gem"`` (3, as the whole-image GeM).
    """

    def __init__(self, layers: Sequence[str], pooling: PoolingMode = "max", output_size: int = 7,
                 sampling_ratio: int = 2, normalize: bool = True, p: float = 3.0) -> None:
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        if len(layers) == 0:
            raise ValueError("RoIFeaturePooler needs at least one feature layer name")
        if pooling not in ("max", "avg", "gem"):
            raise ValueError(f"RoIFeaturePooler pooling must be 'max', 'avg' or 'gem', got {pooling!r}")
        if pooling == "gem" and not p > 0:
            raise ValueError(f"RoIFeaturePooler GeM exponent p must be > 0, got {p}")
        if output_size < 1:
            raise ValueError(f"RoIFeaturePooler output_size must be >= 1, got {output_size}")
        self.layers = list(layers)
        self.pooling = pooling
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.normalize = normalize
        self.p = float(p)

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, pooling={self.pooling!r}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, normalize={self.normalize}"
                + (f", p={self.p}" if self.pooling == "gem" else ""))

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
                same pixels, values in ``[0, 1]``: only the cells whose part inside the box is at
                least half covered (``max``) or the bins whose resampled mask is ``>= 0.5``
                (``avg``, ``gem``) are pooled; a region whose mask covers none falls back to its whole box.

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

        padded_masks = None if masks is None else self._padded_masks(masks, boxes, rois, (height, width))
        keep = None
        if padded_masks is not None and self.pooling != "max":
            keep = self._mask_bins(padded_masks, rois)

        parts = []
        for name in self.layers:
            fmap = features[name]
            # The scale comes from the map's own size rather than a nominal stride, so any backbone
            # works as long as its maps cover the padded tensor (h/H == w/W up to rounding; the
            # batch tensors are padded to a multiple of 32, which makes the ratios exact).
            scale = fmap.shape[-1] / width
            if self.pooling == "max":
                parts.append(self._cell_max(fmap, rois.to(fmap.dtype), scale, padded_masks))
                continue
            if self.pooling == "gem":
                fmap = fmap.clamp(min=GEM_EPS).pow(self.p)
            bins = roi_align(fmap, rois.to(fmap.dtype), output_size=self.output_size, spatial_scale=scale,
                             sampling_ratio=self.sampling_ratio, aligned=True)  # (N, C, S, S)
            pooled = self._reduce(bins.flatten(2), keep)
            parts.append(pooled.clamp(min=GEM_EPS ** self.p).pow(1.0 / self.p) if self.pooling == "gem" else pooled)
        return parts

    @staticmethod
    def cell_ranges(rois: Tensor, scale: float, height: int, width: int) -> Tensor:
        """``(N, 4)`` int64 ``[x0, y0, x1, y1)``: the half-open range of map cells whose centre lies in
        each scaled box, at least the cell under the box's centre, clipped to the map."""
        coords = rois[:, 1:].double() * scale
        start = torch.ceil(coords[:, :2] - 0.5)
        end = torch.ceil(coords[:, 2:] - 0.5)
        centre = torch.floor((coords[:, :2] + coords[:, 2:]) / 2)
        limit = coords.new_tensor([width, height])
        centre = torch.minimum(centre.clamp(min=0), limit - 1)
        start = torch.minimum(start.clamp(min=0), limit)
        end = torch.minimum(end.clamp(min=0), limit)
        empty = end <= start
        start = torch.where(empty, centre, start)
        end = torch.where(empty, centre + 1, end)
        return torch.cat([start, end], dim=1).long()

    def _cell_max(self, fmap: Tensor, rois: Tensor, scale: float, padded_masks: Optional[Tensor]) -> Tensor:
        """``(N, C)``: the maximum over the cells inside each scaled box (and inside its mask)."""
        h, w = fmap.shape[-2:]
        cells = self.cell_ranges(rois, scale, h, w)
        if padded_masks is None:
            # roi_pool with one output bin is Fast R-CNN's max over the integer cell range
            # [round(x1), round(x2)] inclusive; given the range in cell units it is exactly ours.
            cell_rois = torch.cat([rois[:, :1], cells[:, :2].to(rois.dtype), (cells[:, 2:] - 1).to(rois.dtype)], 1)
            return roi_pool(fmap, cell_rois, output_size=1, spatial_scale=1.0).flatten(1)
        # Inside the mask: a cell counts when the mask covers at least half of the cell's part
        # inside the box (pixels whose centre is in the box), so a mask filling the box selects
        # exactly the box's cells whatever the rounding of pasted masks. Regions are processed in
        # chunks so that the (regions, C, h, w) selection stays bounded in memory.
        big_h, big_w = padded_masks.shape[-2:]
        px = torch.arange(big_w, device=fmap.device, dtype=rois.dtype) + 0.5
        py = torch.arange(big_h, device=fmap.device, dtype=rois.dtype) + 0.5
        box_px = ((px[None, None, :] >= rois[:, None, None, 1]) & (px[None, None, :] < rois[:, None, None, 3])
                  & (py[None, :, None] >= rois[:, None, None, 2]) & (py[None, :, None] < rois[:, None, None, 4]))
        box_px = box_px.to(padded_masks.dtype)
        covered = F.interpolate((padded_masks * box_px)[:, None], size=(h, w), mode="area")[:, 0]
        area = F.interpolate(box_px[:, None], size=(h, w), mode="area")[:, 0]
        in_mask = covered >= 0.5 * area
        xs, ys = torch.arange(w, device=fmap.device), torch.arange(h, device=fmap.device)
        in_box = ((xs[None, None, :] >= cells[:, None, None, 0]) & (xs[None, None, :] < cells[:, None, None, 2])
                  & (ys[None, :, None] >= cells[:, None, None, 1]) & (ys[None, :, None] < cells[:, None, None, 3]))
        select = in_box & in_mask
        select = torch.where(select.flatten(1).any(1)[:, None, None], select, in_box)  # empty mask: whole box
        image = rois[:, 0].long()
        chunk = max(1, (1 << 24) // max(fmap.shape[1] * h * w, 1))
        out = []
        for start in range(0, rois.shape[0], chunk):
            part = slice(start, start + chunk)
            values = fmap[image[part]].masked_fill(~select[part, None], float("-inf"))
            out.append(values.flatten(2).amax(dim=2))
        return torch.cat(out)

    @staticmethod
    def _reduce(bins: Tensor, keep: Optional[Tensor]) -> Tensor:
        """``(N, C, S*S)`` -> ``(N, C)``: the mean over the kept bins (all without a mask)."""
        if keep is None:
            return bins.mean(dim=2)
        weights = keep[:, None, :].to(bins.dtype)  # (N, 1, S*S), broadcast over channels
        return (bins * weights).sum(dim=2) / weights.sum(dim=2)

    @staticmethod
    def _padded_masks(masks: list[Tensor], boxes: list[Tensor], rois: Tensor, image_size: tuple[int, int]) -> Tensor:
        """``(N, H, W)``: every region's mask zero-padded to the batch tensor's size (outside the
        image there is no object), regions in the order of ``rois``."""
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
        return torch.cat(padded).to(rois.device)

    def _mask_bins(self, padded_masks: Tensor, rois: Tensor) -> Tensor:
        """Which RoIAlign bins of each region lie inside its mask: ``(N, S*S)`` bool.

        Each region's mask is resampled with the very same RoIAlign grid (scale 1: masks are in
        image pixels), so a bin is kept exactly when the mask averaged over that bin's samples is
        at least 0.5. All regions are resampled in one call by treating the region index as the
        batch index.
        """
        per_region = rois.clone()
        per_region[:, 0] = torch.arange(rois.shape[0], dtype=rois.dtype, device=rois.device)
        resampled = roi_align(padded_masks[:, None], per_region, output_size=self.output_size, spatial_scale=1.0,
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
    return fuse_top_regions(features, [features.shape[0]], mode, features.shape[0] if k is None else k)[0]


def fuse_top_regions(features: Tensor, counts: Sequence[int], mode: FusionMode, k: int) -> Tensor:
    """:func:`fuse_regions` for a batch of images at once: ``(B, k*D)`` for ``concat``, ``(B, D)``
    for ``mean`` / ``max``, rows l2-normalised.

    Args:
        features: ``(sum n_i, D)``: the ``n_i`` region features of image ``i`` as consecutive rows,
            best first (as ``torch.cat`` of the images' ``Regions.features``).
        counts: ``n_i`` per image (0 allowed: a zero vector).
        mode / k: as :func:`fuse_regions`; an image's regions beyond its first ``k`` are ignored.
    """
    if mode not in ("concat", "mean", "max"):
        raise ValueError(f"fuse_regions mode must be 'concat', 'mean' or 'max', got {mode!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"fuse_regions needs k >= 1, got {k}")
    counts = torch.as_tensor(list(counts), dtype=torch.long, device=features.device)
    if features.ndim != 2 or features.shape[0] != int(counts.sum()):
        raise ValueError(f"fuse_top_regions: {tuple(features.shape)} features for counts summing to {int(counts.sum())}")
    batch, dim = counts.shape[0], features.shape[1]
    # Scatter every kept region to its (image, rank) slot of a zero (B, k, D) tensor.
    image = torch.repeat_interleave(torch.arange(batch, device=features.device), counts)
    rank = torch.arange(features.shape[0], device=features.device) - (torch.cumsum(counts, 0) - counts)[image]
    kept = rank < k
    padded = features.new_zeros(batch, k, dim)
    padded[image[kept], rank[kept]] = features[kept]
    filled = counts.clamp(max=k)  # regions fused per image
    if mode == "concat":
        fused = padded.reshape(batch, k * dim)
    elif mode == "mean":
        fused = padded.sum(dim=1) / filled.clamp(min=1)[:, None].to(features.dtype)
    else:
        slot_used = torch.arange(k, device=features.device)[None, :] < filled[:, None]
        fused = padded.masked_fill(~slot_used[..., None], float("-inf")).amax(dim=1)
        fused = torch.where(filled[:, None] > 0, fused, torch.zeros_like(fused))
    return F.normalize(fused, dim=1)
