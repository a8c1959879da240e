"""The backbone registry: every registered backbone's feature_info against its real maps, stage
selection, options, checkpoint key layouts, and the timm ViT patch-token backbone."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from instsearch.networks.backbones import (FeatureInfo, StageInfo, build_backbone, list_backbones,
                                           register_backbone)
from instsearch.networks.resnet import ARCHS
from instsearch.networks.vit import VIT_MODELS, ViTBackbone
from instsearch.networks.weights import reset_random_init_warnings

CNNS = ["vgg16", "resnet50_fpn", "resnet101_fpn", "small", "resnet26", "resnet50", "resnet101", "resnext20_8x4d_narrow", "resnext26_32x4d", "resnext50_32x4d",
        "resnext101_32x4d"]


def test_registry_lists_every_family():
    assert list_backbones() == sorted(CNNS + list(VIT_MODELS))
    assert list_backbones("resnext*") == ["resnext101_32x4d", "resnext20_8x4d_narrow", "resnext26_32x4d", "resnext50_32x4d"]
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("small", build_backbone)


DILATED_DCN = {"dilate_conv5": True, "deformable": True}


@pytest.mark.parametrize("name,options", [(name, {}) for name in list_backbones()]
                         + [(arch, DILATED_DCN) for arch in ARCHS],
                         ids=list_backbones() + [f"{arch}-dilated-dcn" for arch in ARCHS])
def test_feature_info_matches_the_maps_of_a_forward_pass(name, options):
    """Channels and strides declared by feature_info are those of the maps every registered backbone
    computes, at full size (built and run on the meta device: shapes without the arithmetic)."""
    with torch.device("meta"):
        backbone = build_backbone(name, **options).eval()
    largest = max(s.stride for s in backbone.feature_info)
    x = torch.empty(1, 3, 2 * largest, 3 * largest, device="meta")
    with torch.no_grad():
        stages = backbone.forward_stages(x)
    assert list(stages) == list(backbone.feature_info.names) == list(backbone.out_stages)
    for info in backbone.feature_info:
        assert stages[info.name].shape == (1, info.channels, x.shape[2] // info.stride, x.shape[3] // info.stride)
    if options:
        assert backbone.feature_info.stride("conv5") == 16


def test_resnet101_fpn_is_a_101_layer_body_under_the_fpn():
    with torch.device("meta"):
        backbone = build_backbone("resnet101_fpn")
    assert [len(getattr(backbone.body, f"layer{i}")) for i in range(1, 5)] == [3, 4, 23, 3]
    assert backbone.detection_maps == ["0", "1", "2", "3"] and backbone.out_channels == 256


def test_feature_info_lookup():
    info = FeatureInfo.from_lists(["a", "b"], [8, 16], [2, 4])
    assert info.names == ("a", "b") and len(info) == 2 and "b" in info and "c" not in info
    assert info.channels("b") == 16 and info.stride("a") == 2 and info[1] == StageInfo("b", 16, 4)
    with pytest.raises(KeyError, match="unknown stage 'c'"):
        info.channels("c")
    with pytest.raises(ValueError, match="duplicate"):
        FeatureInfo([StageInfo("a", 1, 1), StageInfo("a", 2, 2)])


def test_stages_select_what_forward_returns_and_stop_early():
    torch.manual_seed(0)
    full = build_backbone("resnet26").eval()
    part = build_backbone("resnet26", stages=("conv4", "conv2")).eval()
    part.load_state_dict(full.state_dict())
    assert part.out_stages == ("conv2", "conv4")
    calls = []
    part.body.layer4.register_forward_hook(lambda *_: calls.append("conv5"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = part.forward_stages(x), full.forward_stages(x)
    assert list(out) == ["conv2", "conv4"] and not calls
    torch.testing.assert_close(out["conv4"], ref["conv4"])
    with pytest.raises(ValueError, match="unknown stage"):
        build_backbone("resnet26", stages=("conv6",))
    with pytest.raises(ValueError, match=r"detector maps .* read \['conv2'"):
        build_backbone("resnet50_fpn", stages=("conv3", "conv4", "conv5"))


def test_family_options_are_checked_by_name():
    with pytest.raises(ValueError, match="'vgg16' does not take the option"):
        build_backbone("vgg16", norm="bn")
    net = build_backbone("resnet26", norm="bn", dilate_conv5=True, frozen_stages=0)
    assert net.feature_info.stride("conv5") == 16 and all(p.requires_grad for p in net.parameters())
    assert build_backbone("resnet26").feature_info.stride("conv5") == 32  # standard ResNet by default


def test_resnet50_fpn_keeps_torchvisions_key_layout():
    """The state-dict keys of torchvision's resnet_fpn_backbone, so its detector checkpoints load."""
    ours = build_backbone("resnet50_fpn", norm="frozen_bn", frozen_stages=0)
    theirs = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# ------------------------------------------------------------------------------------------------ ViT
def _reference_map(vit: torch.nn.Module, x: torch.Tensor, patch: int) -> torch.Tensor:
    """timm's forward_features, prefix tokens dropped, the token grid laid out as (B, D, h, w)."""
    tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]
    b, _, d = tokens.shape
    return tokens.reshape(b, x.shape[2] // patch, x.shape[3] // patch, d).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name,prefix", [("vit_small_patch16_224", 1), ("vit_small_patch14_reg4_dinov2.lvd142m", 5)])
def test_vit_patch_token_map_is_timms_last_normed_tokens(name, prefix):
    torch.manual_seed(0)
    backbone = build_backbone(name, depth=1).eval()
    patch = backbone.patch_size
    assert backbone.feature_info.names == ("tokens",) and backbone.frozen_stages == 0
    assert backbone.feature_info.stride("tokens") == patch and backbone.feature_info.channels("tokens") == 384
    reference = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, depth=1).eval()
    reference.load_state_dict(backbone.vit.state_dict())
    assert reference.num_prefix_tokens == prefix  # class token (+ 4 registers) dropped
    x = torch.randn(2, 3, 3 * patch, 5 * patch)  # not the 224 px the model was defined at
    with torch.no_grad():
        out = backbone.forward_stages(x)["tokens"]
        expected = _reference_map(reference, x, patch)
    assert out.shape == (2, 384, 3, 5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[1, :, 2, 4], reference.forward_features(x)[1, prefix + 2 * 5 + 4])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone.forward_stages(torch.randn(1, 3, patch + 1, 2 * patch))


def test_vit_weights_load_from_a_local_file_through_timm(tmp_path, caplog):
    torch.manual_seed(1)
    source = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, depth=1)
    path = tmp_path / "dino_vits16.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded = ViTBackbone("vit_small_patch16_224.dino", weights=path, depth=1)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[key], value), key
    assert loaded.input_mean == (0.485, 0.456, 0.406)  # DINO's normalisation, from timm's pretrained config
    assert ViTBackbone("vit_small_patch16_224", depth=1).input_mean == (0.5, 0.5, 0.5)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ViTBackbone("vit_small_patch16_224.dino", weights=tmp_path / "missing.pth", depth=1)
    reset_random_init_warnings()
    with caplog.at_level(logging.WARNING, logger="instsearch.networks.weights"):
        ViTBackbone("vit_small_patch16_224.dino", depth=1)
    assert "vit_small_patch16_224.dino" in caplog.text and "RANDOMLY INITIALISED" in caplog.text
