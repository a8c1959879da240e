"""DASR and DASR* (deeply activated salient regions): training-free regions from the activation
peaks of a classification CNN, localised by probabilistic back-propagation to the input.

The DASR paper's pipeline (Xiao & Zhao, "Deeply Activated Salient Region for Instance Search"):

* **activation map** -- the image, 512 px on its long side, through an ImageNet CNN (ResNet-50 by
  default, VGG-16 in the paper's ablation); ``X̄`` is the channel mean of the last convolutional
  map (:class:`MeanActivation`).
* **peaks** -- DASR: the 3x3 local maxima of ``X̄`` (:func:`local_maxima`); DASR*: every position
  of ``X̄`` above its mean (:func:`above_mean_positions`), the redundancy removed by NMS below.
* **probabilistic back-propagation** (Eqn. 2-3, :func:`peak_response_maps`) -- each peak becomes a
  map ``M`` over the input pixels: the probability that a pixel contributes to the peak, obtained by
  back-propagating the peak through the network with every convolution's gradient replaced by a
  winner-take-all rule (Zhang et al.'s excitation back-propagation, as the paper). On an
  accelerator all peaks of an image run through **one batched backward** (chunked to bound
  memory); on a CPU, where that measured slower, one backward per peak (``strategy``,
  :func:`resolve_strategy`).
* **regions** -- pixels with ``M >= tau * max M`` (:func:`threshold_maps`), an ellipse from their
  second moments (Eqn. 4) and its circumscribed rectangle as the box (:func:`ellipse_boxes`), then
  NMS at IoU ``beta`` ranked by the peak's ``X̄`` value.
* **features** -- average RoI pooling of each box on ResNet-50 ``layer4.0`` (``conv5.0`` here),
  l2-normalised; the PCA-whitening of the paper is fitted on the database by the evaluator
  (``RetrievalConfig.whitening``), so it is the same for every method.

The back-propagation rule is the one of the authors' public implementation: for a convolution with
input ``A`` (of one image), weights ``W`` and output gradient ``g``, the input gradient is

    ``(A - min A) * conv_transpose(g / Z, W⁺)``,  ``Z = conv(A - min A, W⁺)``

(``W⁺`` = the positive part of ``W``, the bias left out; ``g / Z`` set to 0 where ``Z < 1e-10``),
while batch norm, ReLU and pooling pass their ordinary gradients. It is implemented as an ordinary
differentiable expression whose *value* is the convolution and whose *gradient* is the rule
(:func:`probabilistic_convolutions`), so that ``torch.func.vjp`` + ``vmap`` batch the backward of
many peaks through every layer -- one kernel call per layer for a whole chunk of peaks. For the
same reason eval-mode batch norms run as the per-channel affine maps they are
(:func:`affine_batch_norms`: same values and gradient, a cheaper batching rule), and the
parameters do not require grad while peaks are back-propagated (:func:`frozen_parameters`).

Choices where the paper is ambiguous (each a parameter):

* ``min A`` is taken per image (the public code takes it over its one-image batch); the paper
  writes ``A`` itself, i.e. assumes non-negative inputs, which the first layer's normalised
  image is not.
* Max pooling passes its ordinary gradient, as the public code; the paper's text instead treats it
  as an all-ones convolution.
* A DASR peak must also lie above the mean of ``X̄`` (the public code's filter for DASR) and both
  detectors skip the map's one-cell border and peaks with ``X̄ <= 0`` (which back-propagate
  nothing); ``exclude_border`` / ``local_max_above_mean`` switch these off.
* The region threshold is ``tau`` times the map's maximum (the paper's "normalised to [0, 1]" and
  ``tau = 0.1``); the public code instead keeps the top 5 % of pixels (``threshold="percentile"``).
* The ellipse's axes are ``2 sqrt(eigenvalue)`` of the pixels' covariance (the public code's
  factor; ``ellipse_scale``), so the box is ``centre ± 2 sqrt(var)`` per axis -- the exact
  circumscribed rectangle of that ellipse.
* NMS at ``beta = 0.3`` applies to DASR as well as DASR* (``nms_iou=None`` switches it off, the
  paper's ablation setting).
* An image without any region keeps its whole frame as one region of score 0
  (``whole_image_fallback``) so that it can still be found.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from instsearch.networks.backbones import StagedBackbone, build_backbone
from instsearch.networks.region_features import RoIFeaturePooler
from instsearch.networks.region_search import require_eval_mode
from instsearch.networks.transform import check_box_lists, check_images
from instsearch.networks.vgg import VGG16Backbone
from instsearch.structures import Regions

__all__ = ["DASR", "MeanActivation", "DASRDetection", "peak_response_maps", "probabilistic_convolutions",
           "affine_batch_norms", "frozen_parameters", "backprop_peaks", "resolve_strategy", "local_maxima", "above_mean_positions", "threshold_maps", "pixel_moments",
           "ellipse_boxes", "resize_long_side", "Z_EPS"]

#: ``g / Z`` is zero where ``Z`` is below this (the public code's constant).
Z_EPS = 1e-10

Strategy = Literal["auto", "batched", "sequential"]
Rule = Literal["probabilistic", "gradient"]


# ---------------------------------------------------------------------- probabilistic back-propagation
def _probabilistic_conv2d(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The convolution's value with the probabilistic rule as its gradient.

    With ``s = A - min A`` and ``inv = 1 / Z`` (0 where ``Z < Z_EPS``) held constant,
    ``h(A) = conv(A * s, W⁺) * inv`` has the input gradient ``s * conv_transpose(g * inv, W⁺)``;
    ``conv(A) + (h - h.detach())`` has the convolution's value (``h - h`` is exactly 0) and that
    gradient. Written with ordinary ops, it batches under ``vmap`` like any layer.
    """
    if module.padding_mode != "zeros":
        raise ValueError(f"probabilistic back-propagation supports zero-padded convolutions only, got "
                         f"padding_mode={module.padding_mode!r}")
    conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    with torch.no_grad():
        value = F.conv2d(x, module.weight, module.bias, **conv)
        shifted = x - x.amin(dim=(1, 2, 3), keepdim=True)  # per image: A - min A >= 0
        positive = module.weight.clamp_min(0)
        z = F.conv2d(shifted, positive, None, **conv)
        inv = torch.where(z < Z_EPS, torch.zeros_like(z), 1.0 / (z.abs() + Z_EPS))
    surrogate = F.conv2d(x * shifted, positive, None, **conv) * inv
    return value + (surrogate - surrogate.detach())


@contextlib.contextmanager
def _replaced_forwards(modules: Sequence[nn.Module], make_forward) -> Iterator[None]:
    """Within the block, each module's ``forward`` is ``make_forward(module)``; restored on exit,
    also on error (an instance attribute shadows the class's method, and is removed)."""
    for module in modules:
        if "forward" in vars(module):
            raise RuntimeError(f"{type(module).__name__} already has its forward replaced (nested contexts?)")
    try:
        for module in modules:
            module.forward = make_forward(module)
        yield
    finally:
        for module in modules:
            vars(module).pop("forward", None)


@contextlib.contextmanager
def probabilistic_convolutions(net: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``nn.Conv2d`` of ``net`` back-propagates by the probabilistic rule
    (its forward value unchanged); the modules are restored on exit, also on error."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    with _replaced_forwards(convs, lambda m: functools.partial(_probabilistic_conv2d, m)):
        yield net


def _affine_batch_norm(module: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """An eval-mode batch norm as the per-channel affine map it is, ``x * scale + shift``."""
    with torch.no_grad():
        scale = module.weight / torch.sqrt(module.running_var + module.eps)
        shift = module.bias - module.running_mean * scale
    return x * scale[:, None, None] + shift[:, None, None]


@contextlib.contextmanager
def affine_batch_norms(net: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every eval-mode ``nn.BatchNorm2d`` of ``net`` runs as a per-channel affine
    map: the same values (to float rounding) and the same gradient, but a plain product batches
    under ``vmap``, while the batch-norm backward's batching rule copies its inputs (measured on
    ResNet-50: 1.5x the time of the sequential backward's batch norms, plus as much in copies)."""
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and not m.training
             and m.track_running_stats and m.affine]
    with _replaced_forwards(norms, lambda m: functools.partial(_affine_batch_norm, m)):
        yield net


def backprop_peaks(vjp_fn, out_shape: Sequence[int], positions: Tensor, chunk_size: int = 16,
                   device: Union[str, torch.device] = "cpu") -> Tensor:
    """``(n, H, W)`` peak response maps of one image from the ``vjp_fn`` of its forward pass.

    ``out_shape`` is ``(1, 1, h, w)`` (the image's ``X̄``) and ``positions`` ``(n, 2)`` = ``(y, x)``
    on it. A chunk of one-hot output gradients runs through ``vmap(vjp_fn)`` at once; the maps are
    the input gradients summed over colour channels and clamped at 0 (the public code's map);
    ``device`` is the image's. Run it where the network's parameters do not require grad
    (:func:`frozen_parameters`), or the backward holds a graph for them.
    """
    h, w = int(out_shape[-2]), int(out_shape[-1])
    flat = (positions[:, 0] * w + positions[:, 1]).long()
    maps = []
    for chunk in flat.split(max(1, int(chunk_size))):  # chunks of peaks, not single peaks
        onehot = torch.zeros(len(chunk), h * w, device=device)
        onehot[torch.arange(len(chunk), device=device), chunk.to(device)] = 1.0
        (grad,) = torch.func.vmap(vjp_fn)(onehot.view(len(chunk), *out_shape))
        maps.append(grad[:, 0].sum(1).clamp_min(0))
    if not maps:
        raise ValueError("backprop_peaks: no peak positions")
    return torch.cat(maps)


@contextlib.contextmanager
def frozen_parameters(net: nn.Module) -> Iterator[nn.Module]:
    """Parameters of ``net`` do not require grad within the block (restored on exit).

    Both the forward and the batched backward must run inside: ``torch.func``'s backward is itself
    recorded for parameters that require grad (to allow higher-order transforms), which keeps every
    peak's intermediate gradients alive -- measured on ResNet-50 at 256 px, a 4-peak chunk added
    1.6 GiB to the peak memory instead of 0.6 GiB, and took 1.4x the time.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield net
    finally:
        for p in params:
            p.requires_grad_(True)


def _backprop_context(net: nn.Module, rule: Rule) -> contextlib.ExitStack:
    """Batch norms as affine maps (both strategies, so that they compute the same numbers) and,
    for the probabilistic rule, the convolutions' replacement."""
    stack = contextlib.ExitStack()
    stack.enter_context(affine_batch_norms(net))
    if rule == "probabilistic":
        stack.enter_context(probabilistic_convolutions(net))
    return stack


def _image_vjp(net: nn.Module, image: Tensor, rule: Rule, function=None, has_aux: bool = False):
    """``function`` (default ``net``) on one ``(1, 3, H, W)`` image under ``torch.func.vjp``, the
    convolutions of ``net`` back-propagating by ``rule``."""
    with _backprop_context(net, rule):
        return torch.func.vjp(net if function is None else function, image, has_aux=has_aux)


def _check_rule(rule: str) -> None:
    if rule not in ("probabilistic", "gradient"):
        raise ValueError(f"rule must be 'probabilistic' or 'gradient', got {rule!r}")


def resolve_strategy(strategy: str, device: torch.device) -> str:
    """``"auto"`` -> ``"batched"`` on an accelerator, ``"sequential"`` on the CPU.

    On a GPU one peak's backward is far too small to fill the device, so batching the peaks is
    what pays. On a CPU the arithmetic is the same either way and one peak at a time keeps each
    layer's gradients in cache, while ``vmap`` streams a whole chunk through memory: measured with
    ResNet-50 at 512 px on one core, the batched backward took 1.2x (chunks of 1) to 2x (chunks of
    12) the time of one backward per peak (``benchmarks/dasr_throughput.py``, README "Measured").
    """
    if strategy not in ("auto", "batched", "sequential"):
        raise ValueError(f"strategy must be 'auto', 'batched' or 'sequential', got {strategy!r}")
    if strategy == "auto":
        return "sequential" if torch.device(device).type == "cpu" else "batched"
    return strategy


def peak_response_maps(net: nn.Module, images: Tensor, peaks: Tensor, *, chunk_size: int = 16,
                       strategy: Strategy = "auto", rule: Rule = "probabilistic") -> Tensor:
    """Back-propagate each peak of ``X̄`` to the input: ``(P, H, W)`` maps, in the order of ``peaks``.

    Args:
        net: an ``nn.Module`` of convolutions, batch norms, ReLUs, pooling and residual sums mapping
            ``(B, 3, H, W)`` (normalised) images to ``X̄`` ``(B, 1, h, w)``; in eval mode.
        images: ``(B, 3, H, W)``.
        peaks: ``(P, 3)`` integer ``(batch index, y, x)`` on ``X̄``.
        chunk_size: peaks back-propagated together (memory grows with it: one copy of the
            activation gradients per peak, about 0.2 GiB for ResNet-50 at 512 px).
        strategy: ``"batched"`` -- one forward per image, its peaks through ``vmap`` of the backward
            in chunks; ``"sequential"`` -- one forward per image and one backward per peak (the
            authors' scheme); ``"auto"`` -- batched on an accelerator, sequential on the CPU, where
            it is faster (:func:`resolve_strategy`).
        rule: ``"probabilistic"`` (see the module docstring) or ``"gradient"`` (plain gradients).

    Returns:
        ``(P, H, W)``: the input gradient summed over colour channels, clamped at 0.
    """
    _check_rule(rule)
    strategy = resolve_strategy(strategy, images.device)
    if images.ndim != 4 or peaks.ndim != 2 or peaks.shape[-1] != 3:
        raise ValueError(f"expected images (B, 3, H, W) and peaks (P, 3), got {tuple(images.shape)} and "
                         f"{tuple(peaks.shape)}")
    out = images.new_zeros(len(peaks), *images.shape[-2:])
    peaks = peaks.long()
    with frozen_parameters(net):
        for b in peaks[:, 0].unique().tolist():  # one forward per image, not per peak
            rows = (peaks[:, 0] == b).nonzero().flatten()
            image = images[b:b + 1].detach()
            if strategy == "batched":
                value, vjp_fn = _image_vjp(net, image, rule)
                out[rows] = backprop_peaks(vjp_fn, value.shape, peaks[rows, 1:], chunk_size, images.device)
            else:
                out[rows] = _sequential_maps(net, image, peaks[rows, 1:], rule)
    return out


def _sequential_maps(net: nn.Module, image: Tensor, positions: Tensor, rule: Rule) -> Tensor:
    """One ordinary backward per peak through a retained graph (the authors' loop)."""
    x, value, _ = _recorded_forward(net, image, rule)
    return _backward_per_peak(x, value, positions)


def _recorded_forward(net: nn.Module, image: Tensor, rule: Rule, function=None):
    """``function`` (default ``net``) on ``image`` with an autograd graph (convolutions of ``net``
    by ``rule``): ``(input requiring grad, X̄, aux or None)``."""
    # Lightning tests under inference mode, whose tensors cannot enter a graph: leave it
    with torch.inference_mode(False), torch.enable_grad(), _backprop_context(net, rule):
        x = image.detach().clone().requires_grad_(True)
        out = (net if function is None else function)(x)
    value, aux = out if isinstance(out, tuple) else (out, None)
    return x, value, aux


def _backward_per_peak(x: Tensor, value: Tensor, positions: Tensor) -> Tensor:
    maps = []
    with torch.inference_mode(False), torch.enable_grad():
        for y, xx in positions.tolist():  # the authors' scheme: one backward per peak
            grad_out = torch.zeros_like(value)
            grad_out[0, 0, y, xx] = 1.0
            (grad,) = torch.autograd.grad(value, x, grad_out, retain_graph=True)
            maps.append(grad[0].sum(0).clamp_min(0))
    return torch.stack(maps)


# ---------------------------------------------------------------------- the activation map
class MeanActivation(nn.Module):
    """``X̄``: the channel mean of a backbone stage (the last convolutional map), optionally
    max-pooled 2x2 first (VGG-16's pool5, where the paper starts the back-propagation).

    :meth:`forward_capturing` also returns another layer's map of the same pass (the descriptor's
    ``conv5.0`` lies on the way to ``conv5``), so that detection runs the backbone once.
    """

    def __init__(self, backbone: StagedBackbone, layer: str, pool: bool = False) -> None:
        super().__init__()
        stage, block = backbone.parse_layer(layer)
        if block is not None:
            raise ValueError(f"the activation layer must be a stage (e.g. 'conv5'), got {layer!r}")
        self.backbone = backbone
        self.layer = layer
        self.pool = bool(pool)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_capturing(x, None)[0]

    def forward_capturing(self, x: Tensor, capture: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
        """``(X̄ (B, 1, h, w), map of layer capture or None)``; the captured map is detached and is
        ``None`` when ``capture`` comes after the activation layer."""
        stage, block = self.backbone.parse_layer(capture) if capture is not None else (None, None)
        captured = None
        for name, module in self.backbone.stage_modules().items():
            if name == stage and block is not None:
                for j, child in enumerate(module.children()):
                    x = child(x)
                    if j == block:
                        captured = x.detach()
            else:
                x = module(x)
                if name == stage:
                    captured = x.detach()
            if name == self.layer:
                break
        if self.pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        return x.mean(dim=1, keepdim=True), captured


# ---------------------------------------------------------------------- peaks
def _border(h: int, w: int, width: int, device) -> Tensor:
    inner = torch.zeros(h, w, dtype=torch.bool, device=device)
    if h > 2 * width and w > 2 * width:
        inner[width:h - width, width:w - width] = True
    return inner


def _as_peaks(keep: Tensor, xbar: Tensor) -> tuple[Tensor, Tensor]:
    peaks = keep.nonzero()  # (P, 3) = (b, y, x), row-major per image
    return peaks, xbar[keep]


def local_maxima(xbar: Tensor, window: int = 3, exclude_border: bool = True,
                 above_mean: bool = True) -> tuple[Tensor, Tensor]:
    """DASR's peaks: positions of ``xbar`` ``(B, h, w)`` that equal the maximum of their
    ``window x window`` neighbourhood (ties all count), optionally also above the map's mean,
    never ``<= 0``, and outside the ``window // 2`` border when ``exclude_border``.

    Returns ``(peaks (P, 3) int64 = (b, y, x), values (P,))``, image by image in row-major order.
    """
    if window % 2 != 1:
        raise ValueError(f"the peak window must be odd, got {window}")
    pooled = F.max_pool2d(xbar[:, None], kernel_size=window, stride=1, padding=window // 2)[:, 0]
    keep = (xbar >= pooled) & (xbar > 0)
    if above_mean:
        keep &= xbar > xbar.mean(dim=(1, 2), keepdim=True)
    if exclude_border:
        keep &= _border(*xbar.shape[-2:], window // 2, xbar.device)
    return _as_peaks(keep, xbar)


def above_mean_positions(xbar: Tensor, exclude_border: bool = True) -> tuple[Tensor, Tensor]:
    """DASR*'s peaks: every position of ``xbar`` ``(B, h, w)`` strictly above its image's mean
    (and above 0), optionally outside the one-cell border. Same return as :func:`local_maxima`."""
    keep = (xbar > xbar.mean(dim=(1, 2), keepdim=True)) & (xbar > 0)
    if exclude_border:
        keep &= _border(*xbar.shape[-2:], 1, xbar.device)
    return _as_peaks(keep, xbar)


# ---------------------------------------------------------------------- regions
def _row_percentile(values: Tensor, q: float) -> Tensor:
    """Per row of ``(n, N)``, numpy's default (linear) ``percentile(q)``; sorting per row has no
    size limit, unlike ``torch.quantile``."""
    ordered = values.sort(dim=1).values
    pos = (values.shape[1] - 1) * q / 100.0
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return ordered[:, lo] + (ordered[:, hi] - ordered[:, lo]) * (pos - lo)


def threshold_maps(maps: Tensor, tau: float = 0.1, rule: Literal["relative", "percentile"] = "relative",
                   percentile: float = 95.0) -> Tensor:
    """The activated pixels of each ``(n, H, W)`` map: ``M >= tau * max M`` (``relative``, the
    paper's normalised map and threshold) or ``M >= its percentile`` (``percentile``, the public
    code's top 5 %); zero pixels are never activated, so an all-zero map activates nothing."""
    if rule == "relative":
        floor = tau * maps.amax(dim=(1, 2), keepdim=True)
    elif rule == "percentile":
        floor = _row_percentile(maps.flatten(1), percentile)[:, None, None]
    else:
        raise ValueError(f"threshold rule must be 'relative' or 'percentile', got {rule!r}")
    return (maps >= floor) & (maps > 0)


def pixel_moments(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre ``(n, 2)`` = ``(cx, cy)`` and covariance ``(n, 2, 2)`` (x, y order) of each mask's
    pixels (pixel ``(i, j)`` at ``(j + 0.5, i + 0.5)``), unweighted as Eqn. 4, in float64 (the
    squares of 512 px coordinates lose the variance of a small region in float32); and the pixel
    counts ``(n,)``. An empty mask has count 0 and undefined (NaN) moments."""
    m = masks.to(torch.float64)
    h, w = masks.shape[-2:]
    ys = torch.arange(h, dtype=torch.float64, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=torch.float64, device=masks.device) + 0.5
    count = m.sum(dim=(1, 2))
    row, col = m.sum(dim=2), m.sum(dim=1)  # (n, h), (n, w) marginals
    cx, cy = (col * xs).sum(1) / count, (row * ys).sum(1) / count
    sxx = (col * xs ** 2).sum(1) / count - cx ** 2
    syy = (row * ys ** 2).sum(1) / count - cy ** 2
    sxy = torch.einsum("nij,i,j->n", m, ys, xs) / count - cx * cy
    cov = torch.stack([torch.stack([sxx, sxy], -1), torch.stack([sxy, syy], -1)], -2)
    return torch.stack([cx, cy], -1), cov, count


def ellipse_boxes(centre: Tensor, cov: Tensor, scale: float = 2.0,
                  size: Optional[tuple[int, int]] = None) -> Tensor:
    """``(n, 4)`` float32 ``[x1, y1, x2, y2]``: the circumscribed rectangle of each ellipse with
    axes ``scale * sqrt(eigenvalues of cov)`` -- exactly ``centre ± scale * sqrt(diag cov)`` --
    at least one pixel wide, clipped to ``size`` = (H, W) when given."""
    half = (scale * cov.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()).clamp_min(0.5)
    boxes = torch.cat([centre - half, centre + half], dim=-1)
    if size is not None:
        h, w = size
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], -1)
    return boxes.float()


def resize_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """The size with the long side at ``long_side`` (up or down, as the paper), aspect kept."""
    scale = long_side / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


@dataclass
class DASRDetection:
    """Everything detection computed for one image (network pixels), for figures and inspection.

    ``peaks`` ``(P, 2)`` = ``(y, x)`` on ``xbar``; ``maps`` ``(P, H, W)`` (``None`` unless asked
    for); ``centres`` / ``covs`` the ellipses; ``boxes`` / ``scores`` every peak's region;
    ``kept`` the indices that survive the empty-region filter and NMS, best first.
    """

    xbar: Tensor
    peaks: Tensor
    values: Tensor
    maps: Optional[Tensor]
    centres: Tensor
    covs: Tensor
    boxes: Tensor
    kept: Tensor
    size: tuple[int, int]
    describe_map: Optional[Tensor] = None


# ---------------------------------------------------------------------- the network
class DASR(nn.Module):
    """DASR / DASR* regions and features as a :class:`~instsearch.structures.RegionSearchModel`.

    Args:
        backbone: a registry name (``resnet50`` default, ``vgg16`` as the paper's ablation, any
            CNN such as ``small``) or a built :class:`~instsearch.networks.staged.StagedBackbone`.
        weights: weights file of a backbone given by name (an ImageNet state dict, or any
            instsearch checkpoint holding that backbone); ``None`` runs randomly initialised.
        star: DASR* (every above-mean position of ``X̄``) instead of DASR (local maxima).
        long_side: images are resized to this long side (512, the paper's).
        activation_layer: the stage whose channel mean is ``X̄`` (``None``: the last stage).
        pool_activation: max-pool 2x2 before the mean (VGG-16's pool5); ``None``: only for VGG-16.
        describe_layer: the map regions are pooled from (``conv5.0`` = ResNet-50's ``layer4.0``,
            the paper's Block4_unit1; any layer, its Fig. 4 ablation).
        pooling: ``"avg"`` (the paper's) or ``"max"`` / ``"gem"``.
        window / exclude_border / local_max_above_mean: peak finding (see the module docstring).
        tau / threshold / percentile: the activated pixels of a map (:func:`threshold_maps`).
        ellipse_scale: ellipse axes in standard deviations (:func:`ellipse_boxes`).
        nms_iou: NMS threshold ``beta`` on the regions ranked by peak value (``None``: no NMS).
        max_peaks: back-propagate at most this many peaks per image (highest ``X̄`` first;
            ``None``: all), a bound on time for very large images.
        chunk_size / strategy / rule: the back-propagation (:func:`peak_response_maps`).
        whole_image_fallback: an image without regions keeps its whole frame (score 0).
    """

    predicts_labels = False

    def __init__(self, backbone: Union[str, StagedBackbone] = "resnet50", weights: Union[str, Path, None] = None,
                 star: bool = False, long_side: int = 512, activation_layer: Optional[str] = None,
                 pool_activation: Optional[bool] = None, describe_layer: str = "conv5.0",
                 pooling: Literal["avg", "max", "gem"] = "avg", window: int = 3, exclude_border: bool = True,
                 local_max_above_mean: bool = True, tau: float = 0.1,
                 threshold: Literal["relative", "percentile"] = "relative", percentile: float = 95.0,
                 ellipse_scale: float = 2.0, nms_iou: Optional[float] = 0.3, max_peaks: Optional[int] = None,
                 chunk_size: int = 16, strategy: Strategy = "auto", rule: Rule = "probabilistic",
                 whole_image_fallback: bool = True) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, weights=weights, frozen_stages=0)
        elif weights is not None:
            raise ValueError("weights only apply to a backbone given by name; load them into the instance")
        _check_rule(rule)
        resolve_strategy(strategy, torch.device("cpu"))  # refuse an unknown one now
        if threshold not in ("relative", "percentile"):
            raise ValueError(f"threshold must be 'relative' or 'percentile', got {threshold!r}")
        # training-free: nothing is ever fitted, and parameters that require grad would make the
        # batched backward record (and hold) a graph for them (see frozen_parameters)
        self.backbone = backbone.requires_grad_(False)
        layer = backbone.feature_info.names[-1] if activation_layer is None else activation_layer
        pool = isinstance(backbone, VGG16Backbone) if pool_activation is None else pool_activation
        self.activation = MeanActivation(backbone, layer, pool)
        self.describe_layer = describe_layer
        backbone.parse_layer(describe_layer)  # refuse an unknown layer now, not at the first image
        self.pooler = RoIFeaturePooler([describe_layer], pooling=pooling)
        self.star = bool(star)
        self.long_side = int(long_side)
        self.window, self.exclude_border = int(window), bool(exclude_border)
        self.local_max_above_mean = bool(local_max_above_mean)
        self.tau, self.threshold, self.percentile = float(tau), threshold, float(percentile)
        self.ellipse_scale = float(ellipse_scale)
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.max_peaks = max_peaks
        self.chunk_size, self.strategy, self.rule = int(chunk_size), strategy, rule
        self.whole_image_fallback = bool(whole_image_fallback)

    @property
    def feature_dim(self) -> int:
        return self.backbone.layer_channels(self.describe_layer)

    # ------------------------------------------------------------------ detector
    def network_input(self, image: Tensor) -> Tensor:
        """One ``(3, H, W)`` image in ``[0, 1]`` -> the normalised ``(1, 3, H', W')`` network input
        (long side ``long_side``)."""
        size = resize_long_side(int(image.shape[-2]), int(image.shape[-1]), self.long_side)
        x = image[None].float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return self.backbone.normalize_input(x)

    def find_peaks(self, xbar: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, h, w)`` -> peaks ``(P, 3)`` and values, by the DASR or DASR* rule, capped at
        ``max_peaks`` per image (highest first)."""
        if self.star:
            peaks, values = above_mean_positions(xbar, self.exclude_border)
        else:
            peaks, values = local_maxima(xbar, self.window, self.exclude_border, self.local_max_above_mean)
        if self.max_peaks is not None and len(values) > self.max_peaks:
            top = torch.topk(values, self.max_peaks).indices.sort().values  # a single image here
            peaks, values = peaks[top], values[top]
        return peaks, values

    def explain(self, image: Tensor, keep_maps: bool = True) -> DASRDetection:
        """Detection of one ``(3, H, W)`` image with every intermediate (network pixels)."""
        x = self.network_input(image)
        size = (int(x.shape[-2]), int(x.shape[-1]))

        def activation(inp: Tensor) -> tuple[Tensor, Optional[Tensor]]:
            return self.activation.forward_capturing(inp, self.describe_layer)

        strategy = resolve_strategy(self.strategy, x.device)
        if strategy == "batched":
            xbar, vjp_fn, fmap = _image_vjp(self.activation, x, self.rule, function=activation, has_aux=True)
        else:
            x_grad, value, fmap = _recorded_forward(self.activation, x, self.rule, function=activation)
            xbar = value
        xbar = xbar.detach()
        peaks, values = self.find_peaks(xbar[:, 0])
        positions = peaks[:, 1:]
        if len(positions) == 0:
            maps = x.new_zeros(0, *size)
        elif strategy == "batched":
            maps = backprop_peaks(vjp_fn, xbar.shape, positions, self.chunk_size, x.device)
        else:
            maps = _backward_per_peak(x_grad, value, positions)
        masks = threshold_maps(maps, self.tau, self.threshold, self.percentile)
        centres, covs, count = pixel_moments(masks)
        boxes = ellipse_boxes(centres, covs, self.ellipse_scale, size) if len(masks) else x.new_zeros(0, 4)
        valid = (count > 0).nonzero().flatten()
        kept = valid
        if self.nms_iou is not None and len(valid):
            kept = valid[nms(boxes[valid], values[valid].float(), self.nms_iou)]
        else:
            kept = valid[torch.argsort(values[valid], descending=True)]
        return DASRDetection(xbar=xbar[0, 0], peaks=positions, values=values, maps=maps if keep_maps else None,
                             centres=centres.float(), covs=covs.float(), boxes=boxes, kept=kept, size=size,
                             describe_map=fmap)

    # ------------------------------------------------------------------ descriptor
    def _pool(self, fmap: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
        return self.pooler({self.describe_layer: fmap}, [boxes], size)

    def _describe_map(self, x: Tensor) -> Tensor:
        return self.backbone.forward_layer(x, self.describe_layer)

    # ------------------------------------------------------------------ RegionSearchModel
    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: each image's DASR (or DASR*) boxes in its own pixels, scored by the
        peak's ``X̄`` value, with their pooled features."""
        require_eval_mode(self, "detect_regions")
        check_images(images)
        out = []
        for image in images:  # one forward (and one batched backward) per image
            det = self.explain(image, keep_maps=False)
            fmap = det.describe_map if det.describe_map is not None else self._describe_map(self.network_input(image))
            boxes, scores = det.boxes[det.kept], det.values[det.kept].float()
            if len(boxes) == 0 and self.whole_image_fallback:
                boxes = torch.tensor([[0.0, 0.0, det.size[1], det.size[0]]], device=image.device)
                scores = torch.zeros(1, device=image.device)
            features = self._pool(fmap, boxes.to(fmap), det.size)
            regions = Regions(boxes=boxes.to(image.device), scores=scores.to(image.device),
                              features=features.to(image.device), image_size=det.size)
            out.append(regions.rescaled((int(image.shape[-2]), int(image.shape[-1]))))
        return out

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: each box average-pooled from its image's map at the network size, as a region is."""
        require_eval_mode(self, "describe_boxes")
        check_images(images)
        out = []
        for image, b in zip(images, check_box_lists(images, boxes)):
            x = self.network_input(image)
            size = (int(x.shape[-2]), int(x.shape[-1]))
            scale = b.new_tensor([size[1] / image.shape[-1], size[0] / image.shape[-2]] * 2)
            fmap = self._describe_map(x)
            out.append(self._pool(fmap, (b * scale).to(fmap), size).to(image.device))
        return out

    def figure(self, image: Tensor, max_maps: int = 7, panel: int = 192):
        """The paper's Fig. 3 for one ``(3, H, W)`` image as a PIL image: ``X̄`` with its peaks, the
        kept regions' peak response maps with their ellipses, and every ellipse and box."""
        from PIL import Image

        from instsearch.eval.visualize import salient_region_figure

        with torch.no_grad():
            det = self.explain(image, keep_maps=True)
            shown = F.interpolate(image[None].float(), size=det.size, mode="bilinear", align_corners=False,
                                  antialias=True)[0]
        rgb = Image.fromarray((shown.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
        k = det.kept
        return salient_region_figure(rgb, det.xbar, det.maps[k], det.centres[k], det.covs[k], det.boxes[k],
                                     peaks=det.peaks[k], ellipse_scale=self.ellipse_scale, max_maps=max_maps,
                                     panel=panel)

    def classify_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """DASR is class-agnostic (``predicts_labels`` is ``False``): category pruning does not apply."""
        raise TypeError(f"{type(self).__name__} is class-agnostic: it predicts no categories (predicts_labels is False)")


def figure_main(argv: Optional[list[str]] = None) -> int:
    """``instsearch dasr-figure IMAGE --out fig.png``: X̄, the peak response maps and the fitted
    ellipses / boxes of one image (the DASR paper's Fig. 3)."""
    import argparse

    from instsearch.datamodules.image_io import BadImageError, load_rgb
    from instsearch.datamodules.transforms import to_float_tensor

    p = argparse.ArgumentParser(prog="instsearch dasr-figure", description=figure_main.__doc__)
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default=None, help="ImageNet state dict or an instsearch checkpoint")
    p.add_argument("--star", action="store_true", help="DASR* instead of DASR")
    p.add_argument("--long-side", type=int, default=512)
    p.add_argument("--max-maps", type=int, default=7)
    a = p.parse_args(argv)
    try:
        image = load_rgb(a.image)
    except BadImageError as err:
        p.error(str(err))  # the file and what is wrong with it, no traceback
    net = DASR(a.backbone, weights=a.weights, star=a.star, long_side=a.long_side).eval()
    fig = net.figure(to_float_tensor(image), max_maps=a.max_maps)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(a.out)
    print(f"wrote {a.out}")
    return 0
