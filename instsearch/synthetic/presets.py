"""Presets of the synthetic benchmark: every size, count and probability of one benchmark flavour.

A preset fixes *what* is generated (image and object sizes, how many categories, instances,
images and queries, visibility thresholds, image degradations); the seed fixes the draw. Add a
row to :data:`PRESETS` to extend: ``instsearch synth --preset NAME`` and :func:`get_preset` find it.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SynthPreset", "PRESETS", "get_preset"]


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


def get_preset(preset: str | SynthPreset) -> SynthPreset:
    """``preset`` itself, or the registered preset of that name (a ``KeyError`` lists the available ones)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise KeyError(f"unknown synthetic preset '{preset}'; available: {sorted(PRESETS)}")
        preset = PRESETS[preset]
    return preset
