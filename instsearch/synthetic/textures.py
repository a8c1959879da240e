"""Textures of the synthetic benchmark: how an instance paints its silhouette with its palette.

Instances of one category differ by appearance only, so the texture (with the instance's own
frequency, angle and phase) and the colours are what tells two instances apart. Register a new
texture with :func:`register_texture`; :func:`~instsearch.synthetic.instances.sample_instances`
draws from every registered one.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol

import numpy as np

__all__ = ["Textured", "TextureFn", "TEXTURES", "register_texture", "texture_index"]


class Textured(Protocol):
    """What a texture reads of an instance (:class:`~instsearch.synthetic.instances.Instance` has it)."""

    texture: str
    frequency: float  # cycles per unit of the object frame
    texture_angle: float  # radians, in the object frame
    phase: float  # in [0, 1)

    @property
    def n_colors(self) -> int: ...


# A texture maps object-frame coordinates to a colour index in [0, n_colors). It is evaluated in
# the object frame, so it rotates and scales with the object (an instance keeps its look).
TextureFn = Callable[[np.ndarray, np.ndarray, Textured], np.ndarray]
TEXTURES: dict[str, TextureFn] = {}


def register_texture(name: str) -> Callable[[TextureFn], TextureFn]:
    """Decorator: register ``fn(u, v, instance) -> colour indices`` as the texture ``name``."""
    def deco(fn: TextureFn) -> TextureFn:
        TEXTURES[name] = fn
        return fn
    return deco


def _rotated(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * u + s * v, -s * u + c * v


@register_texture("stripes")
def _stripes(u: np.ndarray, v: np.ndarray, inst: Textured) -> np.ndarray:
    a, _ = _rotated(u, v, inst.texture_angle)
    return np.floor(inst.frequency * a + inst.phase).astype(np.int64) % inst.n_colors


@register_texture("checker")
def _checker(u: np.ndarray, v: np.ndarray, inst: Textured) -> np.ndarray:
    a, b = _rotated(u, v, inst.texture_angle)
    f = inst.frequency
    cells = np.floor(f * a + inst.phase).astype(np.int64) + np.floor(f * b + inst.phase).astype(np.int64)
    return cells % inst.n_colors


@register_texture("dots")
def _dots(u: np.ndarray, v: np.ndarray, inst: Textured) -> np.ndarray:
    a, b = _rotated(u, v, inst.texture_angle)
    fa, fb = inst.frequency * a + inst.phase, inst.frequency * b + inst.phase
    da, db = fa - np.floor(fa) - 0.5, fb - np.floor(fb) - 0.5
    dot = da * da + db * db <= 0.3 ** 2
    # With three colours alternate dot colours by cell parity.
    parity = (np.floor(fa) + np.floor(fb)).astype(np.int64) % 2 if inst.n_colors > 2 else 0
    return np.where(dot, 1 + parity, 0)


@register_texture("rings")
def _rings(u: np.ndarray, v: np.ndarray, inst: Textured) -> np.ndarray:
    return np.floor(inst.frequency * np.hypot(u, v) * 1.5 + inst.phase).astype(np.int64) % inst.n_colors


@register_texture("sectors")
def _sectors(u: np.ndarray, v: np.ndarray, inst: Textured) -> np.ndarray:
    n = max(2, int(round(1.5 * inst.frequency)))
    t = (np.arctan2(v, u) + inst.texture_angle) / (2 * math.pi) * n
    return np.floor(t).astype(np.int64) % inst.n_colors


@register_texture("waves")
def _waves(u: np.ndarray, v: np.ndarray, inst: Textured) -> np.ndarray:
    a, b = _rotated(u, v, inst.texture_angle)
    t = inst.frequency * a + 0.45 * np.sin(2 * math.pi * 0.8 * inst.frequency * b) + inst.phase
    return np.floor(t).astype(np.int64) % inst.n_colors


@register_texture("halves")
def _halves(u: np.ndarray, v: np.ndarray, inst: Textured) -> np.ndarray:
    a, _ = _rotated(u, v, inst.texture_angle)
    split = (a > 0.15 * (inst.phase - 0.5)).astype(np.int64)
    if inst.n_colors > 2:  # a band of the third colour along the split line
        return np.where(np.abs(a) < 0.12 + 0.05 * inst.frequency / 4, 2, split)
    return split


def texture_index(u: np.ndarray, v: np.ndarray, inst: Textured) -> np.ndarray:
    """Palette index of every object-frame point under the instance's texture."""
    try:
        fn = TEXTURES[inst.texture]
    except KeyError:
        raise KeyError(f"unknown texture '{inst.texture}'; registered: {sorted(TEXTURES)}") from None
    return fn(u, v, inst)
