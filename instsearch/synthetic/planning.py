"""Planning of the synthetic benchmark: which instances exist and what every image shows.

One ``numpy.random.default_rng(seed)`` draws the category split (the unseen categories), every
instance's appearance, and each image's :class:`~instsearch.synthetic.rendering.SceneSpec`
(its objects and its own rendering seed). The test database is planned around the query
instances: positives, optional junk, and distractor-only images, in a shuffled order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from instsearch.synthetic.instances import Instance, sample_instances
from instsearch.synthetic.presets import SynthPreset
from instsearch.synthetic.rendering import SceneSpec
from instsearch.synthetic.shapes import SHAPE_ORDER

__all__ = ["Plan", "plan_benchmark"]


@dataclass
class Plan:
    """Everything decided before any pixel is drawn; rendering and export only read it."""

    preset: SynthPreset
    seed: int
    seen: list[str]
    unseen: list[str]
    instances: dict[int, Instance]
    scenes: list[SceneSpec]
    queries: list[tuple[str, str, int]]  # (query id, query image file, instance id)
    database: list[str]  # file names of database images, in id order


def plan_benchmark(preset: SynthPreset, seed: int) -> Plan:
    """Draw the category split, the instances and every image's scene from ``default_rng(seed)``.

    Scenes come in file order: train, val, the test database (shuffled, so image ids carry no
    information about the plan), then the queries. ``ValueError`` when the preset cannot be met.
    """
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
    return Plan(preset, seed, seen, unseen, instances, scenes, queries, database)
