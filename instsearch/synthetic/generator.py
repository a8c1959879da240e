"""``generate``: plan, render and write the synthetic benchmark into a folder.

Determinism: the plan draws one seed per image and each image is rendered from its own generator,
so the files are byte-identical for a seed and preset whatever the number of worker processes
(``imap`` keeps plan order). No global RNG state is read or changed.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import shutil
from pathlib import Path
from typing import Iterable

from PIL import Image

from instsearch.synthetic.export import write_annotations
from instsearch.synthetic.instances import Instance
from instsearch.synthetic.planning import Plan, plan_benchmark
from instsearch.synthetic.presets import SynthPreset, get_preset
from instsearch.synthetic.rendering import RenderedObject, SceneSpec, render_scene

__all__ = ["generate"]


def generate(out: str | Path, preset: str | SynthPreset = "tiny", seed: int = 0, workers: int = 1,
             progress: bool = False) -> Path:
    """Generate the benchmark into ``out``; returns the path of the test ``benchmark.json``.

    ``workers`` > 1 renders in that many processes; the files are byte-identical either way.
    """
    preset = get_preset(preset)
    out = Path(out)
    plan = plan_benchmark(preset, int(seed))
    _prepare_out(out)
    rendered = _render_all(plan, out / "images", workers, progress)
    return write_annotations(plan, out, rendered)


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "synth.json").is_file():
        raise FileExistsError(f"{out}: folder is not empty and holds no synth.json; refusing to write a synthetic "
                              "benchmark over files 'instsearch synth' did not create (choose an empty or new --out)")
    for split in ("train", "val", "test"):  # a previous generation's images would linger otherwise
        shutil.rmtree(out / "images" / split, ignore_errors=True)
        (out / "images" / split).mkdir(parents=True, exist_ok=True)


# Rendering state of this process: set by the pool's initializer, or directly when rendering serially.
_WORKER: dict = {}


def _init_worker(instances: dict[int, Instance], preset: SynthPreset, image_dir: str) -> None:
    _WORKER.update(instances=instances, preset=preset, image_dir=image_dir)


def _render_and_save(spec: SceneSpec) -> list[RenderedObject]:
    preset: SynthPreset = _WORKER["preset"]
    pixels, objects = render_scene(spec, _WORKER["instances"], preset)
    path = Path(_WORKER["image_dir"]) / spec.file_name
    Image.fromarray(pixels).save(path, format="JPEG", quality=preset.jpeg_quality, optimize=False, progressive=False)
    return objects


def _render_all(plan: Plan, image_dir: Path, workers: int, progress: bool) -> list[list[RenderedObject]]:
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
