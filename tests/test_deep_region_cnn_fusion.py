"""DeepRegionCNN's search modes: each top-K region on its own (``fusion="none"``) or one fused top-K
vector per image (concat / mean / max, Mei et al. 2018), on the database and the query side.

The references are hand-built: features of the per-region network fused by explicit torch
arithmetic, and query crops cut by tensor slicing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smooth_images import smooth_image

from instsearch.networks.deep_region_cnn import DeepRegionCNN
from instsearch.networks.region_features import fuse_top_regions

K = 2
LAYERS = ["box_head", "conv4"]
D = 256 + 128  # box head + conv4 of the small backbone


def _build(fusion: str, state=None, **options) -> DeepRegionCNN:
    torch.manual_seed(0)
    net = DeepRegionCNN("small", num_classes=3, top_k=options.pop("top_k", K), feature_layers=LAYERS,
                        fusion=fusion, **options)
    if state is not None:
        net.load_state_dict(state)
    return net.eval()


@pytest.fixture(scope="module")
def per_region() -> DeepRegionCNN:
    return _build("none")


@pytest.fixture(scope="module")
def fused(per_region) -> dict[str, DeepRegionCNN]:
    state = per_region.state_dict()
    return {mode: _build(mode, state) for mode in ("concat", "mean", "max")}


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return [smooth_image(120, 150, seed=1), smooth_image(160, 100, seed=2)]


def _hand_fused(features: torch.Tensor, mode: str, k: int = K) -> torch.Tensor:
    """The paper's fusion of one image's ``(n, D)`` region features (score order), by hand."""
    rows = [features[i] if i < len(features) else torch.zeros(features.shape[1]) for i in range(k)]
    if mode == "concat":
        vector = torch.cat(rows)
    elif mode == "mean":
        vector = sum(features[:k]) / min(k, len(features))
    else:
        vector = features[0]
        for row in features[1:k]:
            vector = torch.maximum(vector, row)
    return vector / vector.norm()


def test_default_is_per_region_search_and_feature_dims(per_region, fused):
    default = DeepRegionCNN("small", num_classes=3, feature_layers=LAYERS)
    assert default.fusion == "none" and default.feature_dim == D
    assert per_region.feature_dim == per_region.region_feature_dim == D
    assert fused["concat"].feature_dim == K * D
    assert fused["mean"].feature_dim == fused["max"].feature_dim == D
    assert _build("concat", top_k=3).feature_dim == 3 * D


def test_none_searches_each_top_k_region_with_its_roi_feature(per_region, images):
    with torch.no_grad():
        regions = per_region.detect_regions(images)
        queries = per_region.describe_boxes(images, [r.boxes for r in regions])  # RoI features of the same boxes
        detections = per_region(images)  # the detector's own post-processing
    for region, query, det in zip(regions, queries, detections):
        assert len(region) == K and region.features.shape == (K, D)
        torch.testing.assert_close(region.boxes, det["boxes"][:K], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(region.scores, det["scores"][:K])
        torch.testing.assert_close(region.features, query, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["concat", "mean", "max"])
def test_fused_database_vector_is_the_hand_fused_top_k(mode, per_region, fused, images):
    with torch.no_grad():
        regions = per_region.detect_regions(images)
        one = fused[mode].detect_regions(images)
    for region, image_vector in zip(regions, one):
        assert torch.all(region.scores[:-1] >= region.scores[1:])  # per-region rows are in score order
        assert len(image_vector) == 1 and image_vector.features.shape == (1, fused[mode].feature_dim)
        expected = _hand_fused(region.features, mode)
        torch.testing.assert_close(image_vector.features[0], expected, atol=1e-5, rtol=1e-5)
        # the localisation of the image is its top-1 detection
        torch.testing.assert_close(image_vector.boxes, region.boxes[:1])
        torch.testing.assert_close(image_vector.scores, region.scores[:1])
        torch.testing.assert_close(image_vector.labels, region.labels[:1])
        assert image_vector.image_size == region.image_size
    if mode == "concat":  # the order matters: best region first
        swapped = _hand_fused(regions[0].features.flip(0), mode)
        assert (one[0].features[0] - swapped).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["concat", "mean", "max"])
def test_fewer_detections_than_k_are_fused_as_they_are(mode, per_region, images):
    # one detection per image for K = 2: concat zero-pads the missing region, mean / max use the one
    net = _build(mode, per_region.state_dict(), box_detections_per_img=1)
    with torch.no_grad():
        single = per_region.detect_regions(images)
        one = net.detect_regions(images)
    for region, image_vector in zip(single, one):
        top1 = region.features[0]
        expected = torch.cat([top1, torch.zeros(D)]) if mode == "concat" else top1
        torch.testing.assert_close(image_vector.features[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["concat", "mean", "max"])
def test_query_is_an_instance_image_processed_like_a_database_image(mode, per_region, fused, images):
    image = images[0]
    box = torch.tensor([[10.4, 20.6, 109.2, 99.9]])  # outer integer pixels: x 10..110, y 20..100
    crop = image[:, 20:100, 10:110]
    net = fused[mode]
    with torch.no_grad():
        query = net.describe_boxes([image], [box])[0]
        as_database = net.detect_regions([crop])[0].features
        crop_regions = per_region.detect_regions([crop])[0]
    assert query.shape == (1, net.feature_dim)
    torch.testing.assert_close(query, as_database, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(query[0], _hand_fused(crop_regions.features, mode), atol=1e-5, rtol=1e-5)
    # not the per-region description of the box itself
    with torch.no_grad():
        box_feature = per_region.describe_boxes([image], [box])[0][0]
    if mode != "concat":
        assert F.cosine_similarity(query[0], box_feature, dim=0) < 0.9999


def test_query_side_keeps_boxes_with_their_images(fused, images):
    net = fused["concat"]
    # crops of one aspect ratio reach the detector at one size, so batching them pads nothing
    boxes = [torch.tensor([[10.0, 20.0, 110.0, 100.0], [0.0, 0.0, 150.0, 120.0]]), torch.zeros(0, 4),
             torch.tensor([[0.0, 40.0, 100.0, 120.0]])]
    with torch.no_grad():
        together = net.describe_boxes([images[0], images[0], images[1]], boxes)
        alone = [net.describe_boxes([image], [box[None]])[0][0]
                 for image, box in ((images[0], boxes[0][0]), (images[0], boxes[0][1]), (images[1], boxes[2][0]))]
    assert [tuple(f.shape) for f in together] == [(2, K * D), (0, K * D), (1, K * D)]
    torch.testing.assert_close(torch.cat([together[0], together[2]]), torch.stack(alone), atol=1e-4, rtol=1e-4)


def test_every_search_option_changes_the_result(per_region, fused, images):
    with torch.no_grad():
        vectors = {mode: net.detect_regions(images[:1])[0].features[0] for mode, net in fused.items()}
        top1 = _build("mean", per_region.state_dict(), top_k=1).detect_regions(images[:1])[0].features[0]
        regions = per_region.detect_regions(images[:1])[0]
    assert len(regions) == K  # none: K searchable regions, not one
    assert (vectors["mean"] - vectors["max"]).abs().max() > 1e-3
    assert (vectors["concat"][:D] - vectors["mean"]).abs().max() > 1e-3
    assert (top1 - vectors["mean"]).abs().max() > 1e-3  # K changes the fused vector
    torch.testing.assert_close(top1, regions.features[0])  # K = 1: the top-1 region's feature


def test_fuse_top_regions_matches_per_image_fusion_for_ragged_batches():
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    counts = [3, 0, 1, 2]
    starts = [0, 3, 3, 4]
    for mode in ("concat", "mean", "max"):
        batch = fuse_top_regions(feats, counts, mode, k=2)
        for i, (start, n) in enumerate(zip(starts, counts)):
            rows = feats[start:start + n]
            expected = _hand_fused(rows, mode) if n else torch.zeros(batch.shape[1])
            torch.testing.assert_close(batch[i], expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="counts"):
        fuse_top_regions(feats, [1, 2], "mean", k=2)
