"""The synthetic instance-search benchmark: ``instsearch synth --out DIR [--preset tiny|small]``.

A generated, deterministic stand-in for the instance benchmarks (Instance-160/335, INSTRE) that a
workplace without datasets can still train and evaluate on. What makes it an *instance* benchmark
rather than a detection toy:

* **Categories are shape families** (disc, square, star, ...). Every category has several
  *instances*; an instance is its family's shape plus an instance-specific appearance: two or
  three colours, a texture (stripes, checker, dots, rings, sectors, waves, halves) with its own
  frequency, angle and phase, an aspect ratio and a family-specific shape parameter. Instances of
  one category share the silhouette and differ in appearance, so a category-level feature ranks
  same-category distractors as high as the true instance.
* **Disjoint instances, one unseen category.** Train/val images show only training instances; the
  test benchmark only test instances. Some categories have no training instance at all (the
  class-agnostic case of CLAID/DASR); the others contribute new instances of known categories.
* **Real nuisance factors.** Each image has a cluttered background, 2-4 objects at random
  position, scale (the preset's size range is at least x2), in-plane rotation, occlusion by other
  objects or an occluder patch (every annotated object keeps >= ``min_visibility`` of its pixels),
  and per-image blur, brightness/contrast/gamma and colour cast.
* **Ground truth from the pixels.** Masks are the *visible* pixels of each object (after
  occlusion), boxes come from those masks, and the benchmark's positives/junk come from the
  measured visible fraction: a database image where a query's instance keeps less than
  ``junk_visibility`` of its pixels is junk (as Oxford's "junk" for barely visible landmarks).

Outputs (all under ``DIR``): ``images/{train,val,test}/*.jpg``; ``train.json`` and ``val.json`` in
COCO instances format with an extra integer ``instance_id`` (and float ``visible``) per
annotation; ``test.json``, the same for the test images (all categories, for detector recall on
the benchmark); ``benchmark.json`` in the ``instsearch-benchmark/1`` format; ``synth.json`` with
the parameters, the category split and the instance table.

Determinism: one ``numpy.random.default_rng(seed)`` plans everything and draws one seed per
image; each image is rendered from its own generator, so the bytes are identical for a seed and
preset whatever the number of worker processes. No global RNG state, no timestamps.
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_util

from instsearch.formats import Benchmark, GroundTruth, ImageEntry, Query

SYNTH_FORMAT = "instsearch-synth/1"

__all__ = [
    "SynthPreset", "PRESETS", "SHAPES", "TEXTURES", "Instance", "SceneSpec", "RenderedObject",
    "register_shape", "register_texture", "shape_mask", "texture_index", "sample_instances",
    "render_scene", "generate", "main",
]


# =========================================================================== presets
@dataclass(frozen=True)
class SynthPreset:
    """Every size and probability of one benchmark flavour. Add a row to :data:`PRESETS` to extend."""

    name: str
    image_size: tuple[int, int]  # (width, height) in pixels
    object_size: tuple[float, float]  # diameter range (px) of an object's bounding disc; ratio >= 2
    query_object_size: tuple[float, float]  # queries show the instance large and unoccluded
    objects_per_image: tuple[int, int]  # inclusive range
    n_categories: int  # the first n families of SHAPE_ORDER
    n_unseen_categories: int  # categories with no training instance
    train_instances_per_category: int
    test_instances_per_category: int  # query instances per seen category
    unseen_instances_per_category: int  # query instances per unseen category
    distractor_instances_per_category: int  # test-side instances that are never queried
    n_train_images: int
    n_val_images: int
    positives_per_query: int  # database images planned around each query instance
    junk_probability: float  # chance of one extra heavily-occluded database image per query
    n_distractor_images: int  # database images with distractor instances only
    min_visibility: float = 0.5  # every annotated object keeps at least this share of its pixels
    junk_visibility: float = 0.3  # below this a query instance's database image is junk
    occluder_probability: float = 0.35
    same_category_companion: float = 0.5  # chance a companion object is of the query's category
    blur_sigma: tuple[float, float] = (0.0, 1.2)  # Gaussian blur std (px), per image
    clutter_shapes: tuple[int, int] = (3, 8)  # faint background primitives per image
    jpeg_quality: int = 92


PRESETS: dict[str, SynthPreset] = {
    # ~150 database images, 18 queries; generates in seconds on 2 cores.
    "tiny": SynthPreset(
        name="tiny", image_size=(160, 160), object_size=(28.0, 80.0), query_object_size=(52.0, 76.0),
        objects_per_image=(2, 4), n_categories=8, n_unseen_categories=2,
        train_instances_per_category=3, test_instances_per_category=2, unseen_instances_per_category=3,
        distractor_instances_per_category=1, n_train_images=300, n_val_images=60,
        positives_per_query=5, junk_probability=0.5, n_distractor_images=50,
    ),
    # GPU-sized: 100 queries, ~1500 database images, 5000 training images.
    "small": SynthPreset(
        name="small", image_size=(512, 512), object_size=(80.0, 256.0), query_object_size=(170.0, 240.0),
        objects_per_image=(2, 4), n_categories=12, n_unseen_categories=2,
        train_instances_per_category=8, test_instances_per_category=8, unseen_instances_per_category=10,
        distractor_instances_per_category=4, n_train_images=5000, n_val_images=500,
        positives_per_query=10, junk_probability=0.5, n_distractor_images=450,
        blur_sigma=(0.0, 2.5), clutter_shapes=(6, 16),
    ),
}


# =========================================================================== shapes
# A shape is an implicit function on object-frame coordinates (u, v): inside <=> True. The frame
# is the object's bounding unit disc (rotation and aspect already applied), so every shape must lie
# within u^2 + v^2 <= 1; ``param`` in [0, 1] is the instance's family-specific variation.
ShapeFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
SHAPES: dict[str, ShapeFn] = {}
# Order in which presets take families: the most distinct silhouettes first.
SHAPE_ORDER = ("disc", "square", "triangle", "star", "ring", "cross", "heart", "crescent",
               "hexagon", "diamond", "arrow", "teardrop")


def register_shape(name: str) -> Callable[[ShapeFn], ShapeFn]:
    def deco(fn: ShapeFn) -> ShapeFn:
        SHAPES[name] = fn
        return fn
    return deco


def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int, start: float) -> np.ndarray:
    """Inside a regular n-gon of circumradius 1 with a vertex at angle ``start``: all edge
    half-planes at once (broadcast over the n edge normals, no loop)."""
    normals = start + math.pi / n + 2 * math.pi * np.arange(n) / n
    dots = u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals)
    return dots.max(axis=-1) <= math.cos(math.pi / n)


@register_shape("disc")
def _disc(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return u * u + v * v <= (0.9 + 0.1 * p) ** 2


@register_shape("square")
def _square(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    # Rounded square: corner radius grows with p; corners touch the unit circle when p = 0.
    h, rc = math.sqrt(0.5), 0.3 * p * math.sqrt(0.5)
    qu, qv = np.maximum(np.abs(u) - (h - rc), 0.0), np.maximum(np.abs(v) - (h - rc), 0.0)
    return (qu * qu + qv * qv <= rc * rc) & (np.abs(u) <= h) & (np.abs(v) <= h)


@register_shape("triangle")
def _triangle(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return _regular_polygon(u, v, 3, -math.pi / 2)


@register_shape("hexagon")
def _hexagon(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return _regular_polygon(u, v, 6, 0.0)


@register_shape("diamond")
def _diamond(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    return np.abs(u) + np.abs(v) / (0.55 + 0.45 * p) <= 1.0


@register_shape("star")
def _star(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    # Five points; the boundary radius falls linearly in angle from 1 (tips) to r_in (notches).
    r_in = 0.38 + 0.17 * p
    sector = 2 * math.pi / 5
    phase = np.mod(np.arctan2(v, u) + math.pi / 2, sector) / sector  # 0 at a tip
    tri = np.abs(2.0 * phase - 1.0)  # 1 at tips, 0 at notches
    return np.hypot(u, v) <= r_in + (1.0 - r_in) * tri


@register_shape("ring")
def _ring(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    r = np.hypot(u, v)
    return (r <= 1.0) & (r >= 0.42 + 0.2 * p)


@register_shape("cross")
def _cross(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    w = 0.24 + 0.14 * p
    arm = math.sqrt(1.0 - w * w)  # arm ends touch the unit circle
    au, av = np.abs(u), np.abs(v)
    return ((au <= w) & (av <= arm)) | ((av <= w) & (au <= arm))


@register_shape("heart")
def _heart(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    # Taubin's heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0 spans x in [-1.14, 1.14], y in [-1, 1.24];
    # y is flipped (image v grows downwards) and shifted by 0.2, which leaves it within radius
    # 1.281 of the origin, so a scale of 1.3 fits the unit disc. p narrows the lobes.
    s = 1.3
    x, y = u * s * (1.0 + 0.2 * p), -v * s + 0.2
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0


@register_shape("crescent")
def _crescent(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    d = 0.4 + 0.25 * p
    return (u * u + v * v <= 1.0) & ((u - d) ** 2 + v * v > 0.8 ** 2)


@register_shape("arrow")
def _arrow(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    w = 0.14 + 0.12 * p
    shaft = (u >= -0.95) & (u <= 0.0) & (np.abs(v) <= w)
    head = (u >= -0.05) & (np.abs(v) <= 0.62 * (0.95 - u))
    return shaft | head


@register_shape("teardrop")
def _teardrop(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    # Round end at u = -1, tip at u = +1: half-width sqrt(1 - u^2) (1 - u) / 2, scaled.
    k = 0.75 + 0.25 * p
    half_width = k * np.sqrt(np.clip(1.0 - u * u, 0.0, None)) * (1.0 - u) / 2.0
    return (np.abs(v) <= half_width) & (np.abs(u) < 1.0)


def shape_mask(family: str, u: np.ndarray, v: np.ndarray, param: float = 0.5) -> np.ndarray:
    """Evaluate a registered shape on object-frame coordinates."""
    try:
        fn = SHAPES[family]
    except KeyError:
        raise KeyError(f"unknown shape family '{family}'; registered: {sorted(SHAPES)}") from None
    return fn(u, v, float(param))


# =========================================================================== textures
# A texture maps object-frame coordinates to a colour index in [0, n_colors). It is evaluated in
# the object frame, so it rotates and scales with the object (an instance keeps its look).
TextureFn = Callable[[np.ndarray, np.ndarray, "Instance"], np.ndarray]
TEXTURES: dict[str, TextureFn] = {}


def register_texture(name: str) -> Callable[[TextureFn], TextureFn]:
    def deco(fn: TextureFn) -> TextureFn:
        TEXTURES[name] = fn
        return fn
    return deco


def _rotated(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * u + s * v, -s * u + c * v


@register_texture("stripes")
def _stripes(u: np.ndarray, v: np.ndarray, inst: "Instance") -> np.ndarray:
    a, _ = _rotated(u, v, inst.texture_angle)
    return np.floor(inst.frequency * a + inst.phase).astype(np.int64) % inst.n_colors


@register_texture("checker")
def _checker(u: np.ndarray, v: np.ndarray, inst: "Instance") -> np.ndarray:
    a, b = _rotated(u, v, inst.texture_angle)
    f = inst.frequency
    cells = np.floor(f * a + inst.phase).astype(np.int64) + np.floor(f * b + inst.phase).astype(np.int64)
    return cells % inst.n_colors


@register_texture("dots")
def _dots(u: np.ndarray, v: np.ndarray, inst: "Instance") -> np.ndarray:
    a, b = _rotated(u, v, inst.texture_angle)
    fa, fb = inst.frequency * a + inst.phase, inst.frequency * b + inst.phase
    da, db = fa - np.floor(fa) - 0.5, fb - np.floor(fb) - 0.5
    dot = da * da + db * db <= 0.3 ** 2
    # With three colours alternate dot colours by cell parity.
    parity = (np.floor(fa) + np.floor(fb)).astype(np.int64) % 2 if inst.n_colors > 2 else 0
    return np.where(dot, 1 + parity, 0)


@register_texture("rings")
def _rings(u: np.ndarray, v: np.ndarray, inst: "Instance") -> np.ndarray:
    return np.floor(inst.frequency * np.hypot(u, v) * 1.5 + inst.phase).astype(np.int64) % inst.n_colors


@register_texture("sectors")
def _sectors(u: np.ndarray, v: np.ndarray, inst: "Instance") -> np.ndarray:
    n = max(2, int(round(1.5 * inst.frequency)))
    t = (np.arctan2(v, u) + inst.texture_angle) / (2 * math.pi) * n
    return np.floor(t).astype(np.int64) % inst.n_colors


@register_texture("waves")
def _waves(u: np.ndarray, v: np.ndarray, inst: "Instance") -> np.ndarray:
    a, b = _rotated(u, v, inst.texture_angle)
    t = inst.frequency * a + 0.45 * np.sin(2 * math.pi * 0.8 * inst.frequency * b) + inst.phase
    return np.floor(t).astype(np.int64) % inst.n_colors


@register_texture("halves")
def _halves(u: np.ndarray, v: np.ndarray, inst: "Instance") -> np.ndarray:
    a, _ = _rotated(u, v, inst.texture_angle)
    split = (a > 0.15 * (inst.phase - 0.5)).astype(np.int64)
    if inst.n_colors > 2:  # a band of the third colour along the split line
        return np.where(np.abs(a) < 0.12 + 0.05 * inst.frequency / 4, 2, split)
    return split


def texture_index(u: np.ndarray, v: np.ndarray, inst: "Instance") -> np.ndarray:
    try:
        fn = TEXTURES[inst.texture]
    except KeyError:
        raise KeyError(f"unknown texture '{inst.texture}'; registered: {sorted(TEXTURES)}") from None
    return fn(u, v, inst)


# =========================================================================== instances
@dataclass(frozen=True)
class Instance:
    """One object identity: its family's shape and its own appearance."""

    id: int
    category: str
    role: str  # "train" | "query" | "distractor"
    colors: tuple[tuple[float, float, float], ...]  # 2 or 3 RGB colours in [0, 1]
    texture: str
    frequency: float  # texture cycles per unit of the object frame
    texture_angle: float  # radians, in the object frame
    phase: float  # in [0, 1)
    aspect: float  # short / long side of the object frame, in (0, 1]
    shape_param: float  # family-specific variation in [0, 1]

    @property
    def n_colors(self) -> int:
        return len(self.colors)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))  # type: ignore[return-value]


def sample_instances(rng: np.random.Generator, category: str, roles: Sequence[str], first_id: int) -> list[Instance]:
    """Appearances for all instances of one category at once.

    Instances of a category are made *distinguishable by design*: their main hues are spread
    evenly around the colour wheel (with jitter) and their textures are drawn without replacement
    from a shuffled list while it lasts, so two instances of one category never share both hue and
    texture. Across categories hues and textures repeat, so appearance alone is not the category.
    """
    n = len(roles)
    textures = list(TEXTURES)
    order = rng.permutation(len(textures))
    hue0 = rng.random()
    out = []
    for k, role in enumerate(roles):
        h = hue0 + k / n + rng.uniform(-0.25, 0.25) / n
        n_colors = int(rng.integers(2, 4))
        colors = [_hsv(h, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))]
        h2 = h + rng.uniform(0.25, 0.75)
        if rng.random() < 0.3:  # a near-white or near-black partner colour
            colors.append(_hsv(h2, rng.uniform(0.0, 0.15), float(rng.choice([0.12, 0.95]))))
        else:
            colors.append(_hsv(h2, rng.uniform(0.5, 1.0), rng.uniform(0.35, 1.0)))
        if n_colors == 3:
            colors.append(_hsv(h + rng.uniform(0.3, 0.7), rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0)))
        out.append(Instance(
            id=first_id + k, category=category, role=role, colors=tuple(colors),
            texture=textures[int(order[k % len(textures)])],
            frequency=round(float(rng.uniform(1.5, 3.5)), 4),
            texture_angle=round(float(rng.uniform(0, math.pi)), 4),
            phase=round(float(rng.random()), 4),
            aspect=round(float(rng.uniform(0.65, 1.0)), 4),
            shape_param=round(float(rng.random()), 4),
        ))
    return out


# =========================================================================== rendering
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
    instance_id: int
    full_area: int  # pixels of the unoccluded object
    visible_area: int
    rle: dict  # COCO RLE of the visible mask, counts as str
    bbox: list[float]  # COCO [x, y, w, h] of the visible mask ([0, 0, 0, 0] when fully hidden)

    @property
    def visible(self) -> float:
        return self.visible_area / max(self.full_area, 1)


@dataclass
class _Layer:
    """An object or occluder rasterised on its patch of the image."""

    y0: int
    x0: int
    alpha: np.ndarray  # (h, w) coverage in [0, 1] from 2x2 supersampling
    mask: np.ndarray  # (h, w) bool, coverage >= 0.5: the pixels the object owns
    frame: tuple[np.ndarray, np.ndarray] = field(repr=False)  # supersampled (u, v)
    shade: Optional[np.ndarray] = field(default=None, repr=False)  # supersampled lighting factor
    rgb: Optional[np.ndarray] = None  # (h, w, 3) once coloured

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.alpha.shape[0]), slice(self.x0, self.x0 + self.alpha.shape[1])


def _downsample2(a: np.ndarray) -> np.ndarray:
    """Mean of each 2x2 block (strided adds: several times faster than a reshaped mean)."""
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * np.float32(0.25)


def _rasterise(inside: Callable[[np.ndarray, np.ndarray], np.ndarray], cx: float, cy: float, radius: float,
               theta: float, aspect: float, size: tuple[int, int]) -> Optional[_Layer]:
    """Evaluate an implicit shape on a 2x supersampled grid over its bounding square.

    Object frame: rotate image offsets by -theta, divide by the radius (and by radius * aspect
    across), so the shape's unit disc maps onto the object's footprint. Returns None when the
    patch misses the image.
    """
    width, height = size
    x0, x1 = max(int(math.floor(cx - radius)) - 1, 0), min(int(math.ceil(cx + radius)) + 1, width)
    y0, y1 = max(int(math.floor(cy - radius)) - 1, 0), min(int(math.ceil(cy + radius)) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    xs = x0 + (np.arange(2 * (x1 - x0), dtype=np.float64) + 0.5) / 2.0
    ys = y0 + (np.arange(2 * (y1 - y0), dtype=np.float64) + 0.5) / 2.0
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    c, s = math.cos(theta), math.sin(theta)
    u = (c * dx + s * dy) / radius
    v = (-s * dx + c * dy) / (radius * aspect)
    alpha = _downsample2(inside(u, v).astype(np.float32))
    return _Layer(y0=y0, x0=x0, alpha=alpha, mask=alpha >= 0.5, frame=(u, v))


def _render_instance(inst: Instance, cx: float, cy: float, radius: float, theta: float,
                     light: tuple[float, float], size: tuple[int, int]) -> Optional[_Layer]:
    layer = _rasterise(lambda u, v: shape_mask(inst.category, u, v, inst.shape_param),
                       cx, cy, radius, theta, inst.aspect, size)
    if layer is not None:
        # Directional shading across the object (image frame), so objects are not flat stickers.
        u, v = layer.frame
        c, s = math.cos(theta), math.sin(theta)
        du, dv = u, v * inst.aspect  # back to isotropic units of the radius
        gx, gy = c * du - s * dv, s * du + c * dv
        layer.shade = 1.0 + light[1] * (gx * math.cos(light[0]) + gy * math.sin(light[0]))
    return layer


def _colour_instance(layer: _Layer, inst: Instance) -> None:
    u, v = layer.frame
    palette = np.asarray(inst.colors, dtype=np.float32)
    rgb = palette[texture_index(u, v, inst)] * layer.shade[..., None].astype(np.float32)
    layer.rgb = _downsample2(rgb)


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


class _Canvas:
    """Objects in depth order and the owner map: which object (or occluder) each pixel shows."""

    OCCLUDER = -2
    BACKGROUND = -1

    def __init__(self, preset: SynthPreset):
        self.preset = preset
        width, height = preset.image_size
        self.owner = np.full((height, width), self.BACKGROUND, dtype=np.int16)
        self.layers: list[tuple[Optional[Instance], _Layer]] = []
        self.full_area: list[int] = []

    def _visible_counts(self, owner: np.ndarray, n: int) -> np.ndarray:
        # One pass over the image: bincount of owner ids (shifted past the negative codes).
        return np.bincount((owner.astype(np.int64) + 2).ravel(), minlength=n + 2)[2:n + 2]

    def try_add(self, inst: Optional[Instance], layer: _Layer, check: Callable[[np.ndarray], bool]) -> bool:
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


def _place(canvas: _Canvas, inst: Instance, rng: np.random.Generator, size_range: tuple[float, float],
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


def _occluder(rng: np.random.Generator, target: _Layer, reach: tuple[float, float], rel_size: tuple[float, float],
              size: tuple[int, int]) -> Optional[_Layer]:
    """A textured rectangle or ellipse near ``target``: not an instance, never annotated."""
    ys, xs = np.nonzero(target.mask)
    cy0, cx0 = target.y0 + ys.mean() + 0.5, target.x0 + xs.mean() + 0.5
    r0 = 0.5 * max(np.ptp(xs) + 1, np.ptp(ys) + 1)
    ang = rng.uniform(0, 2 * math.pi)
    d = rng.uniform(*reach) * r0
    radius = rng.uniform(*rel_size) * r0
    square = rng.random() < 0.6
    inside = (lambda u, v: (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)) if square else (lambda u, v: u * u + v * v <= 1.0)
    layer = _rasterise(inside, cx0 + d * math.cos(ang), cy0 + d * math.sin(ang), radius / (0.75 if square else 1.0),
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
    canvas = _Canvas(preset)
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


# =========================================================================== planning
@dataclass
class _Plan:
    preset: SynthPreset
    seed: int
    seen: list[str]
    unseen: list[str]
    instances: dict[int, Instance]
    scenes: list[SceneSpec]
    queries: list[tuple[str, str, int]]  # (query id, query image file, instance id)
    database: list[str]  # file names of database images, in id order


def _plan(preset: SynthPreset, seed: int) -> _Plan:
    if preset.n_categories > len(SHAPE_ORDER):
        raise ValueError(f"preset '{preset.name}' asks for {preset.n_categories} categories; "
                         f"only {len(SHAPE_ORDER)} shape families exist: {SHAPE_ORDER}")
    if not 0 < preset.n_unseen_categories < preset.n_categories:
        raise ValueError(f"preset '{preset.name}': n_unseen_categories must be in [1, n_categories)")
    lo, hi = preset.object_size
    if hi > min(preset.image_size) or max(preset.query_object_size) > min(preset.image_size):
        raise ValueError(f"preset '{preset.name}': object sizes exceed the image size {preset.image_size}")
    rng = np.random.default_rng(seed)
    families = list(SHAPE_ORDER[: preset.n_categories])
    unseen = sorted(str(f) for f in rng.choice(families, preset.n_unseen_categories, replace=False))
    seen = [f for f in families if f not in unseen]

    instances: dict[int, Instance] = {}
    for cat in families:
        roles = ((["train"] * preset.train_instances_per_category + ["query"] * preset.test_instances_per_category)
                 if cat in seen else ["query"] * preset.unseen_instances_per_category)
        roles += ["distractor"] * preset.distractor_instances_per_category
        for inst in sample_instances(rng, cat, roles, first_id=len(instances)):
            instances[inst.id] = inst
    by_role: dict[str, list[int]] = {"train": [], "query": [], "distractor": []}
    for inst in instances.values():
        by_role[inst.role].append(inst.id)
    test_side = by_role["query"] + by_role["distractor"]

    def n_objects() -> int:
        return int(rng.integers(preset.objects_per_image[0], preset.objects_per_image[1] + 1))

    def companions(primary: int, k: int, pool: list[int]) -> list[int]:
        """``k`` other instances, each of the primary's category with probability p (hard negatives)."""
        chosen: list[int] = []
        cat = instances[primary].category
        for _ in range(k):
            free = [i for i in pool if i != primary and i not in chosen]
            same = [i for i in free if instances[i].category == cat]
            src = same if same and rng.random() < preset.same_category_companion else free
            if src:
                chosen.append(int(rng.choice(src)))
        return chosen

    def seed_() -> int:
        return int(rng.integers(0, 2**63 - 1))

    scenes: list[SceneSpec] = []
    for split, count in (("train", preset.n_train_images), ("val", preset.n_val_images)):
        for i in range(count):
            objs = rng.choice(by_role["train"], n_objects(), replace=False)
            scenes.append(SceneSpec(split, f"{split}/{i:06d}.jpg", seed_(), "free", tuple(int(o) for o in objs)))

    # Test database: planned occurrences of every query instance, optional junk, distractor images.
    db: list[tuple[str, tuple[int, ...]]] = []
    for q in by_role["query"]:
        for _ in range(preset.positives_per_query):
            db.append(("primary", (q, *companions(q, n_objects() - 1, test_side))))
        if rng.random() < preset.junk_probability:
            db.append(("junk", (q, *companions(q, n_objects() - 1, test_side))))
    for _ in range(preset.n_distractor_images):
        objs = rng.choice(by_role["distractor"], min(n_objects(), len(by_role["distractor"])), replace=False)
        db.append(("free", tuple(int(o) for o in objs)))
    order = rng.permutation(len(db))  # ids carry no information about the plan
    database = []
    for i, j in enumerate(order):
        kind, objs = db[int(j)]
        name = f"test/db_{i:06d}.jpg"
        database.append(name)
        scenes.append(SceneSpec("test", name, seed_(), kind, objs))
    queries = []
    for n, q in enumerate(by_role["query"]):
        name = f"test/query_{n:04d}.jpg"
        others = companions(q, int(rng.integers(1, 3)), test_side)
        scenes.append(SceneSpec("test", name, seed_(), "query", (q, *others)))
        queries.append((f"q{n:04d}", name, q))
    return _Plan(preset, seed, seen, unseen, instances, scenes, queries, database)


# =========================================================================== writing
_WORKER: dict = {}


def _init_worker(instances: dict[int, Instance], preset: SynthPreset, image_dir: str) -> None:
    _WORKER.update(instances=instances, preset=preset, image_dir=image_dir)


def _render_and_save(spec: SceneSpec) -> list[RenderedObject]:
    preset: SynthPreset = _WORKER["preset"]
    pixels, objects = render_scene(spec, _WORKER["instances"], preset)
    path = Path(_WORKER["image_dir"]) / spec.file_name
    Image.fromarray(pixels).save(path, format="JPEG", quality=preset.jpeg_quality, optimize=False, progressive=False)
    return objects


def _render_all(plan: _Plan, image_dir: Path, workers: int, progress: bool) -> list[list[RenderedObject]]:
    """Render and save every scene, in plan order; ``workers`` > 1 uses a process pool."""
    args = (plan.instances, plan.preset, str(image_dir))
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            _init_worker(*args)
            results: Iterable[list[RenderedObject]] = map(_render_and_save, plan.scenes)
        else:
            # spawn, not fork: safe whatever the parent imported (torch's thread pools do not
            # survive fork). imap keeps plan order, so the output does not depend on scheduling.
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=args))
            results = pool.imap(_render_and_save, plan.scenes, chunksize=8)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(plan.scenes), desc="rendering", unit="img")
        return list(results)


def _box_xyxy(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return (float(x), float(y), float(x + w), float(y + h))


def _coco(plan: _Plan, split: str, scenes: list[tuple[SceneSpec, list[RenderedObject]]],
          categories: list[str]) -> dict:
    width, height = plan.preset.image_size
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    images, annotations = [], []
    for image_id, (spec, objects) in enumerate(scenes, start=1):
        images.append({"id": image_id, "file_name": spec.file_name, "width": width, "height": height})
        for obj in objects:
            if obj.visible_area == 0:
                continue  # fully hidden behind a junk occluder: nothing to annotate
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": cat_id[plan.instances[obj.instance_id].category],
                "bbox": [round(b, 2) for b in obj.bbox], "area": float(obj.visible_area), "iscrowd": 0,
                "segmentation": obj.rle, "instance_id": obj.instance_id, "visible": round(obj.visible, 4),
            })
    return {
        "info": {"description": f"instsearch synthetic benchmark, preset '{plan.preset.name}', split '{split}'",
                 "version": "1", "seed": plan.seed},
        "licenses": [],
        "images": images,
        "categories": [{"id": cat_id[c], "name": c, "supercategory": "shape"} for c in categories],
        "annotations": annotations,
    }


def _benchmark(plan: _Plan, out: Path, rendered: dict[str, list[RenderedObject]]) -> Benchmark:
    width, height = plan.preset.image_size
    ids = {name: Path(name).stem for name in rendered}
    images = {ids[n]: ImageEntry(ids[n], n, width, height) for n in plan.database + [f for _, f, _ in plan.queries]}
    queries, ground_truth, info = [], {}, {}
    # instance id -> [(db image id, object)] in database order
    occurrences: dict[int, list[tuple[str, RenderedObject]]] = {}
    for name in plan.database:
        for obj in rendered[name]:
            occurrences.setdefault(obj.instance_id, []).append((ids[name], obj))
    for qid, qfile, iid in plan.queries:
        (qobj,) = [o for o in rendered[qfile] if o.instance_id == iid]
        queries.append(Query(qid, ids[qfile], _box_xyxy(qobj.bbox)))
        positives = {img: [_box_xyxy(o.bbox)] for img, o in occurrences.get(iid, [])
                     if o.visible >= plan.preset.junk_visibility}
        junk = {img for img, o in occurrences.get(iid, []) if o.visible < plan.preset.junk_visibility}
        ground_truth[qid] = GroundTruth(positives, junk)
        inst = plan.instances[iid]
        info[qid] = {"instance_id": iid, "category": inst.category, "seen_category": inst.category in plan.seen}
    return Benchmark(name=f"synthetic-{plan.preset.name}", root=out, image_root="images", images=images,
                     database=[ids[n] for n in plan.database], queries=queries, ground_truth=ground_truth,
                     extra={"query_info": info})


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "synth.json").is_file():
        raise FileExistsError(f"{out}: folder is not empty and holds no synth.json; refusing to write a synthetic "
                              "benchmark over files 'instsearch synth' did not create (choose an empty or new --out)")
    for split in ("train", "val", "test"):  # a previous generation's images would linger otherwise
        shutil.rmtree(out / "images" / split, ignore_errors=True)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)


def _write_json(path: Path, data: dict, indent: Optional[int] = None) -> Path:
    path.write_text(json.dumps(data, indent=indent) + "\n")
    return path


def generate(out: str | Path, preset: str | SynthPreset = "tiny", seed: int = 0, workers: int = 1,
             progress: bool = False) -> Path:
    """Generate the benchmark into ``out``; returns the path of the test ``benchmark.json``.

    ``workers`` > 1 renders in that many processes; the files are byte-identical either way.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise KeyError(f"unknown synthetic preset '{preset}'; available: {sorted(PRESETS)}")
        preset = PRESETS[preset]
    out = Path(out)
    plan = _plan(preset, int(seed))
    _prepare_out(out)
    results = _render_all(plan, out / "images", workers, progress)
    by_split: dict[str, list[tuple[SceneSpec, list[RenderedObject]]]] = {"train": [], "val": [], "test": []}
    for spec, objects in zip(plan.scenes, results):
        by_split[spec.split].append((spec, objects))
    categories = plan.seen + plan.unseen  # seen ones first: train/val ids are 1..len(seen)
    for split in ("train", "val"):
        _write_json(out / f"{split}.json", _coco(plan, split, by_split[split], plan.seen))
    _write_json(out / "test.json", _coco(plan, "test", by_split["test"], categories))
    rendered = {spec.file_name: objects for spec, objects in by_split["test"]}
    bench_path = _benchmark(plan, out, rendered).save(out / "benchmark.json")
    by_category = {c: {r: [i.id for i in plan.instances.values() if i.category == c and i.role == r]
                       for r in ("train", "query", "distractor")} for c in categories}
    _write_json(out / "synth.json", {
        "format": SYNTH_FORMAT, "preset": preset.name, "seed": int(seed), "parameters": asdict(preset),
        "categories": [{"id": k + 1, "name": c, "seen_in_training": c in plan.seen,
                        "instances": by_category[c]} for k, c in enumerate(categories)],
        "instances": [asdict(i) for i in plan.instances.values()],
        "files": {"train": "train.json", "val": "val.json", "test": "test.json", "benchmark": "benchmark.json",
                  "images": "images"},
    }, indent=1)
    return bench_path


# =========================================================================== CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="instsearch synth",
        description="Generate the synthetic instance-search benchmark (COCO train/val, test benchmark.json).")
    parser.add_argument("--out", required=True, type=Path, help="output folder (new, empty, or a previous synth output)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="size preset (default: tiny)")
    parser.add_argument("--seed", default=0, type=int, help="random seed; same seed and preset give identical bytes")
    parser.add_argument("--workers", default=min(os.cpu_count() or 1, 8), type=int,
                        help="rendering processes (output does not depend on it)")
    args = parser.parse_args(argv)
    try:
        bench_path = generate(args.out, args.preset, args.seed, workers=args.workers, progress=True)
    except (FileExistsError, ValueError, KeyError) as e:
        print(f"instsearch synth: error: {e}", file=sys.stderr)
        return 2
    out = args.out
    synth = json.loads((out / "synth.json").read_text())
    bench = Benchmark.load(bench_path)
    n_train = len(json.loads((out / "train.json").read_text())["images"])
    n_val = len(json.loads((out / "val.json").read_text())["images"])
    seen = [c["name"] for c in synth["categories"] if c["seen_in_training"]]
    unseen = [c["name"] for c in synth["categories"] if not c["seen_in_training"]]
    n_junk = sum(len(g.junk) for g in bench.ground_truth.values())
    n_pos = sum(len(g.positives) for g in bench.ground_truth.values())
    print(f"synthetic benchmark '{args.preset}' (seed {args.seed}) in {out}")
    print(f"  categories: {len(seen)} seen in training ({', '.join(seen)}); unseen: {', '.join(unseen)}")
    print(f"  train {n_train} images, val {n_val} images; test: {len(bench.queries)} queries, "
          f"{len(bench.database)} database images, {n_pos} positives, {n_junk} junk")
    for name in ("train.json", "val.json", "test.json", "benchmark.json", "synth.json", "images/"):
        print(f"  wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
