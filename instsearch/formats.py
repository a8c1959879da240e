"""The on-disk formats other tools read and write: ``benchmark.json`` and ``run.json``.

Both are documented in docs/formats.md. Loading validates everything a later step relies
on and raises :class:`FormatError` naming the file and the offending entry, so a bad file fails
at the door rather than deep inside a search.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

BENCHMARK_FORMAT = "instsearch-benchmark/1"
RUN_FORMAT = "instsearch-run/1"

Box = tuple[float, float, float, float]


class FormatError(ValueError):
    """A file does not follow its documented format; the message names the file and entry."""


def parse_box(value: Any, where: str, *, size: tuple[int, int] | None = None, clip: bool = True) -> Box:
    """Validate ``[x1, y1, x2, y2]``; clip it to ``size = (width, height)`` when given.

    Empty or inverted boxes are refused: they would silently score zero IoU everywhere.
    """
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise FormatError(f"{where}: box must be [x1, y1, x2, y2], got {value!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError):
        raise FormatError(f"{where}: box coordinates must be numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise FormatError(f"{where}: box has a non-finite coordinate: {value!r}")
    if x2 <= x1 or y2 <= y1:
        raise FormatError(f"{where}: empty or inverted box {value!r} (need x2 > x1 and y2 > y1)")
    if size is not None and clip:
        w, h = size
        x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
        y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
        if x2 <= x1 or y2 <= y1:
            raise FormatError(f"{where}: box {value!r} lies outside the {w}x{h} image")
    return (x1, y1, x2, y2)


@dataclass(frozen=True, slots=True)  # a benchmark may list a million images
class ImageEntry:
    id: str
    file: str  # relative to the benchmark's image_root
    width: int
    height: int


@dataclass(frozen=True)
class Query:
    id: str
    image: str
    box: Box


@dataclass
class GroundTruth:
    positives: dict[str, list[Box]]  # image id -> the instance's boxes in it (may be empty)
    junk: set[str] = field(default_factory=set)


@dataclass
class Benchmark:
    """An instance-search test set: images, database list, queries with boxes, ground truth."""

    name: str
    root: Path  # folder of the benchmark.json; every path is relative to it
    image_root: str
    images: dict[str, ImageEntry]
    database: list[str]
    queries: list[Query]
    ground_truth: dict[str, GroundTruth]
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ paths
    def image_path(self, image_id: str) -> Path:
        """The file of a listed image, or of a distractor (its id is the folder's prefix + path)."""
        entry = self.images.get(image_id)
        if entry is not None:
            return self.root / self.image_root / entry.file
        for d in self.distractors:
            prefix = str(d.get("id_prefix", "distractor:"))
            if image_id.startswith(prefix):
                return self.distractor_root(d) / image_id[len(prefix):]
        raise KeyError(f"benchmark '{self.name}' has no image '{image_id}'")

    @property
    def query_by_id(self) -> dict[str, Query]:
        return {q.id: q for q in self.queries}

    @property
    def distractors(self) -> list[dict[str, Any]]:
        """Distractor folders appended to the database by reference (``instsearch convert --distractors``):
        ``{"root": path relative to the benchmark file, "count": N, "id_prefix": "distractor:"}``."""
        return list(self.extra.get("distractors", []))

    def distractor_root(self, entry: Mapping[str, Any]) -> Path:
        return self.root / str(entry["root"])

    def is_distractor(self, image_id: str) -> bool:
        """Distractor ids are ``id_prefix`` + path; they are database images that are never positive."""
        return any(image_id.startswith(str(d.get("id_prefix", "distractor:"))) for d in self.distractors)

    # ------------------------------------------------------------------ io
    @classmethod
    def load(cls, path: str | Path) -> "Benchmark":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"benchmark file not found: {path} (expected a JSON file in the "
                f"'{BENCHMARK_FORMAT}' format, e.g. written by 'instsearch synth' or 'instsearch convert')")
        data = _read_json_object(path)
        return cls.from_dict(data, root=path.resolve().parent, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], root: str | Path, source: str = "<benchmark>") -> "Benchmark":
        def need(key: str, kind: type) -> Any:
            if key not in data:
                raise FormatError(f"{source}: missing key '{key}'")
            if not isinstance(data[key], kind):
                raise FormatError(f"{source}: '{key}' must be a {kind.__name__}")
            return data[key]

        if not isinstance(data, Mapping):
            raise FormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != BENCHMARK_FORMAT:
            raise FormatError(f"{source}: 'format' must be '{BENCHMARK_FORMAT}', got {fmt!r}")
        images: dict[str, ImageEntry] = {}
        for i, im in enumerate(need("images", list)):
            where = f"{source}: images[{i}]"
            try:
                entry = ImageEntry(id=str(im["id"]), file=str(im["file"]), width=int(im["width"]), height=int(im["height"]))
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"{where}: needs 'id', 'file', 'width', 'height', got {im!r}") from None
            if entry.width <= 0 or entry.height <= 0:
                raise FormatError(f"{where} ({entry.id}): width and height must be positive")
            if entry.id in images:
                raise FormatError(f"{where}: duplicate image id '{entry.id}'")
            images[entry.id] = entry
        database = [str(x) for x in need("database", list)]
        in_database: set[str] = set()
        for image_id in database:
            if image_id not in images:
                raise FormatError(f"{source}: database names unknown image '{image_id}'")
            if image_id in in_database:
                # A repeated entry would be indexed and returned twice.
                raise FormatError(f"{source}: database lists image '{image_id}' twice")
            in_database.add(image_id)
        queries = []
        seen: set[str] = set()
        for i, q in enumerate(need("queries", list)):
            where = f"{source}: queries[{i}]"
            try:
                qid, image = str(q["id"]), str(q["image"])
            except (KeyError, TypeError):
                raise FormatError(f"{where}: needs 'id', 'image', 'box', got {q!r}") from None
            if qid in seen:
                raise FormatError(f"{where}: duplicate query id '{qid}'")
            seen.add(qid)
            if image not in images:
                raise FormatError(f"{where} ({qid}): unknown image '{image}'")
            im = images[image]
            box = parse_box(q.get("box", [0, 0, im.width, im.height]), f"{where} ({qid})", size=(im.width, im.height))
            queries.append(Query(qid, image, box))
        gt_raw = need("ground_truth", dict)
        ground_truth: dict[str, GroundTruth] = {}
        for q in queries:
            if q.id not in gt_raw:
                raise FormatError(f"{source}: ground_truth has no entry for query '{q.id}'")
            g = gt_raw[q.id]
            if not isinstance(g, dict) or not isinstance(g.get("positives", []), list) \
                    or not isinstance(g.get("junk", []), list):
                raise FormatError(f"{source}: ground_truth['{q.id}'] must be an object "
                                  f"{{\"positives\": [...], \"junk\": [...]}}, got {g!r}")
            positives: dict[str, list[Box]] = {}
            for j, p in enumerate(g.get("positives", [])):
                where = f"{source}: ground_truth['{q.id}'].positives[{j}]"
                image = str(p.get("image")) if isinstance(p, dict) else str(p)
                if image not in images:
                    raise FormatError(f"{where}: unknown image '{image}'")
                im = images[image]
                boxes = p.get("boxes", []) if isinstance(p, dict) else []
                if not isinstance(boxes, list):
                    raise FormatError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2], got {boxes!r}")
                positives[image] = [parse_box(b, where, size=(im.width, im.height)) for b in boxes]
            junk = {str(x) for x in g.get("junk", [])}
            for image in junk:
                if image not in images:
                    raise FormatError(f"{source}: ground_truth['{q.id}'].junk names unknown image '{image}'")
            ground_truth[q.id] = GroundTruth(positives, junk)
        for qid in gt_raw:
            if qid not in seen:
                raise FormatError(f"{source}: ground_truth names unknown query '{qid}'")
        known = {"format", "name", "image_root", "images", "database", "queries", "ground_truth"}
        return cls(name=str(data.get("name", Path(str(root)).name)), root=Path(root), image_root=str(data.get("image_root", ".")),
                   images=images, database=database, queries=queries, ground_truth=ground_truth,
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BENCHMARK_FORMAT,
            "name": self.name,
            "image_root": self.image_root,
            "images": [{"id": e.id, "file": e.file, "width": e.width, "height": e.height} for e in self.images.values()],
            "database": list(self.database),
            "queries": [{"id": q.id, "image": q.image, "box": _round_box(q.box)} for q in self.queries],
            "ground_truth": {
                qid: {"positives": [{"image": im, "boxes": [_round_box(b) for b in boxes]}
                                    for im, boxes in g.positives.items()],
                      "junk": sorted(g.junk)}
                for qid, g in self.ground_truth.items()
            },
            **self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write as JSON; ``path``'s folder should be ``self.root`` for relative paths to hold."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _round_box(box: Sequence[float]) -> list[float]:
    return [round(float(v), 2) for v in box]


# ---------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Hit:
    image: str
    score: float
    box: Box | None = None


@dataclass
class Run:
    """A ranking per query: best first, each entry an image, its score and the localisation box."""

    method: str
    rankings: dict[str, list[Hit]]

    @classmethod
    def load(cls, path: str | Path, benchmark: Benchmark | None = None) -> "Run":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run file not found: {path} (expected a JSON file in the '{RUN_FORMAT}' format, "
                                    "as written by 'instsearch test')")
        data = _read_json_object(path)
        return cls.from_dict(data, benchmark=benchmark, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], benchmark: Benchmark | None = None, source: str = "<run>") -> "Run":
        if not isinstance(data, Mapping):
            raise FormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != RUN_FORMAT:
            raise FormatError(f"{source}: 'format' must be '{RUN_FORMAT}', got {data.get('format')!r}")
        raw = data.get("rankings")
        if not isinstance(raw, dict):
            raise FormatError(f"{source}: 'rankings' must be an object mapping query id to a list")
        queries = benchmark.query_by_id if benchmark is not None else None
        rankings: dict[str, list[Hit]] = {}
        for qid, hits in raw.items():
            if queries is not None and qid not in queries:
                raise FormatError(f"{source}: rankings name unknown query '{qid}'")
            if not isinstance(hits, list):
                raise FormatError(f"{source}: rankings['{qid}'] must be a list")
            parsed = []
            for i, h in enumerate(hits):
                where = f"{source}: rankings['{qid}'][{i}]"
                if not isinstance(h, dict) or "image" not in h:
                    raise FormatError(f"{where}: needs 'image' (and 'score', 'box'), got {h!r}")
                image = str(h["image"])
                if benchmark is not None and image not in benchmark.images and not benchmark.is_distractor(image):
                    raise FormatError(f"{where}: unknown image '{image}'")
                try:
                    score = float(h.get("score", -i))
                except (TypeError, ValueError):
                    raise FormatError(f"{where}: score must be a number, got {h.get('score')!r}") from None
                box = h.get("box")
                if box is not None:
                    box = parse_box(box, f"{where} ({image})", clip=False)
                parsed.append(Hit(image, score, box))
            rankings[str(qid)] = parsed
        return cls(method=str(data.get("method", "unknown")), rankings=rankings)

    def to_dict(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, "method": self.method,
                "rankings": {qid: [{"image": h.image, "score": round(h.score, 6),
                                    **({"box": _round_box(h.box)} if h.box is not None else {})}
                                   for h in hits]
                             for qid, hits in self.rankings.items()}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()) + "\n")
        return path

    # ----------------------------------------------------------- TREC run format
    def to_trec(self, tag: str | None = None) -> str:
        """``qid Q0 docid rank score tag`` lines, as trec_eval reads them."""
        tag = tag or self.method
        lines = [f"{qid} Q0 {h.image} {rank} {h.score:.6f} {tag}"
                 for qid, hits in self.rankings.items() for rank, h in enumerate(hits, start=1)]
        return "\n".join(lines) + ("\n" if lines else "")

    @classmethod
    def from_trec(cls, text: str | Iterable[str], method: str | None = None) -> "Run":
        lines = text.splitlines() if isinstance(text, str) else list(text)
        per_query: dict[str, list[tuple[int, Hit]]] = {}
        tag = method
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 6:
                raise FormatError(f"TREC run line {n}: expected 'qid Q0 docid rank score tag', got {line!r}")
            qid, _, doc, rank, score, run_tag = parts
            try:
                parsed = (int(rank), Hit(doc, float(score)))
            except ValueError:
                raise FormatError(f"TREC run line {n}: rank must be an integer and score a number, got {line!r}") from None
            tag = tag or run_tag
            per_query.setdefault(qid, []).append(parsed)
        # trec_eval orders by score, ties by docid; keep the file's ranks which agree for our runs.
        return cls(method=tag or "trec", rankings={q: [h for _, h in sorted(v, key=lambda t: t[0])]
                                                    for q, v in per_query.items()})
