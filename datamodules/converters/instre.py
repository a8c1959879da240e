"""INSTRE (Wang & Jiang, ACM TOMM 2015) -> instsearch benchmark.

Accepted layout (as distributed)::

    DIR/INSTRE-S1/<class>/NNN.jpg + NNN.txt   100 single-instance classes
    DIR/INSTRE-S2/<class>/NNN.jpg + NNN.txt   100 single-instance classes
    DIR/INSTRE-M/<class>/NNN.jpg  + NNN.txt    50 classes, each a *pair* of objects

Class folder names are free (``01a_canada_book`` ...). Each ``NNN.txt`` holds one line per
object, ``x y w h`` in pixels (whitespace or comma separated), i.e. the box
``[x, y, x + w, y + h]``; INSTRE-M images carry two lines.

Protocol (the one of Iscen et al., CVPR 2017, used by DASR and CLAID: 1,250 queries, 27,293
database images), made deterministic:

* the 250 classes are the class folders of S1, S2 and M;
* the queries of a class are its first ``queries_per_class`` (5) images in natural file-name
  order (Iscen et al. drew them at random; the first five keep the split reproducible without
  shipping a split file);
* the database is every other image of every class; query images are not in the database;
* the positives of a query are the database images of its class, each with all its boxes;
  there is no junk;
* the query box is the image's box; for INSTRE-M (two objects) it is the union of both boxes,
  i.e. the query is the pair, as in the multi-instance queries of CLAID (Tab. II, INSTRE-M).

``protocol="instre-m"`` keeps only the 250 queries of the 50 INSTRE-M classes against the same
27,293-image database (CLAID's INSTRE-M: 250 queries / 27,293 images).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from instsearch.datamodules.converters.common import Draft, natural_key, parse_numbers, read_lines, require_dir, require_file
from instsearch.formats import FormatError

SUBSETS = ("INSTRE-S1", "INSTRE-S2", "INSTRE-M")
MULTI_SUBSET = "INSTRE-M"
PROTOCOLS = ("1250", "instre-m")
IMAGE_SUFFIXES = (".jpg", ".jpeg")

LAYOUT = """\
  DIR/INSTRE-S1/<class>/NNN.jpg   with NNN.txt beside it ('x y w h' per line, one line per object)
  DIR/INSTRE-S2/<class>/NNN.jpg   ...
  DIR/INSTRE-M/<class>/NNN.jpg    ... (two lines: the two objects)"""


def build(root: Path, *, protocol: Optional[str] = None, queries_per_class: int = 5) -> Draft:
    protocol = protocol or "1250"
    if protocol not in PROTOCOLS:
        raise ValueError(f"INSTRE protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if queries_per_class < 1:
        raise ValueError(f"queries_per_class must be >= 1, got {queries_per_class}")
    root = require_dir(Path(root), "INSTRE root", LAYOUT)
    multi_only = protocol == "instre-m"
    draft = Draft(name="instre-m" if multi_only else "instre", dataset="instre", image_dir=root,
                  extra={"protocol": protocol, "queries_per_class": queries_per_class},
                  expected={"queries": 250 if multi_only else 1250, "database": 27293, "classes": 250})
    n_classes = 0
    for subset in SUBSETS:
        for class_dir in class_folders(root, subset):
            n_classes += 1
            _add_class(draft, root, subset, class_dir, queries_per_class,
                       make_queries=not multi_only or subset == MULTI_SUBSET)
    draft.extra["classes"] = n_classes
    return draft


def _add_class(draft: Draft, root: Path, subset: str, class_dir: Path, k: int, make_queries: bool) -> None:
    files = class_images(class_dir)
    if len(files) <= k:
        raise FormatError(f"{class_dir}: an INSTRE class needs more than {k} images ({k} queries + database), "
                          f"found {len(files)}")
    members: list[tuple[str, list[int]]] = []
    for image in files:
        image_id = benchmark_image_id(root, image)
        draft.add_image(image_id, image.relative_to(root).as_posix(), where=str(class_dir))
        members.append((image_id, [draft.add_box(image_id, b.box, b.where) for b in read_boxes(image)]))
    queries, database = members[:k], members[k:]
    for image_id, _ in database:
        draft.database.append(image_id)
    if not make_queries:
        return
    for image_id, boxes in queries:
        draft.add_query(image_id, image_id, boxes, where=str(root / draft.images[image_id]))
        for db_id, db_boxes in database:
            draft.add_positive(image_id, db_id, db_boxes)


# ----------------------------------------------------------------------------- the layout, shared
# Public so that the fine-tuning DataModule (:mod:`instsearch.datamodules.finetune`) reads the
# same folders, in the same order, with the same box convention as the converter.
@dataclass(frozen=True)
class AnnotatedBox:
    """One object's ``[x1, y1, x2, y2]`` box and the entry it was read from (``file, line N``)."""

    box: tuple[float, float, float, float]
    where: str


def class_folders(root: Path, subset: str) -> list[Path]:
    """The class folders of one subset (``INSTRE-S1`` ...) in natural name order."""
    folder = require_dir(Path(root) / subset, f"INSTRE subset {subset}", LAYOUT)
    classes = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: natural_key(d.name))
    if not classes:
        raise FileNotFoundError(f"no class folders in {folder}\nexpected layout:\n{LAYOUT}")
    return classes


def benchmark_image_id(root: Path, image: Path) -> str:
    """The id the converted benchmark gives ``image``: its path under ``root`` without suffix."""
    return image.relative_to(root).with_suffix("").as_posix()


def class_images(class_dir: Path) -> list[Path]:
    """The images of one class folder in natural file-name order."""
    return sorted((p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def read_boxes(image: Path) -> list[AnnotatedBox]:
    """The boxes of ``image`` from the ``NNN.txt`` beside it: ``x y w h`` per line -> ``[x, y, x + w, y + h]``.

    Numbers only are checked here; empty, inverted or out-of-image boxes are refused (or clipped)
    by whoever knows the image size, with ``where`` in the message.
    """
    txt = require_file(image.with_suffix(".txt"), f"annotation of {image.name}", LAYOUT)
    lines = read_lines(txt)
    if not lines:
        raise FormatError(f"{txt}: no box (expected 'x y w h' lines, one per object)")
    boxes = []
    for n, line in lines:
        where = f"{txt}, line {n}"
        tokens = [t for t in re.split(r"[\s,;]+", line) if t]
        if len(tokens) != 4:
            raise FormatError(f"{where}: expected 'x y w h' (4 numbers), got {line!r}")
        x, y, w, h = parse_numbers(tokens, where, "'x y w h' (4 numbers)")
        boxes.append(AnnotatedBox((x, y, x + w, y + h), f"{where} ('x y w h' = {line!r})"))
    return boxes
