"""DASR's rules (Xiao & Zhao, "Deeply Activated Salient Region for Instance Search") checked by
their behaviour: the probabilistic back-propagation through a bottleneck ResNet with batch norm,
max pooling and residual sums against a reverse pass written out layer by layer, and the region
defaults (tau = 0.1, ellipse axes of 2 standard deviations, NMS at 0.3 keeping the highest X̄
first, regions described by conv5.0) against numpy recomputations and hand-built maps. "The public
code" is the authors' DASR code (https://github.com/wlzhao22/DASR, commit
e71d16743e1bdf764d5fd178c43f080264a55577)."""
from __future__ import annotations

import inspect
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instsearch.networks.dasr import DASR, ellipse_boxes, peak_response_maps, pixel_moments, threshold_maps
from instsearch.networks.staged import FeatureInfo, StageInfo, StagedBackbone

PAPER_DEFAULTS = dict(tau=0.1, ellipse_scale=2.0, nms_iou=0.3, describe_layer="conv5.0", threshold="relative")


# ---------------------------------------------------------------------- back-propagation on a ResNet
def _bn(channels: int, g: torch.Generator) -> nn.BatchNorm2d:
    """An eval-mode batch norm with non-trivial affine parameters and running statistics."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g) * 0.2 + 0.1)
        bn.running_mean.copy_(torch.randn(channels, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(channels, generator=g) * 1.5 + 0.3)
    return bn


def _conv(cin: int, cout: int, k: int, g: torch.Generator, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.6)
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g) * 0.2)
    return conv


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck, small: 1x1 - 3x3 (stride) - 1x1 with batch norms, in-place
    ReLUs, ``out += shortcut`` then ReLU; the shortcut a 1x1 strided convolution + batch norm when
    ``downsample``, else the identity."""

    def __init__(self, cin: int, mid: int, cout: int, g: torch.Generator, stride: int = 1,
                 downsample: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.conv_a, self.bn_a = _conv(cin, mid, 1, g, bias=bias), _bn(mid, g)
        self.conv_b, self.bn_b = _conv(mid, mid, 3, g, stride=stride, bias=bias), _bn(mid, g)
        self.conv_c, self.bn_c = _conv(mid, cout, 1, g, bias=bias), _bn(cout, g)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Sequential(_conv(cin, cout, 1, g, stride=stride), _bn(cout, g)) if downsample else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn_a(self.conv_a(x)))
        out = self.relu(self.bn_b(self.conv_b(out)))
        out = self.bn_c(self.conv_c(out))
        out += identity
        return self.relu(out)


class TinyBottleneckResNet(nn.Module):
    """Stem (3x3 conv with bias, BN, ReLU, ResNet's overlapping 3x3 / 2 max-pool), a strided
    bottleneck with a downsample shortcut and one with the identity shortcut (convolutions with
    bias); X̄ = the channel mean of the output."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1, self.bn1 = _conv(3, 4, 3, g, bias=True), _bn(4, g)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.block1 = Bottleneck(4, 3, 6, g, stride=2, downsample=True)
        self.block2 = Bottleneck(6, 3, 6, g, bias=True)
        self.eval()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.block2(self.block1(x))
        return x.mean(dim=1, keepdim=True)


def _d(t):
    return None if t is None else t.detach().double()


def _conv64(conv: nn.Conv2d, a):
    return F.conv2d(a, _d(conv.weight), _d(conv.bias), conv.stride, conv.padding)


def _bn_scale(bn: nn.BatchNorm2d):
    return (_d(bn.weight) / torch.sqrt(_d(bn.running_var) + bn.eps))[None, :, None, None]


def _bn64(bn: nn.BatchNorm2d, x):
    return (x - _d(bn.running_mean)[None, :, None, None]) * _bn_scale(bn) + _d(bn.bias)[None, :, None, None]


def _excitation(conv: nn.Conv2d, a, g):
    """The probabilistic rule, as written in the paper and the public code:
    (A - min A) * conv_transpose(g / Z, W⁺), Z = conv(A - min A, W⁺), g / Z = 0 where Z < 1e-10."""
    s = a - a.min()  # one image: the min over all its channels and pixels
    wp = _d(conv.weight).clamp(min=0)  # W⁺; no bias
    z = F.conv2d(s, wp, None, conv.stride, conv.padding)
    ratio = torch.where(z < 1e-10, torch.zeros_like(z), g / torch.where(z < 1e-10, torch.ones_like(z), z))
    k, st, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    extra = [a.shape[d] - ((z.shape[d] - 1) * st - 2 * p + k) for d in (2, 3)]  # stride > 1 drops rows
    back = F.conv_transpose2d(ratio, wp, None, conv.stride, conv.padding, output_padding=tuple(extra))
    assert back.shape == a.shape
    return s * back


def _block_reverse(block: Bottleneck, x, g):
    """``x`` the block's input, ``g`` the gradient at its output: the gradient at its input."""
    a1 = x
    p_a = _bn64(block.bn_a, _conv64(block.conv_a, a1))
    a2 = torch.relu(p_a)
    p_b = _bn64(block.bn_b, _conv64(block.conv_b, a2))
    a3 = torch.relu(p_b)
    main = _bn64(block.bn_c, _conv64(block.conv_c, a3))
    short = x if block.down is None else _bn64(block.down[1], _conv64(block.down[0], x))
    g = g * (main + short > 0)  # the ReLU after the sum
    gm = _excitation(block.conv_c, a3, g * _bn_scale(block.bn_c))
    gm = _excitation(block.conv_b, a2, gm * (p_b > 0) * _bn_scale(block.bn_b))
    gm = _excitation(block.conv_a, a1, gm * (p_a > 0) * _bn_scale(block.bn_a))
    gs = g if block.down is None else _excitation(block.down[0], x, g * _bn_scale(block.down[1]))
    return gm + gs  # the residual sum's two paths add


def _block_forward(block: Bottleneck, x):
    y = torch.relu(_bn64(block.bn_a, _conv64(block.conv_a, x)))
    y = torch.relu(_bn64(block.bn_b, _conv64(block.conv_b, y)))
    y = _bn64(block.bn_c, _conv64(block.conv_c, y))
    return torch.relu(y + (x if block.down is None else _bn64(block.down[1], _conv64(block.down[0], x))))


def resnet_reference_map(net: TinyBottleneckResNet, image: torch.Tensor, y: int, x: int) -> torch.Tensor:
    """One peak of one image, in float64, without autograd: forward, then the reverse pass layer by
    layer (channel mean, ReLU masks, BN scales, the rule at every convolution, max-unpooling,
    residual sums)."""
    with torch.no_grad():
        a0 = image[None].double()
        p0 = _bn64(net.bn1, _conv64(net.conv1, a0))
        r0 = torch.relu(p0)
        pooled, idx = F.max_pool2d(r0, 3, stride=2, padding=1, return_indices=True)
        b1 = _block_forward(net.block1, pooled)
        b2 = _block_forward(net.block2, b1)
        g = torch.zeros_like(b2)
        g[0, :, y, x] = 1.0 / b2.shape[1]  # X̄ is the channel mean
        g = _block_reverse(net.block2, b1, g)
        g = _block_reverse(net.block1, pooled, g)
        # max pooling's ordinary gradient: each output's gradient to its argmax; ResNet's 3x3 / 2
        # windows overlap, so one input can win several windows -- the gradients add (scatter_add;
        # max_unpool2d would keep only one of them)
        g = torch.zeros_like(r0).flatten(2).scatter_add(2, idx.flatten(2), g.flatten(2)).view_as(r0)
        g = g * (p0 > 0) * _bn_scale(net.bn1)
        g = _excitation(net.conv1, a0, g)
        return g[0].sum(0).clamp(min=0)


@pytest.fixture(scope="module")
def resnet():
    net = TinyBottleneckResNet()
    images = torch.randn(2, 3, 20, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        xbar = net(images)
    h, w = xbar.shape[-2:]
    b, yy, xx = torch.meshgrid(torch.arange(2), torch.arange(h), torch.arange(w), indexing="ij")
    peaks = torch.stack([b.flatten(), yy.flatten(), xx.flatten()], 1)  # every position of both images
    reference = torch.stack([resnet_reference_map(net, images[b], y, x) for b, y, x in peaks.tolist()])
    return net, images, peaks, reference


def test_the_resnet_reference_is_not_trivial(resnet):
    """The checks below mean something: batch norms scale, most peaks reach the input, the
    overlapping max-pool windows share winners, and the rule differs from the plain gradient."""
    net, images, peaks, reference = resnet
    assert peaks.shape == (2 * 5 * 6, 3)
    assert (reference.flatten(1).amax(1) > 0).float().mean() > 0.7
    scale = net.bn1.weight / torch.sqrt(net.bn1.running_var + net.bn1.eps)
    assert (scale - 1).abs().min() > 0.01 and net.bn1.running_mean.abs().min() > 0.01
    with torch.no_grad():
        r0 = torch.relu(net.bn1(net.conv1(images)))
        _, idx = F.max_pool2d(r0, 3, stride=2, padding=1, return_indices=True)
    assert any(len(i.unique()) < i.numel() for i in idx.flatten(2).flatten(0, 1))
    plain = peak_response_maps(net, images, peaks[:8], rule="gradient")
    assert not torch.allclose(plain.double(), reference[:8], atol=1e-3)


@pytest.mark.parametrize("strategy", ["batched", "sequential"])
def test_peak_response_maps_on_a_bottleneck_resnet_equal_the_layer_by_layer_reference(resnet, strategy):
    net, images, peaks, reference = resnet
    order = torch.randperm(len(peaks), generator=torch.Generator().manual_seed(5))  # images interleaved
    got = peak_response_maps(net, images, peaks[order], chunk_size=7, strategy=strategy)
    assert got.dtype == torch.float32 and got.shape == (len(peaks), 20, 24)
    torch.testing.assert_close(got.double(), reference[order], rtol=1e-5, atol=1e-6 * float(reference.amax()))
    assert all("forward" not in vars(m) for m in net.modules())  # the modules are restored


class OneConv(nn.Module):
    """A 3x3 convolution with positive weights and a bias, then the channel mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(0.5)
            self.conv.bias.fill_(1.0)
        self.eval()

    def forward(self, x):
        return self.conv(x).mean(dim=1, keepdim=True)


@pytest.mark.parametrize("strategy", ["batched", "sequential"])
def test_a_peak_whose_z_is_below_1e_10_back_propagates_nothing(strategy):
    """g / Z is 0 where Z < 1e-10: a peak over a pixel of 1e-12 (Z = 1.5e-12) gets an empty map,
    one over a pixel of 1e-3 (Z = 1.5e-3) a map of 1 on that pixel, one over zeros (Z = 0) nothing."""
    net = OneConv()
    image = torch.zeros(1, 3, 9, 9)
    image[0, :, 2, 2] = 1e-12
    image[0, :, 6, 6] = 1e-3
    peaks = torch.tensor([[0, 2, 2], [0, 6, 6], [0, 4, 4]])
    got = peak_response_maps(net, image, peaks, strategy=strategy)
    expected = torch.zeros(3, 9, 9)
    expected[1, 6, 6] = 1.0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    for (_, y, x), m in zip(peaks.tolist(), got):  # the layer-by-layer rule agrees
        g = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
        g[0, 0, y, x] = 1.0
        torch.testing.assert_close(m.double(), _excitation(net.conv, image.double(), g)[0].sum(0).clamp(min=0),
                                   rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------- the defaults, by behaviour
def test_paper_defaults_in_the_signatures():
    params = inspect.signature(DASR.__init__).parameters
    assert {k: params[k].default for k in PAPER_DEFAULTS} == PAPER_DEFAULTS
    assert inspect.signature(threshold_maps).parameters["tau"].default == 0.1
    assert inspect.signature(ellipse_boxes).parameters["scale"].default == 2.0
    net = DASR(backbone="small", long_side=64)
    assert (net.tau, net.ellipse_scale, net.nms_iou, net.describe_layer, net.threshold) == tuple(PAPER_DEFAULTS.values())


def test_threshold_maps_default_keeps_a_tenth_of_the_maximum_and_above():
    maps = torch.tensor([[[0.0, 0.9, 1.1, 1.9], [2.1, 10.0, 0.5, -3.0]]])
    assert threshold_maps(maps).tolist() == [[[False, False, True, True], [True, True, False, False]]]
    assert threshold_maps(maps, tau=0.2).tolist() == [[[False, False, False, False], [True, True, False, False]]]


def test_ellipse_boxes_default_is_two_standard_deviations():
    mask = torch.zeros(1, 14, 18, dtype=torch.bool)
    mask[0, 3:9, 4:7] = True  # an L: not symmetric, so the two axes differ
    mask[0, 7:9, 7:15] = True
    centre, cov, count = pixel_moments(mask)
    ys, xs = np.nonzero(mask[0].numpy())
    px, py = xs + 0.5, ys + 0.5
    assert count.item() == len(xs)
    np.testing.assert_allclose(centre[0].numpy(), [px.mean(), py.mean()])
    half = 2 * np.sqrt([px.var(), py.var()])
    expected = [px.mean() - half[0], py.mean() - half[1], px.mean() + half[0], py.mean() + half[1]]
    np.testing.assert_allclose(ellipse_boxes(centre, cov)[0].numpy(), expected, rtol=0, atol=1e-5)


def planted_image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    image = torch.full((3, 72, 96), 0.2)
    image[:, 10:40, 12:44] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    image[:, 40:66, 60:90] = torch.tensor([0.1, 0.8, 0.2])[:, None, None]
    return (image + 0.05 * torch.rand(image.shape, generator=g)).clamp(0, 1)


def small_dasr(**kwargs) -> DASR:
    """The ``small`` backbone (random, seeded) with every region parameter left at its default."""
    torch.manual_seed(0)
    return DASR(backbone="small", long_side=kwargs.pop("long_side", 128), **kwargs).eval()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def numpy_regions(maps: np.ndarray, values: np.ndarray, size, tau=0.1, scale=2.0, beta=0.3, highest_first=True):
    """The paper's regions from the peak response maps: pixels >= tau * max, box = centre ± scale
    * sqrt(var) per axis (at least one pixel wide, clipped to the frame), greedy NMS at IoU beta in
    the order of the peaks' X̄ values. Returns ``(boxes (n, 4), kept indices)``."""
    h, w = size
    boxes, valid = np.zeros((len(maps), 4)), []
    for i, m in enumerate(maps.astype(np.float64)):
        ys, xs = np.nonzero((m >= tau * m.max()) & (m > 0))
        if len(xs) == 0:
            continue
        valid.append(i)
        px, py = xs + 0.5, ys + 0.5
        hx, hy = np.maximum(scale * np.sqrt([px.var(), py.var()]), 0.5)
        boxes[i] = [np.clip(px.mean() - hx, 0, w), np.clip(py.mean() - hy, 0, h),
                    np.clip(px.mean() + hx, 0, w), np.clip(py.mean() + hy, 0, h)]
    order = sorted(valid, key=lambda i: -values[i] if highest_first else values[i])
    kept = []
    for i in order:
        if all(_iou(boxes[i], boxes[j]) <= beta for j in kept):
            kept.append(i)
    return boxes, kept


@pytest.mark.parametrize("star", [False, True])
def test_default_regions_equal_the_numpy_reference(star):
    """explain's boxes and kept regions with the default parameters are the paper's, recomputed
    from its own maps; each default is shown to matter on this image (else the test could not tell)."""
    det = small_dasr(star=star, long_side=192).explain(planted_image())  # X̄ 5 x 6: 12 DASR* peaks
    maps, values = det.maps.numpy(), det.values.double().numpy()
    assert len(np.unique(values)) == len(values)  # no ties: the NMS order is defined
    boxes, kept = numpy_regions(maps, values, det.size)
    assert len(kept) >= 1
    np.testing.assert_allclose(det.boxes.numpy()[kept], boxes[kept], rtol=0, atol=1e-4)
    assert det.kept.tolist() == kept
    # each mutated default gives other regions here
    assert not np.allclose(numpy_regions(maps, values, det.size, tau=0.2)[0][kept], boxes[kept], atol=1e-2)
    assert not np.allclose(numpy_regions(maps, values, det.size, scale=1.0)[0][kept], boxes[kept], atol=1e-2)
    if star:
        assert numpy_regions(maps, values, det.size, highest_first=False)[1] != kept
        assert numpy_regions(maps, values, det.size, beta=0.5)[1] != kept
        assert 1 < len(kept) < len(values)  # NMS removed overlapping regions


class BlurBackbone(StagedBackbone):
    """One stage, ``conv5`` = [a 7x7 Gaussian convolution of the three colours (positive weights,
    no bias), ReLU]: X̄ is the blurred image and, by the rule, the map of a peak at p is
    ``sum_c A_c(q) W(q - p) / Z`` for q in p's window -- known in closed form."""

    default_frozen_stages = 0
    input_mean = (0.0, 0.0, 0.0)
    input_std = (1.0, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.feature_info = FeatureInfo([StageInfo("conv5", 1, 1)])
        self.conv = nn.Conv2d(3, 1, 7, padding=3, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(self.kernel().expand(1, 3, 7, 7))
        self.body = nn.Sequential(self.conv, nn.ReLU())

    @staticmethod
    def kernel() -> torch.Tensor:
        r = torch.arange(7, dtype=torch.float32) - 3
        return torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / 8.0)

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict([("conv5", self.body)])


def two_blobs() -> torch.Tensor:
    """A bright blob at (y, x) = (11, 10) and a dimmer one at (12, 22), slightly asymmetric so
    that no two positions of X̄ tie; background 0 (so min A = 0)."""
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(32.0), indexing="ij")
    blob = lambda cy, cx, a: a * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 8.0)
    ramp = 1.0 + 0.01 * xs / 32 + 0.013 * ys / 24
    return ((blob(11, 10, 1.0) + blob(12, 22, 0.7)) * ramp).expand(3, 24, 32).contiguous()


def test_nms_keeps_the_higher_peak_of_overlapping_regions():
    """DASR* on two blobs: every above-mean position is a peak and neighbouring peaks' regions
    overlap; NMS must keep the brightest peak and suppress its neighbours, best first."""
    det = DASR(BlurBackbone(), long_side=32, star=True).eval().explain(two_blobs())
    values, peaks = det.values, det.peaks.tolist()
    top, second = peaks.index([11, 10]), peaks.index([12, 22])
    assert int(values.argmax()) == top
    assert det.kept[0].item() == top and det.kept[1].item() == second
    kept_values = values[det.kept]
    assert (kept_values[:-1] > kept_values[1:]).all()
    from torchvision.ops import box_iou

    iou = box_iou(det.boxes, det.boxes)
    for neighbour in ([11, 11], [12, 10], [10, 10], [11, 9], [12, 21]):
        j = peaks.index(neighbour)
        assert j not in det.kept.tolist()
        assert iou[j, top if neighbour != [12, 21] else second] > 0.3  # suppressed by the higher peak


def test_the_brightest_region_is_the_closed_form_one():
    """The region of the brightest peak of :class:`BlurBackbone` with the default tau and ellipse
    scale: pixels of its window with A(q) W(q - p) >= 0.1 * max, box = centre ± 2 sqrt(var)."""
    image = two_blobs()
    det = DASR(BlurBackbone(), long_side=32).eval().explain(image)
    i = det.peaks.tolist().index([11, 10])
    m = np.zeros((24, 32))
    m[8:15, 7:14] = image[0, 8:15, 7:14].double().numpy() * BlurBackbone.kernel().double().numpy()
    # the map itself, up to the normalisation by Z
    np.testing.assert_allclose(det.maps[i].numpy() / det.maps[i].numpy().max(), m / m.max(), rtol=1e-5, atol=1e-7)
    for tau, scale, same in ((0.1, 2.0, True), (0.2, 2.0, False), (0.1, 1.0, False)):
        ys, xs = np.nonzero(m >= tau * m.max())
        px, py = xs + 0.5, ys + 0.5
        hx, hy = scale * np.sqrt([px.var(), py.var()])
        box = np.array([px.mean() - hx, py.mean() - hy, px.mean() + hx, py.mean() + hy])
        assert np.allclose(det.boxes[i].numpy(), box, atol=1e-4) == same, (tau, scale)


def test_describe_layer_default_is_the_first_block_of_conv5():
    """Regions are pooled from conv5.0 (ResNet-50's layer4.0, the paper's Block4_unit1), not the
    end of conv5 nor another layer."""
    image = planted_image()
    net = small_dasr()
    x = net.network_input(image)
    with torch.no_grad():
        first, stage = net.backbone.forward_layer(x, "conv5.0"), net.backbone.forward_layer(x, "conv5")
        det = net.explain(image, keep_maps=False)
        whole = [torch.tensor([[0.0, 0.0, 96.0, 72.0], [10.0, 8.0, 50.0, 44.0]])]
        got = net.describe_boxes([image], whole)[0]
        expected = small_dasr(describe_layer="conv5.0").describe_boxes([image], whole)[0]
        at_stage = small_dasr(describe_layer="conv5").describe_boxes([image], whole)[0]
    assert not torch.allclose(first, stage, atol=1e-3)
    torch.testing.assert_close(det.describe_map, first)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, at_stage, atol=1e-3)


# ---------------------------------------------------------------------- the reverse pass's own contract
import operator  # noqa: E402

import instsearch.networks.excitation_backprop as eb  # noqa: E402
from instsearch.networks.excitation_backprop import ReversePass, peak_gradients  # noqa: E402


class Branchy(nn.Module):
    """A dilated 3x3 convolution (bias) straight into a 1x1 convolution, a batch norm read twice
    (``relu(b) + b``), an ``nn.Identity``, a functional max pool with every option set (stride 2,
    padding 1, dilation 2, ceil_mode), then the channel mean."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=2, dilation=2)
        self.conv2 = nn.Conv2d(4, 3, 1, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.randn(self.conv1.weight.shape, generator=g) * 0.6)
            self.conv1.bias.copy_(torch.randn(4, generator=g) * 0.2)
            self.conv2.weight.copy_(torch.randn(self.conv2.weight.shape, generator=g) * 0.6)
        self.bn = _bn(3, g)
        self.id = nn.Identity()
        self.eval()

    def forward(self, x):
        b = self.bn(self.conv2(self.conv1(x)))
        out = self.id(torch.relu(b) + b)
        out = F.max_pool2d(out, kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)
        return out.mean(dim=1, keepdim=True)


def _excitation_dilated(conv: nn.Conv2d, a, g):
    """The probabilistic rule with the convolution's dilation, the transpose by torch's conv2d_input."""
    s = a - a.min()
    wp = _d(conv.weight).clamp(min=0)
    z = F.conv2d(s, wp, None, conv.stride, conv.padding, conv.dilation)
    ratio = torch.where(z < 1e-10, torch.zeros_like(z), g / torch.where(z < 1e-10, torch.ones_like(z), z))
    return s * torch.nn.grad.conv2d_input(a.shape, wp, ratio, conv.stride, conv.padding, conv.dilation)


def branchy_reference_map(net: Branchy, image: torch.Tensor, y: int, x: int) -> torch.Tensor:
    with torch.no_grad():
        a0 = image[None].double()
        z1 = F.conv2d(a0, _d(net.conv1.weight), _d(net.conv1.bias), 1, 2, 2)
        z2 = F.conv2d(z1, _d(net.conv2.weight))
        b = _bn64(net.bn, z2)
        out = torch.relu(b) + b
        pooled, idx = F.max_pool2d(out, 3, 2, 1, 2, ceil_mode=True, return_indices=True)
        g = torch.zeros_like(pooled)
        g[0, :, y, x] = 1.0 / pooled.shape[1]
        g = torch.zeros_like(out).flatten(2).scatter_add(2, idx.flatten(2), g.flatten(2)).view_as(out)
        g = (g * (b > 0) + g) * _bn_scale(net.bn)  # both uses of b add, then the BN scale
        g = _excitation_dilated(net.conv2, z1, g)
        g = _excitation_dilated(net.conv1, a0, g)
        return g[0].sum(0).clamp(min=0)


def test_branchy_network_equals_the_layer_by_layer_reference():
    """Convolution into convolution, a value read twice, nn.Identity, dilation and every functional
    max-pool option: the probabilistic maps equal the float64 reference, the gradient maps autograd's."""
    net = Branchy()
    image = torch.randn(1, 3, 12, 14, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert net(image).shape == (1, 1, 6, 7)  # ceil_mode: (12 + 2 - 5) / 2 + 1 rounded up
    peaks = torch.tensor([[0, y, x] for y in range(6) for x in range(7)])
    reference = torch.stack([branchy_reference_map(net, image[0], y, x) for _, y, x in peaks.tolist()])
    assert (reference.flatten(1).amax(1) > 0).float().mean() > 0.7
    got = peak_response_maps(net, image, peaks, strategy="batched", chunk_size=5)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6 * float(reference.amax()))
    plain = []
    for _, y, x in peaks.tolist():
        xi = image.clone().requires_grad_(True)
        net(xi)[0, 0, y, x].backward()
        plain.append(xi.grad[0].sum(0).clamp(min=0))
    torch.testing.assert_close(peak_response_maps(net, image, peaks, rule="gradient"), torch.stack(plain),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["probabilistic", "gradient"])
def test_elementwise_factors_are_folded_into_one_per_convolution(resnet, rule):
    """After the forward, each convolution holds one factor (ReLU mask x BN scale x 1/Z) and no
    ReLU or batch norm below it keeps its own; only the ReLUs after a residual sum keep theirs."""
    net, images, _, _ = resnet
    reverse = ReversePass(net, rule=rule)
    _, recorded = reverse.forward(images[:1])
    tape = recorded["tape"]
    convs = [s for s in reverse.steps if s.kind == "conv"]
    after_sum = [s for s in reverse.steps if s.kind == "relu" and s.inputs[0].target in (operator.add, operator.iadd)]
    assert len(convs) == 8 and len(after_sum) == 2
    assert {s.node for s in reverse.steps if "pre" in tape[s.node]} == {s.node for s in convs + after_sum}
    a0 = images[:1].double()
    p0 = _bn64(net.bn1, _conv64(net.conv1, a0))
    factor = (p0 > 0) * _bn_scale(net.bn1)
    if rule == "probabilistic":
        z = F.conv2d(a0 - a0.min(), _d(net.conv1.weight).clamp(min=0), None, 1, 1)
        factor = factor * torch.where(z < 1e-10, torch.zeros_like(z), 1 / z)
    conv1 = next(s for s in convs if s.node.target == "conv1")
    torch.testing.assert_close(tape[conv1.node]["pre"].double(), factor, rtol=1e-5, atol=1e-7)


def _backward_sizes(monkeypatch):
    sizes = []
    original = ReversePass.backward

    def spy(self, recorded, grad_output):
        sizes.append(grad_output.shape[0])
        return original(self, recorded, grad_output)

    monkeypatch.setattr(ReversePass, "backward", spy)
    return sizes


def test_peaks_per_reverse_pass_follow_strategy_chunk_size_and_budget(resnet, monkeypatch):
    net, images, peaks, reference = resnet
    peaks, reference = peaks[:10], reference[:10]  # ten peaks of the first image
    sizes = _backward_sizes(monkeypatch)
    per_peak = 3 * 4 * (4 * 20 * 24)  # the widest map, conv1's 4 x 20 x 24 floats, three times
    cases = [(dict(strategy="sequential", chunk_size=7), [1] * 10),
             (dict(strategy="auto", chunk_size=7), [1] * 10),  # the CPU: sequential
             (dict(strategy="batched", chunk_size=7), [7, 3]),
             (dict(strategy="batched", chunk_size=1), [1] * 10),
             (dict(strategy="batched", memory_budget_mb=3.5 * per_peak / 2 ** 20), [3, 3, 3, 1])]
    for kwargs, expected in cases:
        sizes.clear()
        got = peak_response_maps(net, images, peaks, **kwargs)
        assert sizes == expected, kwargs
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-6 * float(reference.amax()))


def test_default_memory_budget_is_one_gib(resnet, monkeypatch):
    net, images, peaks, _ = resnet
    chunks = []
    original = eb.peak_gradients

    def spy(reverse, recorded, positions, chunk_size):
        chunks.append(chunk_size)
        return original(reverse, recorded, positions, chunk_size)

    monkeypatch.setattr(eb, "peak_gradients", spy)
    peak_response_maps(net, images, peaks[:2], strategy="batched")
    assert chunks == [2 ** 30 // (3 * 4 * (4 * 20 * 24))]


def _layouts(monkeypatch):
    layouts = []
    original = F.conv_transpose2d

    def spy(x, *args, **kwargs):
        if x.shape[1] > 1 and x.shape[-1] > 1 and x.shape[-2] > 1:
            layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv_transpose2d", spy)
    return layouts


def test_channels_last_reverse_pass_gives_the_same_maps(resnet, monkeypatch):
    net, images, peaks, reference = resnet
    layouts = _layouts(monkeypatch)
    reverse = ReversePass(net, channels_last=True)
    assert reverse.channels_last is True
    _, recorded = reverse.forward(images[:1])
    got = peak_gradients(reverse, recorded, peaks[:6, 1:], chunk_size=3)
    assert layouts and all(layouts)
    torch.testing.assert_close(got.double(), reference[:6], rtol=1e-5, atol=1e-6 * float(reference.amax()))
    layouts.clear()
    default = ReversePass(net)
    assert default.channels_last is False
    _, recorded = default.forward(images[:1])
    peak_gradients(default, recorded, peaks[:6, 1:], chunk_size=3)
    assert layouts and not any(layouts)


class _Net(nn.Module):
    def __init__(self, tail, *modules) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), *modules)
        self.tail = tail
        self.eval()

    def forward(self, x):
        return self.tail(self.body(x))


def test_refusals_name_what_they_refuse(resnet):
    net, images, peaks, _ = resnet
    mean = lambda x: x.mean(dim=1, keepdim=True)  # noqa: E731
    with pytest.raises(ValueError, match=r"^rule must be 'probabilistic' or 'gradient', got 'excite'$"):
        ReversePass(net, rule="excite")
    with pytest.raises(ValueError, match=r"^rule must be 'probabilistic' or 'gradient', got 'excite'$"):
        peak_response_maps(net, images, peaks[:1], rule="excite")
    with pytest.raises(ValueError, match=r"^dtype must be torch.float32 or torch.bfloat16, got torch.float16$"):
        ReversePass(net, dtype=torch.float16)
    train_bn = _Net(mean, nn.BatchNorm2d(2))
    train_bn.body[1].train()
    no_stats = _Net(mean, nn.BatchNorm2d(2, track_running_stats=False))
    for bad in (train_bn, no_stats):
        with pytest.raises(ValueError, match=r"^body\.1: batch norm must be in eval mode with running statistics$"):
            ReversePass(bad)
    with pytest.raises(ValueError, match=r"^\w+: max_pool2d with return_indices is not supported$"):
        ReversePass(_Net(lambda x: F.max_pool2d(x, 2, return_indices=True)[0].mean(dim=1, keepdim=True)))
    with pytest.raises(ValueError, match=r"^the reverse pass does not know call_function .*sigmoid"):
        ReversePass(_Net(lambda x: torch.sigmoid(x).mean(dim=1, keepdim=True)))
    with pytest.raises(ValueError, match=r"^the reverse pass does not know call_method mean$"):
        ReversePass(_Net(lambda x: x.mean(dim=2, keepdim=True)))  # not the channel mean
    with pytest.raises(ValueError, match=r"^the reverse pass does not know call_method sum$"):
        ReversePass(_Net(lambda x: x.sum(dim=1, keepdim=True)))
    reverse = ReversePass(net)
    assert reverse.capture_node("block1") is reverse.capture_node("block1.relu")  # the ReLU after the sum
    with pytest.raises(ValueError, match=r"^no module 'block3' in the traced network$"):
        reverse.capture_node("block3")
    shape_error = r"^expected images \(B, 3, H, W\) and peaks \(P, 3\), got \({}\) and \({}\)$"
    with pytest.raises(ValueError, match=shape_error.format("3, 20, 24", "1, 3")):
        peak_response_maps(net, images[0], peaks[:1])
    with pytest.raises(ValueError, match=shape_error.format("2, 3, 20, 24", "1, 2")):
        peak_response_maps(net, images, peaks[:1, 1:])
