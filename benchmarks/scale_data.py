"""Planted region collections for measuring search at 1 M - 10 M regions without images, and the
exact references that recall is measured against.

:func:`write_simulation` writes region shards through :class:`~instsearch.eval.shards.ShardWriter`
(the writer ``instsearch extract`` uses, so the files are the extractor's format) and a matching
``benchmark.json`` inside the shards folder; index building, two-stage search and the metrics then
run on them as on extracted ones. ``benchmarks/scale_simulation.py`` is its command line.

The planted set
---------------
* **Images.** ``round(regions / regions_per_image)`` database images. Each is empty with
  probability ``empty_fraction`` (as images where a detector finds nothing); the others hold
  ``1 + Multinomial(regions - non_empty, uniform)`` regions -- about ``1 + Poisson(R - 1)``, so
  counts vary around ``R`` and sum to exactly ``regions``. Each image has one of a few common
  sizes (``IMAGE_SIZES``); boxes are whole-pixel boxes inside it (so a box survives float32,
  parquet and the benchmark's two-decimal JSON unchanged); scores are uniform, descending within
  an image as a detector's slots are.
* **Features.** Unit vectors of a Gaussian mixture, so inverted lists and codebooks meet clusters
  as on real descriptors rather than uniform points on the sphere: ``clusters`` centres with a
  per-dimension scale (the ``spectrum``), normalised; centre ``c`` is drawn with weight
  ``∝ (c + 1)^-1/2`` (uneven list sizes); a region is its centre plus noise of the same profile
  with norm about ``spread``, normalised. ``spectrum="power"`` (default) gives dimension ``i`` the
  standard deviation ``(i + 1)^-1/2``: variances decaying as ``1/i``, as the PCA spectra of CNN
  descriptors do (their leading components carry most of the variance), for an effective
  dimension (participation ratio ``(sum v)^2 / sum v^2``) of 18 at 128-D. ``spectrum="linear"`` (scale from 1
  to 0.1, effective dimension 79 at 128-D) is close to noise on the sphere, where no inverted file
  prunes well: kept to show that regime.
* **Instances.** Each query has an instance vector, drawn as a region is. It is planted in
  ``positives`` database images (distinct images, each hosting at most one instance), in a random
  slot: that region becomes ``instance + noise`` (norm uniform in ``positive_noise``, so some
  positives are easy and some hard), normalised, and its box is the ground-truth box. The query's
  feature is ``instance + noise`` of norm ``query_noise``, normalised; its image is a query image
  outside the database with a random box. Every other region is a distractor. ``junk`` random
  other database images per query are listed as junk (none by default).

Determinism and memory
----------------------
Everything held per image -- region counts, sizes, the planted table -- is drawn first (about 16
bytes an image). Regions are then generated in fixed blocks of ``BLOCK_IMAGES`` images, each from
its own generator seeded by ``(seed, block)``: a block's regions depend on neither the part size
nor the order parts are written, so any ``--part-size`` gives bitwise the same features
concatenated, and the same seed the same files. Memory holds one part and at most the blocks it
overlaps, never the database.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from instsearch.eval.shards import RegionShards, ShardImage, ShardQuery, ShardWriter, config_sha256, file_sha256
from instsearch.formats import BENCHMARK_FORMAT

#: images per generator block: the unit of generation, independent of the part size
BLOCK_IMAGES = 1024
#: bumped whenever the drawing changes, so a changed generator is another "extraction"
GENERATOR_VERSION = 2
#: per-dimension profiles of the features
SPECTRA = ("power", "linear")
#: how images holding no planted instance (and no junk) appear in benchmark.json
BACKGROUNDS = ("listed", "distractors")
#: the id prefix of unlisted background images (the benchmark's distractor entry)
DISTRACTOR_PREFIX = "distractor:"
#: (width, height) of database and query images
IMAGE_SIZES = np.array([(640, 480), (480, 640), (1024, 768), (768, 1024), (800, 600), (500, 375), (375, 500),
                        (1024, 683)], np.int32)
# spawn keys of the independent random streams
_COUNTS, _CENTRES, _PLANT, _BLOCK = 0, 1, 2, 3


@dataclass(frozen=True)
class SimulationConfig:
    """Every argument that decides the planted collection (hashed into the manifest's identity)."""

    regions: int
    dim: int
    regions_per_image: float = 20.0
    queries: int = 100
    positives: tuple[int, int] = (5, 5)  # per query, uniform in [lo, hi]
    seed: int = 0
    clusters: int = 1024
    spread: float = 1.5
    spectrum: str = "power"  # "power" or "linear": the per-dimension profile (module docstring)
    background: str = "listed"  # "listed" or "distractors": how images without an instance are given
    positive_noise: tuple[float, float] = (0.3, 1.5)
    query_noise: float = 0.3
    empty_fraction: float = 0.02
    junk: int = 0

    def __post_init__(self) -> None:
        if self.regions < 1 or self.dim < 1 or self.regions_per_image < 1:
            raise ValueError("regions, dim and regions_per_image must be >= 1")
        if self.queries < 0 or self.junk < 0 or not 1 <= self.positives[0] <= self.positives[1]:
            raise ValueError("queries and junk must be >= 0 and positives 1 <= lo <= hi")
        if not 0 <= self.empty_fraction < 1:
            raise ValueError("empty_fraction must lie in [0, 1)")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA}, got {self.spectrum!r}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "positives": list(self.positives), "positive_noise": list(self.positive_noise),
                "block_images": BLOCK_IMAGES, "generator_version": GENERATOR_VERSION}


@dataclass
class Plan:
    """What is held in memory for the whole collection: per-image counts and sizes, the mixture,
    the planted instances (sorted by image) and the queries."""

    config: SimulationConfig
    counts: np.ndarray  # (I,) int32 regions per database image
    starts: np.ndarray  # (I + 1,) int64 first region id of each image
    sizes: np.ndarray  # (I, 2) int32 width, height
    profile: np.ndarray  # (D,) float32 per-dimension noise scale, unit norm
    centres: np.ndarray  # (C, D) float32
    cdf: np.ndarray  # (C,) cumulative centre weights
    planted_image: np.ndarray  # (P,) int64, ascending
    planted_slot: np.ndarray  # (P,) int64
    planted_query: np.ndarray  # (P,) int64
    planted_feature: np.ndarray  # (P, D) float32
    planted_box: np.ndarray  # (P, 4) float32
    query_feature: np.ndarray  # (Q, D) float32
    query_size: np.ndarray  # (Q, 2) int32
    query_box: np.ndarray  # (Q, 4) float32
    junk: list[np.ndarray]  # per query, database image positions

    @property
    def num_images(self) -> int:
        return len(self.counts)

    @property
    def listed(self) -> np.ndarray:
        """``(I,)`` bool: the images benchmark.json lists (all, or with ``background="distractors"``
        those holding a planted instance or listed as junk)."""
        if self.config.background == "listed":
            return np.ones(self.num_images, bool)
        listed = np.zeros(self.num_images, bool)
        listed[self.planted_image] = True
        for j in self.junk:
            listed[j] = True
        return listed

    def image_name(self, i: int, listed: Optional[np.ndarray] = None) -> str:
        """Image ``i``'s id: ``sim…``, or ``distractor:sim…`` for an unlisted background image."""
        listed = self.listed if listed is None else listed
        return image_id(i) if listed[i] else DISTRACTOR_PREFIX + image_id(i)


def image_id(i: int) -> str:
    return f"sim{i:08d}"


def query_id(j: int) -> str:
    return f"q{j:06d}"


def query_image_id(j: int) -> str:
    return f"query{j:06d}"


# ------------------------------------------------------------------------------------ drawing
def _stream(seed: int, *key: int) -> np.random.Generator:
    """An independent generator per purpose (and per block), so no draw depends on another's order."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _noise(rng: np.random.Generator, n: int, profile: np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """``(n, D)`` Gaussian noise of the decaying profile, expected norm ``scale`` (a row's own
    scale when ``scale`` is ``(n, 1)``)."""
    x = rng.standard_normal((n, len(profile)), dtype=np.float32)
    x *= profile
    x *= np.asarray(scale, np.float32)
    return x


def _clusters(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n)), len(cdf) - 1)


def random_boxes(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    """``(n, 4)`` whole-pixel boxes inside images of ``sizes`` ``(n, 2)``: 10-60 % of each side."""
    u = rng.random((len(sizes), 4))
    w, h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    bw, bh = np.floor(w * (0.1 + 0.5 * u[:, 0])), np.floor(h * (0.1 + 0.5 * u[:, 1]))
    x1, y1 = np.floor((w - bw) * u[:, 2]), np.floor((h - bh) * u[:, 3])
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)


def _draw_counts(config: SimulationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Regions per image summing to exactly ``config.regions``, and each image's size."""
    rng = _stream(config.seed, _COUNTS)
    num_images = max(1, round(config.regions / config.regions_per_image))
    empty = rng.random(num_images) < config.empty_fraction
    if empty.all():
        empty[0] = False  # some image must hold the regions
    filled = np.flatnonzero(~empty)
    if config.regions < len(filled):
        raise ValueError(f"{config.regions} regions cannot fill {len(filled)} images: raise regions_per_image")
    counts = np.zeros(num_images, np.int32)
    counts[filled] = 1 + rng.multinomial(config.regions - len(filled), np.full(len(filled), 1.0 / len(filled)))
    sizes = IMAGE_SIZES[rng.integers(0, len(IMAGE_SIZES), num_images)]
    return counts, sizes


def spectrum_profile(spectrum: str, dim: int) -> np.ndarray:
    """``(dim,)`` unit-norm per-dimension standard deviations of the mixture (module docstring)."""
    if spectrum == "power":
        profile = (np.arange(dim, dtype=np.float64) + 1.0) ** -0.5
    elif spectrum == "linear":
        profile = np.linspace(1.0, 0.1, dim, dtype=np.float64)
    else:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    return (profile / np.linalg.norm(profile)).astype(np.float32)


def _draw_mixture(config: SimulationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = _stream(config.seed, _CENTRES)
    profile = spectrum_profile(config.spectrum, config.dim)
    centres = _normalise(_noise(rng, config.clusters, profile, 1.0))
    weights = (np.arange(config.clusters) + 1.0) ** -0.5
    return profile, centres, np.cumsum(weights / weights.sum())


def draw_plan(config: SimulationConfig) -> Plan:
    """Everything but the distractor regions: counts, sizes, mixture, instances, queries."""
    counts, sizes = _draw_counts(config)
    profile, centres, cdf = _draw_mixture(config)
    rng = _stream(config.seed, _PLANT)
    q = config.queries
    per_query = rng.integers(config.positives[0], config.positives[1] + 1, q)
    filled = np.flatnonzero(counts)
    if per_query.sum() > len(filled):
        raise ValueError(f"{int(per_query.sum())} positives need as many images with regions; there are "
                         f"{len(filled)}: raise regions or lower queries / positives")
    images = rng.choice(filled, int(per_query.sum()), replace=False).astype(np.int64)
    owner = np.repeat(np.arange(q), per_query)
    slots = np.floor(rng.random(len(images)) * counts[images]).astype(np.int64)
    instance = _normalise(centres[_clusters(rng, cdf, q)] + _noise(rng, q, profile, config.spread))
    sigma = rng.uniform(*config.positive_noise, len(images))[:, None]
    planted = _normalise(instance[owner] + _noise(rng, len(images), profile, sigma))
    planted_box = random_boxes(rng, sizes[images])
    query_feature = _normalise(instance + _noise(rng, q, profile, config.query_noise))
    query_size = IMAGE_SIZES[rng.integers(0, len(IMAGE_SIZES), q)]
    query_box = random_boxes(rng, query_size)
    junk = [_draw_junk(rng, len(counts), images[owner == j], config.junk) for j in range(q)] if config.junk else \
        [np.zeros(0, np.int64)] * q
    order = np.argsort(images, kind="stable")
    return Plan(config, counts, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]), sizes, profile, centres,
                cdf, images[order], slots[order], owner[order], planted[order], planted_box[order], query_feature,
                query_size, query_box, junk)


def _draw_junk(rng: np.random.Generator, num_images: int, positives: np.ndarray, n: int) -> np.ndarray:
    """``n`` distinct database images other than ``positives`` (fewer when there are not enough)."""
    pool = rng.choice(num_images, min(num_images, n + len(positives)), replace=False)
    return np.sort(pool[~np.isin(pool, positives)][:n]).astype(np.int64)


# ---------------------------------------------------------------------------------- regions
@dataclass
class Block:
    """The regions of images ``[first_image, first_image + len(counts))``."""

    first_image: int
    first_region: int
    features: np.ndarray  # (n, D) float32
    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32


def generate_block(plan: Plan, block: int) -> Block:
    """Block ``block``'s regions from its own generator, the planted regions put in place."""
    config = plan.config
    i0, i1 = block * BLOCK_IMAGES, min((block + 1) * BLOCK_IMAGES, plan.num_images)
    r0, r1 = int(plan.starts[i0]), int(plan.starts[i1])
    n = r1 - r0
    rng = _stream(config.seed, _BLOCK, block)
    image_of = np.repeat(np.arange(i0, i1), plan.counts[i0:i1])
    features = _noise(rng, n, plan.profile, config.spread)
    features += plan.centres[_clusters(rng, plan.cdf, n)]
    _normalise(features)
    boxes = random_boxes(rng, plan.sizes[image_of])
    scores = rng.random(n, dtype=np.float32)
    scores = scores[np.lexsort((-scores, image_of))]  # descending within each image
    a, b = np.searchsorted(plan.planted_image, [i0, i1])
    rows = plan.starts[plan.planted_image[a:b]] + plan.planted_slot[a:b] - r0
    features[rows] = plan.planted_feature[a:b]
    boxes[rows] = plan.planted_box[a:b]
    return Block(i0, r0, features, boxes, scores)


class BlockSource:
    """Regions of any image range, generated block by block; the last block is kept, since
    consecutive parts usually share one."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._last: Optional[tuple[int, Block]] = None

    def _block(self, b: int) -> Block:
        if self._last is None or self._last[0] != b:
            self._last = (b, generate_block(self.plan, b))
        return self._last[1]

    def regions(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features, boxes, scores of images ``[i0, i1)`` (rows ``starts[i0]`` to ``starts[i1]``)."""
        r0, r1 = int(self.plan.starts[i0]), int(self.plan.starts[i1])
        pieces = []
        for b in range(i0 // BLOCK_IMAGES, (max(i1, i0 + 1) - 1) // BLOCK_IMAGES + 1):
            block = self._block(b)
            lo = max(r0, block.first_region) - block.first_region
            hi = min(r1, block.first_region + len(block.scores)) - block.first_region
            pieces.append((block.features[lo:hi], block.boxes[lo:hi], block.scores[lo:hi]))
        if len(pieces) == 1:
            return pieces[0]
        return tuple(np.concatenate([p[k] for p in pieces]) for k in range(3))  # type: ignore[return-value]


def part_images(plan: Plan, source: BlockSource, i0: int, i1: int) -> list[ShardImage]:
    """Database images ``[i0, i1)`` as the writer takes them (views into one array)."""
    features, boxes, scores = source.regions(i0, i1)
    local = plan.starts[i0:i1 + 1] - plan.starts[i0]
    listed = plan.listed
    return [ShardImage(plan.image_name(i, listed), boxes[a:b], scores[a:b], features[a:b])
            for i, a, b in zip(range(i0, i1), local[:-1].tolist(), local[1:].tolist())]


def part_queries(plan: Plan, j0: int, j1: int) -> list[ShardQuery]:
    return [ShardQuery(query_id(j), query_image_id(j), plan.query_feature[j]) for j in range(j0, j1)]


# -------------------------------------------------------------------------------- benchmark
def _box(b: np.ndarray) -> str:
    return json.dumps([float(v) for v in b])


def benchmark_lines(plan: Plan, name: str) -> Iterator[str]:
    """``benchmark.json`` (instsearch-benchmark/1) as text pieces, streamed: a 10 M-region
    collection has half a million image entries."""
    listed = np.flatnonzero(plan.listed)
    unlisted = plan.num_images - len(listed)
    n = len(listed)
    yield "{\n" + f' "format": "{BENCHMARK_FORMAT}",\n "name": {json.dumps(name)},\n "image_root": ".",\n'
    yield f' "simulation": {json.dumps(plan.config.as_dict(), sort_keys=True)},\n "images": [\n'
    sizes = plan.sizes[listed].tolist()
    for s in range(0, n, 65536):
        yield ",\n".join(f'  {{"id": "{image_id(i)}", "file": "sim/{image_id(i)}.jpg", "width": {w}, "height": {h}}}'
                         for i, (w, h) in zip(listed[s:s + 65536].tolist(), sizes[s:s + 65536]))
        yield ",\n" if s + 65536 < n or plan.config.queries else "\n"
    q = plan.config.queries
    yield ",\n".join(f'  {{"id": "{query_image_id(j)}", "file": "queries/{query_image_id(j)}.jpg", '
                     f'"width": {w}, "height": {h}}}' for j, (w, h) in enumerate(plan.query_size.tolist()))
    yield "\n ],\n \"database\": [\n"
    for s in range(0, n, 65536):
        yield ",\n".join(f'  "{image_id(i)}"' for i in listed[s:s + 65536].tolist())
        yield ",\n" if s + 65536 < n else "\n"
    yield " ],\n \"queries\": [\n"
    yield ",\n".join(f'  {{"id": "{query_id(j)}", "image": "{query_image_id(j)}", "box": {_box(plan.query_box[j])}}}'
                     for j in range(q))
    yield "\n ],\n \"ground_truth\": {\n"
    by_query = np.argsort(plan.planted_query, kind="stable")
    edges = np.searchsorted(plan.planted_query[by_query], np.arange(q + 1))
    entries = []
    for j in range(q):
        rows = by_query[edges[j]:edges[j + 1]]
        positives = ", ".join(f'{{"image": "{image_id(int(plan.planted_image[r]))}", "boxes": '
                              f'[{_box(plan.planted_box[r])}]}}' for r in rows)
        junk = ", ".join(f'"{image_id(int(i))}"' for i in plan.junk[j])
        entries.append(f'  "{query_id(j)}": {{"positives": [{positives}], "junk": [{junk}]}}')
    yield ",\n".join(entries)
    yield "\n }"
    if unlisted:  # the rest of the database by reference, as a distractor collection is given
        yield (f',\n "distractors": [{{"root": "distractors", "id_prefix": "{DISTRACTOR_PREFIX}", '
               f'"count": {unlisted}}}]')
    yield "\n}\n"


# ---------------------------------------------------------------------------------- writing
def folder_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())


def write_simulation(config: SimulationConfig, out: str | Path, dtype: str = "float16", part_size: int = 1000,
                     progress: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Write the planted collection into ``out`` (shards + ``benchmark.json``); returns the final
    manifest. Parts already complete (a rerun of the same arguments) are skipped; a folder holding
    another collection is refused before anything in it is touched."""
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = draw_plan(config)
    say(f"plan: {plan.num_images:,} images, {config.regions:,} regions, {config.queries} queries, "
        f"{len(plan.planted_image)} planted ({time.perf_counter() - t0:.1f} s)")
    bench_path = out / "benchmark.json"
    tmp = out / f".benchmark.json.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.writelines(benchmark_lines(plan, f"simulated-{config.regions}x{config.dim}-seed{config.seed}"))
        num_items = plan.num_images + config.queries
        num_parts = -(-num_items // part_size)
        manifest = {"model": "simulated", "simulation": config.as_dict(),
                    "config_sha256": config_sha256(config.as_dict()), "checkpoint": None, "checkpoint_sha256": None,
                    "benchmark": str(bench_path.resolve()), "benchmark_sha256": file_sha256(tmp),
                    "part_size": int(part_size), "num_items": num_items, "num_parts": num_parts, "dim": config.dim,
                    "distractors": []}
        writer = ShardWriter(out, manifest, dtype=dtype)  # refuses another collection's folder
        os.replace(tmp, bench_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if not (out / "manifest.json").is_file():
        writer.write_manifest()
    _write_parts(plan, writer, num_parts, part_size, say, t0)
    shards = RegionShards(out)
    writer.write_manifest(complete=True, dim=shards.dim, images=len(shards.image_ids), regions=shards.num_regions,
                          queries=sum(r["queries"] for r in shards.records), bad_items=0)
    say(f"done: {shards.num_regions:,} regions in {num_parts} parts, {folder_bytes(out) / 2**20:,.1f} MiB, "
        f"{time.perf_counter() - t0:.1f} s")
    return writer.manifest


def _write_parts(plan: Plan, writer: ShardWriter, num_parts: int, part_size: int, say: Callable[[str], None],
                 t0: float) -> None:
    """Part ``p`` = items ``[p·P, (p+1)·P)`` of database images then queries, as extraction numbers them."""
    n, source, done = plan.num_images, BlockSource(plan), writer.complete_parts()
    step = max(1, num_parts // 20)
    for p in range(num_parts):
        if p in done:
            continue
        a, b = p * part_size, (p + 1) * part_size
        images = part_images(plan, source, min(a, n), min(b, n)) if a < n else []
        queries = part_queries(plan, max(a - n, 0), min(b - n, plan.config.queries)) if b > n else []
        writer.write_part(p, images, queries)
        if (p + 1) % step == 0 or p + 1 == num_parts:
            regions = int(plan.starts[min(b, n)])
            elapsed = time.perf_counter() - t0
            say(f"part {p + 1}/{num_parts}: {regions:,} regions, {elapsed:.1f} s, {regions / elapsed:,.0f} regions/s")


# ------------------------------------------------------------------------ exact references
def feature_blocks(shards: RegionShards, rows: int = 1 << 16) -> Iterator[np.ndarray]:
    """Every region feature as float32 blocks of at most ``rows`` rows, in region-id order."""
    for _, features in shards.iter_features():
        for s in range(0, len(features), rows):
            yield np.ascontiguousarray(features[s:s + rows], dtype=np.float32)


def exact_ground_truth(shards: RegionShards, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` regions per query by inner product, streamed over the parts (faiss's
    ``knn_ground_truth``): ``(scores, region ids)``, each ``(Q, min(k, regions))``, best first.
    The reference an ANN index's region recall is measured against."""
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth

    k = min(int(k), shards.num_regions)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return knn_ground_truth(queries, feature_blocks(shards), k, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
