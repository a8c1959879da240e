"""Any folder of images -> a database-only benchmark (optionally with unjudged queries).

``instsearch convert folder --root DIR --out B.json [--queries queries.txt]`` makes a benchmark of
a user's own collection, so that every method's ``predict`` can describe it, UDQ can train on it
(:class:`~instsearch.datamodules.unlabelled.DatabaseImagesDataModule`) and ``instsearch test``
can rank it for given queries. Accepted layout::

    DIR/**/<name>.<ext>      images at any depth; <ext> one of
                             instsearch.datamodules.distractors.IMAGE_EXTENSIONS (any case)
    queries.txt (optional)   one query per line:  <path> x1 y1 x2 y2
                             <path> is the query image relative to DIR (may contain spaces: the
                             last four tokens are the box, in pixels of the image as displayed)

Database: every image file the distractor walk finds
(:func:`~instsearch.datamodules.distractors.iter_image_files`): recursive, entries sorted per
folder (so the order is that of the relative paths compared by component), hidden entries
(``.x.jpg``, ``._x.jpg``, ``.git/``) skipped, other files ignored, symbolic links followed (a
linked folder is walked once, a link cycle is not walked twice). Image ids and files are the POSIX
paths relative to DIR, as written through the links, so they never leave DIR by ``..``; a broken
link is reported like a missing file. Unreadable images (zero bytes, not an image, cut header, over
``--max-pixels``; with ``--verify-images`` also truncated data) are dropped and listed in
``convert_report.json`` by :func:`~instsearch.datamodules.converters.convert`, as for every
converter.

Queries: query ids are the line number in ``queries.txt``, zero-padded to at least three digits
(all of one file the same width), so ``007`` is line 7 and ids sort in file order; a path may be
listed on several lines (several boxes in one image). Paths are read through
:func:`~instsearch.datamodules.converters.common.normalize_relative_path`; a query image need not
have an image extension, but it must exist (a missing one is reported and its query dropped, as a
bad image). Boxes are clipped to the image; empty, inverted or wholly outside boxes and malformed
lines are a :class:`~instsearch.formats.FormatError` naming the file and line.

Ground truth is unknown: every query has no positive, and its own image (a database image) is junk
for it, as in Holidays and Instance-160/335. ``instsearch test`` ranks the database for each query
(``run.json``), but the scores mean nothing: a query without positive has AP 0
(:mod:`instsearch.eval.metrics`). Without ``--queries`` the benchmark has no query at all: use
``instsearch predict`` (regions and features of every database image) or train UDQ on it. The
evaluator refuses to score a benchmark without queries (``ValueError: benchmark '...' has no
queries to evaluate``): ``instsearch test`` stops there, and so do the per-epoch retrieval
evaluation and UDQ's round-0 baselines during ``fit`` unless they are off
(``--model.init_args.evaluate_baselines false``, ``--retrieval.every_n_epochs`` above
``max_epochs``). ``queries.txt`` is found as given (relative to the working directory); the paths
inside it are relative to DIR. The benchmark's ``name`` is DIR's name and its ``protocol`` is
``"folder"``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from instsearch.datamodules.converters.common import (Draft, normalize_relative_path, parse_numbers, read_lines,
                                                      require_dir, require_file)
from instsearch.datamodules.distractors import IMAGE_EXTENSIONS, iter_image_files
from instsearch.formats import FormatError

__all__ = ["build", "PROTOCOL", "LAYOUT"]

PROTOCOL = "folder"

LAYOUT = f"""\
  DIR/**/<name>.<ext>   images at any depth ({' '.join(sorted(IMAGE_EXTENSIONS))}, any case)
  queries.txt           optional (--queries): '<path> x1 y1 x2 y2' per line, <path> relative to DIR"""

QUERY_LINE = "'<path> x1 y1 x2 y2'"


def query_id(line: int, width: int) -> str:
    """The id of the query on ``line`` (1-based) of a file whose query lines end at ``width`` digits."""
    return f"{line:0{width}d}"


def build(root: Path, *, queries: Optional[str | os.PathLike[str]] = None) -> Draft:
    root = require_dir(Path(root), "image folder", LAYOUT)
    name = Path(os.path.abspath(root)).name or "folder"
    draft = Draft(name=name, dataset=PROTOCOL, image_dir=root, extra={"protocol": PROTOCOL})
    for path in iter_image_files(root):
        rel = path.relative_to(root).as_posix()
        draft.add_image(rel, rel, where=str(root))
        draft.database.append(rel)
    if not draft.database:
        raise FileNotFoundError(f"no image files under {root} (searched every sub-folder; hidden entries are "
                                f"skipped)\nexpected layout:\n{LAYOUT}")
    if queries is not None:
        _read_queries(draft, root, Path(queries))
    return draft


def _read_queries(draft: Draft, root: Path, query_file: Path) -> None:
    require_file(query_file, "query list", LAYOUT)
    lines = read_lines(query_file)
    if not lines:
        raise FormatError(f"{query_file}: no queries listed (expected {QUERY_LINE} lines)")
    width = max(3, len(str(lines[-1][0])))
    in_database = set(draft.database)
    for n, line in lines:
        where = f"{query_file}, line {n}"
        tokens = line.rsplit(maxsplit=4)  # the path keeps its inner spaces
        if len(tokens) != 5:
            raise FormatError(f"{where}: expected {QUERY_LINE} (path relative to {root}), got {line!r}")
        rel = normalize_relative_path(tokens[0], where)
        box = parse_numbers(tokens[1:], where, f"{QUERY_LINE} with four numbers last")
        if (root / rel).is_file():
            draft.add_image(rel, rel, where=where)
        else:
            draft.add_missing(rel, root / rel, where)
        qid = query_id(n, width)
        draft.add_query(qid, rel, [draft.add_box(rel, box, where)], where)
        if rel in in_database:
            draft.add_junk(qid, rel)  # its own image never counts for or against it
