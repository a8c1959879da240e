"""DASR / DASR*: the probabilistic back-propagation against an independent per-peak implementation,
peak finding, thresholds and ellipse boxes on hand-built cases, the search network's contract,
VLAD against a direct computation, and `instsearch test` of the training-free config.
"The public code" is the authors' DASR code
(https://github.com/wlzhao22/DASR, commit e71d16743e1bdf764d5fd178c43f080264a55577)."""
from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config_runs import CONFIGS, load_config, run_shipped_config

from instsearch.networks.dasr import (DASR, above_mean_positions, ellipse_boxes, local_maxima, peak_response_maps,
                                      pixel_moments, threshold_maps)
from instsearch.networks.staged import FeatureInfo, StageInfo, StagedBackbone


# ---------------------------------------------------------------------- back-propagation
class TinyCNN(nn.Module):
    """conv-BN-ReLU-maxpool-conv(stride 2)-ReLU-conv1x1-ReLU, then the channel mean (X̄)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 5, 1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2, self.conv3):
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            self.bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
            self.bn.bias.copy_(torch.randn(4, generator=g) * 0.1)
            self.bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        self.eval()

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return x.mean(dim=1, keepdim=True)


def _rule(conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The public code's convolution rule written out: (A - min A) * W⁺ᵀ (g / Z), 0 where Z < 1e-10."""
    s = a - a.min()
    wp = conv.weight.clamp(min=0)
    z = F.conv2d(s, wp, None, conv.stride, conv.padding)
    ratio = g / (z.abs() + 1e-10)
    ratio[z < 1e-10] = 0
    return s * torch.nn.grad.conv2d_input(a.shape, wp, ratio, conv.stride, conv.padding)


def slow_peak_map(net: TinyCNN, image: torch.Tensor, y: int, x: int) -> torch.Tensor:
    """One peak of one image, layer by layer by hand (no autograd): the reference."""
    with torch.no_grad():
        a1 = image[None]
        z1 = net.conv1(a1)
        b1 = net.bn(z1)
        r1 = torch.relu(b1)
        p1, idx = F.max_pool2d(r1, 2, return_indices=True)
        z2 = net.conv2(p1)
        r2 = torch.relu(z2)
        z3 = net.conv3(r2)
        g = torch.zeros_like(z3)
        g[0, :, y, x] = 1.0 / z3.shape[1]  # the channel mean
        g = g * (z3 > 0)
        g = _rule(net.conv3, r2, g)
        g = g * (z2 > 0)
        g = _rule(net.conv2, p1, g)
        g = F.max_unpool2d(g, idx, 2, output_size=r1.shape[-2:])
        g = g * (b1 > 0)
        g = g * (net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps))[None, :, None, None]
        g = _rule(net.conv1, a1, g)
        return g[0].sum(0).clamp(min=0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyCNN(), torch.randn(2, 3, 16, 20)


def _all_positions(net, images):
    with torch.no_grad():
        h, w = net(images).shape[-2:]
    b, y, x = torch.meshgrid(torch.arange(len(images)), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([b.flatten(), y.flatten(), x.flatten()], 1)


@pytest.mark.parametrize("strategy", ["batched", "sequential"])
def test_peak_response_maps_equal_the_per_peak_reference(tiny, strategy):
    net, images = tiny
    peaks = _all_positions(net, images)  # every position of both images, in chunks of 7
    got = peak_response_maps(net, images, peaks, chunk_size=7, strategy=strategy)
    expected = torch.stack([slow_peak_map(net, images[b], y, x) for b, y, x in peaks.tolist()])
    assert got.shape == (len(peaks), 16, 20)
    assert expected.amax() > 0 and (expected.flatten(1).amax(1) > 0).float().mean() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_single_peak_and_peak_order(tiny):
    net, images = tiny
    peaks = torch.tensor([[1, 3, 2], [0, 1, 4]])
    got = peak_response_maps(net, images, peaks)
    torch.testing.assert_close(got[0], slow_peak_map(net, images[1], 3, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], slow_peak_map(net, images[0], 1, 4), rtol=1e-5, atol=1e-6)
    single = peak_response_maps(net, images, peaks[1:])
    torch.testing.assert_close(single[0], got[1])


def test_the_rule_is_not_the_plain_gradient(tiny):
    net, images = tiny
    peaks = torch.tensor([[0, 2, 2]])
    rule = peak_response_maps(net, images, peaks)
    x = images[:1].clone().requires_grad_(True)
    out = net(x)
    out[0, 0, 2, 2].backward()
    plain = x.grad[0].sum(0).clamp(min=0)
    torch.testing.assert_close(peak_response_maps(net, images, peaks, rule="gradient")[0], plain)
    assert not torch.allclose(rule[0], plain, atol=1e-4)
    assert all(p.requires_grad for p in net.parameters())  # nothing of the network was changed


def test_bfloat16_reverse_pass_stays_close_and_is_not_float32(tiny):
    net, images = tiny
    peaks = _all_positions(net, images)
    exact = peak_response_maps(net, images, peaks)
    half = peak_response_maps(net, images, peaks, dtype=torch.bfloat16)
    assert not torch.equal(half, exact)
    assert float((half - exact).abs().max() / exact.abs().max()) < 2e-2


def test_chunk_size_follows_the_memory_budget(tiny):
    from instsearch.networks.dasr import MeanActivation, chunk_for_budget
    from instsearch.networks.excitation_backprop import ReversePass, bytes_per_peak

    net, images = tiny
    _, recorded = ReversePass(net).forward(images[:1])
    # the widest map is conv1's 4 x 16 x 20 floats, held three times
    assert bytes_per_peak(recorded) == 3 * 4 * (4 * 16 * 20)
    assert chunk_for_budget(recorded, 1.0) == 2 ** 20 // (3 * 4 * 4 * 16 * 20)
    assert chunk_for_budget(recorded, 1e-6) == 1
    peaks = _all_positions(net, images)
    torch.testing.assert_close(peak_response_maps(net, images, peaks, strategy="batched", memory_budget_mb=0.01),
                               peak_response_maps(net, images, peaks, strategy="sequential"))


def test_unsupported_layers_are_refused_by_name():
    from instsearch.networks.excitation_backprop import ReversePass

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid())
    with pytest.raises(ValueError, match="does not know Sigmoid"):
        ReversePass(net)
    with pytest.raises(ValueError, match="zero-padded"):
        ReversePass(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")))


# ---------------------------------------------------------------------- peaks
def hand_map() -> torch.Tensor:
    xbar = torch.zeros(1, 6, 7)
    xbar[0, 2, 2] = 5.0  # interior local maximum
    xbar[0, 2, 3] = 4.0  # its neighbour: above the mean, not a maximum
    xbar[0, 3, 5] = 3.0  # interior local maximum
    xbar[0, 0, 6] = 9.0  # maximum on the border
    xbar[0, 4, 1] = 0.5  # isolated maximum below the mean (21.5 / 42 = 0.512)
    return xbar


def _set(peaks: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(p) for p in peaks.tolist()}


def test_local_maxima_on_a_hand_built_map():
    xbar = hand_map()
    peaks, values = local_maxima(xbar)
    assert _set(peaks) == {(0, 2, 2), (0, 3, 5)}
    assert sorted(values.tolist()) == [3.0, 5.0]
    assert _set(local_maxima(xbar, above_mean=False)[0]) == {(0, 2, 2), (0, 3, 5), (0, 4, 1)}
    assert _set(local_maxima(xbar, exclude_border=False)[0]) == {(0, 2, 2), (0, 3, 5), (0, 0, 6)}


def test_dasr_star_selects_every_position_above_the_mean():
    xbar = hand_map()
    assert _set(above_mean_positions(xbar)[0]) == {(0, 2, 2), (0, 2, 3), (0, 3, 5)}
    assert _set(above_mean_positions(xbar, exclude_border=False)[0]) == {(0, 2, 2), (0, 2, 3), (0, 3, 5), (0, 0, 6)}
    # per image: a second image with its own mean
    second = torch.full((1, 6, 7), 1.0)
    second[0, 3, 3] = 2.0
    peaks, _ = above_mean_positions(torch.cat([xbar, second]))
    assert _set(peaks) == {(0, 2, 2), (0, 2, 3), (0, 3, 5), (1, 3, 3)}


def test_a_constant_map_has_no_peaks():
    flat = torch.ones(1, 5, 5)
    assert len(local_maxima(flat)[0]) == 0 and len(above_mean_positions(flat)[0]) == 0


# ---------------------------------------------------------------------- regions
def test_threshold_rules():
    maps = torch.tensor([[[0.0, 0.5, 1.0, 2.0], [10.0, 0.9, 0.2, 3.0]]])
    assert threshold_maps(maps, tau=0.1).tolist() == [[[False, False, True, True], [True, False, False, True]]]
    values = maps.flatten().numpy()
    floor = np.percentile(values, 75)  # numpy's linear percentile: 2.25
    expected = (maps.numpy() >= floor) & (maps.numpy() > 0)
    assert threshold_maps(maps, rule="percentile", percentile=75).numpy().tolist() == expected.tolist()
    assert not threshold_maps(torch.zeros(1, 3, 3)).any()


def test_ellipse_box_of_a_rectangle_of_pixels():
    mask = torch.zeros(1, 12, 16, dtype=torch.bool)
    mask[0, 2:6, 3:11] = True  # rows 2..5 (4), columns 3..10 (8)
    centre, cov, count = pixel_moments(mask)
    assert count.tolist() == [32]
    # pixel centres: x in 3.5 .. 10.5 (mean 7), y in 2.5 .. 5.5 (mean 4); variance of n
    # consecutive integers is (n^2 - 1) / 12
    assert centre.tolist() == [[7.0, 4.0]]
    torch.testing.assert_close(cov[0], torch.tensor([[63 / 12, 0.0], [0.0, 15 / 12]], dtype=torch.float64))
    box = ellipse_boxes(centre, cov, scale=2.0)[0].tolist()
    hx, hy = 2 * math.sqrt(63 / 12), 2 * math.sqrt(15 / 12)
    assert box == pytest.approx([7 - hx, 4 - hy, 7 + hx, 4 + hy], abs=1e-5)
    # clipped to the frame
    assert ellipse_boxes(centre, cov, scale=5.0, size=(12, 16))[0].tolist() == pytest.approx(
        [0.0, 0.0, 16.0, 4 + 5 * math.sqrt(15 / 12)], abs=1e-5)  # x: 7 ± 11.5, y: 4 ± 5.6


def test_ellipse_box_circumscribes_a_rotated_ellipse():
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    idx = torch.arange(3, 15)
    mask[0, idx, idx] = True  # a diagonal line: var x = var y = cov xy
    mask[0, idx[:-1], idx[:-1] + 1] = True
    centre, cov, _ = pixel_moments(mask)
    box = ellipse_boxes(centre, cov, scale=2.0)[0]
    # the ellipse's boundary, sampled: centre + 2 * L (cos t, sin t) with L L^T = cov
    chol = torch.linalg.cholesky(cov[0] + 1e-9 * torch.eye(2, dtype=torch.float64))
    t = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)
    pts = centre[0][:, None] + 2 * chol @ torch.stack([t.cos(), t.sin()])
    sampled = torch.tensor([pts[0].min(), pts[1].min(), pts[0].max(), pts[1].max()])
    torch.testing.assert_close(box, sampled.float(), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------- the network
def planted_image() -> torch.Tensor:
    torch.manual_seed(1)
    image = torch.full((3, 72, 96), 0.2)
    image[:, 10:40, 12:44] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    image[:, 40:66, 60:90] = torch.tensor([0.1, 0.8, 0.2])[:, None, None]
    return (image + 0.05 * torch.rand_like(image)).clamp(0, 1)


def small_dasr(**kwargs) -> DASR:
    torch.manual_seed(0)
    options = dict(backbone="small", long_side=128, describe_layer="conv5.0")
    options.update(kwargs)
    return DASR(**options).eval()


@pytest.mark.parametrize("star", [False, True])
def test_regions_are_in_image_pixels_and_query_boxes_pool_like_regions(star):
    image = planted_image()
    net = small_dasr(star=star)
    with torch.no_grad():
        (regions,) = net.detect_regions([image])
        (query,) = net.describe_boxes([image], [regions.boxes])
    assert regions.image_size == (72, 96) and len(regions) >= 1
    assert regions.features.shape == (len(regions), net.feature_dim) == (len(regions), 256)
    torch.testing.assert_close(regions.features.norm(dim=1), torch.ones(len(regions)))
    assert (regions.boxes[:, :2] >= 0).all() and (regions.boxes[:, 2] <= 96).all() and (regions.boxes[:, 3] <= 72).all()
    torch.testing.assert_close(query, regions.features, atol=1e-5, rtol=1e-4)
    assert (regions.scores[:-1] >= regions.scores[1:]).all()  # best first


def test_star_finds_more_candidates_and_nms_removes_overlaps():
    image = planted_image()
    dasr, star = small_dasr(), small_dasr(star=True)
    det, det_star = dasr.explain(image), star.explain(image)
    assert len(det_star.peaks) > len(det.peaks)
    no_nms = small_dasr(star=True, nms_iou=None).explain(image)
    assert len(no_nms.kept) == len(det_star.peaks)  # every peak has a region here
    assert len(det_star.kept) < len(no_nms.kept)
    from torchvision.ops import box_iou
    kept = det_star.boxes[det_star.kept]
    iou = box_iou(kept, kept) - torch.eye(len(kept))
    assert iou.max() <= 0.3 + 1e-6


def test_auto_strategy_is_sequential_on_the_cpu_and_batched_elsewhere():
    from instsearch.networks.dasr import resolve_strategy

    assert resolve_strategy("auto", torch.device("cpu")) == "sequential"
    assert resolve_strategy("auto", torch.device("cuda", 0)) == "batched"
    assert resolve_strategy("batched", torch.device("cpu")) == "batched"
    with pytest.raises(ValueError, match="strategy"):
        small_dasr(strategy="loop")


@pytest.mark.parametrize("strategy", ["batched", "sequential"])
def test_detection_runs_under_inference_mode(strategy):
    """Lightning's test loop runs under inference mode, whose tensors cannot enter a graph."""
    image = planted_image()
    with torch.no_grad():
        expected = small_dasr(strategy=strategy).detect_regions([image])[0]
    with torch.inference_mode():
        got = small_dasr(strategy=strategy).detect_regions([image])[0]
    torch.testing.assert_close(got.boxes, expected.boxes)
    torch.testing.assert_close(got.features, expected.features)


def test_sequential_and_batched_detection_agree_on_a_resnet():
    image = planted_image()
    batched = small_dasr(star=True, strategy="batched", chunk_size=3).explain(image)
    sequential = small_dasr(star=True, strategy="sequential").explain(image)
    torch.testing.assert_close(batched.maps, sequential.maps, rtol=1e-4, atol=1e-7)
    assert torch.equal(batched.kept, sequential.kept)


class FlatBackbone(StagedBackbone):
    """One stage whose map is constant (zero weights, bias 1): X̄ has no peak at all."""

    default_frozen_stages = 0

    def __init__(self) -> None:
        super().__init__()
        self.feature_info = FeatureInfo([StageInfo("conv5", 8, 1)])
        conv = nn.Conv2d(3, 8, 1)
        nn.init.zeros_(conv.weight)
        nn.init.ones_(conv.bias)
        self.body = nn.Sequential(conv, nn.ReLU())

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict([("conv5", self.body)])


def test_an_image_without_peaks_keeps_its_whole_frame_only_with_the_fallback():
    image = planted_image()
    with torch.no_grad():
        (kept,) = DASR(FlatBackbone(), long_side=48).eval().detect_regions([image])
        (none,) = DASR(FlatBackbone(), long_side=48, whole_image_fallback=False).eval().detect_regions([image])
    assert kept.boxes.tolist() == [[0.0, 0.0, 96.0, 72.0]] and kept.scores.tolist() == [0.0]
    assert len(none) == 0 and none.features.shape == (0, 8)


def test_figure_has_one_panel_per_shown_map():
    from instsearch.dasr_figure import dasr_figure

    net = small_dasr(star=True, nms_iou=None)
    det = net.explain(planted_image())
    assert len(det.kept) == 2
    for max_maps, panels in ((1, 3), (5, 4)):  # X̄, all regions, then one panel per map shown
        figure = dasr_figure(net, planted_image(), max_maps=max_maps, panel=64)
        assert figure.size == (panels * (64 + 4) + 4, round(det.size[0] * 64 / det.size[1]) + 14 + 4)


def test_figure_command_names_an_unreadable_image_without_a_traceback(tmp_path, capsys):
    from instsearch.dasr_figure import figure_main

    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    with pytest.raises(SystemExit) as exit_info:
        figure_main([str(broken), "--out", str(tmp_path / "fig.png"), "--backbone", "small"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{broken}: not a readable image" in err and "Traceback" not in err
    assert not (tmp_path / "fig.png").exists()


def test_network_refuses_train_mode_and_classification():
    net = small_dasr()
    with pytest.raises(TypeError, match="class-agnostic"):
        net.classify_boxes([planted_image()], [torch.tensor([[0.0, 0, 5, 5]])])
    with pytest.raises(RuntimeError, match="eval mode"):
        net.train().detect_regions([planted_image()])


# ---------------------------------------------------------------------- VLAD
def test_vlad_against_a_direct_computation():
    from instsearch.networks.vlad import vlad

    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(9, 5, generator=g), dim=1)
    owner = torch.tensor([0, 0, 2, 2, 2, 0, 2, 0, 2])  # image 1 has no region
    codebook = torch.randn(3, 5, generator=g)
    got = vlad(features, owner, 3, codebook, power=0.5, intra=True)
    expected = np.zeros((3, 15))
    f, c = features.double().numpy(), codebook.double().numpy()
    for i in range(3):
        blocks = []
        for word in range(3):
            acc = np.zeros(5)
            for row in range(9):
                if owner[row] == i and np.argmin(((c - f[row]) ** 2).sum(1)) == word:
                    acc += f[row] - c[word]
            acc = np.sign(acc) * np.sqrt(np.abs(acc))
            norm = np.linalg.norm(acc)
            blocks.append(acc / norm if norm > 0 else acc)
        v = np.concatenate(blocks)
        norm = np.linalg.norm(v)
        expected[i] = v / norm if norm > 0 else v
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert got[1].abs().sum() == 0


def test_dasr_vlad_network_describes_images_and_crops():
    from instsearch.networks.vlad import DASRVLAD

    dasr = small_dasr()
    codebook = F.normalize(torch.randn(4, 256, generator=torch.Generator().manual_seed(0)), dim=1)
    net = DASRVLAD(dasr, codebook.numpy()).eval()
    image = planted_image()
    with torch.no_grad():
        (regions,) = net.detect_regions([image])
        (query,) = net.describe_boxes([image], [torch.tensor([[0.0, 0.0, 96.0, 72.0]])])
    assert regions.boxes.tolist() == [[0.0, 0.0, 96.0, 72.0]] and net.feature_dim == 1024
    torch.testing.assert_close(query, regions.features)  # the whole-frame crop is the image
    with pytest.raises(ValueError, match="codebook must be"):
        DASRVLAD(dasr, np.zeros((4, 7), dtype=np.float32))


# ---------------------------------------------------------------------- instsearch test
def test_instsearch_test_runs_the_dasr_config_without_a_checkpoint(tmp_path, small_benchmark, capsys):
    """The shipped synthetic config, made small, through `instsearch test` with whitening."""
    shipped = load_config(CONFIGS / "dasr_synthetic.yaml")
    assert shipped["model"]["init_args"]["retrieval"]["whitening"] is True
    metrics, run = run_shipped_config("dasr_synthetic", tmp_path, small_benchmark, capsys, dict(long_side=96))
    assert metrics["num_queries"] == 4
    assert not any(k in metrics for k in ("peaks/img", "s/img"))  # progress-bar figures, not metrics
    assert metrics["regions_per_image"] >= 1.0
    assert set(run["rankings"]) == {q["id"] for q in json.loads(small_benchmark.read_text())["queries"]}


def test_star_peaks_the_papers_above_mean_positions_or_the_public_local_maxima():
    xbar = hand_map()
    above, _ = small_dasr(star=True).find_peaks(xbar)
    local, _ = small_dasr(star=True, star_peaks="local_max").find_peaks(xbar)
    assert _set(above) == {(0, 2, 2), (0, 2, 3), (0, 3, 5)}  # every interior position above the mean (0.512)
    assert _set(local) == {(0, 2, 2), (0, 3, 5), (0, 4, 1)}  # interior 3x3 maxima, no mean filter
    with pytest.raises(ValueError, match="star_peaks"):
        small_dasr(star=True, star_peaks="all")


def test_progress_bar_shows_peaks_and_seconds_per_image():
    import pytorch_lightning as pl

    from instsearch.lightning_modules.training_free import TrainingFreeModule

    net = small_dasr(star=True)
    assert net.progress_metrics() == {"peaks/img": 0.0, "s/img": 0.0}
    images = [planted_image(), planted_image().flip(-1)]
    with torch.no_grad():
        net.detect_regions(images)
    peaks = sum(len(net.explain(im, keep_maps=False).peaks) for im in images) / 2
    shown = net.progress_metrics()
    assert shown["peaks/img"] == peaks > 0 and shown["s/img"] > 0
    module = TrainingFreeModule(net)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    logged = []
    module.log = lambda name, value, **kw: logged.append((name, value, kw["prog_bar"], kw["logger"]))
    module._show_progress_metrics()
    assert logged == [("peaks/img", peaks, True, False), ("s/img", shown["s/img"], True, False)]
