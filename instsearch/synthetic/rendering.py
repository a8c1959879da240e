"""Rendering of one synthetic image: from a :class:`SceneSpec` and its seed to pixels and ground truth.

The renderer draws the background clutter, places the planned objects (rejection-sampling scale,
position, rotation and lighting until every object keeps ``min_visibility`` of its pixels), adds
occluders, composites in depth order, applies the per-image photometric degradations, and measures
each object's *visible* mask from the owner map: the ground truth comes from the pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_util

from instsearch.synthetic.instances import Instance
from instsearch.synthetic.presets import SynthPreset
from instsearch.synthetic.raster import Layer, downsample2, rasterise
from instsearch.synthetic.shapes import shape_mask
from instsearch.synthetic.textures import texture_index

__all__ = ["SceneSpec", "RenderedObject", "Canvas", "render_scene"]


@dataclass(frozen=True)
class SceneSpec:
    """What one image shows, decided by the planner; the renderer decides where and how."""

    split: str  # "train" | "val" | "test"
    file_name: str  # relative to images/
    seed: int  # the image's own generator seed
    kind: str  # "free" | "primary" | "junk" | "query"
    objects: tuple[int, ...]  # instance ids; objects[0] is the planned (or query) instance


@dataclass
class RenderedObject:
    """One object as rendered: what its visible pixels are (the ground truth of the annotations)."""

    instance_id: int
    full_area: int  # pixels of the unoccluded object
    visible_area: int
    rle: dict  # COCO RLE of the visible mask, counts as str
    bbox: list[float]  # COCO [x, y, w, h] of the visible mask ([0, 0, 0, 0] when fully hidden)

    @property
    def visible(self) -> float:
        """Share of the object's pixels left visible by the objects and occluders in front of it."""
        return self.visible_area / max(self.full_area, 1)


def _render_instance(inst: Instance, cx: float, cy: float, radius: float, theta: float,
                     light: tuple[float, float], size: tuple[int, int]) -> Optional[Layer]:
    layer = rasterise(lambda u, v: shape_mask(inst.category, u, v, inst.shape_param),
                      cx, cy, radius, theta, inst.aspect, size)
    if layer is not None:
        # Directional shading across the object (image frame), so objects are not flat stickers.
        u, v = layer.frame
        c, s = math.cos(theta), math.sin(theta)
        du, dv = u, v * inst.aspect  # back to isotropic units of the radius
        gx, gy = c * du - s * dv, s * du + c * dv
        layer.shade = 1.0 + light[1] * (gx * math.cos(light[0]) + gy * math.sin(light[0]))
    return layer


def _colour_instance(layer: Layer, inst: Instance) -> None:
    u, v = layer.frame
    palette = np.asarray(inst.colors, dtype=np.float32)
    rgb = palette[texture_index(u, v, inst)] * layer.shade[..., None].astype(np.float32)
    layer.rgb = downsample2(rgb)


def _background(rng: np.random.Generator, preset: SynthPreset) -> np.ndarray:
    """Clutter: a desaturated gradient, smooth colour noise, faint blurred primitives, grain."""
    width, height = preset.image_size
    grey = rng.uniform(0.3, 0.72)
    tint = rng.uniform(-1, 1, 3) * rng.uniform(0.03, 0.12)
    xs = np.arange(width, dtype=np.float32)[None, :] - width / 2
    ys = np.arange(height, dtype=np.float32)[:, None] - height / 2
    ang = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(ang) + ys * math.sin(ang)) / max(width, height)
    img = (grey + tint[None, None, :]).astype(np.float32) + np.float32(rng.uniform(0.1, 0.3)) * ramp[..., None]
    # Smooth noise: a coarse random grid, bicubic-upsampled.
    g = int(rng.integers(3, 8))
    coarse = (rng.random((g, g, 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32) / 255.0
    img = img + np.float32(rng.uniform(0.08, 0.22)) * (smooth - 0.5)
    # Faint primitives: clutter a detector must learn to ignore (never category shapes).
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    lo, hi = preset.clutter_shapes
    scale = max(width, height)
    for _ in range(int(rng.integers(lo, hi + 1))):
        kind = int(rng.integers(0, 4))
        pts = rng.uniform(-0.1, 1.1, (4, 2)) * (width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(25, 70)),)
        if kind == 0:
            draw.line([tuple(p) for p in pts[:2]], fill=colour, width=int(rng.integers(1, 3 + scale // 80)))
        elif kind == 1:
            c, r = pts[0], rng.uniform(0.04, 0.2, 2) * scale
            draw.ellipse([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]], fill=colour)
        elif kind == 2:
            draw.polygon([tuple(p) for p in pts[: int(rng.integers(3, 5))]], fill=colour)
        else:
            c, r = pts[0], rng.uniform(0.03, 0.15, 2) * scale
            draw.rectangle([c[0] - r[0], c[1] - r[1], c[0] + r[0], c[1] + r[1]], fill=colour)
    layer = layer.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0)) * scale / 160))
    la = np.asarray(layer, np.float32) / 255.0
    img = img * (1 - la[..., 3:]) + la[..., :3] * la[..., 3:]
    img += np.float32(rng.uniform(0.005, 0.025)) * rng.standard_normal(img.shape, dtype=np.float32)  # grain
    return np.clip(img, 0.0, 1.0, out=img)


def _photometric(img: np.ndarray, rng: np.random.Generator, preset: SynthPreset) -> np.ndarray:
    """Per-image blur, colour cast, contrast, brightness, gamma and sensor noise -> uint8."""
    sigma = float(rng.uniform(*preset.blur_sigma))
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if sigma > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(radius=sigma))
    x = np.asarray(out, np.float32) / 255.0
    x = x * rng.uniform(0.88, 1.12, 3).astype(np.float32)  # colour cast
    mean = x.mean()
    contrast, brightness = np.float32(rng.uniform(0.7, 1.25)), np.float32(rng.uniform(-0.1, 0.1))
    x = (x - mean) * contrast + (mean + brightness)
    x = np.clip(x, 0.0, 1.0, out=x) ** np.float32(rng.uniform(0.7, 1.45))  # gamma
    x += np.float32(rng.uniform(0.0, 0.02)) * rng.standard_normal(x.shape, dtype=np.float32)  # sensor noise
    return (np.clip(x, 0, 1, out=x) * 255 + 0.5).astype(np.uint8)


class Canvas:
    """Objects in depth order and the owner map: which object (or occluder) each pixel shows."""

    OCCLUDER = -2
    BACKGROUND = -1

    def __init__(self, preset: SynthPreset):
        self.preset = preset
        width, height = preset.image_size
        self.owner = np.full((height, width), self.BACKGROUND, dtype=np.int16)
        self.layers: list[tuple[Optional[Instance], Layer]] = []
        self.full_area: list[int] = []

    def _visible_counts(self, owner: np.ndarray, n: int) -> np.ndarray:
        # One pass over the image: bincount of owner ids (shifted past the negative codes).
        return np.bincount((owner.astype(np.int64) + 2).ravel(), minlength=n + 2)[2:n + 2]

    def try_add(self, inst: Optional[Instance], layer: Layer, check: Callable[[np.ndarray], bool]) -> bool:
        """Draw ``layer`` on top if ``check(visible fractions)`` accepts the result."""
        if inst is not None and layer.mask.sum() < 16:
            return False
        owner = self.owner.copy()
        code = len(self.full_area) if inst is not None else self.OCCLUDER
        owner[layer.slices][layer.mask] = code
        full = np.asarray(self.full_area + ([int(layer.mask.sum())] if inst is not None else []), np.float64)
        visible = self._visible_counts(owner, len(full)) / np.maximum(full, 1)
        if not check(visible):
            return False
        self.owner = owner
        self.layers.append((inst, layer))
        if inst is not None:
            self.full_area.append(int(layer.mask.sum()))
        return True

    def visible(self) -> np.ndarray:
        n = len(self.full_area)
        return self._visible_counts(self.owner, n) / np.maximum(np.asarray(self.full_area, np.float64), 1)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _place(canvas: Canvas, inst: Instance, rng: np.random.Generator, size_range: tuple[float, float],
           check: Callable[[np.ndarray], bool], tries: int = 40) -> bool:
    """Rejection-sample scale, position, rotation and lighting until ``check`` accepts."""
    width, height = canvas.preset.image_size
    lo, hi = size_range
    for attempt in range(tries):
        if attempt >= tries // 2:  # crowded image: shrink towards the smallest size
            hi = max(lo, hi * 0.9)
        radius = _log_uniform(rng, lo, hi) / 2.0
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        theta = rng.uniform(0, 2 * math.pi)
        light = (rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.25))
        layer = _render_instance(inst, cx, cy, radius, theta, light, canvas.preset.image_size)
        if layer is not None and canvas.try_add(inst, layer, check):
            return True
    return False


def _occluder(rng: np.random.Generator, target: Layer, reach: tuple[float, float], rel_size: tuple[float, float],
              size: tuple[int, int]) -> Optional[Layer]:
    """A textured rectangle or ellipse near ``target``: not an instance, never annotated."""
    ys, xs = np.nonzero(target.mask)
    cy0, cx0 = target.y0 + ys.mean() + 0.5, target.x0 + xs.mean() + 0.5
    r0 = 0.5 * max(np.ptp(xs) + 1, np.ptp(ys) + 1)
    ang = rng.uniform(0, 2 * math.pi)
    d = rng.uniform(*reach) * r0
    radius = rng.uniform(*rel_size) * r0
    square = rng.random() < 0.6
    inside = (lambda u, v: (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)) if square else (lambda u, v: u * u + v * v <= 1.0)
    layer = rasterise(inside, cx0 + d * math.cos(ang), cy0 + d * math.sin(ang), radius / (0.75 if square else 1.0),
                      rng.uniform(0, math.pi), rng.uniform(0.6, 1.0), size)
    if layer is None:
        return None
    base = rng.uniform(0.15, 0.85) + rng.uniform(-0.1, 0.1, 3)
    grain = rng.normal(0.0, 0.06, layer.alpha.shape + (1,))
    layer.rgb = np.clip(base[None, None, :] + grain, 0, 1).astype(np.float32)
    return layer


def render_scene(spec: SceneSpec, instances: dict[int, Instance], preset: SynthPreset
                 ) -> tuple[np.ndarray, list[RenderedObject]]:
    """Render one image from its spec and its own generator: ``(uint8 HxWx3, objects)``.

    Objects are placed in ``spec.objects`` order, each on top of the previous ones, and every
    placement is rejected unless all objects keep ``min_visibility`` of their pixels; a
    companion that cannot be placed after its tries is dropped (the planned first object is
    always placed on the empty canvas). ``junk`` scenes then cover the planned object with an
    occluder until less than ``junk_visibility`` of it shows. The query instance of a ``query``
    scene is drawn at the query size range and nothing may overlap it.
    """
    rng = np.random.default_rng(spec.seed)
    width, height = preset.image_size
    img = _background(rng, preset)
    canvas = Canvas(preset)
    keep = lambda vis: bool(np.all(vis >= preset.min_visibility))  # noqa: E731
    # In a query image the query instance (objects[0]) stays whole: it is "clearly visible".
    keep_query = lambda vis: bool(vis[0] >= 1.0 and np.all(vis >= preset.min_visibility))  # noqa: E731
    for k, iid in enumerate(spec.objects):
        query_object = spec.kind == "query" and k == 0
        sizes = preset.query_object_size if query_object else preset.object_size
        check = keep_query if spec.kind == "query" else keep
        if not _place(canvas, instances[iid], rng, sizes, check, tries=200 if k == 0 else 40) and k == 0:
            raise RuntimeError(f"{spec.file_name}: could not place instance {iid} on an empty image "
                               f"(preset '{preset.name}': objects too small or too large?)")
    if spec.kind == "junk":
        target = canvas.layers[0][1]
        limit = preset.junk_visibility - 0.02
        for _ in range(60):
            occ = _occluder(rng, target, (0.0, 0.6), (0.9, 1.3), preset.image_size)
            if occ is not None and canvas.try_add(None, occ, lambda vis: bool(vis[0] < limit)):
                break
    elif spec.kind != "query" and rng.random() < preset.occluder_probability:
        target = canvas.layers[int(rng.integers(0, len(canvas.layers)))][1]
        for _ in range(10):
            occ = _occluder(rng, target, (0.3, 1.0), (0.3, 0.7), preset.image_size)
            if occ is not None and canvas.try_add(None, occ, keep):
                break
    # Composite in depth order (alpha blending; owners were decided at coverage 0.5).
    for inst, layer in canvas.layers:
        if inst is not None:
            _colour_instance(layer, inst)
        sl = layer.slices
        a = layer.alpha[..., None]
        img[sl] = img[sl] * (1.0 - a) + layer.rgb * a
    pixels = _photometric(img, rng, preset)
    # Visible masks of all objects at once, RLE-encoded by pycocotools.
    instances_drawn = [inst for inst, _ in canvas.layers if inst is not None]
    masks = np.asfortranarray((canvas.owner[..., None] == np.arange(len(instances_drawn))).astype(np.uint8))
    rles = mask_util.encode(masks)
    bboxes = mask_util.toBbox(rles)
    areas = mask_util.area(rles)
    objects = []
    for inst, rle, bbox, area, full in zip(instances_drawn, rles, bboxes, areas, canvas.full_area):
        objects.append(RenderedObject(instance_id=inst.id, full_area=int(full), visible_area=int(area),
                                      rle={"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                                      bbox=[float(b) for b in bbox]))
    return pixels, objects
