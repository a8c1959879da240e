"""DeepRegionCNN on the small backbone: detector training, region detection and description, box
mapping between original and network pixels, crop mode, the whole-image baseline over its backbone, weights.
The search modes (fusion) are in test_deep_region_cnn_fusion.py, the paper's crop-FC7 describer in
test_crop_features.py."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from smooth_images import smooth_image

from instsearch.structures import RegionSearchModel, Regions
from instsearch.networks.deep_region_cnn import DeepRegionCNN
from instsearch.networks.global_model import GlobalDescriptorModel
from instsearch.networks.detection_transform import DetectionTransform
from instsearch.networks.weights import reset_random_init_warnings

LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(scope="module")
def model() -> DeepRegionCNN:
    torch.manual_seed(0)
    return DeepRegionCNN("small", num_classes=3, top_k=2, feature_layers=["box_head", "conv4"]).eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return [smooth_image(120, 150, seed=1), smooth_image(160, 100, seed=2)]


def test_is_a_region_search_model(model):
    assert isinstance(model, RegionSearchModel)
    assert model.region_feature_dim == 256 + 128  # box head + conv4 channels


def test_training_forward_returns_the_four_losses_and_backward_works():
    torch.manual_seed(0)
    net = DeepRegionCNN("small", num_classes=3).train()
    images = [smooth_image(128, 160, seed=3), smooth_image(160, 128, seed=4)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 150.0], [5.0, 5.0, 40.0, 40.0]]),
                "labels": torch.tensor([2, 1])}]
    losses = net(images, targets)
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    backbone = net.backbone
    assert all(p.grad is None for p in backbone.layer1.parameters())  # conv2 frozen
    assert backbone.layer4[0].conv1.weight.grad.abs().sum() > 0  # conv5 learns through the FPN
    assert net.detector.rpn.head.conv[0][0].weight.grad.abs().sum() > 0
    assert net.detector.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_rpn_uses_the_papers_anchor_labels(model):
    matcher = model.detector.rpn.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches) == (0.7, 0.3, True)


def test_detect_regions_returns_top_k_in_original_pixels(model, images):
    with torch.no_grad():
        regions = model.detect_regions(images)
    assert len(regions) == 2
    for region, image in zip(regions, images):
        h, w = image.shape[-2:]
        assert isinstance(region, Regions) and len(region) == model.top_k
        assert (region.boxes[:, 0] >= 0).all() and (region.boxes[:, 2] <= w).all()
        assert (region.boxes[:, 1] >= 0).all() and (region.boxes[:, 3] <= h).all()
        assert (region.boxes[:, 2:] > region.boxes[:, :2]).all()
        assert region.features.shape == (model.top_k, model.region_feature_dim)
        torch.testing.assert_close(region.features.norm(dim=1), torch.ones(model.top_k))
        assert torch.all(region.scores[:-1] >= region.scores[1:])
        assert ((region.labels >= 1) & (region.labels < 3)).all()


def test_detect_regions_boxes_match_the_detectors_own_postprocessing(model, images):
    # torchvision's forward maps boxes back to the input size itself: an independent reference
    # for the one-pass path of detect_regions.
    with torch.no_grad():
        regions = model.detect_regions(images)
        reference = model(images)
    for region, ref in zip(regions, reference):
        torch.testing.assert_close(region.boxes, ref["boxes"][: model.top_k], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(region.scores, ref["scores"][: model.top_k])


def test_database_and_query_features_are_the_cell_maximum_of_the_box(images):
    """Both sides against a hand computation: resize as the detector does, run the backbone, cut
    the cells whose centre lies in the scaled box out of conv4 and take each channel's maximum."""
    torch.manual_seed(0)
    net = DeepRegionCNN("small", num_classes=3, top_k=3, feature_layers=["conv4"]).eval()
    with torch.no_grad():
        regions = net.detect_regions(images)
        queries = net.describe_boxes(images, [r.boxes for r in regions])
        batch, _ = net.detector.transform(list(images))  # batched as the network batches them
        all_conv4 = net.backbone.forward_stages(batch.tensors)["conv4"]
        for index, (image, region, query) in enumerate(zip(images, regions, queries)):
            conv4 = all_conv4[index]
            h, w = batch.image_sizes[index]
            scale = conv4.shape[-1] / batch.tensors.shape[-1]
            expected = []
            for box in region.boxes.tolist():
                x1, x2 = (v * w / image.shape[-1] * scale for v in (box[0], box[2]))
                y1, y2 = (v * h / image.shape[-2] * scale for v in (box[1], box[3]))
                cols = [j for j in range(conv4.shape[-1]) if x1 <= j + 0.5 < x2] or [int((x1 + x2) / 2)]
                rows = [i for i in range(conv4.shape[-2]) if y1 <= i + 0.5 < y2] or [int((y1 + y2) / 2)]
                v = conv4[:, rows][:, :, cols].amax(dim=(1, 2))
                expected.append(v / v.norm())
            torch.testing.assert_close(region.features, torch.stack(expected), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(query, region.features, atol=1e-4, rtol=1e-4)


def test_same_object_at_two_image_sizes_gives_the_same_feature(model):
    small, large = smooth_image(160, 200, seed=5), smooth_image(320, 400, seed=5)
    box = torch.tensor([[40.0, 30.0, 120.0, 110.0]])
    with torch.no_grad():
        f_small = model.describe_boxes([small], [box])[0]
        f_large = model.describe_boxes([large], [box * 2])[0]
        f_wrong = model.describe_boxes([large], [box])[0]  # the same numbers, not the same object
    assert F.cosine_similarity(f_small, f_large).item() > 0.99
    assert F.cosine_similarity(f_small, f_wrong).item() < F.cosine_similarity(f_small, f_large).item() - 0.01


def test_describe_boxes_roi_and_crop_modes(model, images):
    boxes = [torch.tensor([[10.0, 10.0, 90.0, 70.0], [0.0, 0.0, 150.0, 120.0]]), torch.zeros(0, 4)]
    with torch.no_grad():
        roi = model.describe_boxes(images, boxes)
        model.region_feature = "crop"
        try:
            crop = model.describe_boxes(images, boxes)
            # one image alone: its whole-frame crop is batched to the same padded size as the image
            crop_alone = model.describe_boxes(images[:1], boxes[:1])
        finally:
            model.region_feature = "roi"
        roi_alone = model.describe_boxes(images[:1], boxes[:1])
    for feats in (roi, crop):
        assert [f.shape for f in feats] == [(2, model.region_feature_dim), (0, model.region_feature_dim)]
        torch.testing.assert_close(feats[0].norm(dim=1), torch.ones(2))
    # the crop of the whole image is the image: both modes then pool the same maps
    torch.testing.assert_close(crop_alone[0][1], roi_alone[0][1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(crop_alone[0], crop[0], atol=1e-4, rtol=1e-4)  # crops batch alike
    assert F.cosine_similarity(crop[0][:1], roi[0][:1]).item() < 0.9999  # a real crop is not the RoI


def test_database_crop_mode_describes_detections_by_crops(images):
    torch.manual_seed(0)
    net = DeepRegionCNN("small", num_classes=3, feature_layers=["conv5"], region_feature="crop").eval()
    with torch.no_grad():
        regions = net.detect_regions(images)
        queries = net.describe_boxes(images, [r.boxes for r in regions])
    for region, query in zip(regions, queries):
        assert region.features.shape == (2, 256)
        torch.testing.assert_close(query, region.features, atol=1e-4, rtol=1e-4)


def test_global_descriptor_pools_each_image_without_batch_padding(model, images):
    gem = GlobalDescriptorModel.from_detector(model, layer="conv5", pooling="gem")
    with torch.no_grad():
        together = gem.global_descriptor(images)
        batch, maps, _ = model._encode(images, with_detection=False)  # the detector's own encoding
        same_size = gem.global_descriptor([images[0], images[0]])
        alone = gem.global_descriptor(images[:1])
    assert together.shape == (2, 256)  # GeM over conv5
    conv5 = maps["conv5"]
    for i, (h, w) in enumerate(batch.image_sizes):  # reference: GeM over the image's own cells only
        cells = conv5[i:i + 1, :, : math.ceil(h / 32), : math.ceil(w / 32)]
        torch.testing.assert_close(together[i], F.normalize(cells.clamp_min(1e-6).pow(3).mean(dim=(2, 3))
                                                            .pow(1 / 3), dim=1)[0])
    assert batch.image_sizes[0][0] < conv5.shape[-2] * 32  # image 0 really is padded in this batch
    torch.testing.assert_close(same_size, alone.expand(2, -1), atol=1e-5, rtol=1e-5)


def test_global_model_over_the_detector_backbone_is_the_whole_image_baseline(model, images):
    net = GlobalDescriptorModel.from_detector(model, layer="conv5", pooling="gem").eval()
    assert net.backbone is model.backbone and net.feature_dim == 256 and not net.predicts_labels
    assert net.transform.min_size == model.detector.transform.min_size
    assert net.transform.max_size == model.detector.transform.max_size
    with torch.no_grad():
        regions = net.detect_regions(images)
        whole = [torch.tensor([[0.0, 0.0, float(img.shape[-1]), float(img.shape[-2])]]) for img in images]
        queries = net.describe_boxes(images, whole)
        expected = net.global_descriptor(images)
    for i, (region, query) in enumerate(zip(regions, queries)):
        assert region.image_size == tuple(images[i].shape[-2:])
        torch.testing.assert_close(region.boxes, whole[i])
        torch.testing.assert_close(region.features[0], expected[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(query[0], expected[i], atol=1e-4, rtol=1e-4)  # crop of the whole image


def test_checkpoints_holding_the_former_global_pooling_still_load_strictly(model):
    # Networks saved while they also served the whole-image baseline carry its GeM exponent.
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    state["net.global_pool.p"] = torch.tensor(3.0)
    holder = torch.nn.Module()
    holder.net = model
    holder.load_state_dict(state)  # strict: the obsolete key is dropped, nothing else is
    state.pop("net.detector.rpn.head.conv.0.0.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        holder.load_state_dict(state)


def test_classify_boxes(model, images):
    labels = model.classify_boxes(images, [torch.tensor([[10.0, 10.0, 90.0, 70.0]]), torch.zeros(0, 4)])
    assert labels[0].shape == (1,) and 1 <= labels[0].item() < 3 and labels[1].shape == (0,)


def test_fpn_level_and_stage_features(images):
    torch.manual_seed(0)
    net = DeepRegionCNN("small", feature_layers=["p4", "conv3"], pooling="avg").eval()
    assert net.region_feature_dim == 64 + 64
    with torch.no_grad():
        feats = net.describe_boxes(images[:1], [torch.tensor([[5.0, 5.0, 60.0, 60.0]])])
    assert feats[0].shape == (1, 128)


def test_detect_regions_requires_eval_mode(images):
    net = DeepRegionCNN("small").train()
    with pytest.raises(RuntimeError, match="eval"):
        net.detect_regions(images)


def test_resize_respects_min_size_and_max_upscale():
    mean, std = [0.0] * 3, [1.0] * 3
    free = DetectionTransform(160, 320, mean, std).eval()
    capped = DetectionTransform(160, 320, mean, std, max_upscale=1.0).eval()
    batch, _ = free([torch.rand(3, 80, 100)])
    assert batch.image_sizes == [(160, 200)]
    batch, targets = capped([torch.rand(3, 80, 100)], [{"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]])}])
    assert batch.image_sizes == [(80, 100)] and batch.tensors.shape[-2:] == (96, 128)  # padded to 32
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[10.0, 10.0, 20.0, 20.0]]))
    batch, targets = capped([torch.rand(3, 400, 1280)], [{"boxes": torch.tensor([[64.0, 40.0, 128.0, 80.0]])}])
    assert batch.image_sizes == [(100, 320)]  # long side capped at 320
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[16.0, 10.0, 32.0, 20.0]]))
    net = DeepRegionCNN("small", min_size=96, max_size=200, max_upscale=1.0)
    assert net.detector.transform.min_size == (96,) and net.detector.transform.max_upscale == 1.0


def test_invalid_configuration_is_reported():
    with pytest.raises(ValueError, match="anchor_sizes needs 4"):
        DeepRegionCNN("small", anchor_sizes=((32,), (64,)))
    with pytest.raises(ValueError, match="feature_layers"):
        DeepRegionCNN("small", feature_layers=["fc8"])
    with pytest.raises(ValueError, match="region_feature"):
        DeepRegionCNN("small", region_feature="warp")
    with pytest.raises(ValueError, match="fusion"):
        DeepRegionCNN("small", fusion="sum")
    with pytest.raises(ValueError, match="image 0"):
        DeepRegionCNN("small").eval().describe_boxes([torch.rand(1, 32, 32)], [torch.zeros(0, 4)])
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        DeepRegionCNN("small").eval().describe_boxes([torch.rand(3, 32, 32)], [torch.tensor([[5.0, 5.0, 2.0, 9.0]])])


def test_detector_weights_roundtrip_and_random_init_warning_once(tmp_path, model, images, caplog):
    path = tmp_path / "drcnn.ckpt"
    # as a Lightning checkpoint of a module holding the network as `model`
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    reset_random_init_warnings()
    with caplog.at_level(logging.WARNING, logger="instsearch.networks.weights"):
        torch.manual_seed(123)
        restored = DeepRegionCNN("small", num_classes=3, top_k=2, feature_layers=["box_head", "conv4"],
                                 detector_weights=path).eval()
        DeepRegionCNN("small", num_classes=3)
    warnings = [r for r in caplog.records if "RANDOMLY INITIALISED" in r.getMessage()]
    assert len(warnings) == 1 and "small" in warnings[0].getMessage()
    with torch.no_grad():
        a, b = model.detect_regions(images), restored.detect_regions(images)
    for ra, rb in zip(a, b):
        torch.testing.assert_close(ra.boxes, rb.boxes)
        torch.testing.assert_close(ra.features, rb.features)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        DeepRegionCNN("small", detector_weights=tmp_path / "missing.pth")
