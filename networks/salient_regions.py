"""DASR's geometry: the peaks of ``X̄``, the activated pixels of a peak's map, their second
moments and the ellipse and box they define (the DASR paper, Sec. 3 and Eqn. 4).

Plain tensor functions, batched over peaks and maps: the network
(:class:`~instsearch.networks.dasr.DASR`) chains them after the probabilistic back-propagation
(:mod:`instsearch.networks.excitation_backprop`).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["local_maxima", "above_mean_positions", "threshold_maps", "pixel_moments", "ellipse_boxes",
           "resize_long_side"]


def _border(h: int, w: int, width: int, device) -> Tensor:
    inner = torch.zeros(h, w, dtype=torch.bool, device=device)
    if h > 2 * width and w > 2 * width:
        inner[width:h - width, width:w - width] = True
    return inner


def _as_peaks(keep: Tensor, xbar: Tensor) -> tuple[Tensor, Tensor]:
    peaks = keep.nonzero()  # (P, 3) = (b, y, x), row-major per image
    return peaks, xbar[keep]


def local_maxima(xbar: Tensor, window: int = 3, exclude_border: bool = True,
                 above_mean: bool = True) -> tuple[Tensor, Tensor]:
    """DASR's peaks: positions of ``xbar`` ``(B, h, w)`` that equal the maximum of their
    ``window x window`` neighbourhood (ties all count), optionally also above the map's mean,
    never ``<= 0``, and outside the ``window // 2`` border when ``exclude_border``.

    Returns ``(peaks (P, 3) int64 = (b, y, x), values (P,))``, image by image in row-major order.
    """
    if window % 2 != 1:
        raise ValueError(f"the peak window must be odd, got {window}")
    pooled = F.max_pool2d(xbar[:, None], kernel_size=window, stride=1, padding=window // 2)[:, 0]
    keep = (xbar >= pooled) & (xbar > 0)
    if above_mean:
        keep &= xbar > xbar.mean(dim=(1, 2), keepdim=True)
    if exclude_border:
        keep &= _border(*xbar.shape[-2:], window // 2, xbar.device)
    return _as_peaks(keep, xbar)


def above_mean_positions(xbar: Tensor, exclude_border: bool = True) -> tuple[Tensor, Tensor]:
    """DASR*'s peaks: every position of ``xbar`` ``(B, h, w)`` strictly above its image's mean
    (and above 0), optionally outside the one-cell border. Same return as :func:`local_maxima`."""
    keep = (xbar > xbar.mean(dim=(1, 2), keepdim=True)) & (xbar > 0)
    if exclude_border:
        keep &= _border(*xbar.shape[-2:], 1, xbar.device)
    return _as_peaks(keep, xbar)


# ---------------------------------------------------------------------- regions
def _row_percentile(values: Tensor, q: float) -> Tensor:
    """Per row of ``(n, N)``, numpy's default (linear) ``percentile(q)``; sorting per row has no
    size limit, unlike ``torch.quantile``."""
    ordered = values.sort(dim=1).values
    pos = (values.shape[1] - 1) * q / 100.0
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return ordered[:, lo] + (ordered[:, hi] - ordered[:, lo]) * (pos - lo)


def threshold_maps(maps: Tensor, tau: float = 0.1, rule: Literal["relative", "percentile"] = "relative",
                   percentile: float = 95.0) -> Tensor:
    """The activated pixels of each ``(n, H, W)`` map: ``M >= tau * max M`` (``relative``, the
    paper's normalised map and threshold) or ``M >= its percentile`` (``percentile``, the public
    code's top 5 %); zero pixels are never activated, so an all-zero map activates nothing."""
    if rule == "relative":
        floor = tau * maps.amax(dim=(1, 2), keepdim=True)
    elif rule == "percentile":
        floor = _row_percentile(maps.flatten(1), percentile)[:, None, None]
    else:
        raise ValueError(f"threshold rule must be 'relative' or 'percentile', got {rule!r}")
    return (maps >= floor) & (maps > 0)


def pixel_moments(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre ``(n, 2)`` = ``(cx, cy)`` and covariance ``(n, 2, 2)`` (x, y order) of each mask's
    pixels (pixel ``(i, j)`` at ``(j + 0.5, i + 0.5)``), unweighted as Eqn. 4, in float64 (the
    squares of 512 px coordinates lose the variance of a small region in float32); and the pixel
    counts ``(n,)``. An empty mask has count 0 and undefined (NaN) moments."""
    m = masks.to(torch.float64)
    h, w = masks.shape[-2:]
    ys = torch.arange(h, dtype=torch.float64, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=torch.float64, device=masks.device) + 0.5
    count = m.sum(dim=(1, 2))
    row, col = m.sum(dim=2), m.sum(dim=1)  # (n, h), (n, w) marginals
    cx, cy = (col * xs).sum(1) / count, (row * ys).sum(1) / count
    sxx = (col * xs ** 2).sum(1) / count - cx ** 2
    syy = (row * ys ** 2).sum(1) / count - cy ** 2
    sxy = torch.einsum("nij,i,j->n", m, ys, xs) / count - cx * cy
    cov = torch.stack([torch.stack([sxx, sxy], -1), torch.stack([sxy, syy], -1)], -2)
    return torch.stack([cx, cy], -1), cov, count


def ellipse_boxes(centre: Tensor, cov: Tensor, scale: float = 2.0,
                  size: Optional[tuple[int, int]] = None) -> Tensor:
    """``(n, 4)`` float32 ``[x1, y1, x2, y2]``: the circumscribed rectangle of each ellipse with
    axes ``scale * sqrt(eigenvalues of cov)`` -- exactly ``centre ± scale * sqrt(diag cov)`` --
    at least one pixel wide, clipped to ``size`` = (H, W) when given."""
    half = (scale * cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()).clamp_min(0.5)
    boxes = torch.cat([centre - half, centre + half], dim=-1)
    if size is not None:
        h, w = size
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], -1)
    return boxes.float()


def resize_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """The size with the long side at ``long_side`` (up or down, as the paper), aspect kept."""
    scale = long_side / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))
