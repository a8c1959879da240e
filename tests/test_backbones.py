"""Staged backbones (stage shapes, strides, detector maps, freezing) and local weight loading."""
from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from instsearch.networks.backbones import STAGES, build_backbone
from instsearch.networks.weights import load_weights, read_state_dict, reset_random_init_warnings

INPUT = (64, 96)  # (H, W), a multiple of 32 like the detector's padded batches


@pytest.fixture(scope="module", params=["vgg16", "resnet50_fpn", "small"])
def built(request):
    """Each backbone built once (VGG-16 and ResNet-50 are slow to initialise) with one forward."""
    torch.manual_seed(0)
    backbone = build_backbone(request.param).eval()
    with torch.no_grad():
        stages, detection = backbone.forward_features(torch.rand(1, 3, *INPUT))
    return request.param, backbone, stages, detection


def test_stages_have_declared_channels_and_strides(built):
    name, backbone, stages, _ = built
    assert list(stages) == list(STAGES)
    for stage, fmap in stages.items():
        stride = backbone.feature_info.stride(stage)
        assert fmap.shape == (1, backbone.feature_info.channels(stage), INPUT[0] // stride, INPUT[1] // stride), stage
    expected = (1, 2, 4, 8, 16) if name == "vgg16" else (2, 4, 8, 16, 32)
    assert tuple(s.stride for s in backbone.feature_info) == expected


def test_detection_maps_match_the_detector_contract(built):
    name, backbone, stages, detection = built
    assert set(backbone.detection_maps) <= set(detection)
    assert all(v.shape[1] == backbone.out_channels for v in detection.values())
    assert len(detection) == len(backbone.defaults.anchor_sizes)  # one anchor set per RPN level
    if name == "vgg16":
        assert backbone.out_channels == 512 and detection["0"] is stages["conv5"]  # conv5_3, no second pass
    else:
        assert list(detection)[-1] == "pool"
    pooling = backbone.pooling_features(stages, detection)
    assert set(STAGES) <= set(pooling)
    if name == "resnet50_fpn":
        assert [k for k in pooling if k.startswith("p")] == ["p2", "p3", "p4", "p5", "p6"]
        assert pooling["p2"].shape[-1] == INPUT[1] // 4
    if name == "small":
        assert pooling["p3"].shape[-1] == INPUT[1] // 8


def test_forward_returns_detection_maps_only(built):
    _, backbone, _, detection = built
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, *INPUT))
    assert isinstance(out, OrderedDict) and list(out) == list(detection)


def test_box_head_representation(built):
    name, backbone, _, _ = built
    head = backbone.make_box_head(7)
    with torch.no_grad():
        out = head(torch.rand(3, backbone.out_channels, 7, 7))
    assert out.shape == (3, backbone.representation_size) and (out >= 0).all()  # post-ReLU
    if name == "vgg16":
        assert backbone.representation_size == 4096  # FC7
        assert head.fc6.in_features == 512 * 7 * 7


def test_first_two_stages_frozen_by_default(built):
    name, backbone, _, _ = built
    for index, (stage, module) in enumerate(backbone.stage_modules().items()):
        params = list(module.parameters())
        assert params, stage
        assert all(p.requires_grad == (index >= 2) for p in params), stage
    backbone.train()
    try:
        bns = {stage: [m for m in module.modules() if isinstance(m, _BatchNorm)]
               for stage, module in backbone.stage_modules().items()}
        if name == "vgg16":
            assert not any(bns.values())
        else:
            assert bns["conv1"] and all(not m.training for m in bns["conv1"] + bns["conv2"])
            assert all(m.training for m in bns["conv3"] + bns["conv5"])
    finally:
        backbone.eval()


def test_frozen_stages_keep_weights_and_batch_statistics():
    torch.manual_seed(0)
    backbone = build_backbone("small", frozen_stages=2).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    out = backbone(torch.rand(2, 3, 64, 64))
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is None for p in backbone.layer1.parameters())
    assert backbone.layer2[0].conv1.weight.grad is not None
    after = backbone.state_dict()
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])

    backbone.freeze(0)
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(m.training for m in backbone.modules() if isinstance(m, _BatchNorm))
    with pytest.raises(ValueError, match="frozen_stages"):
        backbone.freeze(6)


def test_build_backbone_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'.*vgg16"):
        build_backbone("resnet9")


# ------------------------------------------------------------------------------------------------
# weights
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)


def test_small_backbone_weights_roundtrip_through_a_file(tmp_path):
    torch.manual_seed(1)
    source = build_backbone("small")
    path = tmp_path / "small.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(2)
    loaded = build_backbone("small", weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert not loaded.layer1[0].conv1.weight.requires_grad  # frozen after loading


def test_load_weights_prefixes_key_map_and_shape_mismatch(tmp_path, caplog):
    src, dst = _Tiny(), _Tiny()
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    state["model.head.weight"] = torch.zeros(5, 4)  # another class count: skipped, not fatal
    path = tmp_path / "ckpt.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    with caplog.at_level(logging.INFO, logger="instsearch.networks.weights"):
        assert load_weights(dst, path, name="tiny") is True
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert not torch.equal(dst.head.weight, src.head.weight)
    assert "shape differs" in caplog.text and "head.weight" in caplog.text
    with pytest.raises(RuntimeError, match="shape mismatch"):
        load_weights(_Tiny(), path, name="tiny", strict=True)

    renamed = tmp_path / "renamed.pth"
    torch.save({f"backbone.{k}": v for k, v in src.state_dict().items()}, renamed)
    dst2 = _Tiny()
    load_weights(dst2, renamed, name="tiny", key_map={"backbone.": ""})
    assert torch.equal(dst2.head.weight, src.head.weight)
    dst3 = _Tiny()
    load_weights(dst3, renamed, name="tiny",
                 key_map=lambda k: k.removeprefix("backbone.") if k.startswith("backbone.conv") else None)
    assert torch.equal(dst3.conv.weight, src.conv.weight) and not torch.equal(dst3.head.weight, src.head.weight)
    assert set(read_state_dict(renamed)) == {f"backbone.{k}" for k in src.state_dict()}


def test_load_weights_errors_name_the_file(tmp_path):
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_weights(_Tiny(), missing, name="vgg16")
    assert str(missing) in str(info.value) and "vgg16-397923af.pth" in str(info.value)
    unrelated = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(1)}, unrelated)
    with pytest.raises(ValueError, match="no tensor that fits"):
        load_weights(_Tiny(), unrelated, name="tiny")
    not_a_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(ValueError, match="not a state dict"):
        load_weights(_Tiny(), not_a_state, name="tiny")


def test_random_init_warning_is_logged_once_per_name(caplog):
    reset_random_init_warnings()
    with caplog.at_level(logging.WARNING, logger="instsearch.networks.weights"):
        assert load_weights(_Tiny(), None, name="tiny") is False
        assert load_weights(_Tiny(), None, name="tiny") is False
        load_weights(_Tiny(), None, name="other")
    messages = [r.getMessage() for r in caplog.records if "RANDOMLY INITIALISED" in r.getMessage()]
    assert len(messages) == 2 and "tiny" in messages[0] and "other" in messages[1]
    assert "weights: /path" in messages[0]


def test_backbone_loads_from_a_trained_detector_checkpoint(tmp_path):
    """`weights:` may name a whole instsearch checkpoint: the backbone's entries are found under
    their prefix (here the deep region CNN's net.detector.backbone.) and the rest is ignored."""
    from instsearch.networks.deep_region_cnn import DeepRegionCNN

    torch.manual_seed(3)
    detector = DeepRegionCNN(backbone="small", num_classes=3, feature_layers=["conv4"])
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in detector.state_dict().items()}, "epoch": 11}, path)
    torch.manual_seed(4)
    backbone = build_backbone("small", weights=str(path))
    source = detector.detector.backbone.state_dict()
    assert backbone.state_dict().keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(backbone.state_dict()[key], value), key


def test_normalize_input_applies_the_weights_mean_and_std_per_channel():
    backbone = build_backbone("small")
    backbone.input_mean, backbone.input_std = (0.5, 0.25, 0.0), (0.25, 0.5, 2.0)
    x = torch.tensor([1.0, 0.75, 1.0])[None, :, None, None].expand(2, 3, 4, 5)
    out = backbone.normalize_input(x)
    assert out.shape == (2, 3, 4, 5)
    assert out[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]
