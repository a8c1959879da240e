"""Whole-image descriptors pooled from a convolutional feature map: MAC, SPoC, GeM, R-MAC.

These are the global baselines every instance-search paper reports next to its region method
(Tolias et al. 2016 for MAC / R-MAC, Babenko & Lempitsky 2015 for SPoC, Radenovic et al. 2018 for
GeM). Each maps ``(B, C, H, W)`` to ``(B, C)`` l2-normalised rows, so that the dot product is the
cosine similarity.

Batches of images of different sizes are zero-padded to one tensor; the padding is not part of
the image, so every module takes an optional ``valid`` mask ``(B, H, W)`` (see :func:`valid_mask`)
and pools only over the cells of each image.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_pool

__all__ = ["GeM", "MAC", "SPoC", "RMAC", "valid_mask", "rmac_regions", "build_global_pooling"]


def valid_mask(image_sizes: Sequence[tuple[int, int]], padded_size: tuple[int, int],
               feature_size: tuple[int, int], device: Optional[torch.device] = None) -> Tensor:
    """``(B, h, w)`` bool: which feature cells lie on each image rather than on batch padding.

    Image ``i`` of ``(H_i, W_i)`` pixels occupies the top-left of the ``padded_size`` tensor; a
    cell of an ``feature_size`` map covers it when its index is below ``ceil(H_i * h / H)`` (a
    partly covered border cell counts, as a strided conv sees real pixels there).
    """
    h, w = feature_size
    big_h, big_w = padded_size
    sizes = torch.tensor([[math.ceil(hi * h / big_h), math.ceil(wi * w / big_w)] for hi, wi in image_sizes],
                         device=device)
    rows = torch.arange(h, device=device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(w, device=device)[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def _check(x: Tensor, valid: Optional[Tensor]) -> Optional[Tensor]:
    if x.ndim != 4:
        raise ValueError(f"global pooling expects (B, C, H, W) feature maps, got {tuple(x.shape)}")
    if valid is None:
        return None
    if valid.ndim == 4:
        valid = valid[:, 0]
    if valid.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match the feature map {tuple(x.shape)}")
    return valid[:, None].to(torch.bool)


class MAC(nn.Module):
    """Maximum activation of convolutions: per-channel spatial max, l2-normalised."""

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        valid = _check(x, valid)
        if valid is not None:
            x = x.masked_fill(~valid, float("-inf"))
        return F.normalize(x.amax(dim=(2, 3)), dim=1)


class SPoC(nn.Module):
    """Sum-pooled convolutional features: per-channel spatial mean (the sum up to a constant that the
    l2 normalisation removes), l2-normalised. The centring prior and PCA-whitening of the original
    are left to the post-processing stage shared by all methods."""

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        valid = _check(x, valid)
        if valid is None:
            return F.normalize(x.mean(dim=(2, 3)), dim=1)
        weights = valid.to(x.dtype)
        pooled = (x * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp_min(1.0)
        return F.normalize(pooled, dim=1)


class GeM(nn.Module):
    """Generalised mean pooling ``(mean x^p)^(1/p)`` per channel, l2-normalised.

    ``p = 1`` is SPoC (average pooling), ``p -> inf`` tends to MAC; 3 is the usual fixed value
    (Radenovic et al.). Activations are clamped at ``eps`` first, as GeM assumes non-negative
    (post-ReLU) inputs; for those, the identities with SPoC / MAC hold.

    Args:
        p: the exponent.
        eps: lower clamp of the activations (keeps ``x^p`` and its gradient finite).
        learnable: make ``p`` a trained parameter (one shared scalar).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be > 0, got {p}")
        p_tensor = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = eps

    def extra_repr(self) -> str:
        return f"p={float(self.p):.4g}, eps={self.eps}, learnable={isinstance(self.p, nn.Parameter)}"

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        valid = _check(x, valid)
        powered = x.clamp_min(self.eps).pow(self.p)
        if valid is None:
            mean = powered.mean(dim=(2, 3))
        else:
            weights = valid.to(x.dtype)
            mean = (powered * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp_min(1.0)
        return F.normalize(mean.pow(1.0 / self.p), dim=1)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> Tensor:
    """R-MAC's square regions on an ``height x width`` map, as ``(R, 4)`` inclusive cell boxes
    ``[x1, y1, x2, y2]`` (Tolias, Sicre & Jegou 2016, following the authors' reference code).

    Level ``l`` uses squares of side ``floor(2 * min(H, W) / (l + 1))``, ``l + m`` of them along
    the long side where the extra count ``m`` makes consecutive squares overlap by about 40 %.
    The full map is added as the first region (the reference implementation also sums the MAC of
    the whole map).
    """
    short = min(height, width)
    steps = torch.arange(2, 8, dtype=torch.float64)
    step_len = (max(height, width) - short) / (steps - 1)
    extra = int(torch.argmin(((short ** 2 - short * step_len) / short ** 2 - overlap).abs()))
    extra_w = extra + 1 if height < width else 0
    extra_h = extra + 1 if height > width else 0
    boxes = [[0, 0, width - 1, height - 1]]
    for level in range(1, levels + 1):
        side = int(math.floor(2 * short / (level + 1)))
        if side < 1:
            break
        half = int(math.floor(side / 2 - 1))

        def centres(n_extra: int, length: int) -> list[int]:
            n = level + n_extra
            step = 0.0 if n == 1 else (length - side) / (n - 1)
            return [int(math.floor(half + i * step) - half) for i in range(n)]

        for y in centres(extra_h, height):
            for x in centres(extra_w, width):
                boxes.append([x, y, min(x + side, width) - 1, min(y + side, height) - 1])
    return torch.tensor(boxes, dtype=torch.float32)


class RMAC(nn.Module):
    """Regional MAC: the sum of the l2-normalised MAC vectors of a fixed multi-scale grid of square
    regions (:func:`rmac_regions`), l2-normalised.

    All regions of all images are max-pooled in one ``roi_pool`` call with a 1x1 output (exact max
    over the integer cell window). The per-region PCA-whitening of the original is a learned
    post-process and lives with the other whitening code.
    """

    def __init__(self, levels: int = 3, overlap: float = 0.4) -> None:
        super().__init__()
        self.levels = levels
        self.overlap = overlap

    def extra_repr(self) -> str:
        return f"levels={self.levels}, overlap={self.overlap}"

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        valid = _check(x, valid)
        batch, _, height, width = x.shape
        if valid is None:
            sizes = [(height, width)] * batch
        else:
            sizes = [(int(v.any(dim=1).sum()), int(v.any(dim=0).sum())) for v in valid[:, 0]]
        per_image = [rmac_regions(h, w, self.levels, self.overlap) for h, w in sizes]
        counts = torch.tensor([len(r) for r in per_image], device=x.device)
        rois = torch.cat([torch.cat([torch.full((len(r), 1), float(i)), r], dim=1) for i, r in enumerate(per_image)])
        pooled = roi_pool(x, rois.to(device=x.device, dtype=x.dtype), output_size=1, spatial_scale=1.0).flatten(1)
        pooled = F.normalize(pooled, dim=1)
        owner = torch.repeat_interleave(torch.arange(batch, device=x.device), counts)
        summed = x.new_zeros(batch, x.shape[1]).index_add_(0, owner, pooled)
        return F.normalize(summed, dim=1)


def build_global_pooling(name: str, p: float = 3.0, learnable: bool = False) -> nn.Module:
    """``"gem"`` / ``"mac"`` / ``"spoc"`` / ``"rmac"`` -> the pooling module."""
    name = name.lower()
    if name == "gem":
        return GeM(p=p, learnable=learnable)
    if name == "mac":
        return MAC()
    if name == "spoc":
        return SPoC()
    if name == "rmac":
        return RMAC()
    raise ValueError(f"unknown global pooling {name!r}; expected one of 'gem', 'mac', 'spoc', 'rmac'")
