"""Training throughput of FCIS+XD next to torchvision's Mask R-CNN R50-FPN, measured in one run.

Both train on the same synthetic batches (``--size`` short side, 4:3 images, 3-6 instances with
masks, 81 / 91 COCO classes) under the same regime as real fine-tuning from ImageNet weights:
frozen BatchNorm, conv1 and res2 fixed, SGD. FCIS+XD runs its paper settings (600-proposal OHEM
over 300 RPN proposals, 21x21 assembled masks); Mask R-CNN torchvision's defaults. Images are
served at the network's own scale, so no resize is timed. Prints images/s, seconds per
iteration and peak GPU memory; ``--infer`` also times eval-mode detection (FCIS's two-pass
inference with mask voting).

    python benchmarks/fcis_throughput.py --device cuda --iters 20 --batch-size 2 --amp bf16
    python benchmarks/fcis_throughput.py --device cpu --size 128 --iters 2 --warmup 1   # smoke check
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from instsearch.networks.fcis import build_fcis


def synthetic_batch(batch_size: int, height: int, width: int, num_classes: int, device: torch.device,
                    generator: torch.Generator) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, height, width, generator=generator).to(device))
        n = int(torch.randint(3, 7, (1,), generator=generator))
        wh = torch.rand(n, 2, generator=generator) * 0.4 + 0.1
        xy = torch.rand(n, 2, generator=generator) * (1 - wh)
        boxes = torch.cat([xy, xy + wh], dim=1) * torch.tensor([width, height, width, height])
        masks = torch.zeros(n, height, width, dtype=torch.uint8)
        ys, xs = torch.arange(height)[:, None], torch.arange(width)[None, :]
        for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):  # an ellipse inscribed in each box
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            masks[i] = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).to(torch.uint8)
        labels = torch.randint(1, num_classes, (n,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


def build_models(size: int, long_side: int, names: list[str]) -> dict[str, tuple[nn.Module, int]]:
    models: dict[str, tuple[nn.Module, int]] = {}
    for name in names:
        if name.startswith("fcis"):
            models[name] = (build_fcis(name, num_classes=81, norm="frozen_bn", frozen_stages=2,
                                       min_size=size, max_size=long_side), 81)
        elif name == "maskrcnn_r50_fpn":
            # torchvision's maskrcnn_resnet50_fpn as fine-tuned from ImageNet weights (frozen BN,
            # layer2-4 trainable); built by hand because without a weights enum the builder
            # would switch to trainable BN and all layers.
            body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
            backbone = _resnet_fpn_extractor(body, trainable_layers=3)
            models[name] = (MaskRCNN(backbone, num_classes=91, min_size=size, max_size=long_side), 91)
        else:
            raise SystemExit(f"unknown model {name!r}; choose fcis, fcis_d, fcis_x, fcis_xd or maskrcnn_r50_fpn")
    return models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def measure(name: str, model: nn.Module, num_classes: int, args: argparse.Namespace, device: torch.device,
            long_side: int) -> list[dict]:
    """Train-step (and optionally inference) timing of one model on two alternating batches."""
    model.to(device).train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(args.batch_size, args.size, long_side, num_classes, device, gen) for _ in range(2)]
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    step_count = [0]

    def train_step() -> None:
        images, targets = batches[step_count[0] % len(batches)]
        step_count[0] += 1
        with torch.autocast(**amp):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.no_grad(), torch.autocast(**amp):
            model(batches[0][0])

    def peak() -> float:
        return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_loop(train_step, device, args.warmup, args.iters)
    row = {"model": name, "mode": "train", "params_M": sum(q.numel() for q in model.parameters()) / 1e6,
           "s_per_iter": seconds, "images_per_s": args.batch_size / seconds, "peak_GiB": peak()}
    rows = [row]
    if args.infer:
        model.eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = time_loop(infer_step, device, max(1, args.warmup // 2), args.iters)
        rows.append({**row, "mode": "infer", "s_per_iter": seconds, "images_per_s": args.batch_size / seconds,
                     "peak_GiB": peak()})
    model.to("cpu")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--size", type=int, default=800, help="short side in pixels (images are 4:3)")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--models", nargs="+", default=["fcis_xd", "maskrcnn_r50_fpn"])
    p.add_argument("--infer", action="store_true", help="also time eval-mode detection")
    args = p.parse_args()

    device = torch.device(args.device)
    long_side = int(math.ceil(args.size * 4 / 3))
    rows = []
    for name, (model, num_classes) in build_models(args.size, long_side, args.models).items():
        rows += measure(name, model, num_classes, args, device, long_side)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{where}  images {args.size}x{long_side}  batch {args.batch_size}  amp {args.amp}  "
          f"iters {args.iters} (+{args.warmup} warm-up)")
    header = f"{'model':<18} {'mode':<6} {'params (M)':>10} {'s/iter':>8} {'images/s':>9} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<18} {r['mode']:<6} {r['params_M']:>10.1f} {r['s_per_iter']:>8.3f} "
              f"{r['images_per_s']:>9.2f} {r['peak_GiB']:>9.2f}")


if __name__ == "__main__":
    main()
