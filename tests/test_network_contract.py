"""Every search network satisfies the RegionSearchModel contract of instsearch.structures: feature_dim
is the width of every feature, boxes are in pixels of the given images, Regions carry that frame,
predicts_labels says whether classify_boxes answers, and a network never switches train/eval mode."""
from __future__ import annotations

import pytest
import torch

from instsearch.networks.claid import CLAID
from instsearch.networks.dasr import DASR
from instsearch.networks.deep_region_cnn import DeepRegionCNN
from instsearch.networks.fcis import build_fcis, build_mask_rcnn
from instsearch.networks.global_model import GlobalDescriptorModel
from instsearch.structures import RegionSearchModel

IMAGES = [(3, 64, 80), (3, 72, 56)]  # (C, H, W) of two images of different sizes


def _deep_region_cnn():
    return DeepRegionCNN("small", num_classes=3, feature_layers=["box_head", "conv4"], min_size=64, max_size=96)


def _fcis():
    return build_fcis("fcis_d", num_classes=3, backbone="resnet26", min_size=64, max_size=96, anchor_sizes=(16, 32, 64),
                      rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, head_channels=32, group_size=3,
                      mask_size=9, region_score_thresh=0.0)


def _mask_rcnn():
    return build_mask_rcnn("resnet26", num_classes=3, level="conv4", min_size=64, max_size=96, representation_size=32,
                           region_score_thresh=0.0, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
                           box_detections_per_img=10)


def _global():
    return GlobalDescriptorModel("small", layer="conv4", pooling="gem", min_size=64, max_size=96)


def _claid():
    return CLAID(patch_backbone="small", patch_layer="conv3", describe_backbone="small", describe_layer="conv5.0",
                 min_size=64, max_size=96)


def _dasr():
    return DASR("small", star=True, long_side=96)


@pytest.fixture(scope="module", params=[_deep_region_cnn, _fcis, _mask_rcnn, _global, _claid, _dasr],
                ids=["deep_region_cnn", "fcis", "mask_rcnn", "global", "claid", "dasr"])
def net(request):
    torch.manual_seed(0)
    return request.param().eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(*shape, generator=g) for shape in IMAGES]


def _modes(net):
    return [m.training for m in net.modules()]


def test_is_a_region_search_model(net):
    assert isinstance(net, RegionSearchModel)
    assert isinstance(net.feature_dim, int) and net.feature_dim > 0
    assert net.predicts_labels == (not isinstance(net, (GlobalDescriptorModel, CLAID, DASR)))


def test_database_side_frame_and_width(net, images):
    modes = _modes(net)
    with torch.no_grad():
        regions = net.detect_regions(images)
    assert _modes(net) == modes  # no mode switching
    assert len(regions) == len(images)
    for region, image in zip(regions, images):
        h, w = image.shape[-2:]
        assert region.image_size == (h, w)
        assert len(region) > 0 and region.features.shape == (len(region), net.feature_dim)
        assert (region.boxes[:, 0::2] >= 0).all() and (region.boxes[:, 0::2] <= w).all()
        assert (region.boxes[:, 1::2] >= 0).all() and (region.boxes[:, 1::2] <= h).all()
        if region.masks is not None:
            assert region.masks.shape[-2:] == (h, w)
        assert (region.labels is not None) == net.predicts_labels
        assert region.rescaled((2 * h, 2 * w)).image_size == (2 * h, 2 * w)


def test_query_side_width_and_pixels(net, images):
    boxes = [torch.tensor([[8.0, 6.0, 60.0, 50.0], [0.0, 0.0, 80.0, 64.0]]), torch.tensor([[10.0, 12.0, 40.0, 70.0]])]
    modes = _modes(net)
    with torch.no_grad():
        features = net.describe_boxes(images, boxes)
        # the same object in a twice larger image, at twice the pixel coordinates
        large = torch.nn.functional.interpolate(images[0][None], scale_factor=2.0, mode="bilinear",
                                                align_corners=False)[0]
        scaled = net.describe_boxes([large], [boxes[0] * 2])[0]
        labels = net.classify_boxes(images, boxes) if net.predicts_labels else None
    assert _modes(net) == modes
    assert [f.shape for f in features] == [(2, net.feature_dim), (1, net.feature_dim)]
    assert torch.nn.functional.cosine_similarity(features[0], scaled).min() > 0.9
    if labels is not None:
        assert [lbl.shape for lbl in labels] == [(2,), (1,)] and all(lbl.dtype == torch.int64 for lbl in labels)
    else:
        with pytest.raises(TypeError, match="predicts no categories"):
            net.classify_boxes(images, boxes)


def test_training_mode_is_the_callers_to_change(net, images):
    net.train()
    try:
        modes = _modes(net)
        with pytest.raises(RuntimeError, match="eval"), torch.no_grad():
            net.detect_regions(images)
        assert _modes(net) == modes
    finally:
        net.eval()
