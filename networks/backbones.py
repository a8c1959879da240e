"""The registry of staged backbones: one name -> one builder, for every method.

A method picks its backbone and the stages it reads by name::

    backbone = build_backbone("resnet50", stages=("conv4",))
    backbone.feature_info.channels("conv4"), backbone.feature_info.stride("conv4")  # 1024, 16

Every backbone is a :class:`~instsearch.networks.staged.StagedBackbone` (named stages, a timm-style
``feature_info``, freezing); weights come from a local file through
:mod:`instsearch.networks.weights` (``None`` = random initialisation, said once).

=============================  ==============================  =========================  ===================
name                           stages (stride)                 detector maps              box head
=============================  ==============================  =========================  ===================
``vgg16``                      conv1_2 (1), conv2_2 (2),       ``"0"`` = conv5_3          fc6/fc7 of VGG-16
                               conv3_3 (4), conv4_3 (8),       (512 ch, stride 16), as    (4096-D FC7, from
                               conv5_3 (16)                    in Faster R-CNN            the ImageNet file)
``resnet50_fpn``,              stem (2), layer1 (4), layer2    FPN ``"0"``..``"3"`` +     2-layer MLP, 1024
``resnet101_fpn``              (8), layer3 (16), layer4 (32)   ``"pool"`` (256 ch)
``small``                      ResNet-18 layout, half widths   FPN on conv3..conv5 +      2-layer MLP, 256
                               32/32/64/128/256 ch (2..32)     ``"pool"`` (64 ch)
``resnet26`` / ``50`` /        conv1 .. conv5 (2 .. 32; conv5  --                         --
``101``, ``resnext26`` /       16 with ``dilate_conv5``),
``50`` / ``101_32x4d``         ``deformable`` res5a-c
``resnext20_8x4d_narrow``      as above at 1/4 width: 32, 64,  --                         --
                               128, 256, 512 ch (CPU FCIS+XD)
ViTs of :data:`VIT_MODELS`     ``tokens`` (patch size)         --                         --
=============================  ==============================  =========================  ===================

Backbones without detector maps feed their stages to the heads that read them (FCIS, Mask R-CNN
through one stage) and to the RoI poolers and global descriptors.

The ResNet family takes ``norm`` (``"auto"``, ``"frozen_bn"``, ``"bn"``), ``dilate_conv5``,
``deformable``, ``num_deformable`` and ``offset_groups`` (:func:`~instsearch.networks.resnet.resnet_body`);
``resnet50_fpn`` / ``resnet101_fpn`` take ``norm`` and ``fpn_channels``, ``small`` ``fpn_channels``; ViTs pass extra
options to ``timm.create_model``.
"""
from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Optional, Union

from instsearch.networks.resnet import ARCHS, ResNetBackbone, ResNetFPNBackbone, SmallResNet
from instsearch.networks.staged import (IMAGENET_MEAN, IMAGENET_STD, STAGES, DetectorDefaults, FeatureInfo, StageInfo,
                                        StagedBackbone)
from instsearch.networks.vgg import VGG16Backbone
from instsearch.networks.vit import VIT_MODELS, ViTBackbone

__all__ = ["build_backbone", "list_backbones", "register_backbone", "StagedBackbone", "FeatureInfo", "StageInfo",
           "DetectorDefaults", "STAGES", "IMAGENET_MEAN", "IMAGENET_STD"]

BackboneBuilder = Callable[..., StagedBackbone]

_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str, builder: BackboneBuilder) -> None:
    """Make ``builder(weights=None, **options) -> StagedBackbone`` available as ``name``."""
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[key] = builder


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern`` (e.g. ``"resnext*"``), sorted."""
    return sorted(fnmatch.filter(_REGISTRY, pattern.lower()))


def build_backbone(name: str, weights: Union[str, Path, None] = None, frozen_stages: Optional[int] = None, *,
                   stages: Optional[Iterable[str]] = None, **options) -> StagedBackbone:
    """Build a registered backbone.

    Args:
        name: a name of :func:`list_backbones` (``"vgg16"``, ``"resnet50_fpn"``, ``"small"``,
            ``"resnext101_32x4d"``, ``"vit_base_patch8_224.dino"``, ...).
        weights: local weights file (see :mod:`instsearch.networks.weights` for the file each name
            expects); ``None`` runs randomly initialised and says so once.
        frozen_stages: leading stages kept fixed; ``None`` = the backbone's default (2 = conv1 and
            conv2 for the CNNs, the deep region CNN's and FCIS's setting; 0 for ViTs). With random
            initialisation freezing only fixes random filters; set 0 to train from scratch.
        stages: the stages ``forward_stages`` returns (default all); the pass stops at the deepest.
        **options: the family's own options (see the module docstring).
    """
    builder = _REGISTRY.get(name.lower())
    if builder is None:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(list_backbones())}")
    try:
        inspect.signature(builder).bind(weights=weights, **options)
    except TypeError as err:
        raise ValueError(f"backbone {name!r} does not take the option(s) {sorted(options)}: {err}") from None
    backbone = builder(weights=weights, **options)
    if stages is not None:
        backbone.select_stages(stages)
    backbone.freeze(backbone.default_frozen_stages if frozen_stages is None else frozen_stages)
    return backbone


register_backbone("vgg16", VGG16Backbone)
register_backbone("resnet50_fpn", ResNetFPNBackbone)
register_backbone("resnet101_fpn", partial(ResNetFPNBackbone, arch="resnet101"))
register_backbone("small", SmallResNet)
for _arch in ARCHS:
    register_backbone(_arch, partial(ResNetBackbone.from_arch, _arch))
for _model in VIT_MODELS:
    register_backbone(_model, partial(ViTBackbone, _model))
