"""Probabilistic back-propagation (DASR's Eqn. 2-3) as an explicit reverse pass with the peaks as
the batch dimension.

DASR (Xiao & Zhao, "Deeply Activated Salient Region for Instance Search") back-propagates every
activation peak of ``X̄`` to the input pixels with the winner-take-all rule of excitation
back-propagation (Zhang et al., "Top-down Neural Attention by Excitation Backprop"): for a
convolution with input ``A`` (one image), weights ``W`` and output gradient ``g``,

    ``grad A = s * conv_transpose(g / Z, W⁺)``,  ``s = A − min A``,  ``Z = conv(s, W⁺)``

(``W⁺`` the positive part of ``W``, the bias left out, ``g / Z`` set to 0 where ``Z < 1e-10``, the
constant of the authors' public code, https://github.com/wlzhao22/DASR, commit
e71d16743e1bdf764d5fd178c43f080264a55577),
while batch norm (eval: a per-channel scale), ReLU (its mask), max pooling (its argmax indices)
and residual sums pass their ordinary gradients.

Why not autograd: a peak's map is a vector-Jacobian product of the whole network, and DASR* asks
for ~100 of them per image. Autograd records one image's graph, so the peaks either go one
backward at a time (each ``(1, C, H, W)``: thin matrix products at the deep layers) or through
``vmap`` of the backward, whose batching rules copy and loop; the rule itself, written as a
differentiable surrogate, cost a third convolution per layer plus a recorded elementwise graph.
Here the network is traced once (``torch.fx``) into its convolutions, batch norms, ReLUs, max
pools, sums and the channel mean; :meth:`ReversePass.forward` runs it on one image keeping only
what the reverse pass needs -- ``s`` and ``1/Z`` per convolution (two convolutions per layer:
the value and ``Z``), the ReLU masks, the pooling indices, the batch-norm scales -- and
:meth:`ReversePass.backward` takes a ``(P, 1, h, w)`` batch of one-hot output gradients through
them in reverse: one ``conv_transpose`` per layer for all ``P`` peaks at once. Per-layer factors
that follow each other (ReLU mask, batch-norm scale, ``1/Z``) are multiplied once in the forward,
so the reverse pass spends one product, one ``conv_transpose`` and one product per convolution.

``dtype=torch.bfloat16`` runs the reverse convolutions in bfloat16 (``s``, ``1/Z`` and the
accumulation between layers stay float32); on CPUs with AVX-512 BF16 and on GPUs that is about
half the time, with maps within ~0.3 % of float32's.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReversePass", "MeanChannels", "Z_EPS", "peak_gradients", "bytes_per_peak", "peak_response_maps",
           "resolve_strategy", "chunk_for_budget", "peaks_per_pass", "reverse_pass_of", "check_rule"]

#: ``g / Z`` is zero where ``Z`` is below this (the constant of the public code, see the module docstring).
Z_EPS = 1e-10


class MeanChannels(nn.Module):
    """``X̄``: the channel mean, ``(B, C, h, w) -> (B, 1, h, w)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1, keepdim=True)


@dataclass
class _Step:
    """One traced operation and what its reverse needs."""

    kind: str  # "conv" | "bn" | "relu" | "maxpool" | "add" | "mean" | "identity"
    node: fx.Node
    inputs: list[fx.Node]
    module: Optional[nn.Module] = None


class ReversePass:
    """The probabilistic (or plain gradient) reverse pass of a CNN ``net`` mapping ``(1, 3, H, W)``
    to ``X̄`` ``(1, 1, h, w)``, for a batch of peaks at once.

    ``net`` may contain ``nn.Conv2d`` (zero padding), eval-mode ``nn.BatchNorm2d``, ``nn.ReLU``,
    ``nn.MaxPool2d``, sums (``+``, residual connections), ``nn.Identity``/``nn.Sequential``
    nesting and a final channel mean (:class:`MeanChannels` or ``x.mean(dim=1, keepdim=True)``);
    anything else is refused at construction, naming it.

    Args:
        net: the network (e.g. ``nn.Sequential(*stages, MeanChannels())``), in eval mode.
        rule: ``"probabilistic"`` or ``"gradient"`` (the ordinary input gradient).
        dtype: the reverse convolutions' dtype (``torch.float32`` or ``torch.bfloat16``).
        channels_last: keep the reverse pass's 4-D tensors channels-last (oneDNN's native layout).
    """

    def __init__(self, net: nn.Module, rule: str = "probabilistic", dtype: torch.dtype = torch.float32,
                 channels_last: bool = False) -> None:
        if rule not in ("probabilistic", "gradient"):
            raise ValueError(f"rule must be 'probabilistic' or 'gradient', got {rule!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.net, self.rule, self.dtype, self.channels_last = net, rule, dtype, bool(channels_last)
        self.graph = fx.symbolic_trace(net)
        self.steps = [self._step(node) for node in self.graph.graph.nodes if node.op not in ("placeholder", "output")]
        self.input_node = next(n for n in self.graph.graph.nodes if n.op == "placeholder")
        self.output_node = next(n for n in self.graph.graph.nodes if n.op == "output").args[0]
        self._users: dict[fx.Node, int] = {}  # how many steps read each value
        self._last_use: dict[fx.Node, fx.Node] = {}  # the last step reading it (then it is freed)
        for step in self.steps:
            for node in step.inputs:
                self._users[node] = self._users.get(node, 0) + 1
                self._last_use[node] = step.node
        self._by_node = {step.node: step for step in self.steps}

    # ------------------------------------------------------------------ tracing
    def _step(self, node: fx.Node) -> _Step:
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op == "call_module":
            module = self.graph.get_submodule(node.target)
            if isinstance(module, nn.Conv2d):
                if module.padding_mode != "zeros":
                    raise ValueError(f"{node.target}: probabilistic back-propagation supports zero-padded "
                                     f"convolutions only, got padding_mode={module.padding_mode!r}")
                return _Step("conv", node, inputs, module)
            if isinstance(module, nn.BatchNorm2d):
                if module.training or not module.track_running_stats:
                    raise ValueError(f"{node.target}: batch norm must be in eval mode with running statistics")
                return _Step("bn", node, inputs, module)
            if isinstance(module, nn.ReLU):
                return _Step("relu", node, inputs, module)
            if isinstance(module, nn.MaxPool2d):
                return _Step("maxpool", node, inputs, module)
            if isinstance(module, nn.Identity):
                return _Step("identity", node, inputs, module)
            if isinstance(module, MeanChannels):
                return _Step("mean", node, inputs, module)
            raise ValueError(f"the reverse pass does not know {type(module).__name__} ({node.target})")
        if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
            return _Step("add", node, inputs)
        if node.op == "call_function" and node.target in (F.relu, torch.relu):
            return _Step("relu", node, inputs)
        if node.op == "call_function" and "max_pool2d" in getattr(node.target, "__name__", ""):
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
            given = {**dict(zip(names, node.args)), **node.kwargs}
            pool = nn.MaxPool2d(given["kernel_size"], given.get("stride") or given["kernel_size"],
                                given.get("padding", 0), given.get("dilation", 1),
                                ceil_mode=given.get("ceil_mode", False))
            if given.get("return_indices"):
                raise ValueError(f"{node.name}: max_pool2d with return_indices is not supported")
            return _Step("maxpool", node, inputs, pool)
        if node.op == "call_method" and node.target == "mean" and node.kwargs.get("dim") == 1 and node.kwargs.get("keepdim"):
            return _Step("mean", node, inputs)
        raise ValueError(f"the reverse pass does not know {node.op} {node.target}")

    # ------------------------------------------------------------------ forward
    def capture_node(self, path: str) -> fx.Node:
        """The node whose value is the output of the submodule at ``path`` of the traced net (its
        last operation, e.g. a bottleneck's final ReLU after the residual sum)."""
        found = None
        for step in self.steps:
            stack = step.node.meta.get("nn_module_stack") or {}
            paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
            if any(p == path or p.startswith(path + ".") for p in paths):
                found = step.node
        if found is None:
            raise ValueError(f"no module {path!r} in the traced network")
        return found

    @torch.no_grad()
    def forward(self, image: Tensor, capture: Optional[str] = None) -> tuple[Tensor, dict]:
        """``X̄`` of ``image`` ``(1, 3, H, W)`` and the record :meth:`backward` reads; with
        ``capture`` (a module path of the traced net) also that module's output, as
        ``record["captured"]`` (the same pass computes the region descriptor's map)."""
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"the reverse pass records one image (1, 3, H, W), got {tuple(image.shape)}")
        keep = self.capture_node(capture) if capture is not None else None
        captured = None
        env: dict[fx.Node, Tensor] = {self.input_node: image}
        tape: dict[fx.Node, dict] = {}
        shapes: dict[fx.Node, torch.Size] = {self.input_node: image.shape}
        for step in self.steps:
            x = env[step.inputs[0]] if step.inputs else None
            saved: dict = {}
            if step.kind == "conv":
                m = step.module
                out = m(x)
                weight = m.weight if self.rule == "gradient" else m.weight.clamp_min(0)
                saved["weight"] = weight.to(self.dtype)
                if self.rule == "probabilistic":
                    shifted = x - x.amin(dim=(1, 2, 3), keepdim=True)
                    z = F.conv2d(shifted, weight, None, m.stride, m.padding, m.dilation, m.groups)
                    saved["pre"] = torch.where(z < Z_EPS, torch.zeros_like(z), 1.0 / (z.abs() + Z_EPS))
                    saved["post"] = shifted
            elif step.kind == "bn":
                m = step.module
                scale = m.weight / torch.sqrt(m.running_var + m.eps) if m.affine else torch.rsqrt(m.running_var + m.eps)
                shift = (m.bias if m.affine else 0.0) - m.running_mean * scale
                out = x * scale[:, None, None] + shift[:, None, None]  # eval batch norm as its affine map
                saved["pre"] = scale[None, :, None, None]
            elif step.kind == "relu":
                out = F.relu(x)
                saved["pre"] = (out > 0).to(out.dtype)
            elif step.kind == "maxpool":
                m = step.module
                out, indices = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation,
                                            ceil_mode=m.ceil_mode, return_indices=True)
                saved["indices"] = indices
            elif step.kind == "add":
                out = env[step.inputs[0]] + env[step.inputs[1]]
            elif step.kind == "mean":
                out = x.mean(dim=1, keepdim=True)
            else:  # identity
                out = x
            env[step.node] = out
            shapes[step.node] = out.shape
            if step.node is keep:
                captured = out
            tape[step.node] = saved
            for node in step.inputs:  # free what no later step reads
                if self._last_use[node] is step.node and node is not self.output_node:
                    env.pop(node, None)
        value = env[self.output_node]
        self._fold(tape)
        return value, {"tape": tape, "shapes": shapes, "device": image.device, "captured": captured}

    def _fold(self, tape: dict) -> None:
        """Multiply chains of elementwise factors into one: a ReLU mask, then the batch-norm scale
        before it, then the convolution's ``1/Z`` before that (each read by one step only) become
        the convolution's single ``pre`` factor, applied once to the reverse gradient."""
        for step in reversed(self.steps):
            if step.kind not in ("relu", "bn") or "pre" not in tape[step.node]:
                continue
            source = step.inputs[0]
            below = self._by_node.get(source)
            if below is None or self._users.get(source, 0) != 1 or below.kind not in ("bn", "conv"):
                continue
            saved_below, pre = tape[source], tape[step.node].pop("pre")
            # a gradient-rule convolution has no factor of its own yet
            saved_below["pre"] = saved_below["pre"] * pre if "pre" in saved_below else pre

    # ------------------------------------------------------------------ reverse
    @torch.no_grad()
    def backward(self, recorded: dict, grad_output: Tensor) -> Tensor:
        """Input gradients ``(P, 3, H, W)`` of the ``(P, 1, h, w)`` output gradients, in float32."""
        tape, shapes = recorded["tape"], recorded["shapes"]
        grads: dict[fx.Node, Tensor] = {self.output_node: grad_output.float()}
        for step in reversed(self.steps):
            g = grads.pop(step.node, None)
            if g is None:
                continue
            saved = tape[step.node]
            if "pre" in saved:
                g = g * saved["pre"]
            if step.kind == "conv":
                m = step.module
                in_shape = shapes[step.inputs[0]]
                g = self._conv_transpose(g, saved["weight"], m, in_shape)
                if "post" in saved:
                    g = g * saved["post"]
                self._accumulate(grads, step.inputs[0], g)
            elif step.kind == "maxpool":
                in_shape = shapes[step.inputs[0]]
                p, c = g.shape[:2]
                idx = saved["indices"].flatten(2).expand(p, c, -1)
                flat = g.new_zeros(p, c, in_shape[-2] * in_shape[-1])
                flat.scatter_add_(2, idx, g.flatten(2))  # overlapping windows add, as autograd does
                self._accumulate(grads, step.inputs[0], flat.view(p, c, *in_shape[-2:]))
            elif step.kind == "add":
                for node in step.inputs:
                    self._accumulate(grads, node, g)
            elif step.kind == "mean":
                c = shapes[step.inputs[0]][1]
                self._accumulate(grads, step.inputs[0], (g / c).expand(-1, c, -1, -1))
            else:  # bn, relu (their factor applied above), identity
                self._accumulate(grads, step.inputs[0], g)
        return grads[self.input_node]

    def _conv_transpose(self, g: Tensor, weight: Tensor, m: nn.Conv2d, in_shape: torch.Size) -> Tensor:
        """``conv_transpose(g, weight)`` back to the convolution's input size."""
        pads = []
        for i, size in enumerate(in_shape[-2:]):
            k = (weight.shape[2 + i] - 1) * m.dilation[i] + 1
            pads.append(size - ((g.shape[-2 + i] - 1) * m.stride[i] - 2 * m.padding[i] + k))
        x = g.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = F.conv_transpose2d(x, weight, None, m.stride, m.padding, tuple(pads), m.groups, m.dilation)
        return out.float()

    @staticmethod
    def _accumulate(grads: dict, node: fx.Node, g: Tensor) -> None:
        grads[node] = g if node not in grads else grads[node] + g


def bytes_per_peak(recorded: dict) -> int:
    """Float32 bytes one peak's reverse pass holds at its widest point (the largest map, three
    times: the gradient, its scaled copy and the convolution's output)."""
    largest = max(math.prod(shape[1:]) for shape in recorded["shapes"].values())
    return 3 * 4 * int(largest)


def peak_gradients(reverse: ReversePass, recorded: dict, positions: Tensor, chunk_size: int) -> Tensor:
    """``(P, H, W)`` maps of the peaks at ``positions`` ``(P, 2)`` = ``(y, x)`` on ``X̄``: each
    peak's input gradient summed over colour channels and clamped at 0, ``chunk_size`` peaks per
    reverse pass."""
    value_shape = recorded["shapes"][reverse.output_node]
    h, w = int(value_shape[-2]), int(value_shape[-1])
    device = recorded["device"]
    flat = (positions[:, 0] * w + positions[:, 1]).long().to(device)
    maps = []
    for chunk in flat.split(max(1, int(chunk_size))):
        onehot = torch.zeros(len(chunk), 1, h * w, device=device)
        onehot[torch.arange(len(chunk), device=device), 0, chunk] = 1.0
        grad = reverse.backward(recorded, onehot.view(len(chunk), 1, h, w))
        maps.append(grad.sum(1).clamp_min(0))
    if not maps:
        raise ValueError("peak_gradients: no peak positions")
    return torch.cat(maps)


# ---------------------------------------------------------------------- peaks of a network, chunked
Strategy = Literal["auto", "batched", "sequential"]
Rule = Literal["probabilistic", "gradient"]


def resolve_strategy(strategy: str, device: torch.device) -> str:
    """``"auto"`` -> ``"batched"`` on an accelerator, ``"sequential"`` on the CPU.

    On a GPU one peak's reverse pass is far too small to fill the device, so batching the peaks is
    what pays. On a CPU one peak at a time measured faster: a chunk of peaks makes the large early
    maps (``P x 256 x 128 x 96`` floats at 512 px) stream through memory, which costs more than the
    deep layers' better matrix shapes gain (``benchmarks/dasr_throughput.py``).
    """
    if strategy not in ("auto", "batched", "sequential"):
        raise ValueError(f"strategy must be 'auto', 'batched' or 'sequential', got {strategy!r}")
    if strategy == "auto":
        return "sequential" if torch.device(device).type == "cpu" else "batched"
    return strategy


def chunk_for_budget(recorded: dict, memory_budget_mb: float) -> int:
    """Peaks per reverse pass that fit ``memory_budget_mb`` MiB (at least one)."""
    return max(1, int(memory_budget_mb * 2 ** 20 // bytes_per_peak(recorded)))


def peaks_per_pass(strategy: str, device: torch.device, recorded: dict, chunk_size: Optional[int],
                    memory_budget_mb: float) -> int:
    """One peak per reverse pass (``sequential``), else ``chunk_size`` or what the budget holds."""
    if resolve_strategy(strategy, device) == "sequential":
        return 1
    return chunk_size or chunk_for_budget(recorded, memory_budget_mb)


def reverse_pass_of(net: nn.Module, rule: Rule, dtype: torch.dtype) -> ReversePass:
    """The :class:`ReversePass` of ``net``, traced through its ``as_sequential()`` view when it has
    one (DASR's ``MeanActivation``: the backbone stages then the channel mean)."""
    traced = net.as_sequential() if hasattr(net, "as_sequential") else net
    return ReversePass(traced, rule=rule, dtype=dtype)


def peak_response_maps(net: nn.Module, images: Tensor, peaks: Tensor, *, chunk_size: Optional[int] = None,
                       strategy: Strategy = "auto", rule: Rule = "probabilistic",
                       dtype: torch.dtype = torch.float32, memory_budget_mb: float = 1024.0) -> Tensor:
    """Back-propagate each peak of ``X̄`` to the input: ``(P, H, W)`` maps, in the order of ``peaks``.

    Args:
        net: DASR's ``MeanActivation``, or any ``nn.Module`` of convolutions, batch norms, ReLUs,
            max pooling and residual sums ending in the channel mean, mapping ``(B, 3, H, W)``
            (normalised) images to ``X̄`` ``(B, 1, h, w)``; in eval mode
            (:class:`~instsearch.networks.excitation_backprop.ReversePass`).
        images: ``(B, 3, H, W)``.
        peaks: ``(P, 3)`` integer ``(batch index, y, x)`` on ``X̄``.
        chunk_size: peaks per reverse pass with ``"batched"``; ``None``: as many as fit
            ``memory_budget_mb`` (:func:`chunk_for_budget`).
        strategy: ``"batched"`` -- one forward per image, its peaks through the reverse pass in
            chunks; ``"sequential"`` -- one forward per image, one peak per reverse pass;
            ``"auto"`` -- batched on an accelerator, sequential on the CPU (:func:`resolve_strategy`).
        rule: ``"probabilistic"`` (see the module docstring) or ``"gradient"`` (plain gradients).
        dtype: the reverse convolutions' dtype (``torch.bfloat16``: about half the time on CPUs
            with AVX-512 BF16 and on GPUs, maps within ~0.3 %).

    Returns:
        ``(P, H, W)``: the input gradient summed over colour channels, clamped at 0.
    """
    check_rule(rule)
    resolve_strategy(strategy, images.device)  # refuse an unknown one before any work
    if images.ndim != 4 or peaks.ndim != 2 or peaks.shape[-1] != 3:
        raise ValueError(f"expected images (B, 3, H, W) and peaks (P, 3), got {tuple(images.shape)} and "
                         f"{tuple(peaks.shape)}")
    out = images.new_zeros(len(peaks), *images.shape[-2:])
    peaks = peaks.long()
    reverse = reverse_pass_of(net, rule, dtype)
    for b in peaks[:, 0].unique().tolist():  # one forward per image, not per peak
        rows = (peaks[:, 0] == b).nonzero().flatten()
        _, recorded = reverse.forward(images[b:b + 1].detach())
        chunk = peaks_per_pass(strategy, images.device, recorded, chunk_size, memory_budget_mb)
        out[rows] = peak_gradients(reverse, recorded, peaks[rows, 1:], chunk)
    return out


def check_rule(rule: str) -> None:
    if rule not in ("probabilistic", "gradient"):
        raise ValueError(f"rule must be 'probabilistic' or 'gradient', got {rule!r}")
