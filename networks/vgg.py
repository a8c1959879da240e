"""VGG-16 as a staged detection backbone, the deep region CNN paper's network.

VGG pools *after* each block, so its ``convk`` maps sit at stride ``2^(k-1)`` (every other backbone
follows the ResNet convention ``2^k``); poolers read the scale from the map sizes, so the
difference is transparent to them.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn
from torchvision.models import vgg16

from instsearch.networks.staged import STAGES, DetectorDefaults, FeatureInfo, StagedBackbone
from instsearch.networks.weights import load_weights

__all__ = ["VGG16Backbone", "FC67Head"]


class FC67Head(nn.Module):
    """``TwoMLPHead`` built around existing fc6 / fc7 layers (same forward, same state-dict keys):
    flatten the RoI bins, fc6 + ReLU, fc7 + ReLU. The output is the post-ReLU FC7 activation, the
    blob usually called "fc7" in the VGG-16 retrieval literature."""

    def __init__(self, fc6: nn.Linear, fc7: nn.Linear) -> None:
        super().__init__()
        self.fc6 = fc6
        self.fc7 = fc7

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.fc7(torch.relu(self.fc6(x.flatten(start_dim=1)))))


class VGG16Backbone(StagedBackbone):
    """VGG-16 conv1_1 ... conv5_3 (pool5 and the classifier dropped); detector map = conv5_3.

    The ImageNet classifier's fc6 / fc7 become the detector's box head (RoIAlign 7x7x512 = the
    25088 inputs of fc6), so the detector's 4096-D box representation is FC7, the paper's feature.
    ``features`` keeps torchvision's indices, so ``vgg16-397923af.pth`` loads unchanged.
    """

    # Indices into torchvision's vgg16().features where each block ends (after its last ReLU);
    # block k>1 starts with the max-pool that ends block k-1.
    _ENDS = (4, 9, 16, 23, 30)
    detection_stages = ("conv5",)

    def __init__(self, weights: Union[str, Path, None] = None) -> None:
        super().__init__()
        net = vgg16(weights=None)
        load_weights(net, weights, name="vgg16")
        self.features = net.features[: self._ENDS[-1]]  # drop pool5
        # fc6 / fc7 move into the box head as they are (no copy: they hold 120 M parameters).
        self._handover["box_head"] = FC67Head(net.classifier[0], net.classifier[3])
        self.feature_info = FeatureInfo.from_lists(STAGES, (64, 128, 256, 512, 512), (1, 2, 4, 8, 16))
        self.out_channels = 512
        self.detection_maps = ["0"]
        # Faster R-CNN's VGG-16 setting: short side 600, long side <= 1000, 9 anchors on conv5_3.
        self.defaults = DetectorDefaults(min_size=600, max_size=1000, anchor_sizes=((128, 256, 512),))
        starts = (0,) + self._ENDS[:-1]
        self._stages = OrderedDict((name, self.features[s:e]) for name, s, e in zip(STAGES, starts, self._ENDS))

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        return self._stages

    def detection_features(self, stages: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        return OrderedDict([("0", stages["conv5"])])

    @property
    def representation_size(self) -> int:
        return 4096
