"""ResNet / ResNeXt backbones for detection, with dilated conv5 and optional deformable res5.

FCIS (Li et al., CVPR 2017) runs ResNet-101 with conv5 at stride 16 (the "hole algorithm": stride
1 and dilation 2 in res5) so that the position-sensitive score maps keep enough resolution; the
instance-search variant (Zhan & Zhao) swaps in ResNeXt-101 32x4d ("X") and replaces the 3x3 conv of
the last three bottlenecks, res5a-c, by deformable convolution ("D"). All four variants -- FCIS,
FCIS+D, FCIS+X, FCIS+XD -- come out of :func:`build_resnet`.

The modules are torchvision's own :class:`~torchvision.models.resnet.ResNet` and
:class:`~torchvision.models.resnet.Bottleneck`, so torchvision (ResNet) and timm (ResNeXt) ImageNet
checkpoints load by key name unchanged; the deformable conv keeps the replaced conv's ``weight`` key
and only adds its offset predictor (``conv2.conv_offset.*``), which checkpoints do not have.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import DeformConv2d
from torchvision.ops.misc import FrozenBatchNorm2d

from instsearch.networks.weights import load_weights

__all__ = ["ARCHS", "ArchSpec", "DeformableConv2d", "ResNetBackbone", "build_resnet", "STAGES",
           "STAGE_CHANNELS"]

log = logging.getLogger(__name__)

STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")
#: Output channels of each stage for every bottleneck ResNet / ResNeXt here (expansion 4).
STAGE_CHANNELS = {"conv1": 64, "conv2": 256, "conv3": 512, "conv4": 1024, "conv5": 2048}


@dataclass(frozen=True)
class ArchSpec:
    """Block counts per stage and the grouped-conv shape of the 3x3 convs."""

    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


#: The paper's backbones plus smaller ones with the same stage widths (for fast tests and
#: experiments): ``resnet26`` / ``resnext26_32x4d`` have two bottlenecks per stage.
ARCHS: dict[str, ArchSpec] = {
    "resnet26": ArchSpec((2, 2, 2, 2)),
    "resnet50": ArchSpec((3, 4, 6, 3)),
    "resnet101": ArchSpec((3, 4, 23, 3)),
    "resnext26_32x4d": ArchSpec((2, 2, 2, 2), groups=32, width_per_group=4),
    "resnext50_32x4d": ArchSpec((3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x4d": ArchSpec((3, 4, 23, 3), groups=32, width_per_group=4),
}

NormName = Literal["auto", "frozen_bn", "bn"]


class DeformableConv2d(DeformConv2d):
    """Deformable convolution (Dai et al., ICCV 2017) with its own offset predictor.

    The offsets come from a plain conv over the same input with the same kernel, stride, padding
    and dilation, so they land on the output grid. That conv is zero-initialised: the layer starts
    as exactly the conv it replaced, and pretrained weights keep their meaning until training
    learns to deform.

    Subclassing :class:`torchvision.ops.DeformConv2d` keeps the parameter names ``weight`` /
    ``bias`` of the replaced ``nn.Conv2d``, so ImageNet checkpoints load into it unchanged.

    Args:
        offset_groups: number of offset fields (deformable groups); 1 as in the instance-search
            paper's figure, 4 in some Deformable ConvNets configurations.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False,
                 offset_groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        kh, kw = self.kernel_size
        self.offset_groups = int(offset_groups)
        self.conv_offset = nn.Conv2d(in_channels, 2 * self.offset_groups * kh * kw, (kh, kw), stride=self.stride,
                                     padding=self.padding, dilation=self.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, offset_groups: int = 1) -> "DeformableConv2d":
        """The deformable version of ``conv``: same geometry, groups and (copied) weights."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"DeformableConv2d.from_conv: padding_mode {conv.padding_mode!r} unsupported")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, offset_groups=offset_groups)
        new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(conv.weight.requires_grad)
        return new

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torchvision's argument name
        # Under mixed precision the input and the offsets (an autocast conv's output) arrive in
        # bf16/fp16, but deform_conv2d needs one dtype and CPU autocast does not cast for it: run it
        # in the weight's precision (no-ops in full precision).
        offset = self.conv_offset(input).to(self.weight.dtype)
        return super().forward(input.to(self.weight.dtype), offset)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"offset_groups={self.offset_groups}, bias={self.bias is not None})")


class ResNetBackbone(nn.Module):
    """A torchvision ``ResNet`` body returning ``OrderedDict(conv1=..., ..., conv5=...)``.

    ``conv1`` is the stem output before max-pooling (stride 2, 64 channels); ``conv2`` ..
    ``conv5`` are ``layer1`` .. ``layer4`` (strides 4, 8, 16 and 16 with the dilated conv5,
    channels 256, 512, 1024, 2048).

    ``frozen_stages = n`` freezes the first ``n`` of conv1 .. conv5 (their parameters get no
    gradient and their BatchNorms stay in eval mode even in ``train()``): FCIS fixes conv1 and
    res2, i.e. ``n = 2``.
    """

    def __init__(self, body: ResNet, frozen_stages: int = 2, return_stages: Sequence[str] = STAGES) -> None:
        super().__init__()
        if not 0 <= frozen_stages <= 5:
            raise ValueError(f"frozen_stages must be in 0..5 (number of leading stages conv1..conv5), "
                             f"got {frozen_stages}")
        bad = [s for s in return_stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; expected a subset of {list(STAGES)}")
        body.fc = nn.Identity()  # classification head unused; its checkpoint keys are skipped
        body.avgpool = nn.Identity()
        self.body = body
        self.frozen_stages = int(frozen_stages)
        # Run only as deep as the deepest stage asked for (a conv4-level detector needs no conv5).
        self.return_stages = tuple(s for s in STAGES if s in return_stages)
        self.out_channels = {s: STAGE_CHANNELS[s] for s in self.return_stages}
        self.strides = {"conv1": 2, "conv2": 4, "conv3": 8, "conv4": 16,
                        "conv5": 16 if _conv5_dilated(body) else 32}
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def _stage_modules(self) -> list[list[nn.Module]]:
        b = self.body
        return [[b.conv1, b.bn1], [b.layer1], [b.layer2], [b.layer3], [b.layer4]]

    def _frozen_modules(self) -> list[nn.Module]:
        return [m for stage in self._stage_modules()[: self.frozen_stages] for m in stage]

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        if mode:
            # Frozen stages keep their BatchNorm statistics, as a fixed feature extractor should.
            for module in self._frozen_modules():
                module.eval()
        return self

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        b = self.body
        out: OrderedDict[str, Tensor] = OrderedDict()
        last = self.return_stages[-1]
        x = b.relu(b.bn1(b.conv1(x)))
        stages = (("conv1", None), ("conv2", b.layer1), ("conv3", b.layer2), ("conv4", b.layer3),
                  ("conv5", b.layer4))
        for name, layer in stages:
            if layer is not None:
                x = layer(b.maxpool(x) if name == "conv2" else x)
            if name in self.return_stages:
                out[name] = x
            if name == last:
                break
        return out


def _conv5_dilated(body: ResNet) -> bool:
    return body.layer4[0].conv2.stride == (1, 1) and (body.layer4[0].downsample is None
                                                       or body.layer4[0].downsample[0].stride == (1, 1))


def build_resnet(arch: str = "resnext101_32x4d", deformable: bool = False, dilate_conv5: bool = True,
                 weights: Optional[str | Path] = None, frozen_stages: int = 2, norm: NormName = "auto",
                 num_deformable: int = 3, offset_groups: int = 1,
                 return_stages: Sequence[str] = STAGES) -> ResNetBackbone:
    """Build a detection backbone returning conv1 .. conv5.

    Args:
        arch: a key of :data:`ARCHS` (``resnet101`` for FCIS, ``resnext101_32x4d`` for FCIS+X).
        deformable: replace the 3x3 conv of the last ``num_deformable`` conv5 bottlenecks
            (res5a-c) by :class:`DeformableConv2d` (FCIS+D / FCIS+XD).
        dilate_conv5: conv5 at stride 16 with dilation 2 instead of stride 32. As in FCIS and
            DeepLab, every 3x3 conv of res5 is dilated, res5a's included (torchvision's
            ``replace_stride_with_dilation`` leaves res5a at dilation 1; the weights are the same
            shape, so ImageNet checkpoints load either way).
        weights: local checkpoint file (a torchvision ``resnet*`` or timm ``resnext*`` state dict;
            they share key names). ``None`` runs randomly initialised and says so loudly.
        frozen_stages: how many of conv1 .. conv5 are frozen (FCIS: 2, conv1 and res2).
        norm: ``frozen_bn`` (ImageNet statistics kept fixed, the detection practice for
            small per-GPU batches), ``bn`` (trainable BatchNorm), or ``auto``: frozen when weights
            are given, trainable otherwise (as torchvision's detection builders do), since frozen
            identity statistics would leave a randomly initialised network unnormalised.
        num_deformable: how many of the last conv5 bottlenecks get deformable 3x3 convs
            (paper: 3; all of conv5 when it has fewer blocks).
        offset_groups: deformable groups of each :class:`DeformableConv2d`.
        return_stages: stages to return; the forward pass stops at the deepest.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; expected one of {sorted(ARCHS)}")
    if norm not in ("auto", "frozen_bn", "bn"):
        raise ValueError(f"norm must be 'auto', 'frozen_bn' or 'bn', got {norm!r}")
    spec = ARCHS[arch]
    if norm == "auto":
        norm = "frozen_bn" if weights is not None else "bn"
    norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    body = ResNet(Bottleneck, list(spec.layers), groups=spec.groups, width_per_group=spec.width_per_group,
                  replace_stride_with_dilation=[False, False, bool(dilate_conv5)], norm_layer=norm_layer)
    if dilate_conv5:
        first = body.layer4[0].conv2
        first.dilation, first.padding = (2, 2), (2, 2)
    if deformable:
        if num_deformable < 1:
            raise ValueError(f"num_deformable must be >= 1 when deformable=True, got {num_deformable}")
        for block in list(body.layer4)[-num_deformable:]:
            block.conv2 = DeformableConv2d.from_conv(block.conv2, offset_groups=offset_groups)
    load_weights(body, weights, name=arch, strict=False)
    return ResNetBackbone(body, frozen_stages=frozen_stages, return_stages=return_stages)

