"""ResNet / ResNeXt staged backbones: dilated conv5 and deformable res5 for FCIS, an FPN for Faster
R-CNN, and a compact ResNet for CPU runs.

FCIS (Li et al., CVPR 2017) runs ResNet-101 with conv5 at stride 16 (the "hole algorithm": stride
1 and dilation 2 in res5) so that the position-sensitive score maps keep enough resolution; the
instance-search variant (Zhan & Zhao) swaps in ResNeXt-101 32x4d ("X") and replaces the 3x3 conv of
the last three bottlenecks, res5a-c, by deformable convolution ("D"). All four variants -- FCIS,
FCIS+D, FCIS+X, FCIS+XD -- come out of :meth:`ResNetBackbone.from_arch` (registered under each arch name of
:data:`ARCHS` in :mod:`instsearch.networks.backbones`).

The modules are torchvision's own :class:`~torchvision.models.resnet.ResNet` and
:class:`~torchvision.models.resnet.Bottleneck`, so torchvision (ResNet) and timm (ResNeXt) ImageNet
checkpoints load by key name unchanged; the deformable conv keeps the replaced conv's ``weight`` key
and only adds its offset predictor (``conv2.conv_offset.*``), which checkpoints do not have.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import DeformConv2d, FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from instsearch.networks.staged import STAGES, DetectorDefaults, FeatureInfo, FPNMixin, StagedBackbone
from instsearch.networks.weights import load_weights

__all__ = ["ARCHS", "ArchSpec", "DeformableConv2d", "ResNetBackbone", "ResNetFPNBackbone", "ScaledResNet",
           "SmallResNet", "resnet_body"]


TORCHVISION_PLANES = (64, 128, 256, 512)


@dataclass(frozen=True)
class ArchSpec:
    """Block counts per stage, the grouped-conv shape of the 3x3 convs and the widths.

    ``planes`` are torchvision's per-stage "planes": a bottleneck's 3x3 conv has
    ``planes * width_per_group / 64 * groups`` channels and its output ``4 * planes``.
    torchvision's (and timm's) ResNets use 64, 128, 256, 512 with a 64-channel stem; narrower
    values give the same topology at a fraction of the cost (ImageNet checkpoints then no longer fit).
    """

    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    planes: tuple[int, int, int, int] = TORCHVISION_PLANES
    stem_width: int = 64

    def __post_init__(self) -> None:
        widths = [p * self.width_per_group // 64 for p in self.planes]
        if min(widths) < 1 or any(p * self.width_per_group % 64 for p in self.planes):
            raise ValueError(f"ArchSpec: planes {self.planes} x width_per_group {self.width_per_group} / 64 "
                             f"must be whole numbers of channels per group")


#: The paper's backbones plus smaller ones: ``resnet26`` / ``resnext26_32x4d`` have two
#: bottlenecks per stage at torchvision's widths; ``resnext20_8x4d_narrow`` is a ResNeXt with one
#: or two bottlenecks per stage at 1/4 of torchvision's widths (8 groups of 4 channels in res2,
#: outputs 64 / 128 / 256 / 512), sized so that FCIS+XD trains in minutes on a CPU
#: (``configs/fcis_xd_small.yaml``).
ARCHS: dict[str, ArchSpec] = {
    "resnet26": ArchSpec((2, 2, 2, 2)),
    "resnet50": ArchSpec((3, 4, 6, 3)),
    "resnet101": ArchSpec((3, 4, 23, 3)),
    "resnext26_32x4d": ArchSpec((2, 2, 2, 2), groups=32, width_per_group=4),
    "resnext50_32x4d": ArchSpec((3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x4d": ArchSpec((3, 4, 23, 3), groups=32, width_per_group=4),
    "resnext20_8x4d_narrow": ArchSpec((1, 1, 2, 2), groups=8, width_per_group=16, planes=(16, 32, 64, 128),
                                      stem_width=32),
}

NormName = Literal["auto", "frozen_bn", "bn"]
_NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


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


class ScaledResNet(ResNet):
    """torchvision's :class:`~torchvision.models.resnet.ResNet` built at the widths of an
    :class:`ArchSpec`: same modules, same key names and initialisation, any stem and stage width.

    At torchvision's widths it is the plain ``ResNet`` (which hard-codes them); narrower specs
    reuse its ``_make_layer``, so blocks, downsampling and dilation behave identically.
    """

    def __init__(self, spec: ArchSpec, norm_layer: type[nn.Module],
                 replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)) -> None:
        nn.Module.__init__(self)
        self._norm_layer = norm_layer
        self.inplanes = spec.stem_width
        self.dilation = 1
        self.groups = spec.groups
        self.base_width = spec.width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        p, n = spec.planes, spec.layers
        self.layer1 = self._make_layer(Bottleneck, p[0], n[0])
        self.layer2 = self._make_layer(Bottleneck, p[1], n[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(Bottleneck, p[2], n[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(Bottleneck, p[3], n[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        for m in self.modules():  # torchvision ResNet's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def resnet_stages(net: nn.Module) -> "OrderedDict[str, nn.Module]":
    """The stages of a torchvision-layout ResNet (``conv1``, ``bn1``, ``relu``, ``maxpool``,
    ``layer1`` .. ``layer4``): ``conv1`` is the stem before max-pooling (stride 2), ``conv2`` ..
    ``conv5`` are ``layer1`` .. ``layer4``."""
    return OrderedDict([
        ("conv1", nn.Sequential(net.conv1, net.bn1, net.relu)),
        ("conv2", nn.Sequential(net.maxpool, net.layer1)),
        ("conv3", net.layer2), ("conv4", net.layer3), ("conv5", net.layer4)])


def _stage_channels(net: nn.Module) -> tuple[int, ...]:
    """Output channels of the stem and of each layer (its last block's last conv)."""
    last_convs = [[m for m in layer[-1].modules() if isinstance(m, nn.Conv2d)][-1]
                  for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
    return (net.conv1.out_channels, *(conv.out_channels for conv in last_convs))


def _conv5_dilated(net: nn.Module) -> bool:
    first = net.layer4[0]
    return first.conv2.stride == (1, 1) and (first.downsample is None or first.downsample[0].stride == (1, 1))


def resnet_body(arch: str, weights: Union[str, Path, None] = None, *, norm: Optional[NormName] = "auto",
                dilate_conv5: bool = False, deformable: bool = False, num_deformable: int = 3,
                offset_groups: int = 1, weights_name: Optional[str] = None) -> ResNet:
    """A torchvision ``ResNet`` of :data:`ARCHS`, modified for detection, with ``weights`` loaded.

    Args:
        arch: a key of :data:`ARCHS` (``resnet101`` for FCIS, ``resnext101_32x4d`` for FCIS+X).
        weights: local checkpoint file (a torchvision ``resnet*`` or timm ``resnext*`` state dict;
            they share key names). ``None`` runs randomly initialised and says so loudly.
        norm: ``frozen_bn`` (ImageNet statistics kept fixed, the detection practice for small
            per-GPU batches), ``bn`` (trainable BatchNorm), or ``auto`` / ``None``: frozen when
            weights are given, trainable otherwise (as torchvision's detection builders do), since
            frozen identity statistics would leave a randomly initialised network unnormalised.
        dilate_conv5: conv5 at stride 16 with dilation 2 instead of stride 32. As in FCIS and
            DeepLab, every 3x3 conv of res5 is dilated, res5a's included (torchvision's
            ``replace_stride_with_dilation`` leaves res5a at dilation 1; the weights are the same
            shape, so ImageNet checkpoints load either way).
        deformable: replace the 3x3 conv of the last ``num_deformable`` conv5 bottlenecks
            (res5a-c) by :class:`DeformableConv2d` (FCIS+D / FCIS+XD).
        num_deformable: how many of the last conv5 bottlenecks get deformable 3x3 convs
            (paper: 3; all of conv5 when it has fewer blocks).
        offset_groups: deformable groups of each :class:`DeformableConv2d`.
        weights_name: what the weights are called in messages (default ``arch``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; expected one of {sorted(ARCHS)}")
    norm = norm or "auto"
    if norm == "auto":
        norm = "frozen_bn" if weights is not None else "bn"
    if norm not in _NORM_LAYERS:
        raise ValueError(f"norm must be 'auto', 'frozen_bn' or 'bn', got {norm!r}")
    spec = ARCHS[arch]
    dilation = [False, False, bool(dilate_conv5)]
    if spec.planes == TORCHVISION_PLANES and spec.stem_width == 64:
        body = ResNet(Bottleneck, list(spec.layers), groups=spec.groups, width_per_group=spec.width_per_group,
                      replace_stride_with_dilation=dilation, norm_layer=_NORM_LAYERS[norm])
    else:
        body = ScaledResNet(spec, _NORM_LAYERS[norm], tuple(dilation))
    if dilate_conv5:
        first = body.layer4[0].conv2
        first.dilation, first.padding = (2, 2), (2, 2)
    if deformable:
        if num_deformable < 1:
            raise ValueError(f"num_deformable must be >= 1 when deformable=True, got {num_deformable}")
        for block in list(body.layer4)[-num_deformable:]:
            block.conv2 = DeformableConv2d.from_conv(block.conv2, offset_groups=offset_groups)
    load_weights(body, weights, name=weights_name or arch, strict=False)
    return body


class ResNetBackbone(StagedBackbone):
    """A torchvision ``ResNet`` body (``body.*`` keys, as torchvision's detection backbones) as a
    staged backbone: conv1 .. conv5 at strides 2, 4, 8, 16 and 32 (16 with the dilated conv5),
    channels 64, 256, 512, 1024, 2048 for the bottleneck archs. Its maps feed RoI poolers and the
    FCIS / Mask R-CNN heads directly (no detector parts of its own).
    """

    def __init__(self, body: ResNet) -> None:
        super().__init__()
        body.fc = nn.Identity()  # classification head unused; its checkpoint keys are skipped
        body.avgpool = nn.Identity()
        self.body = body
        self.feature_info = FeatureInfo.from_lists(
            STAGES, _stage_channels(body), (2, 4, 8, 16, 16 if _conv5_dilated(body) else 32))
        self._stages = resnet_stages(body)

    @classmethod
    def from_arch(cls, arch: str, weights: Union[str, Path, None] = None, **options) -> "ResNetBackbone":
        """The backbone of ``arch``; ``options`` as :func:`resnet_body` (``norm``, ``dilate_conv5``,
        ``deformable``, ``num_deformable``, ``offset_groups``)."""
        return cls(resnet_body(arch, weights, **options))

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        return self._stages


class ResNetFPNBackbone(FPNMixin, ResNetBackbone):
    """ResNet-50 (or ``arch="resnet101"``, UDQ's other backbone) with an FPN, laid out like
    torchvision's ``resnet_fpn_backbone`` (``body`` / ``fpn``), so both an ImageNet
    ``resnet50-*.pth`` / ``resnet101-*.pth`` (into ``body``) and a torchvision COCO
    ``fasterrcnn_resnet50_fpn`` checkpoint (into the detector) load by name.

    ``norm="frozen_bn"`` (torchvision's choice with pretrained weights: detection batches are too
    small for batch statistics) or ``"bn"`` (its choice from scratch); ``None`` picks by ``weights``.
    """

    fpn_stages = ("conv2", "conv3", "conv4", "conv5")

    def __init__(self, weights: Union[str, Path, None] = None, norm: Optional[NormName] = None,
                 fpn_channels: int = 256, arch: str = "resnet50") -> None:
        super().__init__(resnet_body(arch, weights, norm=norm, weights_name=f"{arch}_fpn"))
        self.fpn = FeaturePyramidNetwork([self.feature_info.channels(s) for s in self.fpn_stages], fpn_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.detection_maps = ["0", "1", "2", "3"]
        self.defaults = DetectorDefaults(min_size=800, max_size=1333,
                                         anchor_sizes=((32,), (64,), (128,), (256,), (512,)))

    @property
    def representation_size(self) -> int:
        return 1024


class SmallResNet(FPNMixin, StagedBackbone):
    """A compact ResNet for CPU runs: ResNet-18's layout (7x7 stem, max-pool, 4 stages of two basic
    blocks) at half width (32, 32, 64, 128, 256 channels), ~2.8 M parameters in the body, with a
    64-channel FPN on conv3..conv5 (strides 8..32, plus a stride-64 ``pool`` level for the RPN).

    The FPN makes every stage receive detection gradients (a single-map C4 detector would leave
    conv5 untrained) and gives ~160 px images anchors from 16 to 128 px. Its modules sit at the top
    level (``conv1``, ``layer1``, ...), the key layout of its saved checkpoints.
    """

    fpn_stages = ("conv3", "conv4", "conv5")
    widths = (32, 32, 64, 128, 256)

    def __init__(self, weights: Union[str, Path, None] = None, fpn_channels: int = 64,
                 blocks: tuple[int, int, int, int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        w = self.widths
        self.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(w[0], w[1], blocks[0], stride=1)
        self.layer2 = self._make_layer(w[1], w[2], blocks[1], stride=2)
        self.layer3 = self._make_layer(w[2], w[3], blocks[2], stride=2)
        self.layer4 = self._make_layer(w[3], w[4], blocks[3], stride=2)
        self.fpn = FeaturePyramidNetwork(list(w[2:]), fpn_channels, extra_blocks=LastLevelMaxPool())
        for m in self.modules():  # torchvision ResNet's initialisation
            if isinstance(m, nn.Conv2d) and not any(m is c for c in self.fpn.modules()):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        load_weights(self, weights, name="small")
        self.feature_info = FeatureInfo.from_lists(STAGES, w, (2, 4, 8, 16, 32))
        self.out_channels = fpn_channels
        self.detection_maps = ["0", "1", "2"]
        # Sized for ~160 px images on a CPU: no upscaling of small images, fewer proposals and
        # RoI samples than the 800 px COCO setting (which would dominate the cost of a tiny net).
        self.defaults = DetectorDefaults(
            min_size=160, max_size=320, anchor_sizes=((16,), (32,), (64,), (128,)),
            rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150, box_batch_size_per_image=128)
        self._stages = resnet_stages(self)

    @staticmethod
    def _make_layer(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or in_ch != out_ch:
            down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))
        layers = [BasicBlock(in_ch, out_ch, stride=stride, downsample=down)]
        layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        return self._stages

    @property
    def representation_size(self) -> int:
        return 256
