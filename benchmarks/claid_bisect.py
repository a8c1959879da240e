"""Time of the CLAID region decomposition per image: batched k-sums against the per-patch loop.

Both runs decompose identical feature sets with :func:`instsearch.networks.bisecting.build_hierarchy`
and differ only in the k-sums solver: ``solver="batched"`` (prefix moves in closed form on the
image's Gram matrix) and ``solver="sequential"`` (the CLAID paper's Eq. 2-4, one patch at a time in
random order). The feature sets are 45x60 grids of 768-D features, the patch grid and width of DINO
ViT-B/8 on a 360x480 image, with a planted three-level region hierarchy: objects made of parts,
some parts made of sub-parts, each block a shared direction plus noise, on a two-part low-energy
background. Reported per solver: median and best seconds per image, regions and cuts (bisected
nodes, Table V's "#cut") per image; then the speed ratio and how well the two outputs agree (for
each region of one run the best IoU in the other, its mean, and the share matched at IoU >= 0.9).
``--profile`` breaks both runs down (Gram matrix, k-sums, connected components, the rest) and gives the
k-sums-only ratio.

The CLAID paper times one CPU thread (Table V), hence ``--threads 1`` by default.

``--vit-weights PATH`` adds real DINO ViT-B/8 patch tokens (timm ``vit_base_patch8_224.dino``
loaded from that local file; ``--image`` picks the picture, a random one otherwise). It runs only
when the file is given (README "Measured" says which rows were measured with real tokens).

    python benchmarks/claid_bisect.py --images 5 --out runs/claid_bisect.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from instsearch.networks import bisecting
from instsearch.networks.bisecting import RegionNode, build_hierarchy, output_nodes

# (row0, row1, col0, col1) on the 45x60 grid; parts and sub-parts lie inside their parent
OBJECTS = [
    {"box": (4, 22, 3, 27), "parts": [
        {"box": (4, 22, 3, 14), "parts": [(4, 12, 3, 14), (12, 22, 3, 14)]},
        {"box": (4, 22, 14, 27), "parts": []},
    ]},
    {"box": (6, 30, 33, 57), "parts": [
        {"box": (6, 16, 33, 57), "parts": []},
        {"box": (16, 30, 33, 57), "parts": [(16, 30, 33, 45), (16, 30, 45, 57)]},
    ]},
    {"box": (28, 41, 6, 28), "parts": [
        {"box": (28, 41, 6, 17), "parts": []},
        {"box": (28, 41, 17, 28), "parts": []},
    ]},
]
BACKGROUND_SPLIT = 24  # rows above: "sky", below: "ground", both low energy


def planted_grid(seed: int, height: int = 45, width: int = 60, dim: int = 768,
                 noise: float = 0.018) -> tuple[Tensor, list[tuple[int, int, int, int]]]:
    """One image's features and the boxes of its planted regions (objects, parts, sub-parts).

    A block's direction mixes its ancestors' directions with its own (object 1, part 0.4/0.917,
    sub-part 0.25/0.35/0.9 before normalising), so siblings are close to each other yet below the
    Eq. 5 affinity threshold (dot ~0.16-0.19 < 0.2): the terminate condition has something to cut at
    every level. Objects have l1 energy 2-3x the background's, so the background nodes are dummies.
    """
    g = torch.Generator().manual_seed(seed)
    directions = iter(F.normalize(torch.randn(64, dim, generator=g), dim=1))
    feats = torch.empty(height, width, dim)

    def fill(box: tuple[int, int, int, int], direction: Tensor, norm: float) -> None:
        r0, r1, c0, c1 = box
        n = torch.randn(r1 - r0, c1 - c0, dim, generator=g) * noise
        scale = norm * (1 + 0.1 * torch.rand(r1 - r0, c1 - c0, 1, generator=g))
        feats[r0:r1, c0:c1] = F.normalize(direction + n, dim=-1) * scale

    sky = next(directions)
    fill((0, BACKGROUND_SPLIT, 0, width), sky, 1.0)
    fill((BACKGROUND_SPLIT, height, 0, width), 0.6 * sky + 0.8 * next(directions), 1.2)
    boxes = []
    for obj in OBJECTS:
        u_obj = next(directions)
        boxes.append(obj["box"])
        for part in obj["parts"]:
            u_part = next(directions)
            boxes.append(part["box"])
            fill(part["box"], 0.4 * u_obj + 0.917 * u_part, 3.0)
            for sub in part["parts"]:
                boxes.append(sub)
                fill(sub, 0.25 * u_obj + 0.35 * u_part + 0.9 * next(directions), 3.0)
    return feats, boxes


def vit_grid(weights: Path, image: Optional[Path], seed: int) -> Tensor:
    """DINO ViT-B/8 patch tokens ``(h, w, 768)`` of a 360x480 picture (the given one, or noise)."""
    import timm

    model = timm.create_model("vit_base_patch8_224.dino", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights)), dynamic_img_size=True).eval()
    if image is not None:
        from PIL import Image

        picture = Image.open(image).convert("RGB").resize((480, 360))
        pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).reshape(360, 480, 3)
        pixels = pixels.permute(2, 0, 1).float() / 255
    else:
        pixels = torch.rand(3, 360, 480, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        tokens = model.forward_features(((pixels - mean) / std)[None])[0, model.num_prefix_tokens:]
    return tokens.reshape(360 // 8, 480 // 8, -1)


def best_iou(a: Tensor, b: Tensor) -> Tensor:
    """For each mask of ``a (R, h, w)`` the best IoU with a mask of ``b``; 0 when ``b`` is empty."""
    if a.shape[0] == 0:
        return torch.zeros(0)
    if b.shape[0] == 0:
        return torch.zeros(a.shape[0])
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return (inter / union).amax(1)


def output_masks(nodes: list[RegionNode]) -> Tensor:
    kept = [n.mask for n in output_nodes(nodes)]
    return torch.stack(kept) if kept else torch.zeros(0, *nodes[0].mask.shape, dtype=torch.bool)


def time_solver(grids: list[Tensor], solver: str, repeats: int) -> tuple[list[float], list[list[RegionNode]]]:
    """Per image the best of ``repeats`` runs, and the hierarchy of the last run."""
    seconds, hierarchies = [], []
    for grid in grids:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            nodes = build_hierarchy(grid, solver=solver, generator=torch.Generator().manual_seed(0))
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
        hierarchies.append(nodes)
    return seconds, hierarchies


@contextmanager
def timed(totals: dict[str, float], name: str, function: str) -> Iterator[None]:
    """Wrap ``bisecting.<function>`` so its time is added to ``totals[name]``."""
    original = getattr(bisecting, function)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(bisecting, function, wrapper)
    try:
        yield
    finally:
        setattr(bisecting, function, original)


def profile(grids: list[Tensor], solver: str = "batched") -> dict[str, float]:
    """Seconds per image of one solver's run spent in the Gram matrix (measured alone), k-sums,
    connected components, connectivity, and everything else."""
    gram = []
    for grid in grids:
        x = F.normalize(grid.reshape(-1, grid.shape[-1]), dim=1)
        start = time.perf_counter()
        bisecting._gram(x)
        gram.append(time.perf_counter() - start)
    totals: dict[str, float] = {}
    with timed(totals, "ksums", "ksums_bisect"), timed(totals, "components", "connected_components"), \
            timed(totals, "connectivity", "average_connectivity"):
        start = time.perf_counter()
        for grid in grids:
            build_hierarchy(grid, solver=solver, generator=torch.Generator().manual_seed(0))
        total = time.perf_counter() - start
    out = {"total": total / len(grids), "gram": sum(gram) / len(grids)}
    out.update({k: v / len(grids) for k, v in totals.items()})
    out["rest (energy, blocks, bookkeeping)"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5, help="planted feature sets (images)")
    p.add_argument("--repeats", type=int, default=3, help="runs per image for the batched solver (best kept)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the paper times one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="break both solvers' time down (Gram, k-sums, ...)")
    p.add_argument("--vit-weights", type=Path, default=None,
                   help="local DINO ViT-B/8 weights (timm vit_base_patch8_224.dino) to add real patch tokens")
    p.add_argument("--image", type=Path, default=None, help="picture for --vit-weights (random pixels otherwise)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    sets = {"planted 45x60x768": [planted_grid(a.seed + i)[0] for i in range(a.images)]}
    if a.vit_weights is not None:
        sets["DINO ViT-B/8 tokens"] = [vit_grid(a.vit_weights, a.image, a.seed)]
    report: dict[str, object] = {"threads": a.threads, "images": a.images}
    for name, grids in sets.items():
        build_hierarchy(grids[0])  # warm-up (allocator, BLAS)
        fast, fast_nodes = time_solver(grids, "batched", a.repeats)
        slow, slow_nodes = time_solver(grids, "sequential", 1)
        ious_a, ious_b = [], []
        for nf, ns in zip(fast_nodes, slow_nodes):
            mf, ms = output_masks(nf), output_masks(ns)
            ious_a.append(best_iou(mf, ms))
            ious_b.append(best_iou(ms, mf))
        both = torch.cat(ious_a + ious_b)

        def stats(seconds: list[float], hierarchies: list[list[RegionNode]]) -> dict[str, float]:
            return {"median s/image": statistics.median(seconds), "best s/image": min(seconds),
                    "regions/image": sum(len(output_masks(n)) for n in hierarchies) / len(hierarchies),
                    "cuts/image": sum(sum(x.bisected for x in n) for n in hierarchies) / len(hierarchies),
                    "nodes/image": sum(len(n) for n in hierarchies) / len(hierarchies)}

        row = {"grid": list(grids[0].shape), "batched": stats(fast, fast_nodes),
               "sequential (per-patch loop)": stats(slow, slow_nodes),
               "speed ratio (median)": statistics.median(slow) / statistics.median(fast),
               "mean best IoU between the two outputs": float(both.mean()) if both.numel() else 1.0,
               "share of regions matched at IoU >= 0.9": float((both >= 0.9).float().mean()) if both.numel() else 1.0}
        if name.startswith("planted"):
            truth = []
            for i, nodes in enumerate(fast_nodes):
                planted = torch.zeros(0, *grids[i].shape[:2], dtype=torch.bool)
                for r0, r1, c0, c1 in planted_grid(a.seed + i)[1]:
                    m = torch.zeros(1, *grids[i].shape[:2], dtype=torch.bool)
                    m[0, r0:r1, c0:c1] = True
                    planted = torch.cat([planted, m])
                truth.append(best_iou(planted, output_masks(nodes)))
            truth_all = torch.cat(truth)
            row["planted regions recovered by batched at IoU >= 0.9"] = float((truth_all >= 0.9).float().mean())
        if a.profile:
            row["batched profile (s/image)"] = profile(grids, "batched")
            row["sequential profile (s/image)"] = profile(grids, "sequential")
            row["k-sums speed ratio"] = (row["sequential profile (s/image)"]["ksums"]
                                         / row["batched profile (s/image)"]["ksums"])
        report[name] = row
    print(json.dumps(report, indent=1))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
