"""Result grids: each row a query crop and its top results with their returned boxes.

A result is framed green when it is a positive of the query, red when not, grey when junk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

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
