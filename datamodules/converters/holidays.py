"""INRIA Holidays (Jégou et al., ECCV 2008) -> instsearch benchmark.

Accepted layout (as distributed, ``jpg1.tar.gz`` + ``jpg2.tar.gz`` extracted)::

    DIR/jpg/NNNNNN.jpg        1,491 images, six-digit names

Protocol: images are grouped by the first four digits of their name (``1000`` holds 100000,
100001, ...); the group's first image (by name) is the query, with the whole image as its box;
the other images of the group are its positives. The database is all 1,491 images, query images
included (as the official evaluation ranks them), and each query image is junk for its own query,
which is what the official script achieves by removing the query from its own ranking: it never
counts for or against itself. 500 queries.

Holidays has photos whose EXIF orientation is not applied in the files; sizes come from
:func:`instsearch.datamodules.image_io.image_size`, which reports the displayed (rotated) size, and every
loader applies the same rotation, so boxes and pixels agree.
"""
from __future__ import annotations

import re
from pathlib import Path

from instsearch.datamodules.converters.common import Draft, require_dir
from instsearch.formats import FormatError

LAYOUT = "  DIR/jpg/NNNNNN.jpg   (six-digit names; the first four digits are the group)"
NAME = re.compile(r"^\d{6}$")


def build(root: Path) -> Draft:
    root = require_dir(Path(root), "Holidays root", LAYOUT)
    jpg = require_dir(root / "jpg", "Holidays image folder", LAYOUT)
    files = sorted(p for p in jpg.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no .jpg images in {jpg}\nexpected layout:\n{LAYOUT}")
    draft = Draft(name="holidays", dataset="holidays", image_dir=jpg, extra={"protocol": "holidays"},
                  expected={"queries": 500, "database": 1491})
    groups: dict[str, list[str]] = {}
    for path in files:
        if not NAME.match(path.stem):
            raise FormatError(f"{path}: Holidays image names are six digits (NNNNNN.jpg), got '{path.name}'")
        draft.add_image(path.stem, path.name, where=str(jpg))
        draft.database.append(path.stem)
        groups.setdefault(path.stem[:4], []).append(path.stem)
    for group, members in groups.items():
        query, others = members[0], members[1:]
        draft.add_query(query, query, None, where=str(jpg / draft.images[query]))
        draft.add_junk(query, query)
        for image in others:
            draft.add_positive(query, image)
    draft.extra["groups"] = len(groups)
    return draft
