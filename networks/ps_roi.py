"""Position-sensitive RoI operations of FCIS: assembling, box pooling, mask resampling.

Channel layout (shared with :func:`torchvision.ops.ps_roi_align` and FCIS's PSROIPooling): a map
with ``G * k * k`` channels holds, for each of the ``G`` outputs, one channel per cell of the
``k x k`` RoI grid, at index ``g * k * k + i * k + j`` for grid row ``i`` and column ``j``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import ps_roi_align, roi_align

__all__ = ["ps_roi_assemble", "ps_roi_box_pool", "resample_masks"]


def _common_dtype(maps: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
    """RoIAlign needs one dtype; promote rather than round box coordinates to a half-precision map's."""
    dtype = torch.promote_types(maps.dtype, rois.dtype)
    return maps.to(dtype), rois.to(dtype)


def ps_roi_assemble(maps: Tensor, rois: Tensor, group_size: int, output_size: int, spatial_scale: float,
                    sampling_ratio: int = 2, aligned: bool = True) -> Tensor:
    """FCIS's assembling: position-sensitive maps -> an ``output_size`` grid per RoI.

    The RoI is cut into ``k x k`` bins (``k = group_size``); output cell ``(u, v)`` of the
    ``S x S`` grid (``S = output_size``, a multiple of ``k``) lies in bin ``(u // (S/k), v // (S/k))``
    and reads that bin's channel of each group, RoIAlign-resampled at its own position. With
    ``S = k`` this is position-sensitive RoIAlign; with ``S > k`` every bin is itself resolved at
    ``(S/k) x (S/k)``, which is how FCIS gets 21 x 21 masks from a 7 x 7 grid.

    One :func:`~torchvision.ops.roi_align` call pools every (RoI, bin) pair: the maps are regrouped
    so that each bin's channel slice is its own batch entry (``B k^2`` entries of ``G`` channels),
    and each RoI becomes ``k^2`` sub-boxes that point at their bin's entry. No loop over bins, and
    one gradient buffer instead of one per bin in the backward pass.

    Args:
        maps: ``(B, G * k * k, H, W)`` score maps.
        rois: ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image pixels.
        group_size: ``k``.
        output_size: ``S``, a multiple of ``k``.
        spatial_scale: map cells per image pixel (``1 / stride``).
        sampling_ratio: bilinear samples per output-cell side (as torchvision's ``roi_align``).
        aligned: half-pixel-corrected coordinates (``roi_align(aligned=True)``), the correct
            continuous-to-discrete mapping; FCIS's original integer-pixel PSROIPooling predates it.

    Returns:
        ``(R, G, S, S)``.
    """
    k, s = int(group_size), int(output_size)
    if s % k != 0:
        raise ValueError(f"ps_roi_assemble: output_size {s} must be a multiple of group_size {k}")
    b, c, h, w = maps.shape
    if c % (k * k) != 0:
        raise ValueError(f"ps_roi_assemble: {c} channels is not a multiple of group_size^2 = {k * k}")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"ps_roi_assemble: rois must be (R, 5) [batch_index, x1, y1, x2, y2], got {tuple(rois.shape)}")
    g, m = c // (k * k), s // k
    maps, rois = _common_dtype(maps, rois)
    # (B, G, k^2, H, W) -> (B k^2, G, H, W): batch entry b k^2 + bin holds bin's slice of image b
    by_bin = maps.view(b, g, k * k, h, w).transpose(1, 2).reshape(b * k * k, g, h, w)
    r = rois.shape[0]
    index, x1, y1, x2, y2 = (v[:, None] for v in rois.unbind(dim=1))  # (R, 1) each
    bins = torch.arange(k * k, device=rois.device)
    i, j = (bins // k).to(rois.dtype), (bins % k).to(rois.dtype)  # (k^2,) bin row / column
    bin_w, bin_h = (x2 - x1) / k, (y2 - y1) / k
    sub = torch.stack(torch.broadcast_tensors(index * (k * k) + bins.to(rois.dtype), x1 + j * bin_w, y1 + i * bin_h,
                                              x1 + (j + 1) * bin_w, y1 + (i + 1) * bin_h), dim=2)  # (R, k^2, 5)
    cells = roi_align(by_bin, sub.view(-1, 5), (m, m), spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
                      aligned=aligned)  # (R k^2, G, m, m)
    out = cells.view(r, k, k, g, m, m)  # (R, i, j, G, u, v)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(r, g, s, s)


def ps_roi_box_pool(maps: Tensor, rois: Tensor, group_size: int, spatial_scale: float,
                    sampling_ratio: int = 2) -> Tensor:
    """Position-sensitive average pooling (R-FCN / FCIS box branch): ``(R, G)``.

    Each of the ``k x k`` bins reads its own channel of every group (position-sensitive RoIAlign),
    and the ``k^2`` bin values are averaged -- the "vote" that turns ``4 k^2`` maps into 4 box
    deltas per RoI.
    """
    maps, rois = _common_dtype(maps, rois)
    pooled = ps_roi_align(maps, rois, output_size=group_size, spatial_scale=spatial_scale,
                          sampling_ratio=sampling_ratio)
    return pooled.mean(dim=(2, 3))


def resample_masks(masks: Tensor, src_boxes: Tensor, dst_boxes: Tensor, output_size: int | None = None) -> Tensor:
    """Resample masks defined over ``src_boxes`` onto the frames of ``dst_boxes``.

    ``masks[p]`` is an ``M x M`` grid covering ``src_boxes[p]`` (cell centres at
    ``x1 + (u + 0.5) * w / M``); the result is ``output_size^2`` samples of it at the cell centres
    of ``dst_boxes[p]``, bilinear inside the source box and zero outside it (a mask says nothing
    beyond its box). Used to move a mask from the RoI it was predicted on to the regressed box,
    and, for mask voting, from every voting candidate onto the detection it votes for.

    Implemented as one RoIAlign call with the region index as batch index and one sample per
    output cell (``sampling_ratio=1``), so resampling a frame onto itself is exact.

    Args:
        masks: ``(P, M, M)``.
        src_boxes, dst_boxes: ``(P, 4)`` in the same pixel frame.
        output_size: defaults to ``M``.
    """
    p, mh, mw = masks.shape
    if mh != mw:
        raise ValueError(f"resample_masks expects square masks, got {tuple(masks.shape)}")
    size = mh if output_size is None else int(output_size)
    if p == 0:
        return masks.new_zeros(0, size, size)
    dtype = torch.promote_types(masks.dtype, src_boxes.dtype)
    masks, src_boxes, dst_boxes = masks.to(dtype), src_boxes.to(dtype), dst_boxes.to(dtype)
    # A one-cell zero border makes RoIAlign's edge handling fade to 0 just outside the source box
    # instead of replicating the edge value.
    padded = F.pad(masks, (1, 1, 1, 1))[:, None]
    sx = mw / (src_boxes[:, 2] - src_boxes[:, 0]).clamp(min=1e-6)
    sy = mh / (src_boxes[:, 3] - src_boxes[:, 1]).clamp(min=1e-6)
    # dst box in source-grid units (+1 for the border); aligned=True puts grid cell u at u + 0.5.
    x1 = (dst_boxes[:, 0] - src_boxes[:, 0]) * sx + 1
    x2 = (dst_boxes[:, 2] - src_boxes[:, 0]) * sx + 1
    y1 = (dst_boxes[:, 1] - src_boxes[:, 1]) * sy + 1
    y2 = (dst_boxes[:, 3] - src_boxes[:, 1]) * sy + 1
    index = torch.arange(p, device=masks.device, dtype=masks.dtype)
    rois = torch.stack([index, x1, y1, x2, y2], dim=1)
    return roi_align(padded, rois, (size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)[:, 0]
