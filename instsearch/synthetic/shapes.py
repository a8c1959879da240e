"""Shape families of the synthetic benchmark: one silhouette, as an implicit function, per category.

Every instance of a category shares its family's silhouette (up to the instance's aspect ratio and
family-specific ``param``); appearance is the textures' business (:mod:`.textures`). Register a new
family with :func:`register_shape`; presets take families in :data:`SHAPE_ORDER`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = ["ShapeFn", "SHAPES", "SHAPE_ORDER", "register_shape", "shape_mask"]

# A shape is an implicit function on object-frame coordinates (u, v): inside <=> True. The frame
# is the object's bounding unit disc (rotation and aspect already applied), so every shape must lie
# within u^2 + v^2 <= 1; ``param`` in [0, 1] is the instance's family-specific variation.
ShapeFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
SHAPES: dict[str, ShapeFn] = {}
# Order in which presets take families: the most distinct silhouettes first.
SHAPE_ORDER = ("disc", "square", "triangle", "star", "ring", "cross", "heart", "crescent",
               "hexagon", "diamond", "arrow", "teardrop")


def register_shape(name: str) -> Callable[[ShapeFn], ShapeFn]:
    """Decorator: register ``fn(u, v, param) -> bool mask`` as the shape family ``name``."""
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
