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

Modules, in the order the data flows: :mod:`.presets` (sizes and counts of a flavour),
:mod:`.shapes` and :mod:`.textures` (what a category and an instance look like), :mod:`.instances`
(object identities), :mod:`.planning` (what every image shows), :mod:`.raster` and
:mod:`.rendering` (pixels and visible masks of one image), :mod:`.export` (the JSON files),
:mod:`.generator` (:func:`generate`, all of it into a folder) and :mod:`.cli` (``instsearch synth``).
"""
from instsearch.synthetic.cli import main
from instsearch.synthetic.export import SYNTH_FORMAT
from instsearch.synthetic.generator import generate
from instsearch.synthetic.instances import Instance, sample_instances
from instsearch.synthetic.presets import PRESETS, SynthPreset, get_preset
from instsearch.synthetic.rendering import RenderedObject, SceneSpec, render_scene
from instsearch.synthetic.shapes import SHAPE_ORDER, SHAPES, register_shape, shape_mask
from instsearch.synthetic.textures import TEXTURES, register_texture, texture_index

__all__ = [
    "SynthPreset", "PRESETS", "get_preset", "SHAPES", "SHAPE_ORDER", "TEXTURES", "Instance", "SceneSpec",
    "RenderedObject", "register_shape", "register_texture", "shape_mask", "texture_index", "sample_instances",
    "render_scene", "generate", "main", "SYNTH_FORMAT",
]
