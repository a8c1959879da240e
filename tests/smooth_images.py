"""Test images for the networks: smooth random RGB, so that resizing loses little."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_image(h: int, w: int, seed: int = 0, base: int = 12) -> torch.Tensor:
    """A smooth random RGB image (bilinear upsampling of a coarse grid): resizing it loses little,
    so the same scene at two sizes reaches the network almost unchanged."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, base, base * w // h, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
