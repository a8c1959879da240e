"""Instance-160 / Instance-335 (instance search benchmarks built from tracking videos) -> benchmark.

Instance-160 (160 queries, 11,885 reference images; FCIS+XD, Zhan & Zhao 2019) and its extension
Instance-335 (335 queries, 40,914 references; DASR) share one layout, accepted exactly as::

    DIR/query.txt              one query per line:  <path>'>'NNN x1 y1 x2 y2
                               e.g.  'Car1/0001.jpg>001 43 52 147 125'
                               <path> is the query image relative to DIR (may contain spaces),
                               NNN the query number, then its box in pixels.
    DIR/reference.txt          one reference (database) image path per line, relative to DIR
    DIR/groundtruth/NNN.txt    one line per relevant reference image of query NNN:
                               <path> [x1 y1 x2 y2 [x1 y1 x2 y2 ...]]
                               <path> must be listed in reference.txt (it is the longest run of
                               leading tokens that is, so paths may contain spaces); boxes are
                               optional; a path on several lines collects all their boxes.
    DIR/<path>                 the images, at the listed relative paths

Paths must be relative and stay inside DIR; every path is read through
:func:`~instsearch.datamodules.converters.common.normalize_relative_path`, so ``./a/x.jpg``,
``a\\x.jpg`` and ``a//x.jpg`` name one image. Image ids are the normalised relative paths (POSIX
separators); query ids are NNN as written. The database is reference.txt in file order. If a
query image is also a reference image it is junk for its own query (never counts for or against
itself), even when its ground truth lists it. Every malformed line is a
:class:`~instsearch.formats.FormatError` naming file and line.
"""
from __future__ import annotations

from pathlib import Path

from instsearch.datamodules.converters.common import (Draft, normalize_relative_path, parse_numbers, read_lines,
                                                      require_dir, require_file)
from instsearch.formats import FormatError

EXPECTED = {"instance160": {"queries": 160, "database": 11885}, "instance335": {"queries": 335, "database": 40914}}

LAYOUT = """\
  DIR/query.txt             '<path>>NNN x1 y1 x2 y2' per line (query image, '>', query number, box)
  DIR/reference.txt         one reference image path per line (relative to DIR)
  DIR/groundtruth/NNN.txt   '<path> [x1 y1 x2 y2 ...]' per relevant reference image
  DIR/<path>                the images"""


def _split_reference(line: str, references: set[str], where: str, listing: str) -> tuple[str, list[str]]:
    """Split '<path> [numbers]' where <path>, possibly with spaces, must be a listed reference
    (compared after :func:`normalize_relative_path`, as the reference list itself)."""
    tokens = line.split()
    for k in range(len(tokens), 0, -1):
        candidate = normalize_relative_path(" ".join(tokens[:k]), where)
        if candidate in references:
            return candidate, tokens[k:]
    rel = normalize_relative_path(tokens[0], where)
    raise FormatError(f"{where}: '{rel}' is not listed in {listing} (expected '<path> [x1 y1 x2 y2 ...]' "
                      "with <path> a reference image)")


def build(root: Path, *, dataset: str = "instance160") -> Draft:
    if dataset not in EXPECTED:
        raise ValueError(f"dataset must be one of {sorted(EXPECTED)}, got {dataset!r}")
    root = require_dir(Path(root), f"{dataset} root", LAYOUT)
    query_txt = require_file(root / "query.txt", f"{dataset} query list", LAYOUT)
    reference_txt = require_file(root / "reference.txt", f"{dataset} reference list", LAYOUT)
    gt_dir = require_dir(root / "groundtruth", f"{dataset} ground-truth folder", LAYOUT)
    draft = Draft(name=dataset, dataset=dataset, image_dir=root, extra={"protocol": "instance"},
                  expected=dict(EXPECTED[dataset]))

    def register(rel: str, where: str) -> str:
        path = root / rel
        if path.is_file():
            draft.add_image(rel, rel)
        else:
            draft.add_missing(rel, path, where)
        return rel

    references: set[str] = set()
    for n, line in read_lines(reference_txt):
        where = f"{reference_txt}, line {n}"
        rel = normalize_relative_path(line, where)
        if rel in references:
            raise FormatError(f"{where}: '{rel}' is listed twice")
        references.add(rel)
        draft.database.append(register(rel, where))
    if not references:
        raise FormatError(f"{reference_txt}: no reference images listed")

    lines = read_lines(query_txt)
    if not lines:
        raise FormatError(f"{query_txt}: no queries listed (expected '<path>>NNN x1 y1 x2 y2' lines)")
    for n, line in lines:
        where = f"{query_txt}, line {n}"
        if ">" not in line:
            raise FormatError(f"{where}: expected '<path>>NNN x1 y1 x2 y2', got {line!r}")
        path_text, rest = line.rsplit(">", 1)
        tokens = rest.split()
        if not path_text.strip() or len(tokens) != 5:
            raise FormatError(f"{where}: expected '<path>>NNN x1 y1 x2 y2', got {line!r}")
        qid = tokens[0]
        image = register(normalize_relative_path(path_text, where), where)
        box = draft.add_box(image, parse_numbers(tokens[1:], where, "'<path>>NNN x1 y1 x2 y2'"), where)
        draft.add_query(qid, image, [box], where)
        gt_file = require_file(gt_dir / f"{qid}.txt", f"ground truth of query {qid} ({where})", LAYOUT)
        for m, gt_line in read_lines(gt_file):
            gt_where = f"{gt_file}, line {m}"
            rel, rest = _split_reference(gt_line, references, gt_where, reference_txt.name)
            numbers = parse_numbers(rest, gt_where, "'<path> [x1 y1 x2 y2 ...]'")
            if len(numbers) % 4:
                raise FormatError(f"{gt_where}: boxes need 4 numbers each (x1 y1 x2 y2), got {len(numbers)} numbers")
            boxes = [draft.add_box(rel, numbers[i:i + 4], gt_where) for i in range(0, len(numbers), 4)]
            draft.add_positive(qid, rel, boxes)
        if image in references:
            draft.add_junk(qid, image)
    return draft
