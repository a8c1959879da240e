"""Slow, loop-by-loop references shared by the tests (written from the definitions, not the code)."""
from __future__ import annotations

import torch


def bilinear(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision RoIAlign's bilinear sample of a ``(C, H, W)`` map at one point, all channels
    (zero beyond one pixel outside, edge-clamped inside), in float64."""
    _, h, w = fmap.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(fmap.shape[0], dtype=torch.float64)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    f = fmap.double()
    return (hy * hx * f[:, y_low, x_low] + hy * lx * f[:, y_low, x_high]
            + ly * hx * f[:, y_high, x_low] + ly * lx * f[:, y_high, x_high])
