"""A patch backbone for CLAID tests: each 8x8 patch described by its mean colour, so that planted colour
blocks are planted patch-feature regions and the wiring (resize, grid, boxes, figures) is testable
without learned features."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from instsearch.networks.staged import FeatureInfo, StageInfo, StagedBackbone


class ColourPatches(StagedBackbone):
    default_frozen_stages = 0
    input_mean = (0.0, 0.0, 0.0)
    input_std = (1.0, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.feature_info = FeatureInfo([StageInfo("patches", 3, 8)])
        self.pool = nn.AvgPool2d(8)

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict([("patches", self.pool)])
