"""Staged backbones: one forward pass gives both the detector's maps and every named stage.

Region features may be pooled from any convolutional stage (``conv3`` + ``conv4`` for FCIS+XD,
``conv5`` for the deep region CNN's convolutional variant), while a torchvision detector needs its
own maps (a single map, or FPN levels). A :class:`StagedBackbone` computes the stages ``conv1`` ...
``conv5`` once and derives the detector's maps from them, so region description never runs the
backbone twice.

Stage naming follows the papers: ``convk`` is the output of the k-th convolution block.

=============  ===============================  ==========================  ===================
name           stages (stride)                  detector maps               box head
=============  ===============================  ==========================  ===================
``vgg16``      conv1_2 (1), conv2_2 (2),        ``"0"`` = conv5_3           fc6/fc7 of VGG-16
               conv3_3 (4), conv4_3 (8),        (512 ch, stride 16), as     (4096-D FC7, from
               conv5_3 (16)                     in Faster R-CNN             the ImageNet file)
``resnet50_    stem (2), layer1 (4), layer2     FPN ``"0"``..``"3"`` +      2-layer MLP, 1024
fpn``          (8), layer3 (16), layer4 (32)    ``"pool"`` (256 ch)
``small``      ResNet-18 layout, half widths    FPN on conv3..conv5 +       2-layer MLP, 256
               32/32/64/128/256 ch (2..32)      ``"pool"`` (64 ch)
=============  ===============================  ==========================  ===================

VGG pools *after* each block, so its ``convk`` maps sit at stride ``2^(k-1)``; every other
backbone follows the ResNet convention ``2^k``. Poolers read the scale from the map sizes, so the
difference is transparent to them. FPN levels are also exposed for pooling as ``p2`` ... ``p6``
(``pk`` at stride ``2^k``).

Freezing (``frozen_stages``, default 2): the leading stages get ``requires_grad=False`` and their
batch norms stay in eval mode whatever ``train()`` says -- the deep region CNN paper keeps "the
initial two convolution layers" unchanged when fine-tuning (conv1_x and conv2_x of VGG-16, as in
the original Faster R-CNN recipe); torchvision's ``trainable_layers=3`` is the same split for
ResNets.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet50, vgg16
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from instsearch.networks.weights import load_weights

__all__ = ["StagedBackbone", "FC67Head", "VGG16Backbone", "ResNetFPNBackbone", "SmallResNet", "DetectorDefaults",
           "build_backbone", "BACKBONES", "STAGES"]

log = logging.getLogger(__name__)

STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")
BACKBONES = ("vgg16", "resnet50_fpn", "small")


@dataclass(frozen=True)
class DetectorDefaults:
    """Detector settings that suit a backbone; :class:`~instsearch.networks.deep_region_cnn.DeepRegionCNN`
    uses them wherever its own argument is left ``None``."""

    min_size: int  # short side the detector resizes images to
    max_size: int  # cap of the long side
    anchor_sizes: tuple[tuple[int, ...], ...]  # per detector map (RPN level)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512


class StagedBackbone(nn.Module):
    """Base class: named stages ``conv1``..``conv5`` plus the maps a torchvision detector consumes.

    Subclasses define :meth:`stage_modules` (the modules of each stage, in order, which
    :meth:`forward_stages` runs) and :meth:`detection_features`.

    Attributes:
        out_channels: channels of the detector maps (torchvision's contract).
        detection_maps: names of the detector maps the RoI heads pool from (the RPN also sees the
            extra ``"pool"`` level of FPN backbones).
        stage_channels / stage_strides: per stage name.
        defaults: :class:`DetectorDefaults` for this backbone.
    """

    out_channels: int
    detection_maps: list[str]
    stage_channels: dict[str, int]
    stage_strides: dict[str, int]
    defaults: DetectorDefaults

    def __init__(self) -> None:
        super().__init__()
        self.frozen_stages = 0
        # Modules handed over once to the detector (see make_box_head); a plain dict keeps them out
        # of this module's parameters and state dict.
        self._handover: dict[str, nn.Module] = {}

    # -- stages ---------------------------------------------------------------------------------
    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        raise NotImplementedError

    def forward_stages(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """``(B, 3, H, W)`` normalised images -> ``conv1``..``conv5`` maps."""
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        for name, module in self.stage_modules().items():
            x = module(x)
            out[name] = x
        return out

    def detection_features(self, stages: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """The detector's maps, computed from the stages (no second pass)."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> tuple["OrderedDict[str, Tensor]", "OrderedDict[str, Tensor]"]:
        """Stages and detector maps of one pass."""
        stages = self.forward_stages(x)
        return stages, self.detection_features(stages)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """Detector maps only: what ``torchvision.models.detection.FasterRCNN`` calls."""
        return self.detection_features(self.forward_stages(x))

    def pooling_features(self, stages: "OrderedDict[str, Tensor]",
                         detection: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """Every map a region feature may be pooled from: the stages, plus FPN levels as ``pk``."""
        return OrderedDict(stages)

    # -- detector parts -------------------------------------------------------------------------
    @property
    def representation_size(self) -> int:
        """Width of the box head's output (the detector's per-box representation)."""
        raise NotImplementedError

    def make_box_head(self, resolution: int = 7) -> nn.Module:
        """The detector's box head (``TwoMLPHead``) for ``resolution x resolution`` RoI bins."""
        head = self._handover.pop("box_head", None)
        if head is not None and resolution == 7:
            return head
        return TwoMLPHead(self.out_channels * resolution ** 2, self.representation_size)

    # -- freezing -------------------------------------------------------------------------------
    def freeze(self, frozen_stages: int) -> None:
        """Freeze the first ``frozen_stages`` stages (0 = everything trains)."""
        if not 0 <= frozen_stages <= len(STAGES):
            raise ValueError(f"frozen_stages must be in 0..{len(STAGES)}, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        for index, module in enumerate(self.stage_modules().values()):
            for p in module.parameters():
                p.requires_grad_(index >= frozen_stages)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        return list(self.stage_modules().values())[: self.frozen_stages]

    def train(self, mode: bool = True) -> "StagedBackbone":
        super().train(mode)
        # Frozen stages keep their (pretrained) batch statistics: updating running means of layers
        # whose weights are fixed would silently change their output.
        for module in self._frozen_modules():
            for m in module.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


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

    def __init__(self, weights: Union[str, Path, None] = None) -> None:
        super().__init__()
        net = vgg16(weights=None)
        load_weights(net, weights, name="vgg16")
        self.features = net.features[: self._ENDS[-1]]  # drop pool5
        # fc6 / fc7 move into the box head as they are (no copy: they hold 120 M parameters).
        self._handover["box_head"] = FC67Head(net.classifier[0], net.classifier[3])
        self.out_channels = 512
        self.detection_maps = ["0"]
        self.stage_channels = dict(zip(STAGES, (64, 128, 256, 512, 512)))
        self.stage_strides = dict(zip(STAGES, (1, 2, 4, 8, 16)))
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


class _FPNMixin:
    """An FPN over some stages; levels named ``"0"``, ``"1"``, ... plus ``"pool"`` as torchvision's."""

    fpn: FeaturePyramidNetwork
    fpn_stages: tuple[str, ...]

    def detection_features(self, stages: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        return self.fpn(OrderedDict((str(i), stages[name]) for i, name in enumerate(self.fpn_stages)))

    def pooling_features(self, stages: "OrderedDict[str, Tensor]",
                         detection: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        out = OrderedDict(stages)
        first = int(self.fpn_stages[0][-1])  # conv2 -> P2 (stride 4), conv3 -> P3, ...
        for offset, value in enumerate(detection.values()):
            out[f"p{first + offset}"] = value
        return out


class ResNetFPNBackbone(_FPNMixin, StagedBackbone):
    """ResNet-50 with an FPN, laid out like torchvision's ``resnet_fpn_backbone`` (``body`` /
    ``fpn``), so both an ImageNet ``resnet50-*.pth`` (into ``body``) and a torchvision COCO
    ``fasterrcnn_resnet50_fpn`` checkpoint (into the detector) load by name.

    ``norm="frozen_bn"`` (torchvision's choice with pretrained weights: detection batches are too
    small for batch statistics) or ``"bn"`` (its choice from scratch); ``None`` picks by ``weights``.
    """

    fpn_stages = ("conv2", "conv3", "conv4", "conv5")

    def __init__(self, weights: Union[str, Path, None] = None, norm: Optional[str] = None,
                 fpn_channels: int = 256) -> None:
        super().__init__()
        norm = norm or ("frozen_bn" if weights is not None else "bn")
        norm_layer = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}.get(norm)
        if norm_layer is None:
            raise ValueError(f"resnet50_fpn norm must be 'frozen_bn' or 'bn', got {norm!r}")
        net = resnet50(weights=None, norm_layer=norm_layer)
        load_weights(net, weights, name="resnet50_fpn")
        # "relu" is the stem's output (stride 2): IntermediateLayerGetter walks children in order.
        self.body = IntermediateLayerGetter(net, return_layers={
            "relu": "conv1", "layer1": "conv2", "layer2": "conv3", "layer3": "conv4", "layer4": "conv5"})
        self.fpn = FeaturePyramidNetwork([256, 512, 1024, 2048], fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.detection_maps = ["0", "1", "2", "3"]
        self.stage_channels = dict(zip(STAGES, (64, 256, 512, 1024, 2048)))
        self.stage_strides = dict(zip(STAGES, (2, 4, 8, 16, 32)))
        self.defaults = DetectorDefaults(min_size=800, max_size=1333,
                                         anchor_sizes=((32,), (64,), (128,), (256,), (512,)))
        b = self.body
        self._stages = OrderedDict([
            ("conv1", nn.Sequential(b.conv1, b.bn1, b.relu)),
            ("conv2", nn.Sequential(b.maxpool, b.layer1)),
            ("conv3", b.layer2), ("conv4", b.layer3), ("conv5", b.layer4)])

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        return self._stages

    @property
    def representation_size(self) -> int:
        return 1024


class SmallResNet(_FPNMixin, StagedBackbone):
    """A compact ResNet for CPU runs: ResNet-18's layout (7x7 stem, max-pool, 4 stages of two basic
    blocks) at half width (32, 32, 64, 128, 256 channels), ~2.8 M parameters in the body, with a
    64-channel FPN on conv3..conv5 (strides 8..32, plus a stride-64 ``pool`` level for the RPN).

    The FPN makes every stage receive detection gradients (a single-map C4 detector would leave
    conv5 untrained) and gives ~160 px images anchors from 16 to 128 px.
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
        self.out_channels = fpn_channels
        self.detection_maps = ["0", "1", "2"]
        self.stage_channels = dict(zip(STAGES, w))
        self.stage_strides = dict(zip(STAGES, (2, 4, 8, 16, 32)))
        # Sized for ~160 px images on a CPU: no upscaling of small images, fewer proposals and
        # RoI samples than the 800 px COCO setting (which would dominate the cost of a tiny net).
        self.defaults = DetectorDefaults(
            min_size=160, max_size=320, anchor_sizes=((16,), (32,), (64,), (128,)),
            rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150, box_batch_size_per_image=128)
        self._stages = OrderedDict([
            ("conv1", nn.Sequential(self.conv1, self.bn1, self.relu)),
            ("conv2", nn.Sequential(self.maxpool, self.layer1)),
            ("conv3", self.layer2), ("conv4", self.layer3), ("conv5", self.layer4)])

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


def build_backbone(name: str, weights: Union[str, Path, None] = None, frozen_stages: int = 2, *,
                   norm: Optional[str] = None, fpn_channels: Optional[int] = None) -> StagedBackbone:
    """Build a staged backbone by name.

    Args:
        name: ``"vgg16"`` (the paper's), ``"resnet50_fpn"`` or ``"small"`` (CPU demo).
        weights: local weights file (see :mod:`instsearch.networks.weights` for the file each name expects);
            ``None`` runs randomly initialised and says so once.
        frozen_stages: leading stages kept fixed (2 = conv1 and conv2, the paper's setting). With
            random initialisation freezing only fixes random filters; set 0 to train from scratch.
        norm: ``resnet50_fpn`` only, ``"frozen_bn"`` or ``"bn"``.
        fpn_channels: FPN width (``resnet50_fpn`` 256, ``small`` 64 by default).
    """
    key = name.lower()
    if key == "vgg16":
        if norm is not None or fpn_channels is not None:
            raise ValueError("vgg16 has no batch norm and no FPN; leave norm / fpn_channels unset")
        backbone: StagedBackbone = VGG16Backbone(weights)
    elif key == "resnet50_fpn":
        backbone = ResNetFPNBackbone(weights, norm=norm, fpn_channels=fpn_channels or 256)
    elif key == "small":
        if norm is not None:
            raise ValueError("the small backbone always uses batch norm; leave norm unset")
        backbone = SmallResNet(weights, fpn_channels=fpn_channels or 64)
    else:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    backbone.freeze(frozen_stages)
    return backbone
