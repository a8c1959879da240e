"""Detection backbones: stage shapes, dilated conv5, deformable res5, freezing, weight loading."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from instsearch.networks.backbones import build_backbone
from instsearch.networks.resnet import ARCHS, DeformableConv2d


CHANNELS = {"conv1": 64, "conv2": 256, "conv3": 512, "conv4": 1024, "conv5": 2048}
STRIDES = {"conv1": 2, "conv2": 4, "conv3": 8, "conv4": 16, "conv5": 16}


def _offset_params(conv_in: int) -> int:
    return conv_in * 18 * 9 + 18  # 3x3 offset conv: 2 * 3 * 3 outputs, with bias


@pytest.mark.parametrize("arch,deformable", [("resnet26", False), ("resnext26_32x4d", True)])
def test_stage_shapes_and_strides(arch, deformable):
    torch.manual_seed(0)
    net = build_backbone(arch, deformable=deformable, dilate_conv5=True).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = net(x)
    assert list(out) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    for name, f in out.items():
        assert f.shape == (1, CHANNELS[name], 64 // STRIDES[name], 96 // STRIDES[name]), name
    assert {s.name: s.stride for s in net.feature_info} == STRIDES


def test_return_stages_stop_early():
    net = build_backbone("resnet26", stages=["conv3", "conv4"], dilate_conv5=True).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 32))
    assert list(out) == ["conv3", "conv4"]
    assert {s: net.feature_info.channels(s) for s in net.out_stages} == {"conv3": 512, "conv4": 1024}


@pytest.mark.parametrize("arch,deformable,reference", [
    ("resnet101", False, "torchvision"),
    ("resnext101_32x4d", True, "timm"),
])
def test_full_size_structure(arch, deformable, reference):
    """The paper's backbones: widths, dilated stride-16 conv5, deformable res5a-c only, parameter count
    against an independently built torchvision / timm classifier (minus its fc, plus the offset convs)."""
    net = build_backbone(arch, deformable=deformable, dilate_conv5=True, frozen_stages=0)
    body = net.body
    assert len(body.layer3) == 23 and len(body.layer4) == 3
    for block in body.layer4:
        assert block.conv2.stride == (1, 1) and block.conv2.dilation == (2, 2) and block.conv2.padding == (2, 2)
        assert isinstance(block.conv2, DeformableConv2d) == deformable
    assert body.layer4[0].downsample[0].stride == (1, 1)
    assert not any(isinstance(m, DeformableConv2d) for m in list(body.layer1.modules()) + list(body.layer2.modules())
                   + list(body.layer3.modules()))
    groups = 32 if "resnext" in arch else 1
    assert body.layer4[0].conv2.groups == groups and body.layer1[0].conv2.groups == groups
    assert body.layer4[0].conv2.in_channels == (1024 if groups == 32 else 512)

    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[1] for k, v in out.items()} == CHANNELS
    assert out["conv5"].shape[-1] == out["conv4"].shape[-1] == 4

    if reference == "torchvision":
        import torchvision

        ref = torchvision.models.resnet101(weights=None)
    else:
        import timm

        ref = timm.create_model("resnext101_32x4d", pretrained=False)
    ref_count = sum(p.numel() for p in ref.parameters()) - sum(p.numel() for p in ref.fc.parameters())
    extra = 3 * _offset_params(body.layer4[0].conv2.in_channels) if deformable else 0
    assert sum(p.numel() for p in net.parameters()) == ref_count + extra
    # Key names match the reference checkpoint (only the offset predictors are new).
    ours = {k for k in body.state_dict() if not k.startswith("fc.")}
    theirs = {k for k in ref.state_dict() if not k.startswith("fc.")}
    assert ours - theirs == {k for k in ours if "conv_offset" in k}
    assert theirs <= ours


@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 1), (1, 2, 4), (1, 2, 32)])
def test_deformable_with_zero_offsets_equals_plain_conv(stride, dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False)
    deform = DeformableConv2d.from_conv(conv)
    x = torch.randn(2, 64, 11, 13)
    torch.testing.assert_close(deform(x), conv(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(deform.conv_offset.weight, torch.zeros_like(deform.conv_offset.weight))


def test_deformable_backbone_block_equals_plain_block():
    """res5 of the deformable ResNeXt (groups 32, dilation 2) starts as the plain one."""
    torch.manual_seed(0)
    plain = build_backbone("resnext26_32x4d", deformable=False, dilate_conv5=True).eval()
    torch.manual_seed(0)
    deform = build_backbone("resnext26_32x4d", deformable=True, dilate_conv5=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deform(x)["conv5"], plain(x)["conv5"], atol=1e-5, rtol=1e-4)


def test_deformable_offsets_shift_the_sampling():
    """A constant offset of +1 row samples the input one row lower: equals the plain conv of the
    input shifted up by one row (zero-filled), checked away from the borders."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=False)
    deform = DeformableConv2d.from_conv(conv)
    with torch.no_grad():
        deform.conv_offset.bias.view(9, 2)[:, 0] = 1.0  # (dy, dx) per kernel tap
    x = torch.randn(1, 8, 10, 10)
    shifted = F.pad(x[:, :, 1:], (0, 0, 0, 1))
    torch.testing.assert_close(deform(x)[:, :, 1:-2], conv(shifted)[:, :, 1:-2], atol=1e-5, rtol=1e-5)


def test_frozen_stages_and_norm():
    net = build_backbone("resnet26", frozen_stages=2, norm="bn", dilate_conv5=True)
    b = net.body
    assert not any(p.requires_grad for p in list(b.conv1.parameters()) + list(b.layer1.parameters()))
    assert all(p.requires_grad for p in b.layer2.parameters())
    net.train()
    assert not b.bn1.training and not b.layer1[0].bn1.training and b.layer2[0].bn1.training
    assert isinstance(b.bn1, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="frozen_stages"):
        build_backbone("resnet26", frozen_stages=6)
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        build_backbone("resnet7")


def test_loads_torchvision_checkpoint_into_deformable_backbone(tmp_path):
    """A torchvision-layout state dict loads by key name; the deformable conv takes the weight of the
    conv it replaces; norm='auto' freezes BatchNorm when weights are given."""
    torch.manual_seed(1)
    spec = ARCHS["resnet26"]
    ref = ResNet(Bottleneck, list(spec.layers))
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet26.pth"
    torch.save(ref.state_dict(), path)
    net = build_backbone("resnet26", weights=path, deformable=True, dilate_conv5=True)
    assert isinstance(net.body.bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(net.body.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    torch.testing.assert_close(net.body.layer2[0].bn1.running_mean, ref.layer2[0].bn1.running_mean)
    torch.testing.assert_close(net.body.conv1.weight, ref.conv1.weight)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet26", weights=tmp_path / "missing.pth")


def test_scaled_resnet_at_torchvision_widths_matches_torchvision_layout():
    """ScaledResNet is torchvision's ResNet with the widths as parameters: at torchvision's own widths
    every key and shape of ``resnext50_32x4d`` is the same, so checkpoints load either way."""
    from torchvision.models import resnext50_32x4d

    from instsearch.networks.resnet import ScaledResNet
    ours = ScaledResNet(ARCHS["resnext50_32x4d"], nn.BatchNorm2d).state_dict()
    ref = {k: v for k, v in resnext50_32x4d().state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_narrow_resnext_widths_groups_and_deformable_res5():
    """The CPU-sized ResNeXt of fcis_xd_small: 32-ch stem, bottleneck 3x3 convs of 8 groups x 4, 8, 16,
    32 channels, outputs 64 / 128 / 256 / 512 at strides 4 / 8 / 16 / 16 (dilated), every res5 block
    deformable."""
    net = build_backbone("resnext20_8x4d_narrow", deformable=True, dilate_conv5=True).eval()
    body = net.body
    assert body.conv1.out_channels == 32
    assert [len(layer) for layer in (body.layer1, body.layer2, body.layer3, body.layer4)] == [1, 1, 2, 2]
    mid = [layer[0].conv2 for layer in (body.layer1, body.layer2, body.layer3, body.layer4)]
    assert [(c.in_channels, c.groups) for c in mid] == [(32, 8), (64, 8), (128, 8), (256, 8)]
    assert all(isinstance(b.conv2, DeformableConv2d) for b in body.layer4)
    assert not any(isinstance(b.conv2, DeformableConv2d) for b in body.layer3)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "conv1": (1, 32, 32, 48), "conv2": (1, 64, 16, 24), "conv3": (1, 128, 8, 12),
        "conv4": (1, 256, 4, 6), "conv5": (1, 512, 4, 6)}


def test_arch_spec_refuses_fractional_group_widths():
    from instsearch.networks.resnet import ArchSpec
    with pytest.raises(ValueError, match="whole numbers"):
        ArchSpec((1, 1, 1, 1), groups=8, width_per_group=4, planes=(8, 16, 32, 64))
