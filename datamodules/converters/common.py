"""The part every benchmark converter shares: a :class:`Draft` the dataset parser fills, and its
:meth:`Draft.finalize` that measures images, drops bad ones, validates and clips boxes, and
produces the :class:`~instsearch.formats.Benchmark` plus the ``convert_report.json`` content.

A parser only reads annotation files. It registers images (id -> file under the dataset's image
folder), the database, queries, positives and junk, and every box with *where* it came from
(``file, line N``), so a bad box is reported by the entry that holds it. Everything that needs
the pixels (sizes, bad files, clipping) happens once, here, for all datasets alike.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from instsearch.datamodules.image_io import MAX_PIXELS, BadImageError, BadImageReport, image_size, load_rgb
from instsearch.formats import Benchmark, FormatError, GroundTruth, ImageEntry, Query

__all__ = ["Draft", "ConvertResult", "natural_key", "normalize_relative_path", "read_lines", "require_dir",
           "require_file", "parse_numbers", "measure_images"]

REPORT_NAME = "convert_report.json"


# ----------------------------------------------------------------------------- small helpers
def natural_key(text: str) -> tuple:
    """Sort key that orders '9.jpg' before '10.jpg' (numbers compared as numbers)."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text))


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[/\\]")


def normalize_relative_path(text: str, where: str) -> str:
    """One spelling for a relative image path read from a list file, whoever wrote the list.

    ``./data/x.jpg``, ``data\\x.jpg``, ``data//x.jpg`` and ``data/x.jpg  `` are all
    ``data/x.jpg``: surrounding whitespace, backslashes, repeated separators and ``.`` segments are
    dropped. Absolute paths (``/x``, ``C:\\x``, ``\\\\server\\x``) and ``..`` segments, which would
    leave the dataset folder, are a :class:`FormatError` naming ``where``.
    """
    stripped = text.strip()
    if stripped.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(stripped):
        raise FormatError(f"{where}: image path must be relative to the dataset folder, got {text!r}")
    parts = [p for p in stripped.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatError(f"{where}: image path must stay inside the dataset folder (no '..'), got {text!r}")
    if not parts:
        raise FormatError(f"{where}: empty image path")
    return "/".join(parts)


def require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: expected a folder at {path}\nexpected layout:\n{layout}")
    return path


def require_file(path: Path, what: str, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected a file at {path}\nexpected layout:\n{layout}")
    return path


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-empty lines of a text file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_text(encoding="latin-1")
    return [(n, s) for n, line in enumerate(text.splitlines(), start=1) if (s := line.strip())]


def parse_numbers(tokens: Sequence[str], where: str, expected: str) -> list[float]:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        raise FormatError(f"{where}: expected {expected}, got {' '.join(tokens)!r}") from None


def measure_images(paths: dict[str, Path], *, verify: bool = False, max_pixels: int = MAX_PIXELS,
                   workers: int = 8) -> tuple[dict[str, tuple[int, int]], BadImageReport]:
    """(width, height) of each image as displayed (EXIF-aware), and a report of the unusable ones.

    Header-only by default (:func:`image_size`); ``verify`` decodes every image fully with
    :func:`load_rgb`, which also catches truncated files whose header is intact. Reads run in a
    thread pool because on network file systems they are latency-bound, not CPU-bound.
    """

    def probe(path: Path) -> tuple[int, int] | BadImageError:
        # Missing / zero-byte / not an image / over max_pixels are decided by image_io, as for
        # every other loader, so a converted benchmark and its extraction agree on what is bad.
        try:
            if verify:
                return load_rgb(path, max_pixels=max_pixels).size
            return image_size(path, max_pixels=max_pixels)
        except BadImageError as e:
            return e

    ids = list(paths)
    sizes: dict[str, tuple[int, int]] = {}
    report = BadImageReport()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for image_id, result in zip(ids, pool.map(probe, (paths[i] for i in ids))):
            if isinstance(result, BadImageError):
                report.add(result, image_id)
            else:
                sizes[image_id] = (int(result[0]), int(result[1]))
    return sizes, report


# ----------------------------------------------------------------------------- draft
@dataclass
class ConvertResult:
    benchmark: Benchmark
    report: dict[str, Any]
    path: Path
    report_path: Path


@dataclass
class _QueryDraft:
    id: str
    image: str
    boxes: Optional[list[int]]  # indices into the box table; None = the whole image; several = union
    where: str


@dataclass
class Draft:
    """What a dataset parser produces: ids, lists and raw boxes, before any image is opened."""

    name: str
    dataset: str
    image_dir: Path  # the benchmark's image_root points here; image files are relative to it
    images: dict[str, str] = field(default_factory=dict)  # id -> file relative to image_dir (POSIX)
    missing: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (expected path, reason)
    database: list[str] = field(default_factory=list)
    queries: list[_QueryDraft] = field(default_factory=list)
    positives: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # qid -> image -> box ids
    junk: dict[str, set[str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)  # published sizes, for the report
    _box_values: list[Sequence[float]] = field(default_factory=list)
    _box_image: list[str] = field(default_factory=list)
    _box_where: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ registration
    def add_image(self, image_id: str, file: str, where: str = "") -> str:
        previous = self.images.get(image_id)
        if previous is not None and previous != file:
            raise FormatError(f"{where or self.dataset}: image id '{image_id}' names two files: '{previous}' and '{file}'")
        self.images[image_id] = file
        return image_id

    def add_missing(self, image_id: str, expected_path: Path, where: str) -> str:
        """An image an annotation lists but the folder lacks: reported and dropped like a bad image."""
        if image_id not in self.images:
            self.missing.setdefault(image_id, (str(expected_path), f"file not found (listed in {where})"))
        return image_id

    def known(self, image_id: str) -> bool:
        return image_id in self.images or image_id in self.missing

    def add_box(self, image_id: str, values: Sequence[float], where: str) -> int:
        """Register ``[x1, y1, x2, y2]`` of ``image_id``; validated and clipped in :meth:`finalize`."""
        if len(values) != 4:
            raise FormatError(f"{where}: a box needs 4 numbers [x1, y1, x2, y2], got {list(values)!r}")
        self._box_values.append(values)
        self._box_image.append(image_id)
        self._box_where.append(where)
        return len(self._box_values) - 1

    def add_query(self, qid: str, image_id: str, boxes: Optional[list[int]], where: str) -> None:
        if qid in self.positives:
            raise FormatError(f"{where}: duplicate query id '{qid}'")
        self.queries.append(_QueryDraft(qid, image_id, boxes, where))
        self.positives[qid] = {}
        self.junk[qid] = set()

    def add_positive(self, qid: str, image_id: str, boxes: Iterable[int] = ()) -> None:
        self.positives[qid].setdefault(image_id, []).extend(boxes)

    def add_junk(self, qid: str, image_id: str) -> None:
        self.junk[qid].add(image_id)

    # ------------------------------------------------------------ finalize
    def finalize(self, out: Path, *, verify: bool = False, max_pixels: int = MAX_PIXELS,
                 workers: int = 8) -> tuple[Benchmark, dict[str, Any]]:
        out = Path(os.path.abspath(out))
        boxes, box_image = self._validated_boxes()

        referenced = set(self.images)
        sizes, bad = measure_images({i: self.image_dir / f for i, f in self.images.items()},
                                    verify=verify, max_pixels=max_pixels, workers=workers)
        for image_id, (path, reason) in sorted(self.missing.items()):
            bad.add(BadImageError(path, reason), image_id)
        good = set(sizes)

        # Clip every box to its image at once; a box wholly outside its image is an error.
        clipped_report: list[dict[str, Any]] = []
        if len(boxes):
            usable = np.fromiter((i in good for i in box_image), dtype=bool, count=len(box_image))
            wh = np.array([sizes.get(i, (0, 0)) for i in box_image], dtype=np.float64).reshape(-1, 2)
            upper = np.concatenate([wh, wh], axis=1)
            clipped = np.clip(boxes, 0.0, upper)
            changed = usable & (clipped != boxes).any(axis=1)
            outside = usable & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
            if outside.any():
                k = int(np.flatnonzero(outside)[0])
                w, h = sizes[box_image[k]]
                raise FormatError(f"{self._box_where[k]}: box {boxes[k].tolist()} lies outside the {w}x{h} image "
                                  f"'{box_image[k]}'" + _and_more(int(outside.sum()) - 1))
            for k in np.flatnonzero(changed).tolist():
                clipped_report.append({"where": self._box_where[k], "image": box_image[k],
                                       "box": boxes[k].tolist(), "clipped": clipped[k].tolist()})
        else:
            clipped = boxes

        def box_tuple(k: int) -> tuple[float, float, float, float]:
            x1, y1, x2, y2 = clipped[k].tolist()
            return (x1, y1, x2, y2)

        images = {i: ImageEntry(i, self.images[i], *sizes[i]) for i in self.images if i in good}
        database = [i for i in dict.fromkeys(self.database) if i in good]
        in_database = set(database)
        queries: list[Query] = []
        ground_truth: dict[str, GroundTruth] = {}
        dropped: list[dict[str, str]] = []
        bad_reason = {e["image"]: e["reason"] for e in bad.entries}
        for q in self.queries:
            if q.image not in good:
                dropped.append({"query": q.id, "image": q.image,
                                "reason": f"query image unusable: {bad_reason.get(q.image, 'unknown image')}"})
                continue
            if q.boxes is None:
                w, h = sizes[q.image]
                box = (0.0, 0.0, float(w), float(h))
            else:
                sel = clipped[q.boxes]  # union of the query's boxes (INSTRE-M pairs)
                box = (float(sel[:, 0].min()), float(sel[:, 1].min()), float(sel[:, 2].max()), float(sel[:, 3].max()))
            junk = {i for i in self.junk[q.id] if i in good}
            positives = {i: [box_tuple(k) for k in ks] for i, ks in self.positives[q.id].items()
                         if i in good and i not in junk}
            stray = [i for i in positives if i not in in_database]
            if stray:
                raise FormatError(f"{q.where}: positives of query '{q.id}' not in the database: {stray[:5]}")
            queries.append(Query(q.id, q.image, box))
            ground_truth[q.id] = GroundTruth(positives, junk)

        out_dir = out.parent
        image_root = Path(os.path.relpath(os.path.abspath(self.image_dir), out_dir)).as_posix()
        benchmark = Benchmark(name=self.name, root=out_dir, image_root=image_root, images=images,
                              database=database, queries=queries, ground_truth=ground_truth,
                              extra={"dataset": self.dataset, **self.extra})

        n_pos = np.array([len(g.positives) for g in ground_truth.values()], dtype=np.float64)
        n_junk = np.array([len(g.junk) for g in ground_truth.values()], dtype=np.float64)
        report: dict[str, Any] = {
            "dataset": self.dataset,
            "benchmark": out.name,
            "source_root": str(self.image_dir),
            **{k: v for k, v in self.extra.items() if k in ("protocol", "setting")},
            "counts": {
                "images_listed": len(referenced) + len(self.missing),
                "images": len(images),
                "database": len(database),
                "queries": len(queries),
                "queries_dropped": len(dropped),
                "positives_total": int(n_pos.sum()),
                "positives_mean": float(n_pos.mean()) if len(n_pos) else 0.0,
                "junk_mean": float(n_junk.mean()) if len(n_junk) else 0.0,
                "queries_without_positives": int((n_pos == 0).sum()),
                "boxes": int(len(boxes)),
                "boxes_clipped": len(clipped_report),
                "bad_images": len(bad),
            },
            "expected": dict(self.expected),
            "bad_images": bad.entries,
            "dropped_queries": dropped,
            "queries_without_positives": [q for q, g in ground_truth.items() if not g.positives],
            "clipped_boxes": clipped_report,
        }
        return benchmark, report

    def _validated_boxes(self) -> tuple[np.ndarray, list[str]]:
        """All boxes as an (N, 4) array; refuses non-finite, empty or inverted ones by their entry."""
        if not self._box_values:
            return np.zeros((0, 4), dtype=np.float64), []
        boxes = np.asarray(self._box_values, dtype=np.float64).reshape(-1, 4)
        invalid = ~np.isfinite(boxes).all(axis=1)
        invalid |= (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if invalid.any():
            k = int(np.flatnonzero(invalid)[0])
            raise FormatError(f"{self._box_where[k]}: empty or inverted box [x1, y1, x2, y2] = {boxes[k].tolist()} "
                              f"(need x2 > x1 and y2 > y1)" + _and_more(int(invalid.sum()) - 1))
        return boxes, self._box_image


def _and_more(n: int) -> str:
    return f" ({n} more such boxes)" if n > 0 else ""
