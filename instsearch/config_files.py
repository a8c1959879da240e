"""A LightningCLI config file as the plain dict the CLI composes from it.

A shipped config (``configs/<method>_<benchmark>.yaml``) names the pieces it shares with others by
path, as jsonargparse reads them: a value that is the path of a YAML file -- ``data:
data/instre.yaml``, ``model: model/dasr.yaml``, ``net: ../net/udq_vgg16.yaml`` inside a model's
``init_args``, ``trainer: base/x.yaml`` -- is that file's content, and a relative path is read
next to the file that names it. A top-level ``config: other.yaml`` key reads ``other.yaml`` in its
place, whose top-level keys the including file's later keys replace whole.

The included value is whole: jsonargparse does not merge a partial ``model:`` or ``trainer:``
mapping over a piece included in the same file (a later top-level key replaces the included one),
so a piece holds only a value that configs share as it is. Options on the command line
(``--model.init_args.net.init_args.weights X``) are merged over the composed config as usual.

:func:`load_config` is for code that reads a config's values (tests, benchmarks, tools): the
``instsearch`` command itself lets jsonargparse do the same."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

INCLUDE_SUFFIXES = (".yaml", ".yml")


def load_config(path: Union[str, Path]) -> dict[str, Any]:
    """The config at ``path`` with every included file read in place, as a plain dict (a fresh
    copy: edit it freely, ``yaml.safe_dump`` it anywhere)."""
    path = Path(path)
    root = yaml.safe_load(path.read_text(encoding="utf-8"))
    if root is None:
        return {}
    if not isinstance(root, dict):
        raise ValueError(f"{path}: a config is a mapping, not {type(root).__name__}")
    composed: dict[str, Any] = {}
    for key, value in root.items():
        if key == "config" and isinstance(value, str):
            composed.update(load_config(_included(value, path.parent) or path.parent / value))
        else:
            composed[key] = _resolve(value, path.parent)
    return composed


def _included(value: str, base: Path) -> Union[Path, None]:
    """The YAML file that ``value`` names relative to ``base`` (or absolutely), or None."""
    if not value.endswith(INCLUDE_SUFFIXES):
        return None
    candidate = Path(value).expanduser()
    candidate = candidate if candidate.is_absolute() else base / candidate
    return candidate if candidate.is_file() else None


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, dict):
        return {key: _resolve(item, base) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, base) for item in value]
    if isinstance(value, str):
        included = _included(value, base)
        if included is not None:
            return load_config(included)
    return value
