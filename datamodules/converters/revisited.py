"""Revisited Oxford / Paris (Radenović et al., CVPR 2018) -> instsearch benchmark.

Accepted layout (as distributed with the revisitop toolkit)::

    DIR/gnd_roxford5k.pkl     (or gnd_rparis6k.pkl) a dict:
                              imlist  - database image names (no extension)
                              qimlist - query image names
                              gnd     - one dict per query: bbx [x1, y1, x2, y2],
                                        easy / hard / junk: indices into imlist
    DIR/jpg/<name>.jpg        every image of imlist and qimlist

The pickle is read with :func:`instsearch.datamodules.restricted_pickle.restricted_load` (numpy arrays and
containers only; nothing in the file is executed).

Settings (as the revisited protocol's evaluation):

=========  =================  ====================
setting    positives          junk
=========  =================  ====================
easy       easy               junk + hard
medium     easy + hard        junk
hard       hard               junk + easy
=========  =================  ====================

70 queries. Should a query image appear in ``imlist``, it is made junk for its own query, so it
never counts for or against itself. Positives carry no boxes (the ground truth has none).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from instsearch.datamodules.converters.common import Draft, require_dir, require_file
from instsearch.datamodules.restricted_pickle import restricted_load
from instsearch.formats import FormatError

SETTINGS = ("easy", "medium", "hard")
DEFAULT_SETTING = "medium"
EXPECTED = {"roxford5k": {"queries": 70, "database": 4993}, "rparis6k": {"queries": 70, "database": 6322}}

# setting -> (lists that are positive, lists that are junk)
_SPLITS = {"easy": (("easy",), ("junk", "hard")),
           "medium": (("easy", "hard"), ("junk",)),
           "hard": (("hard",), ("junk", "easy"))}


def layout(dataset: str) -> str:
    return (f"  DIR/gnd_{dataset}.pkl   dict with 'imlist', 'qimlist', 'gnd' (per query: 'bbx', 'easy', 'hard', 'junk')\n"
            f"  DIR/jpg/<name>.jpg       the images of imlist and qimlist")


def build(root: Path, *, dataset: str = "roxford5k", setting: Optional[str] = None) -> Draft:
    if dataset not in EXPECTED:
        raise ValueError(f"dataset must be one of {sorted(EXPECTED)}, got {dataset!r}")
    setting = setting or DEFAULT_SETTING
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    root = require_dir(Path(root), f"{dataset} root", layout(dataset))
    pkl = require_file(root / f"gnd_{dataset}.pkl", f"{dataset} ground truth", layout(dataset))
    jpg = require_dir(root / "jpg", f"{dataset} image folder", layout(dataset))
    data = restricted_load(pkl)
    imlist, qimlist, gnd = _check(data, pkl)

    draft = Draft(name=f"{dataset}-{setting}", dataset=dataset, image_dir=jpg,
                  extra={"protocol": "revisited", "setting": setting}, expected=dict(EXPECTED[dataset]))

    def register(name: str, where: str) -> str:
        path = jpg / f"{name}.jpg"
        if path.is_file():
            draft.add_image(name, f"{name}.jpg")
        else:
            draft.add_missing(name, path, where)
        return name

    for i, name in enumerate(imlist):
        draft.database.append(register(name, f"{pkl}: imlist[{i}]"))
    in_database = set(imlist)
    positive_lists, junk_lists = _SPLITS[setting]
    seen: dict[str, int] = {}
    for i, (name, g) in enumerate(zip(qimlist, gnd)):
        where = f"{pkl}: gnd[{i}]"
        image = register(name, f"{pkl}: qimlist[{i}]")
        seen[name] = seen.get(name, 0) + 1
        qid = name if seen[name] == 1 else f"{name}#{seen[name]}"
        bbx = np.asarray(g["bbx"], dtype=np.float64).ravel()
        box = draft.add_box(image, bbx.tolist(), f"{where}['bbx']")
        draft.add_query(qid, image, [box], where)
        lists = {key: _indices(g, key, len(imlist), where) for key in ("easy", "hard", "junk")}
        for key in positive_lists:
            for j in lists[key].tolist():
                draft.add_positive(qid, imlist[j])
        for key in junk_lists:
            for j in lists[key].tolist():
                draft.add_junk(qid, imlist[j])
        if name in in_database:
            draft.add_junk(qid, name)  # junk wins over positive in finalize()
    return draft


def _check(data: Any, pkl: Path) -> tuple[list[str], list[str], list[dict]]:
    if not isinstance(data, dict):
        raise FormatError(f"{pkl}: expected a dict with 'imlist', 'qimlist', 'gnd', got {type(data).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in data:
            raise FormatError(f"{pkl}: missing key '{key}' (expected 'imlist', 'qimlist', 'gnd')")
    imlist = [str(x) for x in data["imlist"]]
    qimlist = [str(x) for x in data["qimlist"]]
    gnd = list(data["gnd"])
    if len(gnd) != len(qimlist):
        raise FormatError(f"{pkl}: 'gnd' has {len(gnd)} entries but 'qimlist' {len(qimlist)}")
    if len(set(imlist)) != len(imlist):
        raise FormatError(f"{pkl}: 'imlist' repeats an image name")
    for i, g in enumerate(gnd):
        if not isinstance(g, dict) or "bbx" not in g:
            raise FormatError(f"{pkl}: gnd[{i}] must be a dict with 'bbx', 'easy', 'hard', 'junk'")
    return imlist, qimlist, gnd


def _indices(g: dict, key: str, n: int, where: str) -> np.ndarray:
    if key not in g:
        raise FormatError(f"{where}: missing '{key}' (expected 'bbx', 'easy', 'hard', 'junk')")
    values = np.asarray(g[key]).ravel()
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(values.dtype, np.integer):
        if not (np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values))):
            raise FormatError(f"{where}['{key}']: expected integer indices into imlist, got dtype {values.dtype}")
    values = values.astype(np.int64)
    bad = (values < 0) | (values >= n)
    if bad.any():
        raise FormatError(f"{where}['{key}']: index {int(values[bad][0])} outside imlist (0..{n - 1})")
    return values
