"""RoIFeaturePooler, fuse_regions and the global descriptors against hand-computed and slow
direct references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instsearch.networks.global_descriptors import GeM, MAC, RMAC, SPoC, build_global_pooling, rmac_regions, valid_mask
from torchvision.ops import roi_align

from instsearch.networks.region_features import RoIFeaturePooler, boxes_to_rois, fuse_regions, l2_concat
from slow_reference import bilinear as _bilinear


# ------------------------------------------------------------------------------------------------
# slow references
def _roi_bins_slow(fmap: torch.Tensor, box: list[float], scale: float, size: int, ratio: int) -> torch.Tensor:
    """(C, size, size) aligned RoIAlign of one box, by explicit loops."""
    x1, y1, x2, y2 = (c * scale - 0.5 for c in box)
    bin_h, bin_w = (y2 - y1) / size, (x2 - x1) / size
    out = torch.zeros(fmap.shape[0], size, size, dtype=torch.float64)
    for ph in range(size):
        for pw in range(size):
            acc = torch.zeros(fmap.shape[0], dtype=torch.float64)
            for iy in range(ratio):
                for ix in range(ratio):
                    yy = y1 + ph * bin_h + (iy + 0.5) * bin_h / ratio
                    xx = x1 + pw * bin_w + (ix + 0.5) * bin_w / ratio
                    acc += _bilinear(fmap, yy, xx)
            out[:, ph, pw] = acc / (ratio * ratio)
    return out


def _cell_max_slow(fmap: torch.Tensor, box: list[float], scale: float, mask=None) -> torch.Tensor:
    """(C,) max over the cells whose centre (j + 0.5) lies in the scaled box, by explicit loops; on
    an axis where no centre does, the row / column under the box centre. With ``mask`` (pixels of the image, an integer
    number of pixels per cell) only cells whose pixels inside the box (centre in the box) are at
    least half covered count, unless none is."""
    c, h, w = fmap.shape
    x1, y1, x2, y2 = (v * scale for v in box)
    rows = [i for i in range(h) if y1 <= i + 0.5 < y2] or [min(max(math.floor((y1 + y2) / 2), 0), h - 1)]
    cols = [j for j in range(w) if x1 <= j + 0.5 < x2] or [min(max(math.floor((x1 + x2) / 2), 0), w - 1)]
    cells = [(i, j) for i in rows for j in cols]
    if mask is not None:
        step = round(1 / scale)
        inside = []
        for i, j in cells:
            pixels = [mask[y, x].item() for y in range(i * step, (i + 1) * step) for x in range(j * step, (j + 1) * step)
                      if box[0] <= x + 0.5 < box[2] and box[1] <= y + 0.5 < box[3]]
            if pixels and sum(pixels) >= 0.5 * len(pixels):
                inside.append((i, j))
        cells = inside or cells
    best = torch.full((c,), float("-inf"), dtype=torch.float64)
    for i, j in cells:
        best = torch.maximum(best, fmap[:, i, j].double())
    return best


def _pool_slow(features, layers, boxes, image_size, pooling, size, ratio, keep=None, masks=None):
    rows = []
    for b, image_boxes in enumerate(boxes):
        for box in image_boxes.tolist():
            parts = []
            for name in layers:
                fmap = features[name][b]
                scale = fmap.shape[-1] / image_size[1]
                if pooling == "max":
                    v = _cell_max_slow(fmap, box, scale, None if masks is None else masks[len(rows)])
                    parts.append(v / v.norm())
                    continue
                bins = _roi_bins_slow(fmap, box, scale, size, ratio).flatten(1)
                k = keep[len(rows)] if keep is not None else torch.ones(bins.shape[1], dtype=torch.bool)
                v = bins[:, k].mean(dim=1)
                parts.append(v / v.norm())
            cat = torch.cat(parts)
            rows.append(cat / cat.norm())
    return torch.stack(rows).float()


@pytest.fixture
def two_layer_features():
    g = torch.Generator().manual_seed(0)
    return {"conv3": torch.rand(2, 5, 16, 16, generator=g), "conv4": torch.rand(2, 7, 8, 8, generator=g)}


# ------------------------------------------------------------------------------------------------
# RoIFeaturePooler
def test_max_pool_equals_hand_crop_of_scaled_box():
    # A box whose scaled extent is exactly cells [2, 6) x [1, 5) of a stride-4 map: with aligned
    # RoIAlign, one sample per bin and one bin per cell, the samples hit the cell centres, so the
    # pooled vector is the max over that hand-cut crop.
    fmap = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pooler = RoIFeaturePooler(["conv4"], pooling="max", output_size=4, sampling_ratio=1, normalize=False)
    box = torch.tensor([[4.0 * 1, 4.0 * 2, 4.0 * 5, 4.0 * 6]])  # x1, y1, x2, y2 in 64 px image
    out = pooler({"conv4": fmap}, [box], (64, 64))
    expected = fmap[0, :, 2:6, 1:5].amax(dim=(1, 2))
    torch.testing.assert_close(out[0], expected)


def test_avg_pool_two_layers_l2_each_then_concat_then_l2():
    g = torch.Generator().manual_seed(2)
    c3 = torch.rand(1, 4, 16, 16, generator=g)
    # conv4 is linear in the cell position, so bilinear samples are exact and their mean is the
    # value at the mean sample position, which is also the mean over the hand-cut crop.
    coef = torch.rand(3, 6, 1, 1, generator=g)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    c4 = (coef[0] + coef[1] * xs + coef[2] * ys)[None]
    # Box [16, 16, 48, 48] of a 64 px image: cells 4..12 of conv3 (stride 4), 2..6 of conv4
    # (stride 8). On conv3, two samples per bin side land on the cell centres.
    pooler = RoIFeaturePooler(["conv3", "conv4"], pooling="avg", output_size=4, sampling_ratio=2)
    out = pooler({"conv3": c3, "conv4": c4}, [torch.tensor([[16.0, 16.0, 48.0, 48.0]])], (64, 64))
    v3 = c3[0, :, 4:12, 4:12].mean(dim=(1, 2))
    v4 = c4[0, :, 2:6, 2:6].mean(dim=(1, 2))
    expected = torch.cat([v3 / v3.norm(), v4 / v4.norm()])
    torch.testing.assert_close(out[0], expected / expected.norm(), atol=1e-6, rtol=1e-5)
    assert out.shape == (1, 10)


def test_max_is_the_true_cell_maximum_not_the_max_of_bilinear_bins():
    # One hot cell on a ReLU-like map: RoIAlign bins average bilinear samples around it and never
    # reach its value; the seed's "maximum activation of the scaled ROI region" is the cell itself.
    fmap = torch.zeros(1, 1, 16, 16)
    fmap[0, 0, 5, 9] = 4.0
    box = torch.tensor([[30.0, 14.0, 50.0, 30.0]])  # stride 4: x 7.5..12.5, y 3.5..7.5 -> cells x 7..11, y 3..6
    pooler = RoIFeaturePooler(["conv3"], pooling="max", normalize=False)
    assert pooler({"conv3": fmap}, [box], (64, 64)).item() == 4.0
    bins = roi_align(fmap, torch.tensor([[0.0, 30.0, 14.0, 50.0, 30.0]]), output_size=7, spatial_scale=0.25,
                     sampling_ratio=2, aligned=True)
    assert bins.max().item() < 4.0 * 0.9
    # the cell range itself, by hand: centres 7.5..11.5 lie in [7.5, 12.5), centres 3.5..6.5 in [3.5, 7.5)
    ranges = RoIFeaturePooler.cell_ranges(torch.tensor([[0.0, 30.0, 14.0, 50.0, 30.0]]), 0.25, 16, 16)
    assert ranges.tolist() == [[7, 3, 12, 7]]
    # a box inside one cell takes that cell; a box past the map's edge is clipped to it; a thin box
    # takes the row under its centre across the columns it spans
    tiny = RoIFeaturePooler.cell_ranges(torch.tensor([[0.0, 37.0, 21.0, 38.0, 22.0], [0.0, 60.0, 60.0, 90.0, 90.0],
                                                      [0.0, 8.0, 33.0, 24.0, 34.0]]), 0.25, 16, 16)
    assert tiny.tolist() == [[9, 5, 10, 6], [15, 15, 16, 16], [2, 8, 6, 9]]


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_pooler_matches_slow_reference_on_fractional_boxes(two_layer_features, pooling):
    boxes = [torch.tensor([[3.3, 7.1, 40.2, 29.9], [0.0, 0.0, 64.0, 64.0], [50.5, 10.0, 63.9, 60.0]]),
             torch.tensor([[12.0, 31.5, 20.25, 33.0]])]
    pooler = RoIFeaturePooler(["conv3", "conv4"], pooling=pooling, output_size=3, sampling_ratio=2)
    out = pooler(two_layer_features, boxes, (64, 64))
    ref = _pool_slow(two_layer_features, ["conv3", "conv4"], boxes, (64, 64), pooling, 3, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_gem_pooling_is_the_generalised_mean_of_the_roi_bins(two_layer_features):
    """GeM over a box: (mean of the RoIAlign bins of x^p)^(1/p), from the slow RoIAlign; p = 1 is avg."""
    boxes = [torch.tensor([[3.3, 7.1, 40.2, 29.9]]), torch.tensor([[12.0, 31.5, 50.25, 63.0]])]
    gem = RoIFeaturePooler(["conv3"], pooling="gem", p=3.0, output_size=3, sampling_ratio=2, normalize=False)
    out = gem(two_layer_features, boxes, (64, 64))
    rows = []
    for b, image_boxes in enumerate(boxes):
        fmap = two_layer_features["conv3"][b].clamp(min=1e-6) ** 3
        bins = _roi_bins_slow(fmap, image_boxes[0].tolist(), 16 / 64, 3, 2).flatten(1)
        rows.append(bins.mean(dim=1) ** (1 / 3))
    torch.testing.assert_close(out, torch.stack(rows).float(), atol=1e-5, rtol=1e-5)
    avg = RoIFeaturePooler(["conv3"], pooling="avg", output_size=3, sampling_ratio=2, normalize=False)
    one = RoIFeaturePooler(["conv3"], pooling="gem", p=1.0, output_size=3, sampling_ratio=2, normalize=False)
    torch.testing.assert_close(one(two_layer_features, boxes, (64, 64)), avg(two_layer_features, boxes, (64, 64)))
    assert (out > avg(two_layer_features, boxes, (64, 64)) + 1e-4).all()  # p > 1 leans towards the maximum
    with pytest.raises(ValueError, match="p must be > 0"):
        RoIFeaturePooler(["conv3"], pooling="gem", p=0.0)


def test_pooler_handles_images_without_boxes_and_empty_batches(two_layer_features):
    pooler = RoIFeaturePooler(["conv3", "conv4"])
    boxes = [torch.zeros(0, 4), torch.tensor([[1.0, 2.0, 30.0, 40.0]])]
    out = pooler(two_layer_features, boxes, (64, 64))
    alone = pooler({k: v[1:] for k, v in two_layer_features.items()}, boxes[1:], (64, 64))
    torch.testing.assert_close(out, alone)  # the second image's box reads the second feature map
    assert pooler(two_layer_features, [torch.zeros(0, 4)] * 2, (64, 64)).shape == (0, 12)


def test_pooler_errors_name_the_problem(two_layer_features):
    with pytest.raises(KeyError, match="conv5"):
        RoIFeaturePooler(["conv5"])(two_layer_features, [torch.zeros(0, 4)] * 2, (64, 64))
    with pytest.raises(ValueError, match="1 box lists for a batch of 2"):
        RoIFeaturePooler(["conv3"])(two_layer_features, [torch.zeros(0, 4)], (64, 64))
    with pytest.raises(ValueError, match="pooling"):
        RoIFeaturePooler(["conv3"], pooling="sum")


def test_pooler_is_differentiable(two_layer_features):
    feats = {k: v.clone().requires_grad_(True) for k, v in two_layer_features.items()}
    out = RoIFeaturePooler(["conv3", "conv4"])(feats, [torch.tensor([[1.0, 2.0, 30.0, 40.0]]), torch.zeros(0, 4)],
                                                 (64, 64))
    out.sum().backward()
    assert feats["conv3"].grad[0].abs().sum() > 0 and feats["conv3"].grad[1].abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# mask pooling
def test_mask_excludes_bins_outside_the_mask():
    fmap = torch.zeros(1, 2, 16, 16)
    fmap[0, :, 4:12, 4:8] = 10.0  # strong activations in the left half of the box
    fmap[0, 0, 4:12, 8:12] = torch.arange(32.0).reshape(8, 4) / 32  # right half: known values
    fmap[0, 1, 4:12, 8:12] = 0.5
    box = torch.tensor([[16.0, 16.0, 48.0, 48.0]])  # cells 4..12 of the 16x16 (stride 4) map
    mask = torch.zeros(1, 64, 64)
    mask[0, :, 32:] = 1.0  # right half of the box (and of the image)
    pooler = RoIFeaturePooler(["conv3"], pooling="max", output_size=8, sampling_ratio=1, normalize=False)
    unmasked = pooler({"conv3": fmap}, [box], (64, 64))
    masked = pooler({"conv3": fmap}, [box], (64, 64), masks=[mask])
    torch.testing.assert_close(unmasked[0], torch.tensor([10.0, 10.0]))
    torch.testing.assert_close(masked[0], torch.tensor([31 / 32, 0.5]))
    avg = RoIFeaturePooler(["conv3"], pooling="avg", output_size=8, sampling_ratio=1, normalize=False)
    torch.testing.assert_close(avg({"conv3": fmap}, [box], (64, 64), masks=[mask])[0],
                               torch.tensor([fmap[0, 0, 4:12, 8:12].mean().item(), 0.5]))


def test_mask_matches_slow_reference_and_empty_mask_falls_back_to_box(two_layer_features):
    boxes = [torch.tensor([[3.3, 7.1, 40.2, 29.9], [10.0, 10.0, 50.0, 50.0]]), torch.tensor([[12.0, 20.0, 40.0, 60.0]])]
    masks = [torch.zeros(2, 64, 64), torch.zeros(1, 48, 56)]  # second image smaller than the batch tensor
    masks[0][0, 5:20, 0:25] = 1.0
    masks[1][0, 30:48, 20:40] = 1.0  # mask[0][1] stays empty
    pooler = RoIFeaturePooler(["conv3", "conv4"], pooling="max", output_size=4, sampling_ratio=2)
    out = pooler(two_layer_features, boxes, (64, 64), masks=masks)
    # reference: the cells inside box and mask, by loops over the zero-padded masks
    padded = [m for image_masks in masks
              for m in F.pad(image_masks, (0, 64 - image_masks.shape[2], 0, 64 - image_masks.shape[1]))]
    ref = _pool_slow(two_layer_features, ["conv3", "conv4"], boxes, (64, 64), "max", 4, 2, masks=padded)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # avg pooling resamples each mask on the RoIAlign grid (slow RoIAlign), keeping bins >= 0.5
    keep = [k if k.any() else torch.ones_like(k)
            for k in (_roi_bins_slow(m[None], box, 1.0, 4, 2).flatten() >= 0.5
                      for box, m in zip([b for bs in boxes for b in bs.tolist()], padded))]
    avg = RoIFeaturePooler(["conv3", "conv4"], pooling="avg", output_size=4, sampling_ratio=2)
    ref_avg = _pool_slow(two_layer_features, ["conv3", "conv4"], boxes, (64, 64), "avg", 4, 2, keep=keep)
    torch.testing.assert_close(avg(two_layer_features, boxes, (64, 64), masks=masks), ref_avg, atol=1e-5, rtol=1e-5)
    no_mask = pooler(two_layer_features, boxes, (64, 64))
    torch.testing.assert_close(out[1], no_mask[1])  # empty mask -> whole box
    assert not torch.allclose(out[0], no_mask[0])


def test_mask_shape_errors(two_layer_features):
    pooler = RoIFeaturePooler(["conv3"])
    boxes = [torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.zeros(0, 4)]
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        pooler(two_layer_features, boxes, (64, 64), masks=[torch.zeros(2, 64, 64), torch.zeros(0, 64, 64)])
    with pytest.raises(ValueError, match="larger than the image tensor"):
        pooler(two_layer_features, boxes, (64, 64), masks=[torch.zeros(1, 80, 64), torch.zeros(0, 64, 64)])


# ------------------------------------------------------------------------------------------------
# helpers and fusion
def test_boxes_to_rois_and_l2_concat():
    rois = boxes_to_rois([torch.tensor([[1.0, 2, 3, 4]]), torch.zeros(0, 4), torch.tensor([[5.0, 6, 7, 8]] * 2)])
    torch.testing.assert_close(rois[:, 0], torch.tensor([0.0, 2.0, 2.0]))
    torch.testing.assert_close(rois[0, 1:], torch.tensor([1.0, 2, 3, 4]))
    out = l2_concat([torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0, 0.0]])])
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8, 0.0, 1.0, 0.0]]) / math.sqrt(2))


def test_fuse_regions_modes():
    f = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    torch.testing.assert_close(fuse_regions(f, "concat"), torch.tensor([1.0, 0, 0, 0, 0.6, 0.8]) / math.sqrt(2))
    torch.testing.assert_close(fuse_regions(f, "mean"), torch.tensor([0.5, 0.3, 0.4]) / math.sqrt(0.5))
    torch.testing.assert_close(fuse_regions(f, "max"), torch.tensor([1.0, 0.6, 0.8]) / math.sqrt(2))
    # fewer regions than K: concat zero-pads to K*D; more: keeps the first K (best first)
    torch.testing.assert_close(fuse_regions(f[:1], "concat", k=3), torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(fuse_regions(f, "max", k=1), torch.tensor([1.0, 0.0, 0.0]))
    assert fuse_regions(torch.zeros(0, 3), "concat", k=2).shape == (6,)
    assert fuse_regions(torch.zeros(0, 3), "mean", k=2).shape == (3,)
    with pytest.raises(ValueError, match="mode"):
        fuse_regions(f, "sum")


# ------------------------------------------------------------------------------------------------
# global descriptors
@pytest.fixture
def relu_maps():
    return torch.rand(3, 8, 5, 7, generator=torch.Generator().manual_seed(3))


def test_gem_p1_is_spoc_and_large_p_tends_to_mac(relu_maps):
    torch.testing.assert_close(GeM(p=1.0)(relu_maps), SPoC()(relu_maps))
    mac = MAC()(relu_maps)
    torch.testing.assert_close(mac, F.normalize(relu_maps.amax(dim=(2, 3)), dim=1))
    err = [(GeM(p=p)(relu_maps.double()) - mac.double()).abs().max().item() for p in (3.0, 20.0, 200.0)]
    assert err[0] > err[1] > err[2] and err[2] < 0.01


def test_gem_matches_formula_and_learnable_p_gets_gradient(relu_maps):
    expected = relu_maps.clamp_min(1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(GeM()(relu_maps), F.normalize(expected, dim=1))
    gem = GeM(p=3.0, learnable=True)
    gem(relu_maps)[:, 0].sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0
    assert "p" not in dict(GeM().named_parameters()) and "p" in GeM().state_dict()


@pytest.mark.parametrize("pool", [GeM(), MAC(), SPoC(), RMAC()], ids=["gem", "mac", "spoc", "rmac"])
def test_valid_mask_ignores_padding(relu_maps, pool):
    # image 0 covers 3x4 cells of the 5x7 padded map; padding holds huge values that must not count
    padded = relu_maps.clone()
    valid = valid_mask([(24, 30), (40, 56), (40, 56)], (40, 56), (5, 7))
    assert valid[0].sum() == 3 * 4 and valid[1].all()
    padded[0][:, ~valid[0]] = 100.0
    out = pool(padded, valid)
    torch.testing.assert_close(out[0], pool(relu_maps[:1, :, :3, :4])[0])
    torch.testing.assert_close(out[1:], pool(relu_maps[1:]))


def _rmac_slow(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """R-MAC by the reference loop (Radenovic et al.'s cirtorch ``rmac``), one image."""
    ovr, steps = 0.4, torch.tensor([2.0, 3, 4, 5, 6, 7])
    h, w = x.shape[-2:]
    side = min(w, h)
    b = (max(h, w) - side) / (steps - 1)
    idx = torch.argmin(torch.abs(((side ** 2 - side * b) / side ** 2) - ovr)).item()
    wd = idx + 1 if h < w else 0
    hd = idx + 1 if h > w else 0
    v = F.normalize(x.amax(dim=(-2, -1)), dim=-1)
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        wl2 = math.floor(wl / 2 - 1)
        bw = 0 if level + wd == 1 else (w - wl) / (level + wd - 1)
        bh = 0 if level + hd == 1 else (h - wl) / (level + hd - 1)
        cen_w = [math.floor(wl2 + i * bw) - wl2 for i in range(level + wd)]
        cen_h = [math.floor(wl2 + i * bh) - wl2 for i in range(level + hd)]
        for i_ in cen_h:
            for j_ in cen_w:
                v = v + F.normalize(x[..., i_:i_ + wl, j_:j_ + wl].amax(dim=(-2, -1)), dim=-1)
    return F.normalize(v, dim=-1)


@pytest.mark.parametrize("size", [(5, 7), (9, 6), (6, 6), (12, 30)])
def test_rmac_matches_reference_loop(size):
    x = torch.rand(2, 4, *size, generator=torch.Generator().manual_seed(4))
    out = RMAC()(x)
    torch.testing.assert_close(out, torch.stack([_rmac_slow(xi) for xi in x]))
    assert len(rmac_regions(*size)) > 1 + 1  # full map + level-1 region(s) + ...


def test_build_global_pooling():
    assert isinstance(build_global_pooling("GeM", p=4.0), GeM)
    assert isinstance(build_global_pooling("mac"), MAC)
    with pytest.raises(ValueError, match="unknown global pooling"):
        build_global_pooling("crow")
