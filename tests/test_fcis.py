"""FCIS: assembling, scores, losses, training / inference of the four variants, instance features."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, ps_roi_align

from instsearch.structures import RegionSearchModel
from instsearch.losses.fcis import FCISLoss, fcis_box_loss, fcis_class_loss, fcis_mask_loss, ohem_select
from instsearch.networks.fcis import FCIS, FCISHeadOutput, PositionSensitiveHead, build_fcis, build_mask_rcnn, fcis_scores
from instsearch.networks.ps_roi import ps_roi_assemble, resample_masks
from instsearch.networks.resnet import DeformableConv2d
from slow_reference import bilinear


# ------------------------------------------------------------------------------------ slow references
def _bilinear(fmap, y, x):
    """torchvision RoIAlign's bilinear sample of a 2-D map."""
    return float(bilinear(fmap[None], y, x)[0])


def _assemble_reference(maps, rois, k, size, scale, sr):
    """FCIS assembling by its definition: output cell (u, v) of the S x S RoI grid averages sr x sr
    bilinear samples of channel g * k^2 + (u // (S/k)) * k + (v // (S/k))."""
    m = size // k
    groups = maps.shape[1] // (k * k)
    out = torch.zeros(rois.shape[0], groups, size, size)
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = x1 * scale - 0.5, y1 * scale - 0.5, x2 * scale - 0.5, y2 * scale - 0.5
        cw, ch = (x2 - x1) / size, (y2 - y1) / size
        for g in range(groups):
            for u in range(size):
                for v in range(size):
                    channel = g * k * k + (u // m) * k + (v // m)
                    acc = 0.0
                    for iy in range(sr):
                        for ix in range(sr):
                            acc += _bilinear(maps[int(b), channel], y1 + u * ch + (iy + 0.5) * ch / sr,
                                             x1 + v * cw + (ix + 0.5) * cw / sr)
                    out[r, g, u, v] = acc / (sr * sr)
    return out


def _resample_reference(mask, src, dst, size):
    """Zero-extended bilinear sample of ``mask`` (over box src) at the cell centres of box dst."""
    n = mask.shape[0]
    padded = F.pad(mask, (1, 1, 1, 1))
    out = torch.zeros(size, size)
    for u in range(size):
        for v in range(size):
            px = dst[0] + (v + 0.5) * (dst[2] - dst[0]) / size
            py = dst[1] + (u + 0.5) * (dst[3] - dst[1]) / size
            gx = (px - src[0]) / (src[2] - src[0]) * n - 0.5 + 1  # +1: the zero border
            gy = (py - src[1]) / (src[3] - src[1]) * n - 0.5 + 1
            if gx < 0 or gy < 0 or gx > n + 1 or gy > n + 1:
                continue
            out[u, v] = _bilinear(padded, gy, gx)
    return out


# ------------------------------------------------------------------------------------ position-sensitive ops
def test_assembling_matches_slow_reference():
    torch.manual_seed(0)
    k, size, groups = 2, 4, 3
    maps = torch.randn(2, groups * k * k, 6, 7)
    rois = torch.tensor([[0, 2.0, 3.0, 20.0, 17.0], [1, -3.0, 1.0, 9.0, 26.0], [0, 5.0, 5.0, 8.0, 7.0]])
    ours = ps_roi_assemble(maps, rois, k, size, spatial_scale=0.5, sampling_ratio=2)
    torch.testing.assert_close(ours, _assemble_reference(maps, rois, k, size, 0.5, 2), atol=1e-5, rtol=1e-5)


def test_assembling_at_group_size_is_ps_roi_align():
    torch.manual_seed(1)
    k = 3
    maps = torch.randn(1, 5 * k * k, 12, 10)
    rois = torch.tensor([[0, 3.0, 5.0, 60.0, 70.0], [0, 10.0, 2.0, 90.0, 40.0]])
    torch.testing.assert_close(ps_roi_assemble(maps, rois, k, k, 1 / 8, 2), ps_roi_align(maps, rois, k, 1 / 8, 2),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ps_roi_assemble(maps, rois, k, 8, 1 / 8)


def test_assembling_gradient_matches_slow_reference():
    """Assembling is linear in the maps, so its gradient g for output weights w must satisfy
    <ref(x), w> = <x, g> for every map x, with ref the slow definition."""
    torch.manual_seed(3)
    maps = torch.randn(2, 2 * 4, 5, 6, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 40.0, 40.0], [1, 4.0, 6.0, 30.0, 22.0]])
    weights = torch.randn(2, 2, 4, 4)
    (ps_roi_assemble(maps, rois, 2, 4, 1 / 8) * weights).sum().backward()
    grad = maps.grad
    for _ in range(3):
        probe = torch.randn_like(grad)
        expected = float((_assemble_reference(probe, rois, 2, 4, 1 / 8, 2) * weights).sum())
        assert float((probe * grad).sum()) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert (grad[0, 4:].abs().sum(dim=(1, 2)) > 0).all()  # every bin's channel of group 1 receives gradient


def test_resample_masks_identity_and_reference():
    torch.manual_seed(2)
    masks = torch.rand(3, 5, 5)
    src = torch.tensor([[10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 5.0, 5.0], [3.0, 4.0, 13.0, 24.0]])
    torch.testing.assert_close(resample_masks(masks, src, src), masks)
    dst = torch.tensor([[15.0, 5.0, 40.0, 25.0], [1.0, 1.0, 3.0, 4.0], [-5.0, 0.0, 20.0, 30.0]])
    ours = resample_masks(masks, src, dst, output_size=4)
    for p in range(3):
        ref = _resample_reference(masks[p], src[p].tolist(), dst[p].tolist(), 4)
        torch.testing.assert_close(ours[p], ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ FCIS equations
def test_class_score_and_mask_probability_hand_case():
    # One RoI, classes {bg, 1}, a 2x2 grid; inside maps then outside maps.
    inside = torch.tensor([[[0.0, 1.0], [2.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]])
    outside = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [-1.0, 4.0]]])
    assembled = torch.cat([inside, outside])[None]  # (1, 4, 2, 2)
    class_logits, mask_logits = fcis_scores(assembled, num_classes=2)
    # bg: max = [[1, 1], [2, 0]] -> 1.0 ; class 1: max = [[3, 2], [1, 4]] -> 2.5
    torch.testing.assert_close(class_logits, torch.tensor([[1.0, 2.5]]))
    probs = F.softmax(class_logits, dim=1)
    torch.testing.assert_close(probs[0, 1], torch.tensor(math.exp(2.5) / (math.exp(1.0) + math.exp(2.5))))
    # mask probability = softmax(inside, outside)[inside], e.g. class 1 top-right: e^0 / (e^0 + e^2)
    prob = torch.sigmoid(mask_logits)
    torch.testing.assert_close(prob[0, 1, 0, 1], torch.tensor(1.0 / (1.0 + math.exp(2.0))))
    two_way = F.softmax(torch.stack([inside, outside]), dim=0)[0]
    torch.testing.assert_close(prob[0], two_way)


def test_head_channel_layout():
    head = PositionSensitiveHead(in_channels=32, num_classes=4, group_size=3, mid_channels=16)
    scores, boxes = head(torch.randn(1, 32, 5, 5))
    assert scores.shape == (1, 2 * 9 * 4, 5, 5) and boxes.shape == (1, 4 * 9, 5, 5)


# ------------------------------------------------------------------------------------ losses
def test_class_loss_hand_case():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    expected = [-math.log(math.exp(2) / (math.exp(2) + 2)), -math.log(math.e / (math.e + 2))]
    torch.testing.assert_close(fcis_class_loss(logits, labels, "none"), torch.tensor(expected))
    torch.testing.assert_close(fcis_class_loss(logits, labels), torch.tensor(sum(expected) / 2))


def test_box_loss_hand_case():
    deltas = torch.tensor([[0.5, 0.0, 2.0, 0.0], [9.0, 9.0, 9.0, 9.0], [0.0, -1.0, 0.0, 0.0]])
    targets = torch.zeros(3, 4)
    labels = torch.tensor([3, 0, 1])  # the background RoI's deltas do not count
    # smooth-L1 (beta 1): 0.5 -> 0.125, 2 -> 1.5, 1 -> 0.5
    torch.testing.assert_close(fcis_box_loss(deltas, targets, labels, 1.0, "none"), torch.tensor([1.625, 0.0, 0.5]))
    torch.testing.assert_close(fcis_box_loss(deltas, targets, labels), torch.tensor((1.625 + 0.5) / 3))
    # beta 1/9: |0.5| > 1/9 -> 0.5 - 1/18
    torch.testing.assert_close(fcis_box_loss(deltas[:1, :1], targets[:1, :1], labels[:1], 1 / 9, "none"),
                               torch.tensor([0.5 - 1 / 18]))


def test_mask_loss_hand_case():
    # Two RoIs, classes {bg, 1, 2}, 1x2 masks. RoI 0 is class 2, RoI 1 background (ignored).
    inside = torch.zeros(2, 3, 1, 2)
    outside = torch.zeros(2, 3, 1, 2)
    inside[0, 2] = torch.tensor([[2.0, 0.0]])
    outside[0, 2] = torch.tensor([[0.0, 1.0]])
    inside[0, 1] = 100.0  # another class's maps must not matter
    targets = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    labels = torch.tensor([2, 0])
    # pixel 1: target inside, p_in = e^2/(e^2+1); pixel 2: target outside, p_out = e^1/(e^0+e^1)
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    loss = fcis_mask_loss(inside - outside, targets, labels)
    torch.testing.assert_close(loss, torch.tensor(expected))
    torch.testing.assert_close(fcis_mask_loss(inside - outside, targets, labels, "none"), torch.tensor([expected, 0.0]))
    assert fcis_mask_loss(inside - outside, targets, torch.tensor([0, 0])) == 0


def test_ohem_select_and_loss_on_subset():
    per_roi = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7])
    index = ohem_select(per_roi, [4, 3], keep_per_image=2)
    assert index.tolist() == [1, 2, 4, 6]
    assert ohem_select(per_roi, [1, 6], keep_per_image=3).tolist() == [0, 1, 4, 6]

    torch.manual_seed(0)
    r, c1, s = 7, 3, 4
    logits, deltas, masks = torch.randn(r, c1), torch.randn(r, 4), torch.randn(r, c1, s, s)
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 0])
    reg, mtarget = torch.randn(r, 4), (torch.rand(r, s, s) > 0.5).float()
    loss = FCISLoss()
    full = loss(logits[index], deltas[index], masks[index], labels[index], reg[index], mtarget[index])
    sub = loss(logits, deltas, masks, labels, reg, mtarget, index=index)
    for key in ("loss_classifier", "loss_box_reg", "loss_mask"):
        torch.testing.assert_close(full[key], sub[key])
    # per RoI, written out from the definitions: -log softmax of the label, smooth-L1 (beta 1)
    # summed over the four coordinates and the pixel mean of the 2-way (logistic) mask loss of the
    # label's channel, both for foreground RoIs only
    per = loss.per_roi(logits, deltas, masks, labels, reg, mtarget)
    expected = []
    for i in range(r):
        y = int(labels[i])
        value = -(logits[i, y] - logits[i].exp().sum().log())
        if y > 0:
            d = (deltas[i] - reg[i]).abs()
            value = value + torch.where(d < 1.0, 0.5 * d * d, d - 0.5).sum()
            p_in = torch.sigmoid(masks[i, y])
            t = mtarget[i]
            value = value - (t * p_in.log() + (1 - t) * (1 - p_in).log()).mean()
        expected.append(value)
    torch.testing.assert_close(per, torch.stack(expected), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ the network
def _tiny(variant="fcis_xd", **kw):
    arch = "resnext26_32x4d" if variant in ("fcis_x", "fcis_xd") else "resnet26"
    args = dict(num_classes=3, backbone=arch, min_size=64, max_size=96, anchor_sizes=(16, 32, 64),
                rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=40, rpn_pre_nms_top_n_test=200,
                rpn_post_nms_top_n_test=40, roi_batch_size_per_image=16, head_channels=64, group_size=3,
                mask_size=9)
    args.update(kw)
    torch.manual_seed(0)
    return build_fcis(variant, **args)


def _data():
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = []
    for im in images:
        h, w = im.shape[-2:]
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:40, 8:30] = 1
        masks[1, 30:60, 35:60] = 1
        targets.append(dict(boxes=torch.tensor([[8.0, 10, 30, 40], [35, 30, 60, 60]]), labels=torch.tensor([1, 2]),
                            masks=masks))
    return images, targets


@pytest.mark.parametrize("variant", ["fcis", "fcis_d", "fcis_x", "fcis_xd"])
def test_variants_forward_backward(variant):
    net = _tiny(variant)
    body = net.backbone.body
    assert isinstance(body.layer4[-1].conv2, DeformableConv2d) == variant.endswith("d")
    assert body.layer4[0].conv2.groups == (32 if variant in ("fcis_x", "fcis_xd") else 1)
    images, targets = _data()
    net.train()
    losses = net(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for module in (net.head.cls_seg, net.head.bbox, net.rpn.head.conv, body.layer4[-1].conv2):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    if variant.endswith("d"):
        assert body.layer4[-1].conv2.conv_offset.weight.grad is not None
    assert body.conv1.weight.grad is None and body.layer1[0].conv1.weight.grad is None  # frozen conv1, res2


def test_fcis_xd_small_config_is_fcis_xd_at_cpu_size_and_trains_every_stage():
    """configs/fcis_xd_small.yaml: the same FCIS+XD code (grouped 3x3 convs, deformable res5, dilated
    conv5 at stride 16) on the narrow ResNeXt, every stage trained from random initialisation."""
    import yaml
    from pathlib import Path

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "fcis_xd_small.yaml").read_text())
    args = dict(config["model"]["init_args"]["net"]["init_args"], min_size=64, max_size=96)
    torch.manual_seed(0)
    net = FCIS(**args)
    body = net.backbone.body
    assert all(isinstance(b.conv2, DeformableConv2d) for b in body.layer4)
    assert {b.conv2.groups for layer in (body.layer1, body.layer2, body.layer3, body.layer4) for b in layer} == {8}
    assert net.backbone.feature_info.stride("conv5") == 16 and net.feature_dim == 128 + 256
    images, targets = _data()
    net.train()
    sum(net(images, [dict(t, labels=t["labels"] + 3) for t in targets]).values()).backward()
    assert body.conv1.weight.grad.abs().sum() > 0 and body.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_full_size_head_dimensions():
    net = FCIS(num_classes=81, backbone="resnet26", deformable=False)
    assert net.head.cls_seg.out_channels == 2 * 7 * 7 * 81 and net.head.bbox.out_channels == 4 * 7 * 7
    assert net.head.reduce.in_channels == 2048 and net.head.reduce.out_channels == 1024
    assert net.rpn.anchor_generator.num_anchors_per_location() == [12]
    assert net.mask_size == 21 and net.feature_dim == 1536
    assert net.rpn.head.conv.in_channels == 1024 and net.rpn.head.conv.out_channels == 512


@pytest.mark.parametrize("sampling", ["balanced", "ohem"])
def test_training_roi_selection(sampling):
    net = _tiny("fcis", roi_sampling=sampling, roi_batch_size_per_image=8)
    _, targets = _data()
    proposals = [torch.tensor([[8.0, 10, 30, 41], [0, 0, 10, 10], [36, 30, 60, 59], [50, 50, 63, 63]]),
                 torch.tensor([[1.0, 1, 5, 5]])]
    rois, labels, reg, masks, counts = net.select_training_rois(proposals, targets)
    if sampling == "ohem":
        assert counts == [6, 3]  # every candidate (proposals + gt boxes); OHEM picks among them later
    else:
        assert counts == [4, 3]  # at most 8 * 0.25 = 2 foreground per image, plus the 2 / 1 background
    n = sum(counts)
    assert rois.shape == (n, 5) and rois[: counts[0], 0].eq(0).all() and rois[counts[0]:, 0].eq(1).all()
    assert int((labels[: counts[0]] > 0).sum()) == (4 if sampling == "ohem" else 2)
    # Order within an image can be permuted by the sampler; check each RoI by its box.
    for i in range(n):
        box = rois[i, 1:]
        gt = targets[int(rois[i, 0])]
        ious = box_iou(box[None], gt["boxes"])[0]
        best = int(ious.argmax())
        if ious[best] >= 0.5:
            assert labels[i] == gt["labels"][best]
            if torch.equal(box, gt["boxes"][best]):  # the gt box itself: zero deltas, full mask
                torch.testing.assert_close(reg[i], torch.zeros(4))
                assert masks[i].eq(1).all()
        else:
            assert labels[i] == 0 and masks[i].eq(0).all()
    net.train()
    losses = net(*_data())
    assert torch.isfinite(sum(losses.values()))


def test_training_with_background_only_image():
    net = _tiny("fcis")
    images, targets = _data()
    targets[1] = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                      masks=torch.zeros(0, 72, 64, dtype=torch.uint8))
    net.train()
    losses = net(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_target_validation_names_the_entry():
    net = _tiny("fcis").train()
    images, targets = _data()
    targets[1]["labels"] = torch.tensor([1, 3])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must lie in 1..2"):
        net(images, targets)
    images, targets = _data()
    targets[0]["masks"] = targets[0]["masks"][:, :10]
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\] must be \(2, 64, 80\)"):
        net(images, targets)
    with pytest.raises(ValueError, match="needs targets"):
        net(images)


def test_inference_outputs():
    net = _tiny("fcis_xd").eval()
    images, _ = _data()
    with torch.no_grad():
        out = net(images)
    for det, im in zip(out, images):
        h, w = im.shape[-2:]
        n = det["boxes"].shape[0]
        assert 0 < n <= net.detections_per_img
        assert det["masks"].shape == (n, 1, h, w)
        assert det["masks"].min() >= 0 and det["masks"].max() <= 1
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()
        assert det["labels"].min() >= 1 and det["labels"].max() <= 2
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


def test_postprocess_nms_and_mask_voting_hand_case():
    net = _tiny("fcis", box_score_thresh=0.05, mask_size=3)
    frames = torch.tensor([[0.0, 0, 30, 30], [0.0, 0, 30, 30], [1.0, 0, 31, 30], [0.0, 0, 30, 30]])
    boxes = frames.clone()
    # classes {bg, 1, 2}: candidates 0-2 vote for class 1, candidate 3 is class 2 at the same place
    probs = torch.tensor([[0.1, 0.9, 0.0], [0.4, 0.6, 0.0], [0.7, 0.3, 0.0], [0.2, 0.0, 0.8]])
    logits = torch.full((4, 3, 3, 3), -30.0)
    logits[0, 1] = 30.0  # candidate 0: all inside for class 1
    logits[1, 1] = -30.0  # candidate 1: all outside
    logits[3, 2] = 30.0
    boxes[2] = torch.tensor([100.0, 100, 130, 130])  # far away: does not vote, survives NMS
    det = net.postprocess_candidates(frames, boxes, probs, logits)
    # class-wise NMS: class 2's box is not suppressed by class 1's identical box
    assert det["labels"].tolist() == [1, 2, 1] and torch.allclose(det["scores"], torch.tensor([0.9, 0.8, 0.3]))
    voted = det["masks"][0, 0]
    torch.testing.assert_close(voted, torch.full((3, 3), 0.9 / (0.9 + 0.6)))
    torch.testing.assert_close(det["masks"][1, 0], torch.ones(3, 3))
    net.mask_voting = False
    det = net.postprocess_candidates(frames, boxes, probs, logits)
    torch.testing.assert_close(det["masks"][0, 0], torch.ones(3, 3))


# ------------------------------------------------------------------------------------ instance search
def test_detect_regions_features_and_protocol():
    net = _tiny("fcis_xd", region_score_thresh=0.0).eval()
    assert isinstance(net, RegionSearchModel)
    images, _ = _data()
    regions = net.detect_regions(images)
    for r, im in zip(regions, images):
        assert r.features.shape == (len(r), 1536)  # conv3 (512) + conv4 (1024), the paper's 1536-D
        torch.testing.assert_close(r.features.norm(dim=1), torch.ones(len(r)))
        assert r.masks.shape == (len(r), *im.shape[-2:])
        assert r.labels.min() >= 1 and r.labels.max() <= 2
    # The query side pools the same feature for the same boxes.
    again = net.describe_boxes(images, [r.boxes for r in regions])
    for r, f in zip(regions, again):
        torch.testing.assert_close(f, r.features, atol=1e-4, rtol=1e-4)
    labels = net.classify_boxes(images, [r.boxes[:3] for r in regions])
    assert [lbl.shape for lbl in labels] == [(3,), (3,)] and all(((lbl >= 1) & (lbl <= 2)).all() for lbl in labels)


def test_region_threshold_keeps_at_least_one_and_search_never_switches_mode():
    net = _tiny("fcis", region_score_thresh=1.1, min_regions=1).eval()
    images = _data()[0]
    regions = net.detect_regions(images)
    assert [len(r) for r in regions] == [1, 1]
    net.train()  # the caller's job is to switch to eval mode; the network refuses rather than switching
    for call in (lambda: net.detect_regions(images), lambda: net.describe_boxes(images, [r.boxes for r in regions]),
                 lambda: net.classify_boxes(images, [r.boxes for r in regions])):
        with pytest.raises(RuntimeError, match="eval mode"):
            call()
        assert net.training


@pytest.mark.parametrize("layers,dim", [(["conv5"], 2048), (["conv2", "conv4"], 1280), (["conv4", "conv5"], 3072)])
def test_feature_layers_are_selectable(layers, dim):
    net = _tiny("fcis", feature_layers=layers, region_score_thresh=0.0, region_masks=False).eval()
    regions = net.detect_regions(_data()[0])
    assert regions[0].features.shape[1] == dim == net.feature_dim
    assert regions[0].masks is None


def _force_masks(net, value_fn):
    """Replace the predicted mask logits by value_fn(shape) to test pooling inside masks."""
    original = net.head_outputs

    def patched(maps, rois, width):
        out = original(maps, rois, width)
        return FCISHeadOutput(out.class_logits, value_fn(out.mask_logits), out.box_deltas)

    net.head_outputs = patched


def _force_detection_masks(net, value_fn):
    """Replace the masks of the final detections (in their box frames) by value_fn(masks)."""
    original = net.postprocess_candidates

    def patched(*args):
        det = original(*args)
        return {**det, "masks": value_fn(det["masks"])}

    net.postprocess_candidates = patched


def _left_half(m, inside=20.0, outside=-20.0):
    out = torch.full_like(m, outside)
    out[..., : m.shape[-1] // 2] = inside
    return out


def test_pool_in_mask_query_side():
    images, _ = _data()
    boxes = [torch.tensor([[4.0, 6, 50, 40]]), torch.tensor([[10.0, 5, 60, 70], [0.0, 0, 64, 72]])]
    net = _tiny("fcis").eval()
    net.pooler.normalize = False  # compare raw maxima
    box_feats = net.describe_boxes(images, boxes)
    net.pool_in_mask = True
    _force_masks(net, lambda m: torch.full_like(m, 20.0))  # every pixel inside: same as the box
    for a, b in zip(net.describe_boxes(images, boxes), box_feats):
        torch.testing.assert_close(a, b)
    _force_masks(net, _left_half)
    for a, b in zip(net.describe_boxes(images, boxes), box_feats):
        assert (a <= b + 1e-6).all() and (a < b - 1e-6).any()  # max over a subset of the bins


def test_pool_in_mask_database_side():
    images, _ = _data()
    net = _tiny("fcis", region_score_thresh=0.0, min_size=128, max_size=192).eval()  # boxes of >= 8 px per bin
    net.pooler.normalize = False
    box_regions = net.detect_regions(images)
    net.pool_in_mask = True
    _force_detection_masks(net, torch.ones_like)
    big = [((r.boxes[:, 2:] - r.boxes[:, :2]).min(dim=1).values >= 8) for r in box_regions]
    for a, b, keep in zip(net.detect_regions(images), box_regions, big):
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.features[keep], b.features[keep])
    _force_detection_masks(net, lambda m: _left_half(m, 1.0, 0.0))
    for a, b in zip(net.detect_regions(images), box_regions):
        assert (a.features <= b.features + 1e-6).all() and (a.features < b.features - 1e-6).any()


def test_mask_rcnn_comparison_model():
    images, targets = _data()
    torch.manual_seed(0)
    net = build_mask_rcnn("resnet26", num_classes=3, level="conv4", min_size=64, max_size=96,
                          representation_size=32, region_score_thresh=0.0,
                          rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=20, rpn_pre_nms_top_n_test=100,
                          rpn_post_nms_top_n_test=20, box_batch_size_per_image=32, box_detections_per_img=10)
    assert isinstance(net, RegionSearchModel)
    assert sum(1 for k in net.state_dict() if k.startswith("model.backbone.body.body.conv1")) == 1
    net.train()
    losses = net(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    sum(losses.values()).backward()
    net.eval()
    regions = net.detect_regions(images)
    assert all(r.features.shape[1] == 1536 for r in regions)
    feats = net.describe_boxes(images, [r.boxes[:2] for r in regions])
    for r, f in zip(regions, feats):
        torch.testing.assert_close(f, r.features[:2], atol=1e-4, rtol=1e-4)
    labels = net.classify_boxes(images, [r.boxes[:2] for r in regions])
    assert all(((lbl >= 1) & (lbl <= 2)).all() for lbl in labels)
    net.pool_in_mask = True
    assert net.describe_boxes(images, [r.boxes[:2] for r in regions])[0].shape == (2, 1536)


def test_build_fcis_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown FCIS variant 'fcis_z'"):
        build_fcis("fcis_z")
    with pytest.raises(ValueError, match="feature_layers"):
        FCIS(num_classes=3, backbone="resnet26", feature_layers=["conv1"])


def test_bf16_autocast_train_and_eval():
    """Mixed precision: deformable conv and the position-sensitive ops run, proposals stay float32."""
    net = _tiny("fcis_xd")
    images, targets = _data()
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = net(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert net.backbone.body.layer4[-1].conv2.conv_offset.weight.grad is not None
    net.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image_list, features = net.encode(images)
        proposals, _ = net.rpn(image_list, {"conv4": features["conv4"]})
        out = net(images)
    assert all(p.dtype == torch.float32 for p in proposals)
    assert all(d["boxes"].dtype == torch.float32 and d["masks"].shape[0] == d["boxes"].shape[0] for d in out)
