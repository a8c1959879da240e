"""A tiny COCO split on disk, as the real files are: the fixture of the COCO-format tests.

Image 1 carries polygon, compressed-RLE, uncompressed-RLE, crowd, degenerate and unknown-category
annotations, so the checks run against what pycocotools and the real files do, not against a mock.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]


def rect_mask(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of 0/1 in column-major order, starting with zeros."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def write_image(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def make_coco(root: Path, split: str = "train2017", n_extra: int = 0, corrupt: bool = False) -> tuple[Path, Path]:
    """A COCO split: image 1 (64x48) with polygon / RLE / uncompressed RLE / crowd / degenerate /
    unknown-category annotations, image 2 (40x60, portrait) with one polygon object, image 3
    (50x50) with only a crowd region, plus ``n_extra`` landscape images with one box each."""
    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
              {"id": 2, "file_name": "b.jpg", "width": 40, "height": 60},
              {"id": 3, "file_name": "c.jpg", "width": 50, "height": 50}]
    rle = mask_utils.encode(np.asfortranarray(rect_mask(48, 64, 30, 5, 50, 25)))
    rle["counts"] = rle["counts"].decode()
    anns = [
        # two-part polygon object (two squares) -> mask is their union
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 18, 18], "area": 200.0, "iscrowd": 0,
         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12], [10, 10, 20, 10, 20, 20, 10, 20]], "instance_id": 7},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [30, 5, 20, 20], "area": 400.0, "iscrowd": 0,
         "segmentation": rle},
        {"id": 12, "image_id": 1, "category_id": 18, "bbox": [5, 30, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": uncompressed_rle(rect_mask(48, 64, 5, 30, 15, 40))},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [40, 30, 20, 15], "area": 300.0, "iscrowd": 1,
         "segmentation": uncompressed_rle(rect_mask(48, 64, 40, 30, 60, 45))},
        {"id": 14, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "area": 0.0, "iscrowd": 0,
         "segmentation": [[5, 5, 5, 15, 5, 10]]},  # zero width
        {"id": 15, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "area": 25.0, "iscrowd": 0,
         "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},  # category not in the file
        {"id": 16, "image_id": 1, "category_id": 3, "bbox": [70, 50, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": [[70, 50, 80, 50, 80, 60]]},  # entirely outside the image
        {"id": 20, "image_id": 2, "category_id": 18, "bbox": [10, 20, 20, 30], "area": 600.0, "iscrowd": 0,
         "segmentation": [[10, 20, 30, 20, 30, 50, 10, 50]]},
        {"id": 30, "image_id": 3, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500.0, "iscrowd": 1,
         "segmentation": uncompressed_rle(np.ones((50, 50), np.uint8))},
    ]
    for k in range(n_extra):
        images.append({"id": 100 + k, "file_name": f"x{k}.jpg", "width": 64, "height": 40})
        anns.append({"id": 1000 + k, "image_id": 100 + k, "category_id": 3, "bbox": [4, 4, 20, 20],
                     "area": 400.0, "iscrowd": 0, "segmentation": [[4, 4, 24, 4, 24, 24, 4, 24]]})
    for i, im in enumerate(images):
        write_image(images_dir / im["file_name"], im["width"], im["height"], seed=i)
    if corrupt:
        (images_dir / "b.jpg").write_bytes(b"this is not a jpeg")
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return images_dir, ann_file
