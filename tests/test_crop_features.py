"""The deep region CNN paper's region describer (crop -> 224 x 224 -> ImageNet VGG-16 FC7) against a
hand pipeline on torchvision's VGG-16, and as DeepRegionCNN's ``region_feature="crop_fc7"``.

VGG-16 has 138 M parameters: one describer (inside one DeepRegionCNN) and one torchvision reference
are built for the whole module."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import vgg16

from smooth_images import smooth_image

from instsearch.networks.deep_region_cnn import DeepRegionCNN
from instsearch.networks.crops import resized_crops

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def fc7_bias() -> torch.Tensor:
    return torch.linspace(-0.05, 0.05, 4096)


@pytest.fixture(scope="module")
def net(tmp_path_factory, fc7_bias) -> DeepRegionCNN:
    # A weights file in torchvision's key layout (only fc7's bias, so it stays small): the describer
    # must take it from crop_weights, while the rest stays at its random initialisation.
    path = tmp_path_factory.mktemp("crop_weights") / "vgg16_fc7_bias.pth"
    torch.save({"classifier.3.bias": fc7_bias}, path)
    torch.manual_seed(0)
    return DeepRegionCNN("small", num_classes=3, top_k=2, region_feature="crop_fc7", crop_weights=path,
                         crop_batch_size=2).eval()


@pytest.fixture(scope="module")
def reference(net) -> torch.nn.Module:
    """torchvision's VGG-16 holding the describer's weights, copied by torchvision's layer indices."""
    vgg = vgg16(weights=None).eval()
    describer = net.crop_fc7
    with torch.no_grad():
        for index, layer in enumerate(vgg.features[:30]):
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.copy_(describer.convs.features[index].weight)
                layer.bias.copy_(describer.convs.features[index].bias)
        for index, fc in ((0, describer.fc67.fc6), (3, describer.fc67.fc7)):
            vgg.classifier[index].weight.copy_(fc.weight)
            vgg.classifier[index].bias.copy_(fc.bias)
    return vgg


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return [smooth_image(120, 150, seed=1), smooth_image(300, 260, seed=2)]


def hand_fc7(vgg: torch.nn.Module, image: torch.Tensor, box: list[float]) -> torch.Tensor:
    """Crop the outer integer pixels of ``box`` by slicing, resize to 224 x 224, normalise, VGG-16
    up to the post-ReLU fc7, l2."""
    x1, y1 = math.floor(box[0]), math.floor(box[1])
    x2, y2 = max(math.ceil(box[2]), x1 + 1), max(math.ceil(box[3]), y1 + 1)
    crop = F.interpolate(image[None, :, y1:y2, x1:x2], size=(224, 224), mode="bilinear", align_corners=False)
    with torch.no_grad():
        x = vgg.avgpool(vgg.features((crop - MEAN) / STD)).flatten(1)
        return F.normalize(vgg.classifier[:5](x), dim=1)[0]


BOXES = [
    [[10.0, 12.0, 40.0, 50.0]],  # an upscaled crop (smaller than 224 px)
    [[5.5, 20.2, 250.7, 290.1], [100.0, 30.0, 110.0, 280.0]],  # downscaled, thin (non-integer corners)
]


def test_resized_crops_are_the_interpolated_slices():
    image = smooth_image(50, 70, seed=3)
    boxes = torch.tensor([[0.0, 0.0, 70.0, 50.0], [3.7, 4.2, 9.1, 30.0], [60.5, 40.5, 70.0, 50.0],
                          [20.0, 20.0, 20.4, 20.4]])  # whole image, thin, corner, under one pixel
    slices = [image[:, 0:50, 0:70], image[:, 4:30, 3:10], image[:, 40:50, 60:70], image[:, 20:21, 20:21]]
    for size in (8, 224):
        expected = torch.cat([F.interpolate(s[None], size=(size, size), mode="bilinear", align_corners=False)
                              for s in slices])
        torch.testing.assert_close(resized_crops([image, image], [boxes, boxes[:0]], size), expected,
                                   atol=1e-5, rtol=1e-5)


def test_crop_fc7_equals_the_hand_pipeline(net, reference, images):
    boxes = [torch.tensor(b) for b in BOXES]
    with torch.no_grad():
        features = net.crop_fc7(images, boxes)
    expected = torch.stack([hand_fc7(reference, image, box) for image, bs in zip(images, BOXES) for box in bs])
    assert features.shape == (3, 4096)
    torch.testing.assert_close(features, expected, atol=2e-5, rtol=1e-4)
    assert (features >= 0).all()  # post-ReLU


def test_batching_gives_the_features_of_one_crop_at_a_time(net, images):
    boxes = [torch.tensor(b) for b in BOXES]  # 3 crops in chunks of crop_batch_size = 2
    with torch.no_grad():
        batched = net.crop_fc7(images, boxes)
        single = torch.cat([net.crop_fc7([image], [torch.tensor([box])]) for image, bs in zip(images, BOXES)
                            for box in bs])
    assert net.crop_fc7.batch_size == 2
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_crop_weights_are_loaded_and_change_the_features(net, reference, images, fc7_bias):
    torch.testing.assert_close(net.crop_fc7.fc67.fc7.bias, fc7_bias)
    box = BOXES[0][0]
    with torch.no_grad():
        feature = net.crop_fc7(images[:1], [torch.tensor([box])])[0]
        reference.classifier[3].bias.zero_()  # torchvision's initial bias: what the file replaced
        try:
            without_file = hand_fc7(reference, images[0], box)
        finally:
            reference.classifier[3].bias.copy_(fc7_bias)
    assert (feature - without_file).abs().max() > 1e-3


def test_region_feature_crop_fc7_describes_both_sides(net, reference, images):
    assert net.region_feature_dim == net.feature_dim == 4096
    query_boxes = [torch.tensor(BOXES[0]), torch.zeros(0, 4)]
    with torch.no_grad():
        region = net.detect_regions(images[:1])[0]
        queries = net.describe_boxes(images, query_boxes)
    assert region.features.shape == (2, 4096)
    expected = torch.stack([hand_fc7(reference, images[0], box) for box in region.boxes.tolist()])
    torch.testing.assert_close(region.features, expected, atol=2e-5, rtol=1e-4)
    expected = torch.stack([hand_fc7(reference, images[0], box) for box in BOXES[0]])
    torch.testing.assert_close(queries[0], expected, atol=2e-5, rtol=1e-4)
    assert queries[1].shape == (0, 4096)


def test_fused_crop_fc7_query_is_the_fused_fc7_of_the_crops_detections(net, reference, images):
    image, box = images[1], [5.0, 20.0, 250.0, 290.0]
    crop = image[:, 20:290, 5:250]
    net.fusion = "concat"
    try:
        assert net.feature_dim == 2 * 4096
        with torch.no_grad():
            query = net.describe_boxes([image], [torch.tensor([box])])[0][0]
            detections = net([crop])[0]  # the detector's own output on the explicit crop
    finally:
        net.fusion = "none"
    top = detections["boxes"][:2].tolist()
    expected = torch.cat([hand_fc7(reference, crop, b) for b in top]) / math.sqrt(2)
    torch.testing.assert_close(query, expected, atol=2e-5, rtol=1e-4)


def test_the_fixed_describer_stays_out_of_checkpoints_and_training(net, images):
    state = net.state_dict()
    assert not [k for k in state if k.startswith("crop_fc7.")]
    assert not [p for p in net.crop_fc7.parameters() if p.requires_grad]
    before = net.crop_fc7.convs.features[0].weight.clone()
    torch.manual_seed(1)
    net.load_state_dict(DeepRegionCNN("small", num_classes=3).state_dict())  # strict: a roi network's checkpoint
    torch.testing.assert_close(net.crop_fc7.convs.features[0].weight, before)
    net.load_state_dict(state)
