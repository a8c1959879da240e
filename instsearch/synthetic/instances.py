"""Instances of the synthetic benchmark: object identities and the sampling of their appearance.

An :class:`Instance` is what a query asks for: its category's shape plus its own colours, texture,
aspect ratio and shape parameter. :func:`sample_instances` draws all instances of one category at
once, so that they are told apart by design.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from instsearch.synthetic.textures import TEXTURES

__all__ = ["Instance", "sample_instances"]


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
