"""Whole-image baselines as a region method: one region per database image, the image itself.

Wrapping a network's ``global_descriptor`` (GeM, MAC, SPoC over a backbone stage) this way lets
the same search, metrics and grids compare instance-level features against global ones.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from instsearch.structures import Regions


class GlobalDescriptorSearch(nn.Module):
    """Database: the whole image as its only region. Query: the descriptor of the cropped query box
    (the usual protocol for global descriptors on Oxford/Paris and INSTRE)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not hasattr(net, "global_descriptor"):
            raise TypeError(f"{type(net).__name__} has no global_descriptor(images)")
        self.net = net

    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        features = self.net.global_descriptor(images)
        out = []
        for image, f in zip(images, features):
            h, w = image.shape[-2:]
            out.append(Regions(boxes=torch.tensor([[0.0, 0.0, float(w), float(h)]], device=f.device),
                               scores=torch.ones(1, device=f.device), features=f[None]))
        return out

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        crops, counts = [], []
        for image, b in zip(images, boxes):
            h, w = image.shape[-2:]
            for x1, y1, x2, y2 in b.round().long().tolist():
                x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
                x2, y2 = max(min(x2, w), x1 + 1), max(min(y2, h), y1 + 1)
                crops.append(image[:, y1:y2, x1:x2])
            counts.append(len(b))
        features = self.net.global_descriptor(crops) if crops else torch.zeros(0, 0)
        return list(features.split(counts))
