"""The deep region CNN paper's region describer: each box cut out of its image and described by an
ImageNet VGG-16 as a picture of its own.

Mei et al. 2018, Section 3.1.2 "CNN based feature representation": "we select the top-K bounding
boxes with higher scores for each image in the database. According to its coordinates to take out
this piece of image, we use the VGG-16 network trained on Imagenet to extract 4096-D features from
the seventh Fully-Connected layer (FC7)." :class:`CropFC7` is that step: crop, resize to the
network's 224 x 224 input, ImageNet normalisation, VGG-16 conv1_1 ... pool5, fc6 + ReLU, fc7 +
ReLU (the post-ReLU "fc7" blob), l2-normalised. The network is the classification VGG-16 of its
own weights file, not the fine-tuned detector.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instsearch.networks.backbones import STAGES, build_backbone
from instsearch.networks.crops import resized_crops

__all__ = ["CropFC7"]


class CropFC7(nn.Module):
    """Post-ReLU FC7 (4096-D, l2-normalised) of ImageNet VGG-16 on 224 x 224 box crops.

    All crops of a call are resized together (:func:`~instsearch.networks.crops.resized_crops`)
    and run through the network ``batch_size`` at a time (a bound on activation memory).

    The network is fixed (never trained) and comes from its own file, so it stays out of the
    state dict: checkpoints of a network holding it keep the size of the rest, and they load
    whatever the region describer was when they were saved. Without ``weights`` it is randomly
    initialised (said once, as every network), which exercises the mechanics only.

    Args:
        weights: torchvision's VGG-16 ImageNet state dict (``vgg16-397923af.pth``); ``None`` =
            random initialisation.
        batch_size: crops per network batch.
    """

    input_size = 224
    feature_dim = 4096

    def __init__(self, weights: Union[str, Path, None] = None, batch_size: int = 16) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"CropFC7 batch_size must be >= 1, got {batch_size}")
        vgg = build_backbone("vgg16", weights=weights, frozen_stages=len(STAGES), stages=["conv5"])
        self.convs = vgg  # conv1_1 ... conv5_3 + ReLU (pool5 is applied in forward)
        self.fc67 = vgg.make_box_head(7)  # the ImageNet classifier's fc6 / fc7
        self.requires_grad_(False)
        self.batch_size = int(batch_size)
        self.register_buffer("mean", torch.tensor(vgg.input_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vgg.input_std).view(1, 3, 1, 1), persistent=False)
        self.register_state_dict_post_hook(_leave_out_of_state_dict)
        self.register_load_state_dict_pre_hook(_keep_own_tensors)

    def forward(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        """``(sum N_i, 4096)`` features of ``boxes[i]`` (pixels of ``images[i]``, RGB in [0, 1]),
        in box order."""
        crops = resized_crops(images, boxes, self.input_size)
        if len(crops) == 0:
            return crops.new_zeros(0, self.feature_dim)
        return torch.cat([self.describe(crops[start:start + self.batch_size])
                          for start in range(0, len(crops), self.batch_size)])

    def describe(self, crops: Tensor) -> Tensor:
        """``(n, 3, 224, 224)`` RGB crops in [0, 1] -> ``(n, 4096)`` l2-normalised post-ReLU FC7."""
        conv5 = self.convs.forward_stages((crops - self.mean) / self.std)["conv5"]
        pool5 = F.adaptive_avg_pool2d(F.max_pool2d(conv5, kernel_size=2, stride=2), 7)  # VGG's pool5 + avgpool
        return F.normalize(self.fc67(pool5), dim=1)


def _leave_out_of_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _keep_own_tensors(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Loading a state dict keeps the describer as it is (its tensors are not in the file)."""
    for key, value in module.named_parameters(prefix=prefix.rstrip(".")):  # (VGG-16 holds no buffers)
        state_dict.setdefault(key, value)
