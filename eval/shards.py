"""Region shards: a benchmark's extracted regions on disk, in parts, for collections past one
machine's memory.

Layout of a shards folder (the style embedding tools use: numpy rows + parquet metadata)::

    manifest.json              what was extracted: format, model, config and checkpoint hashes,
                               benchmark, dims, part size, dtype, counts once complete
    emb/part-NNNNN.npy         (M_p, D) region features of part p, float16 (default) or float32
    meta/part-NNNNN.parquet    one row per region: image_id, slot (position in its image),
                               x1 y1 x2 y2 (original pixels), score, label (when predicted)
    queries/part-NNNNN.npy     (Q_p, D) float32 features of the query boxes served in part p
    queries/part-NNNNN.parquet query_id, image_id, label
    parts/part-NNNNN.json      the part's images in order with their region counts (an image
                               with no region included), undecodable items; written last

A part is a fixed range of the benchmark's items (part ``p`` = items ``[p·P, (p+1)·P)``, database
images then queries, as :class:`~instsearch.datamodules.benchmark.BenchmarkImages` serves them),
so an image is never split across parts and a part's content does not depend on the number of
processes. Every file of a part is written under a temporary name and renamed when complete, the
part's JSON last: a part is complete exactly when ``parts/part-NNNNN.json`` exists, and a rerun
skips complete parts. Region ``r`` of the shards is row ``r`` of the parts' ``emb`` files read
in part order: that is its id in an index built from them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

SHARDS_FORMAT = "instsearch-region-shards/1"
FEATURE_DTYPES = ("float16", "float32")


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file, read in chunks (checkpoints are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_sha256(config: Any) -> str:
    """A stable hash of a JSON-serialisable configuration (keys sorted)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _save_npy(array: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as f:  # np.save on a name would append ".npy" to the temporary name
            np.save(f, array)
    return write


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class ShardImage:
    """One database image of a part: its regions' rows, all in original-image pixels."""

    image_id: str
    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    features: np.ndarray  # (n, D) float32
    labels: Optional[np.ndarray] = None  # (n,) int64


@dataclass
class ShardQuery:
    query_id: str
    image_id: str
    feature: np.ndarray  # (D,) float32
    label: Optional[int] = None


class ShardWriter:
    """Writes complete parts into a shards folder (any number of processes, one part each).

    ``manifest`` holds the extraction's identity (model, config and checkpoint hashes, benchmark,
    part size); a folder already holding another extraction's manifest is refused, so parts of
    two models never mix.
    """

    IDENTITY = ("model", "config_sha256", "checkpoint_sha256", "benchmark_sha256", "part_size", "dtype")

    def __init__(self, root: str | Path, manifest: dict[str, Any], dtype: str = "float16"):
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
        self.root = Path(root)
        self.dtype = dtype
        self.manifest = {"format": SHARDS_FORMAT, **manifest, "dtype": dtype}
        path = self.root / "manifest.json"
        if path.is_file():
            existing = json.loads(path.read_text())
            differ = [k for k in self.IDENTITY if existing.get(k) != self.manifest.get(k)]
            if differ:
                detail = ", ".join(f"{k}: {existing.get(k)!r} there, {self.manifest.get(k)!r} asked" for k in differ)
                raise ValueError(f"{self.root} holds another extraction ({detail}): choose a new output folder "
                                 f"or delete it")

    def write_manifest(self, **extra: Any) -> None:
        """(Re)write ``manifest.json`` (the identity plus ``extra``, e.g. final counts)."""
        self.manifest.update(extra)
        text = json.dumps(self.manifest, indent=1) + "\n"
        _atomic_write(self.root / "manifest.json", lambda p: p.write_text(text))

    def is_complete(self, part: int) -> bool:
        return (self.root / "parts" / f"{part_name(part)}.json").is_file()

    def complete_parts(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in (self.root / "parts").glob("part-*.json")}

    def write_part(self, part: int, images: Sequence[ShardImage], queries: Sequence[ShardQuery] = (),
                   bad: Sequence[dict] = ()) -> None:
        """Write part ``part``: its database images (in order), the query features served in it,
        its undecodable items. Nothing of the part is visible as complete until all is written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = part_name(part)
        dims = {int(im.features.shape[1]) for im in images if len(im.boxes)} | {int(q.feature.shape[0]) for q in queries}
        if len(dims) > 1:
            raise ValueError(f"part {part}: features of different sizes {sorted(dims)}")
        dim = dims.pop() if dims else int(self.manifest.get("dim") or 0)
        counts = [int(len(im.boxes)) for im in images]
        with_regions = [im for im in images if len(im.boxes)]
        features = (np.concatenate([im.features for im in with_regions]) if with_regions
                    else np.zeros((0, dim), np.float32)).astype(self.dtype)
        boxes = np.concatenate([im.boxes for im in with_regions]).astype(np.float32) if with_regions else np.zeros((0, 4), np.float32)
        has_labels = bool(with_regions) and all(im.labels is not None for im in with_regions)
        columns = {
            "image_id": pa.array(np.repeat(np.array([im.image_id for im in images], dtype=object), counts), pa.string()),
            "slot": pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in counts]) if images else
                             np.zeros(0, np.int32)),
            **{c: pa.array(boxes[:, i]) for i, c in enumerate(("x1", "y1", "x2", "y2"))},
            "score": pa.array(np.concatenate([im.scores for im in with_regions]).astype(np.float32) if with_regions
                              else np.zeros(0, np.float32)),
        }
        if has_labels:
            columns["label"] = pa.array(np.concatenate([im.labels for im in with_regions]).astype(np.int64))
        _atomic_write(self.root / "emb" / f"{name}.npy", _save_npy(features))
        _atomic_write(self.root / "meta" / f"{name}.parquet", lambda p: pq.write_table(pa.table(columns), p))
        qfeatures = (np.stack([q.feature for q in queries]).astype(np.float32) if queries
                     else np.zeros((0, dim), np.float32))
        qcolumns = {"query_id": pa.array([q.query_id for q in queries], pa.string()),
                    "image_id": pa.array([q.image_id for q in queries], pa.string()),
                    "label": pa.array([q.label for q in queries], pa.int64())}
        _atomic_write(self.root / "queries" / f"{name}.npy", _save_npy(qfeatures))
        _atomic_write(self.root / "queries" / f"{name}.parquet", lambda p: pq.write_table(pa.table(qcolumns), p))
        record = {"part": part, "dim": dim, "regions": int(sum(counts)), "queries": len(queries),
                  "images": [im.image_id for im in images], "region_counts": counts, "labels": has_labels,
                  "bad": list(bad)}
        text = json.dumps(record) + "\n"
        _atomic_write(self.root / "parts" / f"{name}.json", lambda p: p.write_text(text))


class RegionShards:
    """Read access to a shards folder: counts and offsets in memory (a few bytes per image), the
    rows themselves memory-mapped part by part.

    ``parts`` are the complete parts in order; region ``r`` is row ``r - offsets[p]`` of part ``p``.
    """

    def __init__(self, root: str | Path, require_complete: bool = True):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"not a region shards folder: {path} is missing (expected the output of "
                                    f"'instsearch extract')")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != SHARDS_FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {SHARDS_FORMAT!r}")
        self.records = [json.loads(p.read_text()) for p in sorted((self.root / "parts").glob("part-*.json"))]
        self.parts = [int(r["part"]) for r in self.records]
        planned = self.manifest.get("num_parts")
        if require_complete and planned is not None and len(self.parts) != planned:
            missing = sorted(set(range(planned)) - set(self.parts))
            raise ValueError(f"{self.root}: {len(missing)} of {planned} parts are not complete (first: "
                             f"{part_name(missing[0])}); rerun 'instsearch extract' with the same --out to finish")
        dims = {int(r["dim"]) for r in self.records if r["regions"] or r["queries"]}
        if len(dims) > 1:
            raise ValueError(f"{self.root}: parts have features of different sizes {sorted(dims)}")
        self.dim = dims.pop() if dims else int(self.manifest.get("dim") or 0)
        sizes = np.array([r["regions"] for r in self.records], dtype=np.int64)
        #: first region id of each part (and the total at the end)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    # -- counts ---------------------------------------------------------------------------------
    @property
    def num_regions(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_regions

    @cached_property
    def image_ids(self) -> list[str]:
        """Every database image, in part order (including images without a region)."""
        return [i for r in self.records for i in r["images"]]

    @cached_property
    def image_starts(self) -> np.ndarray:
        """``(num_images + 1,)`` first region id of each image (its regions are contiguous)."""
        counts = np.fromiter((c for r in self.records for c in r["region_counts"]), dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @property
    def bad_images(self) -> list[dict]:
        return [b for r in self.records for b in r["bad"]]

    @property
    def has_labels(self) -> bool:
        return bool(self.records) and all(r["labels"] for r in self.records if r["regions"])

    # -- rows -----------------------------------------------------------------------------------
    def _file(self, folder: str, part: int, suffix: str) -> Path:
        return self.root / folder / f"{part_name(part)}{suffix}"

    def features(self, part: int) -> np.ndarray:
        """Part ``part``'s ``(M_p, D)`` region features, memory-mapped (stored dtype). The map is
        opened once and kept: rescoring reads a few rows of many parts per batch of queries."""
        maps = self.__dict__.setdefault("_maps", {})
        if part not in maps:
            maps[part] = np.load(self._file("emb", part, ".npy"), mmap_mode="r")
        return maps[part]

    def meta(self, part: int, columns: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
        """Part ``part``'s region metadata as numpy columns (only ``columns`` when given)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self._file("meta", part, ".parquet"), columns=list(columns) if columns else None)
        return {name: table.column(name).to_numpy() for name in table.column_names}

    def boxes(self, part: int) -> np.ndarray:
        m = self.meta(part, ["x1", "y1", "x2", "y2"])
        return np.stack([m["x1"], m["y1"], m["x2"], m["y2"]], axis=1).astype(np.float32)

    def iter_features(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first region id, features)`` of every part in order, each map opened afresh and
        dropped by the caller (a pass over every part keeps no more than one part mapped)."""
        for i, part in enumerate(self.parts):
            yield int(self.offsets[i]), np.load(self._file("emb", part, ".npy"), mmap_mode="r")

    def _by_part(self, ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(part position, positions in ids)`` for each part the region ``ids`` fall in, one
        group per part (ids sorted by part first: one pass, not one scan of ``ids`` per part)."""
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        order = np.argsort(which, kind="stable")
        parts, starts = np.unique(which[order], return_index=True)
        for i, a, b in zip(parts.tolist(), starts.tolist(), [*starts[1:].tolist(), len(ids)]):
            yield i, order[a:b]

    def rows(self, ids: np.ndarray, keep_maps: bool = True) -> np.ndarray:
        """Features (float32) of the regions ``ids`` (any order), read part by part from the maps
        (kept open for the next call, or with ``keep_maps=False`` opened and dropped here: a
        sample over every part then leaves no part's pages mapped)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        for i, sel in self._by_part(ids):  # one gather per part
            part = self.parts[i]
            rows = self.features(part) if keep_maps else np.load(self._file("emb", part, ".npy"), mmap_mode="r")
            out[sel] = rows[ids[sel] - self.offsets[i]]
        return out

    def region_boxes(self, ids: np.ndarray) -> np.ndarray:
        """``(n, 4)`` boxes (original pixels, float32) of the regions ``ids`` (any order), read
        from the parts' metadata."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), 4), np.float32)
        for i, sel in self._by_part(ids):
            out[sel] = self.boxes(self.parts[i])[ids[sel] - self.offsets[i]]
        return out

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``min(n, num_regions)`` region features (float32) drawn uniformly without replacement
        from all parts (an index's training set)."""
        n = min(int(n), self.num_regions)
        ids = np.sort(np.random.default_rng(seed).choice(self.num_regions, size=n, replace=False))
        return self.rows(ids, keep_maps=False)

    def queries(self) -> tuple[list[str], np.ndarray, list[Optional[int]]]:
        """Every query feature stored: ``(query ids, (Q, D) float32, labels)``."""
        import pyarrow.parquet as pq

        ids, feats, labels = [], [], []
        for part in self.parts:
            table = pq.read_table(self._file("queries", part, ".parquet"))
            ids += table.column("query_id").to_pylist()
            labels += table.column("label").to_pylist()
            feats.append(np.load(self._file("queries", part, ".npy")))
        features = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, self.dim), np.float32)
        return ids, features, labels
