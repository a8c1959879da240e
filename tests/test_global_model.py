"""GlobalDescriptorModel: the whole-image baselines over any registered backbone, by hand computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instsearch.networks.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from instsearch.networks.global_model import GlobalDescriptorModel

SIZE = (64, 96)  # a multiple of 32: the transform neither resizes (min = max = 96 keeps it) nor pads


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("small").eval()


def _normalised(image: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image - mean) / std)[None]


def test_gem_over_a_named_layer_equals_a_hand_computation(backbone):
    torch.manual_seed(1)
    image = torch.rand(3, *SIZE)
    net = GlobalDescriptorModel(backbone, layer="conv4", pooling="gem", p=3.0, min_size=64, max_size=96).eval()
    assert net.feature_dim == 128 and not net.predicts_labels
    with torch.no_grad():
        regions = net.detect_regions([image])
        conv4 = backbone.forward_stages(_normalised(image))["conv4"]
    expected = F.normalize(conv4.clamp_min(1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3), dim=1)[0]
    assert len(regions) == 1 and len(regions[0]) == 1 and regions[0].image_size == SIZE
    torch.testing.assert_close(regions[0].boxes, torch.tensor([[0.0, 0.0, 96.0, 64.0]]))
    torch.testing.assert_close(regions[0].scores, torch.ones(1))
    torch.testing.assert_close(regions[0].features[0], expected, atol=1e-5, rtol=1e-5)


def test_query_box_is_described_by_its_crop(backbone):
    torch.manual_seed(2)
    image = torch.rand(3, *SIZE)
    net = GlobalDescriptorModel(backbone, pooling="mac", min_size=64, max_size=96).eval()
    assert net.layer == "conv5" and net.feature_dim == 256
    boxes = torch.tensor([[32.0, 0.0, 96.0, 64.0], [0.0, 0.0, 64.0, 64.0]])  # two 64x64 crops: no batch padding
    with torch.no_grad():
        features = net.describe_boxes([image, image[:, :32, :32]], [boxes, torch.zeros(0, 4)])
        crops = backbone.forward_stages(torch.cat([_normalised(image[:, :, 32:]), _normalised(image[:, :, :64])]))
        whole = net.describe_boxes([image], [torch.tensor([[0.5, 0.0, 95.5, 64.0]])])[0]
        database = net.detect_regions([image])[0].features
    assert [f.shape for f in features] == [(2, 256), (0, 256)]
    torch.testing.assert_close(features[0], F.normalize(crops["conv5"].amax(dim=(2, 3)), dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole, database, atol=1e-5, rtol=1e-5)  # outer pixels of the box: the image


@pytest.mark.parametrize("pooling,dim", [("spoc", 64), ("rmac", 64), ("gem", 64)])
def test_fpn_level_and_poolings(backbone, pooling, dim):
    net = GlobalDescriptorModel(backbone, layer="p4", pooling=pooling, min_size=64, max_size=96).eval()
    with torch.no_grad():
        features = net.detect_regions([torch.rand(3, 48, 80), torch.rand(3, 64, 64)])
    assert net.feature_dim == dim and all(r.features.shape == (1, dim) for r in features)
    assert [r.image_size for r in features] == [(48, 80), (64, 64)]


def test_by_name_and_over_a_vit():
    torch.manual_seed(0)
    by_name = GlobalDescriptorModel("resnet26", layer="conv3", min_size=64, max_size=64).eval()
    assert by_name.feature_dim == 512 and by_name.backbone.feature_info.stride("conv5") == 32
    vit = build_backbone("vit_small_patch16_224", depth=1).eval()
    net = GlobalDescriptorModel(vit, min_size=64, max_size=64).eval()
    assert net.layer == "tokens" and net.feature_dim == 384
    assert net.transform.image_mean == [0.5, 0.5, 0.5]  # the ViT's own normalisation by default
    with torch.no_grad():
        features = net.describe_boxes([torch.rand(3, 40, 56)], [torch.tensor([[4.0, 4.0, 36.0, 30.0]])])
    assert features[0].shape == (1, 384)
    torch.testing.assert_close(features[0].norm(dim=1), torch.ones(1))


def test_invalid_use_is_reported(backbone):
    with pytest.raises(ValueError, match="layer 'fc7'"):
        GlobalDescriptorModel(backbone, layer="fc7")
    with pytest.raises(ValueError, match="weights only apply"):
        GlobalDescriptorModel(backbone, weights="x.pth")
    with pytest.raises(ValueError, match="unknown global pooling"):
        GlobalDescriptorModel(backbone, pooling="crow")
    net = GlobalDescriptorModel(backbone, min_size=64, max_size=96)  # still in training mode
    with pytest.raises(RuntimeError, match="eval mode"):
        net.detect_regions([torch.rand(3, *SIZE)])
    assert net.training
