"""Writing the synthetic benchmark's annotation files from its plan and the rendered ground truth.

What rendering measured (each object's visible mask, box and visible fraction) becomes:
``train.json`` / ``val.json`` (COCO instances of the training instances, seen categories only,
with an extra integer ``instance_id`` and float ``visible`` per annotation), ``test.json`` (the
same for the test images, all categories), ``benchmark.json`` (``instsearch-benchmark/1``: a
database image where the query instance keeps less than ``junk_visibility`` of its pixels is
junk) and ``synth.json`` (parameters, category split, instance table). Everything is a function
of the plan and the pixels: no timestamps, so the bytes are identical for a seed.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from instsearch.formats import Benchmark, GroundTruth, ImageEntry, Query
from instsearch.synthetic.planning import Plan
from instsearch.synthetic.rendering import RenderedObject, SceneSpec

SYNTH_FORMAT = "instsearch-synth/1"

__all__ = ["SYNTH_FORMAT", "write_annotations"]


def write_annotations(plan: Plan, out: Path, rendered: Sequence[list[RenderedObject]]) -> Path:
    """Write every JSON file of the benchmark into ``out``; returns the path of ``benchmark.json``.

    ``rendered[k]`` holds the objects of ``plan.scenes[k]`` as :func:`~instsearch.synthetic.rendering.render_scene`
    measured them.
    """
    by_split: dict[str, list[tuple[SceneSpec, list[RenderedObject]]]] = {"train": [], "val": [], "test": []}
    for spec, objects in zip(plan.scenes, rendered):
        by_split[spec.split].append((spec, objects))
    categories = plan.seen + plan.unseen  # seen ones first: train/val ids are 1..len(seen)
    for split in ("train", "val"):
        _write_json(out / f"{split}.json", _coco_split(plan, split, by_split[split], plan.seen))
    _write_json(out / "test.json", _coco_split(plan, "test", by_split["test"], categories))
    test_objects = {spec.file_name: objects for spec, objects in by_split["test"]}
    bench_path = _test_benchmark(plan, out, test_objects).save(out / "benchmark.json")
    by_category = {c: {r: [i.id for i in plan.instances.values() if i.category == c and i.role == r]
                       for r in ("train", "query", "distractor")} for c in categories}
    _write_json(out / "synth.json", {
        "format": SYNTH_FORMAT, "preset": plan.preset.name, "seed": plan.seed, "parameters": asdict(plan.preset),
        "categories": [{"id": k + 1, "name": c, "seen_in_training": c in plan.seen,
                        "instances": by_category[c]} for k, c in enumerate(categories)],
        "instances": [asdict(i) for i in plan.instances.values()],
        "files": {"train": "train.json", "val": "val.json", "test": "test.json", "benchmark": "benchmark.json",
                  "images": "images"},
    }, indent=1)
    return bench_path


def _write_json(path: Path, data: dict, indent: Optional[int] = None) -> Path:
    path.write_text(json.dumps(data, indent=indent) + "\n")
    return path


def _box_xyxy(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = bbox
    return (float(x), float(y), float(x + w), float(y + h))


def _coco_split(plan: Plan, split: str, scenes: list[tuple[SceneSpec, list[RenderedObject]]],
                categories: list[str]) -> dict:
    """One split's COCO instances file; ``categories`` in id order (ids 1..n)."""
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


def _test_benchmark(plan: Plan, out: Path, rendered: dict[str, list[RenderedObject]]) -> Benchmark:
    """Queries, database and ground truth from the test images (``rendered``: objects by file name)."""
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
