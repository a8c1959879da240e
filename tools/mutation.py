"""Mutation testing of instsearch's core modules with mutmut, one module at a time.

Usage:  python tools/mutation.py [--module eval/metrics.py ...] [--max-children N] [--report-only]

The modules and the tests that cover each are listed in pyproject.toml under
[tool.instsearch.mutation]. mutmut copies the package into ``mutants/`` and puts that folder first
on ``sys.path``, which needs the code laid out as it is imported (``instsearch/eval/metrics.py``),
whereas this repository keeps eval/, networks/, losses/, ... at its top level and maps them into
``instsearch`` through setuptools' package-dir. So each module gets a sandbox,
``.mutation/<module>/``, holding the installed layout (``instsearch/`` with eval/, networks/, ...
as sub-packages), a copy of tests/ and a pyproject.toml whose [tool.mutmut] mutates that one file
and runs only its covering tests. The editable install's finder comes after the path finders on
``sys.meta_path``, so ``import instsearch.eval.metrics`` inside the run finds the mutated copy.

Mutants that cannot change behaviour are listed, each with its reason, in docs/mutation.md as
``- `<mutant name>`: reason`` lines; the kill rate printed per module leaves them out:
killed / (mutants - equivalent - unrun). Timeouts count as killed, as mutmut counts them; "unrun"
are mutants an interrupted run did not reach.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SANDBOXES = ROOT / ".mutation"
DOC = ROOT / "docs" / "mutation.md"
# mutmut's exit codes (mutmut.stats.status_by_exit_code) grouped into what the table reports
KILLED = {1, 3, 36, -24, 24, 152, 255, -11}  # test failure, pytest internal error, timeout, a crash (SIGSEGV)
SURVIVED = {0}
DATA_FOLDERS = ("configs",)
NO_TESTS = {5, 33}


def load_config() -> tuple[dict[str, str], list[dict]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    return data["tool"]["setuptools"]["package-dir"], data["tool"]["instsearch"]["mutation"]["modules"]


def import_path(module: str, package_dir: dict[str, str]) -> Path:
    """eval/metrics.py -> instsearch/eval/metrics.py (the path the module is imported from)."""
    top, _, rest = module.partition("/")
    for package, folder in package_dir.items():
        if folder == top:
            return Path(*package.split("."), rest)
    return Path(module)


def equivalent_mutants() -> dict[str, str]:
    found = {}
    if DOC.exists():
        for m in re.finditer(r"^- `([\w.ǁ]+__mutmut_\d+)`:?\s*(.*)$", DOC.read_text("utf-8"), re.M):
            found[m.group(1)] = m.group(2).strip()
    return found


def _sync(src: Path, dst: Path) -> None:
    """Copy a tree keeping mtimes (mutmut compares them to know which mutants are stale)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(src, dst, ignore=ignore, dirs_exist_ok=True, copy_function=shutil.copy2)


def sandbox_of(entry: dict) -> Path:
    return SANDBOXES / entry["module"].replace("/", "__").removesuffix(".py")


def build_sandbox(entry: dict, package_dir: dict[str, str]) -> tuple[Path, Path]:
    module = entry["module"]
    sandbox = sandbox_of(entry)
    sandbox.mkdir(parents=True, exist_ok=True)
    for package, folder in sorted(package_dir.items()):
        _sync(ROOT / folder, sandbox / Path(*package.split(".")))
    if (sandbox / "tests").exists():
        shutil.rmtree(sandbox / "tests")
    _sync(ROOT / "tests", sandbox / "tests")
    for folder in DATA_FOLDERS:  # read by some tests (ROOT / "configs"), copied beside tests/
        if (ROOT / folder).is_dir():
            _sync(ROOT / folder, sandbox / folder)
    target = import_path(module, package_dir)
    pytest_opts = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["pytest"]["ini_options"]
    lines = [
        "[tool.mutmut]",
        'source_paths = ["instsearch"]',
        f"only_mutate = [{json.dumps(str(target))}]",
        f"pytest_add_cli_args_test_selection = {json.dumps(entry['tests'])}",
        f"also_copy = {json.dumps(list(DATA_FOLDERS))}",
        # "deselect": integration tests whose cost would dominate every mutant's run (the unit
        # tests of the module cover the same functions)
        f"pytest_add_cli_args = {json.dumps(['-p', 'no:cacheprovider', '-p', 'no:xdist'] + [a for d in entry.get('deselect', []) for a in ('--deselect', d)])}",
        f"timeout_multiplier = {float(entry.get('timeout_multiplier', 5.0))}",
        "use_git_change_detection = false",
        "",
        "[tool.pytest.ini_options]",
    ]
    for key, value in pytest_opts.items():
        lines.append(f"{key} = {json.dumps(value)}")
    (sandbox / "pyproject.toml").write_text("\n".join(lines) + "\n", "utf-8")
    return sandbox, target


def tally(sandbox: Path, target: Path, equivalent: dict[str, str]) -> dict:
    meta = sandbox / "mutants" / (str(target) + ".meta")
    codes = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
    row = dict(mutants=len(codes), killed=0, equivalent=0, survived=0, no_tests=0, other=0, not_checked=0,
               survivors=[])
    for name, code in sorted(codes.items()):
        if code is None:  # an interrupted run: not part of the rate
            row["not_checked"] += 1
        elif name in equivalent:
            row["equivalent"] += 1
        elif code in KILLED:
            row["killed"] += 1
        elif code in SURVIVED:
            row["survived"] += 1
            row["survivors"].append(name)
        elif code in NO_TESTS:
            row["no_tests"] += 1
            row["survivors"].append(name)
        else:  # not run, segfault, suspicious
            row["other"] += 1
            row["survivors"].append(f"{name} (exit {code})")
    judged = row["mutants"] - row["not_checked"] - row["equivalent"]
    row["kill_rate"] = row["killed"] / judged if judged else 1.0
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="only this module (repeatable), e.g. eval/metrics.py")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--report-only", action="store_true", help="tabulate the last run, run nothing")
    parser.add_argument("--fresh", action="store_true",
                        help="drop the sandbox and mutmut's cached results first (mutmut keeps a survivor's "
                             "verdict across runs, so new tests need a fresh run to count)")
    parser.add_argument("--show-survivors", action="store_true")
    args = parser.parse_args(argv)

    package_dir, modules = load_config()
    if args.module:
        unknown = set(args.module) - {m["module"] for m in modules}
        if unknown:
            parser.error(f"not in [tool.instsearch.mutation] modules: {sorted(unknown)}")
        modules = [m for m in modules if m["module"] in args.module]
    equivalent = equivalent_mutants()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    rows = []
    for entry in modules:
        if args.fresh and not args.report_only:
            shutil.rmtree(sandbox_of(entry), ignore_errors=True)
        sandbox, target = build_sandbox(entry, package_dir)
        wall = None
        if not args.report_only:
            print(f"== {entry['module']}: mutmut over {' '.join(entry['tests'])}", flush=True)
            start = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)],
                                  cwd=sandbox, env=env)
            wall = time.monotonic() - start
            if proc.returncode != 0:
                print(f"mutmut failed on {entry['module']} (exit {proc.returncode})", file=sys.stderr)
                return proc.returncode
        row = tally(sandbox, target, equivalent)
        row.update(module=entry["module"], wall=wall)
        rows.append(row)
        if args.show_survivors or not args.report_only:
            for name in row["survivors"]:
                print(f"   survived: {name}   (python -m mutmut show {name}, in {sandbox.relative_to(ROOT)})")

    print()
    header = (f"{'module':34} {'mutants':>7} {'killed':>6} {'equiv':>5} {'surv':>4} {'no-test':>7} {'unrun':>5} "
              f"{'kill rate':>9} {'wall':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        wall = f"{r['wall']:.0f}s" if r["wall"] is not None else "-"
        print(f"{r['module']:34} {r['mutants']:7} {r['killed']:6} {r['equivalent']:5} {r['survived']:4} "
              f"{r['no_tests']:7} {r['not_checked']:5} {r['kill_rate']:9.1%} {wall:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
