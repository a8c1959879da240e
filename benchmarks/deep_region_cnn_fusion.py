"""Deep region CNN search modes on a trained checkpoint: what is searched (each top-K region, or one
fused top-K vector per image by concatenation, mean- or max-pooling; Mei et al. 2018, Section 3.2)
and how regions are described (RoI features of the detection pass, or the paper's crop -> 224 x 224
-> VGG-16 FC7).

    make demo   # trains demo_out/checkpoints/last.ckpt on the synthetic tiny benchmark
    python benchmarks/deep_region_cnn_fusion.py --ckpt demo_out/checkpoints/last.ckpt
    python benchmarks/deep_region_cnn_fusion.py --ckpt ... --crop-weights /path/to/vgg16-397923af.pth

The network options come from the run's ``config.yaml`` (next to the ``checkpoints/`` folder by
default), the weights from the checkpoint; ``fusion``, ``top_k`` and ``region_feature`` are varied.
Every setting is one :func:`~instsearch.eval.evaluator.extract_and_score` over the benchmark. Crop-FC7
features are memoised by crop pixels across settings, so each distinct crop passes VGG-16 once
(exact: the same pixels give the same feature; the detections do not depend on K).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from instsearch.config_files import load_config
from instsearch.datamodules.benchmark import benchmark_dataloader
from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator, extract_and_score
from instsearch.formats import Benchmark
from instsearch.lightning_modules.detector import DetectorModule
from instsearch.networks.deep_region_cnn import DeepRegionCNN

FUSIONS = ("none", "concat", "mean", "max")
TOP_K = (1, 2, 3)


class MemoisedDescribe:
    """Wraps :meth:`CropFC7.describe`: crops seen before (same pixels) are not run again."""

    def __init__(self, describe: Callable[[Tensor], Tensor]) -> None:
        self.describe = describe
        self.cache: dict[bytes, Tensor] = {}

    def __call__(self, crops: Tensor) -> Tensor:
        keys = [hashlib.blake2b(c.contiguous().cpu().numpy().tobytes(), digest_size=16).digest() for c in crops]
        new = list({k: i for i, k in enumerate(keys) if k not in self.cache}.items())
        if new:
            features = self.describe(crops[[i for _, i in new]])
            self.cache.update((k, f) for (k, _), f in zip(new, features))
        return torch.stack([self.cache[k] for k in keys])


def load_net(ckpt: Path, config: Path, region_feature: str, crop_weights: Optional[Path]) -> DeepRegionCNN:
    """The checkpoint's network (through its LightningModule) with the run's options; options the
    network no longer has (an older config) are dropped and named."""
    options = load_config(config)["model"]["init_args"]["net"]["init_args"]
    known = inspect.signature(DeepRegionCNN).parameters
    dropped = sorted(k for k in options if k not in known)
    if dropped:
        print(f"options of {config} that DeepRegionCNN no longer takes (ignored): {dropped}")
    options = {k: v for k, v in options.items() if k in known}
    options.update(region_feature=region_feature, crop_weights=crop_weights)
    torch.manual_seed(0)  # the crop-FC7 VGG-16 is randomly initialised without --crop-weights
    module = DetectorModule.load_from_checkpoint(ckpt, net=DeepRegionCNN(**options), map_location="cpu")
    net = module.net.eval()
    if net.crop_fc7 is not None:
        net.crop_fc7.describe = MemoisedDescribe(net.crop_fc7.describe)
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True, help="a trained deep region CNN checkpoint (make demo)")
    p.add_argument("--config", type=Path, default=None, help="the run's config.yaml (default: <ckpt>/../../config.yaml)")
    p.add_argument("--benchmark", type=Path, default=None,
                   help="benchmark.json (default: <ckpt>/../../data/benchmark.json, the demo's)")
    p.add_argument("--crop-weights", type=Path, default=None, help="ImageNet VGG-16 for crop-FC7 (default: random)")
    p.add_argument("--features", nargs="+", default=["roi", "crop_fc7"], choices=["roi", "crop_fc7"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run = a.ckpt.resolve().parents[1]
    bench = Benchmark.load(a.benchmark or run / "data" / "benchmark.json")
    loaders = [benchmark_dataloader(bench, "all", batch_size=a.batch_size)]
    settings = [(f, k) for f in FUSIONS for k in TOP_K]

    rows = []
    for feature in a.features:
        net = load_net(a.ckpt, a.config or run / "config.yaml", feature, a.crop_weights)
        demo_k = net.top_k
        for fusion, k in settings + ([("none", demo_k)] if feature == "roi" and demo_k not in TOP_K else []):
            net.fusion, net.top_k = fusion, k
            start = time.perf_counter()
            result = extract_and_score(net, loaders, RetrievalEvaluator(bench, RetrievalConfig(), method=f"{feature}/{fusion}/K{k}"),
                              progress=False)
            m = result.metrics
            rows.append((feature, fusion, k, net.feature_dim, m["mAP@all"], m["mAP@10"], m["mIoU"],
                         time.perf_counter() - start))
            print(f"{feature:8s} {fusion:6s} K={k:<2d} D={net.feature_dim:<5d} mAP@all {m['mAP@all']:.4f}  "
                  f"mAP@10 {m['mAP@10']:.4f}  mIoU {m['mIoU']:.4f}  ({rows[-1][-1]:.0f} s)", flush=True)

    print(f"\n{bench.name}: {len(bench.database)} database images, {len(bench.queries)} queries; checkpoint {a.ckpt}")
    print("| region feature | fusion | K | D | mAP@all | mAP@10 | mIoU |")
    print("|---|---|---|---|---|---|---|")
    for feature, fusion, k, dim, map_all, map_10, miou, _ in rows:
        print(f"| {feature} | {fusion} | {k} | {dim} | {map_all:.4f} | {map_10:.4f} | {miou:.4f} |")


if __name__ == "__main__":
    main()
