"""DASR and DASR* on the synthetic benchmark against whole-image GeM of the same backbone: mAP@all,
mIoU, detector recall@IoU, regions per image and time, with and without the PCA-whitening, and the
paper's Fig. 3 picture of one image.

The seeds' claim to check: instance-level features (one per salient region) beat one global
descriptor for instance search. The paper's network (ImageNet ResNet-50) has no local weights
here: a trained instsearch checkpoint (the demo's, ``make demo``) stands in with its `small`
backbone; without ``--ckpt`` the backbone is randomly initialised (the mechanics only).

    python benchmarks/dasr_synthetic.py --data data/synthetic [--ckpt demo_out/checkpoints/last.ckpt]

The synthetic images are 160 px, so ``--long-side`` defaults to 256 rather than the paper's 512
(which would upsample them 3.2 times and back-propagate 4 times as many pixels for nothing).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from instsearch.console import quiet_framework_noise
from instsearch.dasr_figure import dasr_figure
from instsearch.datamodules.benchmark import benchmark_dataloader
from instsearch.datamodules.image_io import load_rgb
from instsearch.datamodules.transforms import to_float_tensor
from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator, extract_and_score
from instsearch.formats import Benchmark
from instsearch.networks.dasr import DASR
from instsearch.networks.global_model import GlobalDescriptorModel


def _row(metrics: dict, seconds: float) -> dict[str, float]:
    return {"mAP@all": metrics["mAP@all"], "mAP@10": metrics["mAP@10"], "mIoU": metrics["mIoU"],
            "recall@IoU0.5": metrics["recall@IoU0.5"], "recall@IoU0.7": metrics["recall@IoU0.7"],
            "regions_per_image": metrics["regions_per_image"], "extraction_s": seconds}


def scores(model, bench: Benchmark, whitening: tuple[bool, ...] = (False,)) -> dict[bool, dict[str, float]]:
    """One extraction, scored once per whitening setting (the evaluator keeps what it processed)."""
    evaluator = RetrievalEvaluator(bench, RetrievalConfig(normalization="relevant", grid_queries=0))
    start = time.perf_counter()
    extract_and_score(model, [benchmark_dataloader(bench, batch_size=4)], evaluator, progress=False)
    seconds = time.perf_counter() - start
    out = {}
    for white in whitening:
        evaluator.config = RetrievalConfig(normalization="relevant", grid_queries=0, whitening=white)
        out[white] = _row(evaluator.compute(gather=False).metrics, seconds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=None, help="instsearch checkpoint whose `small` backbone stands in "
                                                           "for ResNet-50 (default: random weights)")
    p.add_argument("--data", type=Path, required=True, help="synthetic benchmark folder (benchmark.json)")
    p.add_argument("--backbone", default="small")
    p.add_argument("--long-side", type=int, default=256)
    p.add_argument("--describe-layer", default="conv5.0", help="region features' layer (the paper: layer4.0 = conv5.0)")
    p.add_argument("--out", type=Path, default=Path("runs/dasr_synthetic"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure-image", default=None, help="database image id for the picture")
    a = p.parse_args()
    quiet_framework_noise()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    bench = Benchmark.load(a.data / "benchmark.json")
    weights = str(a.ckpt) if a.ckpt else None

    rows = {}
    for name, star in (("DASR", False), ("DASR*", True)):
        torch.manual_seed(0)
        net = DASR(a.backbone, weights=weights, star=star, long_side=a.long_side,
                   describe_layer=a.describe_layer).eval()
        for whitening, row in scores(net, bench, (True, False)).items():
            key = f"{name} ({'l2-PCAw-l2' if whitening else 'l2'})"
            rows[key] = row
            print(key, json.dumps(row), flush=True)
    # whole-image GeM of the same backbone over the stage the regions are pooled from, and the last one
    for layer in dict.fromkeys([a.describe_layer.split(".")[0], "conv5"]):
        torch.manual_seed(0)
        gem = GlobalDescriptorModel(a.backbone, layer=layer, pooling="gem", weights=weights, min_size=a.long_side,
                                    max_size=a.long_side).eval()
        rows[f"whole-image GeM ({layer})"] = scores(gem, bench)[False]
        print(f"GeM {layer}", json.dumps(rows[f"whole-image GeM ({layer})"]), flush=True)

    torch.manual_seed(0)
    net = DASR(a.backbone, weights=weights, star=True, long_side=a.long_side).eval()
    image_id = a.figure_image or bench.database[0]
    dasr_figure(net, to_float_tensor(load_rgb(bench.image_path(image_id)))).save(a.out / "dasr_regions.png")

    result = {"ckpt": weights, "weights": "checkpoint" if weights else "random initialisation",
              "backbone": a.backbone, "long_side": a.long_side, "describe_layer": a.describe_layer, "threads": a.threads, "benchmark": bench.name,
              "database": len(bench.database), "queries": len(bench.queries), "retrieval": rows}
    (a.out / "dasr_synthetic.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
