"""DASR / DASR* back-propagation cost on a photograph: instsearch's reverse pass against the public
scheme, in one run.

The public scheme (the DASR authors' public code, https://github.com/wlzhao22/DASR, commit
e71d16743e1bdf764d5fd178c43f080264a55577) back-propagates each peak with one autograd backward through
a retained graph whose convolutions carry the probabilistic rule as their gradient (an
``autograd.Function`` per convolution; batch norm, ReLU and pooling by autograd). instsearch runs
one forward that records what the rule needs, then an explicit reverse pass per peak
(``sequential``) or per chunk of peaks (``batched``; chunks from ``--budget-mb``), in float32 or
with bfloat16 reverse convolutions (:mod:`instsearch.networks.excitation_backprop`).

For each detector (DASR, DASR* with the paper's above-mean peaks, DASR* with the public code's
local maxima) it reports peaks and regions (after NMS) per image, and for each engine the seconds
per image of the maps (forward + every peak) and per peak, the ratio to the public scheme, and
the largest relative difference of the maps from the public scheme's. Each engine is timed on
the same images in the same process, best of ``--repeat``.

It also reports the multiply-accumulates of one peak's reverse pass (every convolution transposed
once: the same count as the network's forward) and the rate each engine reaches, against the rate
of a large matrix product on the same threads (``gemm_gmac_per_s``). When the per-peak engine is
already near that rate, batching peaks cannot be much faster on that device: it runs the same
multiply-accumulates, only with larger tensors.

    python benchmarks/dasr_throughput.py --image photo.jpg --threads 2 [--weights resnet50-0676ba61.pth] [--device cuda]

Without ``--weights`` the ResNet-50 runs randomly initialised (its peaks are not the trained
network's, the cost per peak is).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class _PublicRuleConv(torch.autograd.Function):
    """A convolution whose input gradient is the probabilistic rule (the public scheme's layer)."""

    @staticmethod
    def forward(ctx, x, weight, bias, positive, stride, padding, dilation, groups):
        shifted = x - x.amin(dim=(1, 2, 3), keepdim=True)
        z = F.conv2d(shifted, positive, None, stride, padding, dilation, groups)
        ctx.save_for_backward(shifted, torch.where(z < 1e-10, torch.zeros_like(z), 1.0 / (z.abs() + 1e-10)),
                              positive)
        ctx.conf = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        shifted, inv, positive = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        gx = torch.ops.aten.convolution_backward(g * inv, shifted, positive, None, stride, padding, dilation,
                                                 False, [0, 0], groups, (True, False, False))[0]
        return gx * shifted, None, None, None, None, None, None, None


class _PublicScheme:
    """One autograd backward per peak, the rule in each convolution's backward."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]

    def maps(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        def rule_forward(m):
            positive = m.weight.detach().clamp_min(0)
            return lambda inp: _PublicRuleConv.apply(inp, m.weight, m.bias, positive, m.stride, m.padding,
                                                     m.dilation, m.groups)
        for m in self.convs:
            m.forward = rule_forward(m)
        try:
            with torch.enable_grad():
                inp = x.detach().clone().requires_grad_(True)
                value = self.net(inp)
                out = []
                for y, xx in positions.tolist():
                    grad_out = torch.zeros_like(value)
                    grad_out[0, 0, y, xx] = 1.0
                    (g,) = torch.autograd.grad(value, inp, grad_out, retain_graph=True)
                    out.append(g[0].sum(0).clamp_min(0))
            return torch.stack(out)
        finally:
            for m in self.convs:
                vars(m).pop("forward", None)


def reverse_macs(net: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one reverse pass of one peak through ``net`` at input ``x``: each
    convolution's transpose costs what the convolution costs."""
    total = 0

    def count(m, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.shape[-2] * out.shape[-1] * m.out_channels * (m.in_channels // m.groups) * kh * kw

    handles = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return total


def gemm_rate(dtype: torch.dtype, device: torch.device, n: int = 2048, repeat: int = 5) -> float:
    """GMAC/s of an ``n x n`` matrix product: the device's practical peak for dense work."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return n ** 3 / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, required=True, help="a photograph (JPEG/PNG)")
    p.add_argument("--weights", default=None, help="ResNet-50 ImageNet state dict (default: random init)")
    p.add_argument("--side", type=int, default=512, help="long side (the paper's 512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    p.add_argument("--budget-mb", type=float, default=1024.0, help="memory budget of a batched chunk")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--max-peaks", type=int, default=None, help="time only the first N peaks of each detector")
    p.add_argument("--out", type=Path, default=Path("runs/dasr_throughput.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from instsearch.console import quiet_framework_noise
    from instsearch.datamodules.image_io import load_rgb
    from instsearch.datamodules.transforms import to_float_tensor
    from instsearch.networks.dasr import DASR, chunk_for_budget
    from instsearch.networks.excitation_backprop import ReversePass, peak_gradients

    quiet_framework_noise()
    torch.manual_seed(0)
    image = to_float_tensor(load_rgb(a.image))
    detectors = {"DASR": dict(star=False), "DASR* (above_mean)": dict(star=True),
                 "DASR* (local_max)": dict(star=True, star_peaks="local_max")}
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = DASR("resnet50", weights=a.weights, long_side=a.side).eval().to(device)
    image = image.to(device)
    x = base.network_input(image)
    sequential = base.activation.as_sequential()
    macs = reverse_macs(sequential, x)
    gemm = {str(d).removeprefix("torch."): gemm_rate(d, device) for d in (torch.float32, torch.bfloat16)}
    print(f"reverse pass: {macs / 1e9:.2f} GMAC per peak; matrix product: "
          + ", ".join(f"{k} {v:.1f} GMAC/s" for k, v in gemm.items()), flush=True)
    rows = {}
    for name, options in detectors.items():
        net = DASR("resnet50", weights=a.weights, long_side=a.side, **options).eval().to(device)
        net.load_state_dict(base.state_dict())
        det = net.explain(image, keep_maps=False)
        positions = det.peaks if a.max_peaks is None else det.peaks[:a.max_peaks]
        row = {"peaks_per_image": len(det.peaks), "regions_after_nms": len(det.kept), "timed_peaks": len(positions)}
        if not len(positions):
            rows[name] = row
            continue

        def best(fn):
            times, result = [], None
            for _ in range(a.repeat):
                sync()
                start = time.perf_counter()
                result = fn()
                sync()
                times.append(time.perf_counter() - start)
            return min(times), result

        public_s, reference = best(lambda: _PublicScheme(net.activation.as_sequential()).maps(x, positions))
        row["public scheme"] = {"seconds": public_s, "per_peak_s": public_s / len(positions)}
        for dtype in (torch.float32, torch.bfloat16):
            reverse = ReversePass(sequential, dtype=dtype)
            for strategy in ("sequential", "batched"):
                def run():
                    _, recorded = reverse.forward(x)
                    chunk = 1 if strategy == "sequential" else chunk_for_budget(recorded, a.budget_mb)
                    return peak_gradients(reverse, recorded, positions, chunk), chunk
                seconds, (maps, chunk) = best(run)
                key = f"{strategy} {str(dtype).removeprefix('torch.')}"
                row[key] = {"seconds": seconds, "per_peak_s": seconds / len(positions), "chunk": chunk,
                            "speedup_vs_public": public_s / seconds,
                            "gmac_per_s": macs * len(positions) / seconds / 1e9,
                            "max_rel_diff": float((maps - reference).abs().max() / reference.abs().max())}
        s32, b32 = row["sequential float32"]["seconds"], row["batched float32"]["seconds"]
        row["batched_vs_sequential_float32"] = s32 / b32
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    out = {"image": str(a.image), "size": list(x.shape[-2:]), "backbone": "resnet50",
           "weights": a.weights or "random", "threads": a.threads,
           "reverse_gmac_per_peak": macs / 1e9, "gemm_gmac_per_s": gemm, "budget_mb": a.budget_mb,
           "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else f"CPU ({platform.processor() or platform.machine()})"), "results": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
