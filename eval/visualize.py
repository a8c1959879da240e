"""Pictures people would rather look at than read.

* Result grids: each row a query crop and its top results with their returned boxes; a result is
  framed green when it is a positive of the query, red when not, grey when junk.
* Region hierarchies (:func:`region_hierarchy_figure`): one panel per depth of a region
  decomposition, each region tinted in its own colour with its box, as CLAID's Fig. 3 shows them;
  optionally the dummy nodes grey and hatched, the image itself and the kept regions' boxes
  (``instsearch claid-figure``).
* Metric curves (:func:`metric_curves_figure`): a metric per round or epoch against reference
  lines, as UDQ's Fig. 3 compares its rounds with the off-the-shelf baselines.
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
    """The image, or a dark red stand-in of its size (64 px for an unlisted one) when it cannot be read."""
    try:
        return load_rgb(benchmark.image_path(image_id))
    except (BadImageError, KeyError, OSError):
        e = benchmark.images.get(image_id)
        return Image.new("RGB", (e.width, e.height) if e is not None else (64, 64), (60, 0, 0))


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


#: A dummy node (CLAID: energy ratio xi <= tau2): its pixels desaturated and pulled to DUMMY_GREY,
#: hatched with HATCH every HATCH_PERIOD panel pixels, its box dashed in HATCH and labelled "D".
DUMMY_GREY, HATCH, HATCH_PERIOD = (160, 160, 160), (70, 70, 70), 8
HEADER = 14  # height of a heading or title line


def _panel_geometry(image: Image.Image, panel: int) -> tuple[float, int]:
    """Scale from the image's pixels to a ``panel``-wide panel, and the panel's height."""
    scale = panel / image.width
    return scale, max(1, round(image.height * scale))


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], fill: tuple[int, int, int],
                      dash: int = 5, width: int = 2) -> None:
    x1, y1, x2, y2 = box
    for (a, b), fixed, horizontal in (((x1, x2), y1, True), ((x1, x2), y2 - width + 1, True),
                                      ((y1, y2), x1, False), ((y1, y2), x2 - width + 1, False)):
        start = a
        while start <= b:
            stop = min(start + dash - 1, b)
            if horizontal:
                draw.rectangle([start, fixed, stop, fixed + width - 1], fill=fill)
            else:
                draw.rectangle([fixed, start, fixed + width - 1, stop], fill=fill)
            start += 2 * dash


def _labels(draw: ImageDraw.ImageDraw, items: Sequence[tuple[tuple[float, float], str, tuple[int, int, int]]],
            size: tuple[int, int]) -> None:
    """Each ``(xy, text, colour)`` written in white on a small box of ``colour``, its top-left corner at
    ``xy`` (moved inside the ``size`` panel), in the given order; a label that would overlap one
    already written is left out, so that the ones written stay readable."""
    placed: list[tuple[float, float, float, float]] = []
    for (x, y), text, colour in items:
        left, top, right, bottom = draw.textbbox((0, 0), text)
        x = min(max(x, 1), size[0] - right - 2)
        y = min(max(y, 1), size[1] - bottom - 2)
        rect = (x + left - 1, y + top - 1, x + right + 1, y + bottom + 1)
        if any(rect[0] < q[2] and q[0] < rect[2] and rect[1] < q[3] and q[1] < rect[3] for q in placed):
            continue
        placed.append(rect)
        draw.rectangle(rect, fill=colour)
        draw.text((x, y), text, fill=(255, 255, 255))


def _region_panel(image: Image.Image, masks: torch.Tensor, members: Sequence[int], panel: int, alpha: float,
                  boxes: Optional[torch.Tensor] = None, dummies: Optional[torch.Tensor] = None,
                  labels: Optional[Sequence[str]] = None) -> Image.Image:
    """The image at panel size with the regions ``members`` (rows of ``masks``) drawn: the k-th
    non-dummy region tinted ``PALETTE[k]`` (opacity ``alpha``) with its box outlined in that
    colour; a dummy desaturated to grey, hatched, its box dashed. ``labels`` (one per row of
    ``masks``) are written at the top-left corner of each region's box."""
    scale, height = _panel_geometry(image, panel)
    shown = np.asarray(image.convert("RGB").resize((panel, height)), dtype=np.float32).copy()
    is_dummy = [bool(dummies[r]) if dummies is not None else False for r in members]
    colours, k = [], 0
    for r, dummy in zip(members, is_dummy):
        colours.append(HATCH if dummy else PALETTE[k % len(PALETTE)])
        k += not dummy
    ys, xs = np.mgrid[:height, :panel]
    hatch = (xs + ys) % HATCH_PERIOD < 2
    for r, dummy, colour in zip(members, is_dummy, colours):  # a handful of regions: the loop is over regions
        mask = Image.fromarray(masks[r].cpu().numpy().astype(np.uint8) * 255).resize((panel, height), Image.NEAREST)
        inside = np.asarray(mask) > 0
        if dummy:
            grey = shown[inside] @ np.asarray([0.299, 0.587, 0.114], np.float32)
            shown[inside] = ((1 - alpha) * grey + alpha * DUMMY_GREY[0])[:, None]
            shown[inside & hatch] = HATCH
        else:
            shown[inside] = (1 - alpha) * shown[inside] + alpha * np.asarray(colour, np.float32)
    out = Image.fromarray(shown.round().clip(0, 255).astype(np.uint8))
    if boxes is not None:
        d = ImageDraw.Draw(out)
        placed = []
        for r, dummy, colour in zip(members, is_dummy, colours):
            x1, y1, x2, y2 = (float(v) * scale for v in boxes[r])
            if dummy:
                _dashed_rectangle(d, [x1, y1, x2 - 1, y2 - 1], HATCH)
            else:
                d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=2)
            if labels is not None:
                placed.append(((x1 + 3, y1 + 3), labels[r], colour, int(masks[r].sum())))
        # the largest regions' labels first: a small region's label gives way when they overlap
        _labels(d, [item[:3] for item in sorted(placed, key=lambda item: -item[3])], out.size)
    return out


def _wrap(text: str, width: float, draw: ImageDraw.ImageDraw) -> list[str]:
    """``text`` split at its ``" | "`` separators into lines that fit ``width`` pixels; a part
    wider than ``width`` on its own is broken at spaces."""
    lines: list[str] = []
    for part in text.split(" | "):
        if lines and draw.textlength(f"{lines[-1]} | {part}") <= width:
            lines[-1] = f"{lines[-1]} | {part}"
            continue
        lines.append("")
        for word in part.split(" "):
            if lines[-1] and draw.textlength(f"{lines[-1]} {word}") > width:
                lines.append(word)
            else:
                lines[-1] = f"{lines[-1]} {word}" if lines[-1] else word
    return lines


def _side_by_side(panels: Sequence[tuple[str, Image.Image]], title: Optional[str] = None) -> Image.Image:
    """Equal-sized panels in a row, 4 px apart, each under its heading; ``title`` (wrapped at its
    ``" | "`` separators) above them all."""
    panel_w, panel_h = panels[0][1].size
    width = len(panels) * (panel_w + 4) + 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = _wrap(title, width - 8, measure) if title else []
    top = HEADER * len(title_lines)
    figure = Image.new("RGB", (width, top + panel_h + HEADER + 4), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    for i, line in enumerate(title_lines):
        draw.text((4, 1 + HEADER * i), line, fill=(0, 0, 0))
    for i, (heading, p) in enumerate(panels):
        x = 4 + i * (panel_w + 4)
        figure.paste(p, (x, top + HEADER))
        draw.text((x, top + 1), heading, fill=(0, 0, 0))
    return figure


def region_hierarchy_figure(image: Image.Image, masks: torch.Tensor, levels: torch.Tensor,
                            boxes: Optional[torch.Tensor] = None, alpha: float = 0.5, panel: int = 256, *,
                            dummies: Optional[torch.Tensor] = None, labels: Optional[Sequence[str]] = None,
                            show_image: bool = False, kept_boxes: Optional[torch.Tensor] = None,
                            kept_labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Image.Image:
    """One panel per depth of a region hierarchy: the image with that depth's regions tinted.

    Args:
        image: the RGB image the regions belong to.
        masks: ``(R, H, W)`` bool, in the image's pixels (e.g. upsampled patch masks).
        levels: ``(R,)`` depth of each region (1 = children of the whole image).
        boxes: optional ``(R, 4)`` boxes in the image's pixels, outlined in the region's colour.
        alpha: tint opacity inside a region; pixels outside every region of a panel are unchanged.
        panel: width of each panel in pixels (height follows the image's aspect ratio).
        dummies: optional ``(R,)`` bool: regions drawn as dummy nodes (grey, hatched, dashed box,
            labelled "D"); the panels are then headed "depth k: n nodes, m dummies".
        labels: optional text per region, written at its box's corner (needs ``boxes``).
        show_image: a first panel with the image itself.
        kept_boxes / kept_labels: a last panel with the regions a model keeps: ``(K, 4)`` boxes in
            the image's pixels, the k-th outlined in ``PALETTE[k]`` under its label.
        title: a line above the panels (wrapped at ``" | "``).

    Returns:
        The panels side by side, each headed "level k: n regions" (or as ``dummies`` says).
    """
    if masks.ndim != 3 or masks.shape[1:] != (image.height, image.width):
        raise ValueError(f"region_hierarchy_figure: masks must be (R, {image.height}, {image.width}) like the image, "
                         f"got {tuple(masks.shape)}")
    if levels.shape != masks.shape[:1]:
        raise ValueError(f"region_hierarchy_figure: {masks.shape[0]} masks but {levels.shape[0]} levels")
    if dummies is not None and dummies.shape != masks.shape[:1]:
        raise ValueError(f"region_hierarchy_figure: {masks.shape[0]} masks but {dummies.shape[0]} dummy flags")
    if labels is not None and (boxes is None or len(labels) != len(masks)):
        raise ValueError("region_hierarchy_figure: labels need boxes and one label per mask")
    panels = []
    if show_image:
        panels.append((f"image {image.width}x{image.height}", _region_panel(image, masks, [], panel, alpha)))
    for depth in sorted(set(levels.tolist())) or [1]:
        members = (levels == depth).nonzero().flatten().tolist()
        if dummies is None:
            heading = f"level {depth}: {len(members)} regions"
        else:
            n_dummy = int(dummies[members].sum()) if members else 0
            heading = f"depth {depth}: {len(members)} nodes, {n_dummy} dumm{'y' if n_dummy == 1 else 'ies'}"
        panels.append((heading, _region_panel(image, masks, members, panel, alpha, boxes, dummies, labels)))
    if kept_boxes is not None:
        kept = _region_panel(image, masks, [], panel, alpha)
        d = ImageDraw.Draw(kept)
        scale, _ = _panel_geometry(image, panel)
        for k, box in enumerate(kept_boxes.tolist()):
            x1, y1, x2, y2 = (v * scale for v in box)
            d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=PALETTE[k % len(PALETTE)], width=2)
        if kept_labels is not None:  # over every box, in the boxes' order
            _labels(d, [((box[0] * scale + 3, box[1] * scale + 3), text, PALETTE[k % len(PALETTE)])
                        for k, (box, text) in enumerate(zip(kept_boxes.tolist(), kept_labels))], kept.size)
        panels.append((f"kept: {len(kept_boxes)} region{'' if len(kept_boxes) == 1 else 's'}", kept))
    return _side_by_side(panels, title)


def _heat(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` values -> ``(H, W, 3)`` float RGB of a blue (low) to red (high) colour ramp."""
    v = values.astype(np.float32)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
    return np.stack([255 * v, 255 * (1 - np.abs(2 * v - 1)), 255 * (1 - v)], axis=-1)


def _ellipse_outline(centre: np.ndarray, cov: np.ndarray, scale: float, points: int = 64) -> list[tuple[float, float]]:
    """The polygon of the ellipse ``centre + scale * L (cos t, sin t)``, ``L Lᵀ = cov``."""
    values, vectors = np.linalg.eigh(cov)
    axes = vectors * (scale * np.sqrt(np.clip(values, 0, None)))
    t = np.linspace(0, 2 * np.pi, points)
    xy = centre[:, None] + axes @ np.stack([np.cos(t), np.sin(t)])
    return [(float(x), float(y)) for x, y in xy.T]


def salient_region_figure(image: Image.Image, xbar: torch.Tensor, maps: torch.Tensor, centres: torch.Tensor,
                          covs: torch.Tensor, boxes: torch.Tensor, peaks: Optional[torch.Tensor] = None,
                          ellipse_scale: float = 2.0, max_maps: int = 7, panel: int = 192,
                          alpha: float = 0.5) -> Image.Image:
    """DASR's picture of one image (its Fig. 3): ``X̄`` over the image, each region's peak response
    map with its ellipse, and every fitted ellipse with its box on the image.

    Args:
        image: the RGB image as the network saw it (its pixels are the frame of the rest).
        xbar: ``(h, w)`` mean activation map; ``peaks`` ``(n, 2)`` = ``(y, x)`` on it, marked.
        maps: ``(n, H, W)`` peak response maps of the regions to show, in the image's pixels.
        centres / covs / boxes: ``(n, 2)``, ``(n, 2, 2)``, ``(n, 4)``: each region's ellipse
            (second moments, x-y order) and box, in the image's pixels.
        ellipse_scale: the ellipse axes in standard deviations (as the detector's).
        max_maps: map panels shown (the first ones).
    """
    n = len(maps)
    if not (len(centres) == len(covs) == len(boxes) == n):
        raise ValueError(f"salient_region_figure: {n} maps, {len(centres)} centres, {len(covs)} covariances, "
                         f"{len(boxes)} boxes")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    scale, height = _panel_geometry(image, panel)

    def shown(rgb: np.ndarray) -> Image.Image:
        return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8)).resize((panel, height))

    heat = np.asarray(Image.fromarray(_heat(xbar.cpu().numpy()).astype(np.uint8)).resize(image.size, Image.BILINEAR))
    panels = [("mean activation and its peaks", shown((1 - alpha) * base + alpha * heat))]
    if peaks is not None and len(peaks):
        d = ImageDraw.Draw(panels[0][1])
        sy, sx = height / xbar.shape[0], panel / xbar.shape[1]
        for y, x in peaks.tolist():
            cx, cy = (x + 0.5) * sx, (y + 0.5) * sy
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], outline=(255, 255, 255), width=2)
    regions = shown(base)
    d = ImageDraw.Draw(regions)
    for k in range(n):  # a handful of regions: the loop is over regions, not pixels
        colour = PALETTE[k % len(PALETTE)]
        d.line(_ellipse_outline(centres[k].double().numpy() * scale, covs[k].double().numpy() * scale ** 2,
                                ellipse_scale), fill=colour, width=2)
        x1, y1, x2, y2 = (float(v) * scale for v in boxes[k])
        d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=1)
    panels.append((f"{n} regions: ellipses and boxes", regions))
    for k in range(min(n, max_maps)):
        p = shown(0.35 * base + 0.65 * _heat(maps[k].cpu().numpy()))
        ImageDraw.Draw(p).line(_ellipse_outline(centres[k].double().numpy() * scale,
                                                covs[k].double().numpy() * scale ** 2, ellipse_scale),
                               fill=(255, 255, 255), width=2)
        panels.append((f"region {k}: peak response", p))
    return _side_by_side(panels)


#: line colours of :func:`metric_curves_figure`, in series order
SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                  (227, 119, 194), (127, 127, 127)]


def metric_curves_figure(series: dict[str, Sequence[float]], references: Optional[dict[str, float]] = None,
                         x_label: str = "round", y_label: str = "mAP@all", size: tuple[int, int] = (640, 400)
                         ) -> Image.Image:
    """A line chart: one polyline per ``series`` (value at x = 0, 1, ...) and one dashed
    horizontal line per ``references`` value, with a legend -- e.g. UDQ's mAP after each round
    against Off-the-shelf and Off-the-shelf-OPQ (the UDQ paper's Fig. 3)."""
    references = references or {}
    width, height = size
    left, right, top, bottom = 56, 180, 20, 40
    values = [v for s in series.values() for v in s] + list(references.values())
    if not values:
        raise ValueError("metric_curves_figure needs at least one value")
    lo, hi = min(values), max(values)
    pad = max(hi - lo, 1e-3) * 0.1
    lo, hi = lo - pad, hi + pad
    steps = max((len(s) for s in series.values()), default=1)

    def xy(i: float, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * (i / max(steps - 1, 1))
        return x, top + (height - top - bottom) * (hi - v) / (hi - lo)

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        _, y = xy(0, v)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{v:.3f}", fill=(0, 0, 0))
    for i in range(steps):  # x ticks
        x, _ = xy(i, lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill=(0, 0, 0))
        draw.text((x - 3, height - bottom + 6), str(i), fill=(0, 0, 0))
    draw.text(((left + width - right) / 2 - 20, height - 16), x_label, fill=(0, 0, 0))
    draw.text((4, 2), y_label, fill=(0, 0, 0))
    legend = []
    for n, (name, value) in enumerate(references.items()):
        colour = GREY if n == 0 else (90, 90, 90)
        _, y = xy(0, value)
        for x0 in range(left, width - right, 12):  # dashed
            draw.line([x0, y, min(x0 + 6, width - right), y], fill=colour, width=2)
        legend.append((name, colour, True))
    for n, (name, points) in enumerate(series.items()):
        colour = SERIES_COLOURS[n % len(SERIES_COLOURS)]
        coords = [xy(i, v) for i, v in enumerate(points)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for x, y in coords:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend.append((name, colour, False))
    for n, (name, colour, dashed) in enumerate(legend):
        y = top + 8 + 16 * n
        x = width - right + 10
        draw.line([x, y, x + 18, y], fill=colour, width=2 if not dashed else 1)
        draw.text((x + 24, y - 6), name[:24], fill=(0, 0, 0))
    return img
