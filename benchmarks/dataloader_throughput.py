"""Training DataLoader throughput: decoded-and-transformed images per second.

Writes ``--images`` photo-like 1024x768 JPEGs and a COCO instances file (a few polygon objects per
image) to a temporary folder, then drains :class:`~instsearch.datamodules.detection.DetectionDataModule`'s
training loader (multi-scale resize 480-1000 / 1333, flip, masks) with 0, 1 and 2 workers and
prints a table. The first batch (worker start-up) is not timed.

    python benchmarks/dataloader_throughput.py [--images 64] [--epochs 2] [--workers 0 1 2] [--no-masks]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from instsearch.datamodules.detection import DetectionDataModule


def write_dataset(root: Path, n: int, width: int = 1024, height: int = 768, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        # smooth colour field + grain: compresses and decodes like a photo, unlike pure noise
        small = Image.fromarray(rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8))
        arr = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        w, h = (width, height) if i % 4 else (height, width)  # a quarter portrait
        Image.fromarray(arr if i % 4 else arr.transpose(1, 0, 2)).save(images_dir / f"{i:06d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": w, "height": h})
        for k in range(4):
            x, y = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            bw, bh = rng.uniform(40, w * 0.3), rng.uniform(40, h * 0.3)
            poly = [x, y, x + bw, y, x + bw * 0.8, y + bh, x + bw * 0.1, y + bh * 0.9]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + k % 3, "iscrowd": 0,
                         "bbox": [x, y, bw, bh], "area": bw * bh * 0.8, "segmentation": [poly]})
    ann_file = root / "train.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}))
    return images_dir, ann_file


def measure(images_dir: Path, ann_file: Path, workers: int, masks: bool, epochs: int, batch_size: int) -> float:
    torch.manual_seed(0)
    dm = DetectionDataModule(images_dir, ann_file, batch_size=batch_size, num_workers=workers, masks=masks)
    loader = dm.train_dataloader()
    n, start = 0, None
    for _ in range(epochs):
        for images, _targets in loader:
            if start is None:  # exclude worker start-up and the first decode
                start = time.perf_counter()
                continue
            n += len(images)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-masks", action="store_true", help="boxes only (skip mask decoding)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-process decode; parallelism comes from workers
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        images_dir, ann_file = write_dataset(Path(tmp), args.images)
        mask_modes = [False] if args.no_masks else [False, True]
        print(f"{args.images} JPEGs 1024x768, batch {args.batch_size}, {args.epochs} epochs, "
              f"train transforms: RandomResize(480..1000, max 1333) + flip + ToTensor")
        print(f"{'workers':>8} {'masks':>6} {'images/s':>9}")
        for workers in args.workers:
            for masks in mask_modes:
                rate = measure(images_dir, ann_file, workers, masks, args.epochs, args.batch_size)
                print(f"{workers:>8} {str(masks):>6} {rate:>9.1f}")


if __name__ == "__main__":
    main()
