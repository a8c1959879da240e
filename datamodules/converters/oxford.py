"""Oxford Buildings (Oxford5k) and Paris (Paris6k), classic protocol -> instsearch benchmark.

Accepted layout (as distributed)::

    DIR/jpg/<image>.jpg                       Oxford: flat; Paris: nested per landmark
                                              (jpg/defense/paris_defense_000605.jpg) - any depth
    DIR/gt_files/<name>_<n>_query.txt         one line: '<image> x1 y1 x2 y2'
    DIR/gt_files/<name>_<n>_good.txt          one image name per line (no extension)
    DIR/gt_files/<name>_<n>_ok.txt
    DIR/gt_files/<name>_<n>_junk.txt

Oxford writes the query image as ``oxc1_<image>``; the ``oxc1_`` prefix is removed. Image ids
are the file stems, which are unique in both datasets (a clash is an error).

Protocol (Philbin et al. 2007): 55 queries ``<name>_<n>``, box from the query file; positives
are good + ok, junk images are ignored; the database is every image under ``jpg/``. As in the
official ``compute_ap``, the query image stays in the database and counts as a positive when the
good/ok lists name it (they do); nothing is moved to junk. Positives carry no boxes (the
ground truth has none). An image the lists name but ``jpg/`` lacks is reported and dropped like
a bad image (some Paris copies miss a few files).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instsearch.datamodules.converters.common import (Draft, natural_key, normalize_relative_path, parse_numbers,
                                                      read_lines, require_dir, require_file)
from instsearch.datamodules.distractors import iter_image_files
from instsearch.formats import FormatError

OXFORD_PREFIX = "oxc1_"
EXPECTED = {"oxford5k": {"queries": 55, "database": 5063}, "paris6k": {"queries": 55, "database": 6392}}

LAYOUT = """\
  DIR/jpg/<image>.jpg                      (flat, or nested per landmark; searched recursively)
  DIR/gt_files/<name>_<n>_query.txt        '<image> x1 y1 x2 y2' (Oxford: 'oxc1_<image> ...')
  DIR/gt_files/<name>_<n>_good.txt         image names, one per line
  DIR/gt_files/<name>_<n>_ok.txt
  DIR/gt_files/<name>_<n>_junk.txt"""


def index_images(folder: Path) -> dict[str, Path]:
    """Stem -> path of every .jpg under ``folder`` (any depth, deterministic order)."""
    found: dict[str, Path] = {}
    for path in iter_image_files(folder, extensions=frozenset({".jpg", ".jpeg"})):
        if path.stem in found:
            raise FormatError(f"{folder}: two images share the name '{path.stem}': {found[path.stem]} and {path}")
        found[path.stem] = path
    if not found:
        raise FileNotFoundError(f"no .jpg images under {folder}\nexpected layout:\n{LAYOUT}")
    return found


def build(root: Path, *, dataset: str = "oxford5k") -> Draft:
    if dataset not in EXPECTED:
        raise ValueError(f"dataset must be one of {sorted(EXPECTED)}, got {dataset!r}")
    root = require_dir(Path(root), f"{dataset} root", LAYOUT)
    jpg = require_dir(root / "jpg", f"{dataset} image folder", LAYOUT)
    gt = require_dir(root / "gt_files", f"{dataset} ground-truth folder", LAYOUT)
    draft = Draft(name=dataset, dataset=dataset, image_dir=jpg, extra={"protocol": "classic"},
                  expected=dict(EXPECTED[dataset]))
    found = index_images(jpg)
    for stem, path in found.items():
        draft.add_image(stem, path.relative_to(jpg).as_posix())
        draft.database.append(stem)

    def image_ref(name: str, where: str) -> str:
        name = normalize_relative_path(name, where)
        if name not in found:
            draft.add_missing(name, jpg / f"{name}.jpg", where)
        return name

    for query in read_query_files(gt):
        qid, where = query.id, query.where
        image = image_ref(query.image, where)
        box = draft.add_box(image, query.box, where)
        draft.add_query(qid, image, [box], where)
        for kind in ("good", "ok", "junk"):
            listing = require_file(gt / f"{qid}_{kind}.txt", f"'{kind}' list of query {qid}", LAYOUT)
            for m, entry in read_lines(listing):
                if len(entry.split()) != 1:
                    raise FormatError(f"{listing}, line {m}: expected one image name, got {entry!r}")
                ref = image_ref(entry, f"{listing}, line {m}")
                if kind == "junk":
                    draft.add_junk(qid, ref)
                else:
                    draft.add_positive(qid, ref)
    return draft


# ----------------------------------------------------------------------------- the query files, shared
# Public so that the fine-tuning DataModule (:mod:`instsearch.datamodules.finetune`) reads the
# queries exactly as the converter does.
@dataclass(frozen=True)
class QueryFile:
    """One ``<landmark>_<n>_query.txt``: the query id, its image id (``oxc1_`` removed), its box."""

    id: str  # '<landmark>_<n>'
    image: str
    box: tuple[float, float, float, float]  # [x1, y1, x2, y2] as written (not yet clipped)
    where: str  # 'file, line N'

    @property
    def landmark(self) -> str:
        """The landmark the query shows: its id without the trailing ``_<n>``."""
        return self.id.rsplit("_", 1)[0]


def read_query_files(gt: Path) -> list[QueryFile]:
    """Every ``gt_files/<name>_<n>_query.txt`` in natural name order, parsed."""
    query_files = sorted(gt.glob("*_query.txt"), key=lambda p: natural_key(p.name))
    if not query_files:
        raise FileNotFoundError(f"no '<name>_<n>_query.txt' files in {gt}\nexpected layout:\n{LAYOUT}")
    return [read_query_file(q) for q in query_files]


def read_query_file(qfile: Path) -> QueryFile:
    """``qfile`` holds one line ``<image> x1 y1 x2 y2`` (Oxford: ``oxc1_<image> ...``)."""
    lines = read_lines(qfile)
    if len(lines) != 1:
        raise FormatError(f"{qfile}: expected exactly one line '<image> x1 y1 x2 y2', found {len(lines)}")
    n, line = lines[0]
    where = f"{qfile}, line {n}"
    tokens = line.split()
    if len(tokens) != 5:
        raise FormatError(f"{where}: expected '<image> x1 y1 x2 y2', got {line!r}")
    name = tokens[0][len(OXFORD_PREFIX):] if tokens[0].startswith(OXFORD_PREFIX) else tokens[0]
    x1, y1, x2, y2 = parse_numbers(tokens[1:], where, "'<image> x1 y1 x2 y2'")
    return QueryFile(qfile.name[: -len("_query.txt")], normalize_relative_path(name, where), (x1, y1, x2, y2), where)
