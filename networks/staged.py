"""The staged-backbone contract every backbone of :mod:`instsearch.networks.backbones` implements.

A :class:`StagedBackbone` computes named stages (``conv1`` ... ``conv5`` for the CNNs, ``tokens``
for a ViT) in one forward pass and describes them in a timm-style :class:`FeatureInfo` (name,
channels, stride per stage). Region features may be pooled from any stage (``conv3`` + ``conv4``
for FCIS+XD, ``conv5`` for the deep region CNN's convolutional variant, a global descriptor over
``conv5`` or a ViT's patch tokens), while a torchvision detector needs its own maps (a single map,
or FPN levels): a detection backbone derives those maps from the stages of the same pass
(:meth:`StagedBackbone.detection_features`), so region description never runs the backbone twice.

Freezing (``frozen_stages``): the leading stages get ``requires_grad=False`` and their batch norms
stay in eval mode whatever ``train()`` says. The deep region CNN paper keeps "the initial two
convolution layers" unchanged when fine-tuning (conv1_x and conv2_x of VGG-16, as in the original
Faster R-CNN recipe) and FCIS fixes conv1 and res2; torchvision's ``trainable_layers=3`` is the
same split for ResNets.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Optional, Union

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork

__all__ = ["STAGES", "IMAGENET_MEAN", "IMAGENET_STD", "StageInfo", "FeatureInfo", "DetectorDefaults",
           "StagedBackbone", "FPNMixin"]

#: The convolutional stages, named after the papers: ``convk`` is the output of the k-th block.
STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")

#: Input normalisation of the ImageNet-trained torchvision / timm CNNs (RGB in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StageInfo:
    """One stage of a backbone: its output channels and its stride in input pixels."""

    name: str
    channels: int
    stride: int


class FeatureInfo:
    """The stages of a backbone in forward order, addressed by index or name (as timm's
    ``feature_info``, with names instead of out-indices)."""

    def __init__(self, stages: Iterable[StageInfo]) -> None:
        self._stages = tuple(stages)
        self._by_name = {s.name: s for s in self._stages}
        if len(self._by_name) != len(self._stages):
            raise ValueError(f"FeatureInfo: duplicate stage names in {[s.name for s in self._stages]}")

    @classmethod
    def from_lists(cls, names: Iterable[str], channels: Iterable[int], strides: Iterable[int]) -> "FeatureInfo":
        return cls(StageInfo(n, int(c), int(s)) for n, c, s in zip(names, channels, strides, strict=True))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def channels(self, name: str) -> int:
        return self[name].channels

    def stride(self, name: str) -> int:
        return self[name].stride

    def __getitem__(self, key: Union[int, str]) -> StageInfo:
        if isinstance(key, int):
            return self._stages[key]
        try:
            return self._by_name[key]
        except KeyError:
            raise KeyError(f"unknown stage {key!r}; this backbone has {list(self.names)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[StageInfo]:
        return iter(self._stages)

    def __len__(self) -> int:
        return len(self._stages)

    def __add__(self, other: "FeatureInfo") -> "FeatureInfo":
        return FeatureInfo((*self, *other))

    def __repr__(self) -> str:
        return "FeatureInfo(" + ", ".join(f"{s.name}: {s.channels} ch / {s.stride}" for s in self) + ")"


@dataclass(frozen=True)
class DetectorDefaults:
    """Detector settings that suit a detection backbone;
    :class:`~instsearch.networks.deep_region_cnn.DeepRegionCNN` uses them wherever its own argument
    is left ``None``."""

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
    """Base class: named stages described by :attr:`feature_info`, freezing, and (for detection
    backbones) the maps and box head a torchvision detector consumes.

    Subclasses set ``feature_info`` and define :meth:`stage_modules` (the module of each stage, in
    order, which :meth:`forward_stages` runs). Detection backbones also define
    :meth:`detection_features`, ``out_channels``, ``detection_maps``, ``defaults`` and
    :attr:`representation_size`.

    Attributes:
        feature_info: every stage (name, channels, stride), in forward order.
        out_stages: the stages :meth:`forward_stages` returns (all by default; see
            :meth:`select_stages`); the pass stops at the deepest of them.
        default_frozen_stages: what ``build_backbone`` freezes when not told.
        input_mean / input_std: the normalisation the (pretrained) weights expect.
        out_channels: channels of the detector maps (torchvision's contract).
        detection_maps: names of the detector maps the RoI heads pool from (the RPN also sees the
            extra ``"pool"`` level of FPN backbones).
        detection_stages: the stages :meth:`detection_features` reads.
        defaults: :class:`DetectorDefaults`, ``None`` for backbones without detector parts.
    """

    feature_info: FeatureInfo
    default_frozen_stages: int = 2
    input_mean: tuple[float, ...] = IMAGENET_MEAN
    input_std: tuple[float, ...] = IMAGENET_STD
    out_channels: int
    detection_maps: list[str]
    detection_stages: tuple[str, ...] = ()
    defaults: Optional[DetectorDefaults] = None

    def __init__(self) -> None:
        super().__init__()
        self.frozen_stages = 0
        self._out_stages: Optional[tuple[str, ...]] = None
        # Modules handed over once to the detector (see make_box_head); a plain dict keeps them out
        # of this module's parameters and state dict.
        self._handover: dict[str, nn.Module] = {}

    # -- stages ---------------------------------------------------------------------------------
    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        raise NotImplementedError

    @property
    def out_stages(self) -> tuple[str, ...]:
        return self._out_stages or self.feature_info.names

    def select_stages(self, stages: Iterable[str]) -> "StagedBackbone":
        """Return only ``stages`` from :meth:`forward_stages` (in forward order), stopping the pass
        at the deepest one (a conv4-level head needs no conv5)."""
        stages = list(stages)
        unknown = [s for s in stages if s not in self.feature_info]
        if unknown or not stages:
            raise ValueError(f"unknown stage(s) {unknown}; expected a non-empty subset of "
                             f"{list(self.feature_info.names)}")
        missing = [s for s in self.detection_stages if s not in stages]
        if missing:
            raise ValueError(f"the detector maps of {type(self).__name__} read {missing}; keep them in the stages")
        self._out_stages = tuple(s for s in self.feature_info.names if s in stages)
        return self

    def forward_stages(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """``(B, 3, H, W)`` normalised images -> the :attr:`out_stages` maps."""
        out: "OrderedDict[str, Tensor]" = OrderedDict()
        wanted = self.out_stages
        for name, module in self.stage_modules().items():
            x = module(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out

    def normalize_input(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images in ``[0, 1]`` -> the normalisation the weights expect
        (``input_mean`` / ``input_std``), for networks that feed the backbone directly rather than
        through a detector transform."""
        mean = x.new_tensor(self.input_mean)[:, None, None]
        std = x.new_tensor(self.input_std)[:, None, None]
        return (x - mean) / std

    def forward_layer(self, x: Tensor, layer: str) -> Tensor:
        """``(B, 3, H, W)`` normalised images -> the map of one ``layer``: a stage (``"conv4"``) or
        the output of block ``j`` of a stage (``"conv5.0"``), the pass stopping there.

        Block-level maps are what training-free region methods pool from: DASR and CLAID describe
        regions by ResNet-50's ``layer4.0`` (torchvision's name), i.e. ``conv5.0`` here -- the first
        bottleneck of conv5, already at conv5's stride and width but less specialised than its end.
        Blocks are the children of the stage's ``nn.Sequential`` (the ResNets' ``conv2`` starts
        with the stem's max-pool, so its blocks are shifted by one).
        """
        stage, block = self.parse_layer(layer)
        for name, module in self.stage_modules().items():
            if name != stage:
                x = module(x)
                continue
            if block is None:
                return module(x)
            for child in list(module.children())[: block + 1]:
                x = child(x)
            return x
        raise AssertionError("unreachable: parse_layer checked the stage")

    def parse_layer(self, layer: str) -> tuple[str, Optional[int]]:
        """``"conv5.0"`` -> ``("conv5", 0)``, ``"conv4"`` -> ``("conv4", None)``; unknown stages and
        blocks a stage does not have are refused by name."""
        stage, _, block = layer.partition(".")
        if stage not in self.feature_info:
            raise ValueError(f"unknown layer {layer!r}: {type(self).__name__} has the stages "
                             f"{list(self.feature_info.names)} (a block of one as 'stage.j', e.g. 'conv5.0')")
        if not block:
            return stage, None
        module = self.stage_modules()[stage]
        if not isinstance(module, nn.Sequential):
            raise ValueError(f"layer {layer!r}: stage {stage} of {type(self).__name__} is not a sequence of blocks")
        if not block.isdigit() or int(block) >= len(module):
            raise ValueError(f"layer {layer!r}: stage {stage} of {type(self).__name__} has blocks 0..{len(module) - 1}")
        return stage, int(block)

    def layer_channels(self, layer: str) -> int:
        """Channels of :meth:`forward_layer`'s map: a stage's width (every block of a stage ends at
        the stage's width in the ResNet family)."""
        return self.feature_info.channels(self.parse_layer(layer)[0])

    def layer_stride(self, layer: str) -> int:
        """Stride of :meth:`forward_layer`'s map (a stage's first block already strides)."""
        return self.feature_info.stride(self.parse_layer(layer)[0])

    def detection_features(self, stages: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """The maps the downstream detector consumes, computed from the stages (no second pass);
        a backbone without detector parts feeds its stages as they are."""
        return stages

    def forward_features(self, x: Tensor) -> tuple["OrderedDict[str, Tensor]", "OrderedDict[str, Tensor]"]:
        """Stages and detector maps of one pass."""
        stages = self.forward_stages(x)
        return stages, self.detection_features(stages)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """The maps of :meth:`detection_features` only: what ``torchvision.models.detection.FasterRCNN``
        calls."""
        return self.detection_features(self.forward_stages(x))

    @property
    def pooling_info(self) -> FeatureInfo:
        """Every map a region feature may be pooled from (the keys of :meth:`pooling_features`)."""
        return self.feature_info

    def pooling_features(self, stages: "OrderedDict[str, Tensor]",
                         detection: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        """The maps of :attr:`pooling_info` from one pass: the stages (plus FPN levels)."""
        return OrderedDict(stages)

    # -- detector parts -------------------------------------------------------------------------
    @property
    def representation_size(self) -> int:
        """Width of the box head's output (the detector's per-box representation)."""
        raise NotImplementedError(f"{type(self).__name__} has no detector box head")

    def make_box_head(self, resolution: int = 7) -> nn.Module:
        """The detector's box head (``TwoMLPHead``) for ``resolution x resolution`` RoI bins."""
        head = self._handover.pop("box_head", None)
        if head is not None and resolution == 7:
            return head
        return TwoMLPHead(self.out_channels * resolution ** 2, self.representation_size)

    # -- freezing -------------------------------------------------------------------------------
    def freeze(self, frozen_stages: int) -> None:
        """Freeze the first ``frozen_stages`` stages (0 = everything trains)."""
        stages = self.stage_modules()
        if not 0 <= frozen_stages <= len(stages):
            raise ValueError(f"frozen_stages must be in 0..{len(stages)} (leading stages of {list(stages)}), "
                             f"got {frozen_stages}")
        self.frozen_stages = frozen_stages
        for index, module in enumerate(stages.values()):
            for p in module.parameters():
                p.requires_grad_(index >= frozen_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> "StagedBackbone":
        super().train(mode)
        # Frozen stages keep their (pretrained) batch statistics: updating running means of layers
        # whose weights are fixed would silently change their output.
        for module in list(self.stage_modules().values())[: self.frozen_stages]:
            for m in module.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


class FPNMixin:
    """An FPN over some stages of a :class:`StagedBackbone`: detector maps ``"0"``, ``"1"``, ...
    plus ``"pool"`` as torchvision's ``BackboneWithFPN``, also exposed for pooling as ``p2`` ...
    ``p6`` (``pk`` at stride ``2^k``, the FPN paper's naming)."""

    fpn: FeaturePyramidNetwork
    fpn_stages: tuple[str, ...]
    feature_info: FeatureInfo
    out_channels: int

    @property
    def detection_stages(self) -> tuple[str, ...]:
        return self.fpn_stages

    def detection_features(self, stages: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        return self.fpn(OrderedDict((str(i), stages[name]) for i, name in enumerate(self.fpn_stages)))

    @property
    def pooling_info(self) -> FeatureInfo:
        first = int(self.fpn_stages[0][-1])  # conv2 -> P2 (stride 4), conv3 -> P3, ...
        levels = range(first, first + len(self.fpn_stages) + 1)  # + the max-pooled "pool" level
        return self.feature_info + FeatureInfo(StageInfo(f"p{k}", self.out_channels, 2 ** k) for k in levels)

    def pooling_features(self, stages: "OrderedDict[str, Tensor]",
                         detection: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        out = OrderedDict(stages)
        first = int(self.fpn_stages[0][-1])
        for offset, value in enumerate(detection.values()):
            out[f"p{first + offset}"] = value
        return out
