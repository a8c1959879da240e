"""Pictures people would rather look at than read.

* Result grids: each row a query crop and its top results with their returned boxes; a result is
  framed green when it is a positive of the query, red when not, grey when junk.
* Region hierarchies (:func:`region_hierarchy_figure`): one panel per depth of a region
  decomposition, each region tinted in its own colour with its box, as CLAID's Fig. 3 shows them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from instsearch.datamodules.image_io import BadImageError, load_rgb
from instsearch.formats import Benchmark, Run

GREEN, RED, GREY, YELLOW = (40, 200, 60), (220, 40, 40), (150, 150, 150), (250, 210, 0)


def _thumb(image: Image.Image, size: int) -> tuple[Image.Image, float, tuple[int, int]]:
    scale = size / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    canvas = Image.new("RGB", (size, size), (25, 25, 25))
    offset = ((size - resized.width) // 2, (size - resized.height) // 2)
    canvas.paste(resized, offset)
    return canvas, scale, offset


def _open(benchmark: Benchmark, image_id: str) -> Image.Image:
    try:
        return load_rgb(benchmark.image_path(image_id))
    except BadImageError:
        e = benchmark.images[image_id]
        return Image.new("RGB", (e.width, e.height), (60, 0, 0))


def result_grid(benchmark: Benchmark, run: Run, query_ids: Optional[Sequence[str]] = None, num_queries: int = 4,
                top: int = 5, cell: int = 128, border: int = 4) -> Image.Image:
    """Render ``num_queries`` queries (the first of ``query_ids`` or of the run) with their top results."""
    if query_ids is None:
        query_ids = [q.id for q in benchmark.queries if q.id in run.rankings][:num_queries]
    queries = benchmark.query_by_id
    pad = 6
    width = (top + 1) * (cell + pad) + pad + 8
    height = max(len(query_ids), 1) * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, qid in enumerate(query_ids):
        y = pad + row * (cell + pad)
        q = queries[qid]
        crop = _open(benchmark, q.image).crop(tuple(round(v) for v in q.box))
        thumb, _, _ = _thumb(crop, cell - 2 * border)
        grid.paste(ImageOps.expand(thumb, border=border, fill=YELLOW), (pad, y))
        gt = benchmark.ground_truth[qid]
        for col, hit in enumerate(run.rankings.get(qid, [])[:top]):
            x = pad + 8 + (col + 1) * (cell + pad)
            thumb, scale, (ox, oy) = _thumb(_open(benchmark, hit.image), cell - 2 * border)
            if hit.box is not None:
                d = ImageDraw.Draw(thumb)
                x1, y1, x2, y2 = (v * scale for v in hit.box)
                d.rectangle([x1 + ox, y1 + oy, x2 + ox, y2 + oy], outline=YELLOW, width=2)
            color = GREEN if hit.image in gt.positives else GREY if hit.image in gt.junk else RED
            grid.paste(ImageOps.expand(thumb, border=border, fill=color), (x, y))
            draw.text((x + border + 2, y + border + 1), f"{col + 1}: {hit.score:.2f}", fill=(255, 255, 255))
    return grid


def save_result_grid(path: str | Path, benchmark: Benchmark, run: Run, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result_grid(benchmark, run, **kwargs).save(path)
    return path


#: Distinct tints for the regions of one panel (cycled).
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0))


def region_hierarchy_figure(image: Image.Image, masks: torch.Tensor, levels: torch.Tensor,
                            boxes: Optional[torch.Tensor] = None, alpha: float = 0.5, panel: int = 256) -> Image.Image:
    """One panel per depth of a region hierarchy: the image with that depth's regions tinted.

    Args:
        image: the RGB image the regions belong to.
        masks: ``(R, H, W)`` bool, in the image's pixels (e.g. upsampled patch masks).
        levels: ``(R,)`` depth of each region (1 = children of the whole image).
        boxes: optional ``(R, 4)`` boxes in the image's pixels, outlined in the region's colour.
        alpha: tint opacity inside a region; pixels outside every region of a panel are unchanged.
        panel: width of each panel in pixels (height follows the image's aspect ratio).

    Returns:
        The panels side by side, each headed "level k: n regions".
    """
    if masks.ndim != 3 or masks.shape[1:] != (image.height, image.width):
        raise ValueError(f"region_hierarchy_figure: masks must be (R, {image.height}, {image.width}) like the image, "
                         f"got {tuple(masks.shape)}")
    if levels.shape != masks.shape[:1]:
        raise ValueError(f"region_hierarchy_figure: {masks.shape[0]} masks but {levels.shape[0]} levels")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    depths = sorted(set(levels.tolist())) or [0]
    scale = panel / image.width
    height = max(1, round(image.height * scale))
    header = 14
    figure = Image.new("RGB", (len(depths) * (panel + 4) + 4, height + header + 4), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    for p, depth in enumerate(depths):
        members = (levels == depth).nonzero().flatten().tolist()
        tinted = base.copy()
        for k, r in enumerate(members):  # a handful of regions per depth: the loop is over regions, not pixels
            inside = masks[r].cpu().numpy().astype(bool)
            tinted[inside] = (1 - alpha) * tinted[inside] + alpha * np.asarray(PALETTE[k % len(PALETTE)], np.float32)
        shown = Image.fromarray(tinted.round().clip(0, 255).astype(np.uint8)).resize((panel, height))
        if boxes is not None:
            d = ImageDraw.Draw(shown)
            for k, r in enumerate(members):
                x1, y1, x2, y2 = (float(v) * scale for v in boxes[r])
                d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=PALETTE[k % len(PALETTE)], width=2)
        x = 4 + p * (panel + 4)
        figure.paste(shown, (x, header))
        draw.text((x, 1), f"level {depth}: {len(members)} regions", fill=(0, 0, 0))
    return figure
