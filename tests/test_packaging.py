"""The package installs under one namespace: ``instsearch.eval``, ``instsearch.networks``, ...

The folders live at the repository's top level, but a bare ``import eval`` or ``networks`` would
collide with any other research project that has such a folder, and those names end up in
LightningCLI ``class_path``s and checkpoints. These tests fail on any bare reference.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("eval", "networks", "losses", "datamodules", "lightning_modules")
SOURCE_DIRS = ("instsearch", *FOLDERS, "tests", "benchmarks")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _python_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def _bare_imports(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(root)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    return found


def test_no_code_imports_a_bare_top_level_package():
    bad = [line for p in _python_files() for line in _bare_imports(p)]
    assert not bad, "import through the instsearch namespace:\n" + "\n".join(bad)


def test_the_detector_finds_a_bare_import(tmp_path):
    # the scanner itself must be able to fail
    (tmp_path / "x.py").write_text("import networks.fcis\nfrom eval.metrics import ap\nfrom instsearch.eval import metrics\n")
    hits = _bare_imports(tmp_path / "x.py", root=tmp_path)
    assert [h.split(": ")[1] for h in hits] == ["networks.fcis", "eval.metrics"]


BARE_DOTTED = re.compile(r"(?<![\w./~-])(?:" + "|".join(FOLDERS) + r")\.[a-z_]+\.[A-Za-z_]+")


@pytest.mark.parametrize("pattern", ["configs/**/*.yaml", "README.md", "instsearch/*.py", "lightning_modules/*.py"])
def test_configs_and_docs_name_classes_through_the_namespace(pattern):
    bad = []
    for path in sorted(ROOT.glob(pattern)):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            bad += [f"{path.relative_to(ROOT)}:{lineno}: {m}" for m in BARE_DOTTED.findall(line)]
    assert not bad, "\n".join(bad)


def test_every_subpackage_is_in_the_installed_package_list():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping, listed = config["package-dir"], set(config["packages"])
    assert set(mapping) >= {"instsearch", *(f"instsearch.{f}" for f in FOLDERS)}
    expected = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((name, *rel)))
    assert listed == expected


def test_installed_modules_resolve_to_the_repository_folders():
    import instsearch.eval.metrics
    import instsearch.networks.backbones

    assert Path(instsearch.eval.metrics.__file__).resolve() == ROOT / "eval" / "metrics.py"
    assert Path(instsearch.networks.backbones.__file__).resolve() == ROOT / "networks" / "backbones.py"
