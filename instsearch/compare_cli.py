"""``instsearch compare``: several methods on several benchmarks under one protocol, resumable.

    instsearch compare --config configs/compare/NAME.yaml [--out DIR]

The comparison file lists the benchmarks, the methods (a LightningCLI config, optionally a
checkpoint and overrides) and the baseline::

    out: runs/compare/synthetic
    baseline: gem
    bootstrap: {resamples: 10000, seed: 0, confidence: 0.95}
    benchmarks:
      - {name: tiny, benchmark: data/synthetic/benchmark.json, synthetic: {preset: tiny, seed: 0},
         normalization: relevant, protocol: standard}   # imposed on every method
    methods:
      - {name: deep_region_cnn, config: configs/deep_region_cnn_synthetic.yaml, train: true,
         overrides: {model.init_args.retrieval.regions_per_image: 3}}

A method with ``train: true`` and no checkpoint is first fitted with its config (``instsearch
fit``; the checkpoint is kept under ``DIR/checkpoints/``, or the file's ``checkpoints:`` folder
shared by several comparisons, by the hash of the config and overrides, and a killed training
resumes). Variants are methods too::

      - {name: conv4_only, config: configs/fcis_xd_small.yaml, ckpt_path: {checkpoint_of: fcis_xd},
         overrides: {model.init_args.net.init_args.feature_layers: [conv4]}}
      - {name: claid, config: configs/claid_synthetic.yaml,
         overrides: {model.init_args.net.init_args.patch_weights: {checkpoint_of: stand_in}}}
      - {name: udq, config: configs/udq_synthetic.yaml, train: true, seeds: [0, 1, 2],
         seed_options: [model.init_args.seed]}     # udq@seed0, udq@seed1, udq@seed2
      - {name: drcnn_oxford, config: ..., train: true, benchmarks: [oxford5k]}   # runs there only

``{checkpoint_of: METHOD}`` is that method's checkpoint (trained first when it trains); a method
with ``seeds`` runs once per seed with ``seed_everything`` and every ``seed_options`` option set to
it, and its family's mean ± sample standard deviation over seeds goes to ``seeds.csv`` and the
reports; a family as the ``baseline`` compares each seed's row with the baseline's row of that seed. ``columns:`` adds method-specific figures to the rows: ``{name, key, from: fit}`` (the
last value logged under ``key`` in the training log of the row's checkpoint; ``every_epoch: true``
one column per epoch), ``from: costs`` (``costs.json``, e.g. ``network.cuts/img``), ``from:
metrics`` (``metrics.json``) or ``from: validate`` (``instsearch validate`` of the cell, run once). ``--only NAME ...`` runs some methods (with the baseline and the
methods whose checkpoints they use). Every cell (method x benchmark) is ``instsearch test`` of
that config, checkpoint and overrides
on that benchmark, run in this process, so its numbers are exactly the command's. A cell's
``metrics.json`` and ``run.json`` are kept under ``DIR/cells/<key>/`` where the key hashes
everything that decides them (the composed config, the overrides, the checkpoint's and the
benchmark's SHA-256); a rerun reuses every finished cell (one killed midway is redone), and a
changed option makes a new key. A cell that fails is a failed row with its error; the rest goes
on. Missing configs, checkpoints and benchmarks are named before any cell runs.

Written to ``DIR``: ``results.csv`` (one row per cell: mAP@k, mIoU, recall@IoU, regions per
image, seconds, the paired difference in mAP@all to the baseline with its bootstrap interval over
queries -- a re-ranked row also against its own plain search --, provenance, search ms/query
and index bytes/image from the cell's ``costs.json``, the ``columns:``),
``per_query.csv`` (AP of every query in every cell), ``cost_<benchmark>.png`` (mAP@all against
cost, the Pareto front joined), ``size_<group>.png`` (mAP@all against database size for the
benchmarks of one ``group:``, e.g. a collection at +0 and +N distractors), ``report.md`` (a protocol card per benchmark, then its table) and
``report.html`` (the same with the plots and a gallery of the queries where the methods disagree
most; self-contained: open it from disk).
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

PROG = "instsearch compare"
#: bumped when a cell's outputs change, so that cells of an older instsearch are redone
CELL_FORMAT = "instsearch-compare-cell/4"
#: the same for trained checkpoints (what training does, not what a cell writes)
TRAIN_FORMAT = "instsearch-compare-train/1"
KS: tuple[Optional[int], ...] = (10, 20, 50, 100, None)


# ------------------------------------------------------------------------------ the comparison file
@dataclass
class CheckpointOf:
    """``{checkpoint_of: NAME}`` in a method's ``ckpt_path`` or in an override's value: the
    checkpoint of method NAME (its own ``ckpt_path``, or the one this comparison trains for it).
    Lets a variant test another method's trained weights with other options, and a method use them
    as its backbone's weights. ``path`` is set once that checkpoint exists."""
    name: str
    path: Optional[Path] = None


@dataclass
class MethodSpec:
    name: str
    config: Path
    ckpt_path: Union[Path, CheckpointOf, None] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    #: fit the config first when no checkpoint is given (the checkpoint is cached)
    train: bool = False
    #: a method listed with ``seeds:`` runs once per seed, as ``NAME@seedS`` of family NAME
    family: Optional[str] = None
    seed: Optional[int] = None
    #: the training log of the checkpoint (a CSV logger's folder: one ``version_N/metrics.csv`` per
    #: attempt of a resumed training), once known: ``from: fit`` columns
    training_log: Optional[Path] = None
    #: the benchmarks the method runs on (default: all), e.g. a detector fine-tuned on one of them
    benchmarks: Optional[list[str]] = None

    def references(self) -> list[CheckpointOf]:
        refs = [v for v in self.overrides.values() if isinstance(v, CheckpointOf)]
        return ([self.ckpt_path] if isinstance(self.ckpt_path, CheckpointOf) else []) + refs

    @property
    def checkpoint(self) -> Optional[Path]:
        """The checkpoint file tested (``None``: the config's own initialisation)."""
        return self.ckpt_path.path if isinstance(self.ckpt_path, CheckpointOf) else self.ckpt_path

    def command_overrides(self) -> dict[str, Any]:
        """The overrides as given to the command line (a checkpoint reference as its path)."""
        return {k: str(v.path) if isinstance(v, CheckpointOf) else v for k, v in self.overrides.items()}

    def hashed_overrides(self) -> dict[str, Any]:
        """The overrides as hashed into keys: a referenced checkpoint, and a value naming an
        existing file (a weights file), by its content as well, so that a file rewritten in place
        makes new keys."""
        def hashed(value: Any) -> Any:
            if isinstance(value, CheckpointOf):
                return {"checkpoint_sha256": _sha256(value.path)}
            if isinstance(value, str) and len(value) < 4096 and Path(value).is_file():
                return {"file": value, "sha256": _sha256(Path(value))}
            return value

        return {k: hashed(v) for k, v in self.overrides.items()}


@dataclass
class ExtraColumn:
    """A method-specific figure as a results column (``columns:`` of the comparison file).

    ``from``: ``fit`` -- the value logged under ``key`` in the training log of the cell's
    checkpoint (its last value, or one column per epoch with ``every_epoch``; logged under the
    method config's own protocol); ``costs`` -- the cell's ``costs.json`` (``network.KEY``: the
    network's own figures, e.g. CLAID's ``cuts/img``); ``metrics`` -- the cell's ``metrics.json``;
    ``validate`` -- ``instsearch validate`` of the cell's config, checkpoint and overrides, run once
    per cell when a column asks for it (e.g. a detector's ``val/box_AP@0.5`` before and after
    training). A cell without the figure leaves the column empty."""
    name: str
    key: str
    source: str = "fit"
    every_epoch: bool = False

    SOURCES = ("fit", "costs", "metrics", "validate")


@dataclass
class BenchmarkSpec:
    name: str
    path: Path
    #: ``{preset, seed}``: generate the synthetic benchmark there when it is missing
    synthetic: Optional[dict[str, Any]] = None
    #: the benchmark's AP convention, imposed on every method (one protocol per table)
    normalization: str = "relevant"
    protocol: str = "standard"
    #: benchmarks of one group are one collection at several sizes (+0 / +N distractors): their
    #: mAP is plotted against the database size
    group: Optional[str] = None

    @property
    def protocol_overrides(self) -> dict[str, str]:
        return {"model.init_args.retrieval.normalization": self.normalization,
                "model.init_args.retrieval.protocol": self.protocol}


@dataclass
class ComparisonSpec:
    methods: list[MethodSpec]
    benchmarks: list[BenchmarkSpec]
    baseline: Optional[str]
    out: Path
    resamples: int = 10_000
    seed: int = 0
    confidence: float = 0.95
    source: Optional[Path] = None
    #: queries shown in report.html's gallery
    gallery_queries: int = 30
    #: ``{project, name}``: log the table and the plots to wandb (offline without credentials)
    wandb: Optional[dict[str, Any]] = None
    #: re-rankers applied to every cell's shortlist (``{type, name?, ...parameters}``)
    rerankers: list[dict[str, Any]] = field(default_factory=list)
    #: images per query the re-rankers reorder
    shortlist: int = 100
    #: method-specific figures as extra columns of the plain-search rows
    columns: list[ExtraColumn] = field(default_factory=list)
    #: where trained checkpoints are cached (default ``out/checkpoints``); comparisons that train
    #: the same config with the same overrides can share one folder (the key is the content's hash)
    checkpoints: Optional[Path] = None

    @property
    def checkpoint_folder(self) -> Path:
        return self.checkpoints or self.out / "checkpoints"

    def only(self, names: Sequence[str]) -> None:
        """Keep the named methods (a family by its name), the baseline and every method whose
        checkpoint they use; raises ValueError naming an unknown one."""
        unknown = [n for n in names if not any(m.name == n or m.family == n for m in self.methods)]
        if unknown:
            raise ValueError(f"{self.source}: --only {unknown}: not methods of this comparison "
                             f"({sorted(dict.fromkeys(m.family or m.name for m in self.methods))})")
        keep = {m.name for m in self.methods if m.name in names or m.family in names
                or self.baseline in (m.name, m.family)}
        by_name = {m.name: m for m in self.methods}
        todo = list(keep)
        while todo:
            m = by_name[todo.pop()]
            for ref in m.references():
                target = _referenced(self.methods, m, ref.name)
                if target.name not in keep:
                    keep.add(target.name)
                    todo.append(target.name)
        self.methods = [m for m in self.methods if m.name in keep]

    @classmethod
    def load(cls, path: str | Path, out: Optional[str | Path] = None, check_inputs: bool = True) -> "ComparisonSpec":
        """Read and check a comparison file; every problem is named with the file (ValueError /
        FileNotFoundError), before anything runs. ``check_inputs=False`` reads it on a machine
        without its data (the files it names are not looked for)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"comparison file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        where = str(path)
        if not isinstance(data, dict) or not data.get("methods") or not data.get("benchmarks"):
            raise ValueError(f"{where}: a comparison lists 'methods' and 'benchmarks' (see instsearch compare --help)")
        methods = []
        for i, m in _named_entries(data, "methods", "config", where):
            methods += _method_specs(i, m, where)
        twice = sorted({m.name for m in methods if sum(n.name == m.name for n in methods) > 1})
        if twice:
            raise ValueError(f"{where}: method names {twice} appear twice (with a family's seeds)")
        _check_references(methods, where)
        benchmarks = []
        for i, b in _named_entries(data, "benchmarks", "benchmark", where, " (path of benchmark.json)"):
            from instsearch.eval.metrics import NORMALIZATIONS, PROTOCOLS

            bench = BenchmarkSpec(str(b["name"]), Path(b["benchmark"]), b.get("synthetic"),
                                  str(b.get("normalization", "relevant")), str(b.get("protocol", "standard")),
                                  b.get("group"))
            if bench.normalization not in NORMALIZATIONS or bench.protocol not in PROTOCOLS:
                raise ValueError(f"{where}: benchmarks[{i}]: normalization must be one of {NORMALIZATIONS} and "
                                 f"protocol one of {PROTOCOLS}")
            benchmarks.append(bench)
        names = {b.name for b in benchmarks}
        for m in methods:
            unknown = sorted(set(m.benchmarks or ()) - names)
            if unknown:
                raise ValueError(f"{where}: method {m.name}: benchmarks {unknown} are not benchmarks of this file")
        baseline = data.get("baseline")
        if baseline is not None and baseline not in {m.name for m in methods} | {m.family for m in methods}:
            raise ValueError(f"{where}: baseline {baseline!r} is not one of the methods (or a family run with "
                             f"seeds: each seed's row is then compared with the baseline's row of that seed)")
        boot = data.get("bootstrap") or {}
        spec = cls(methods, benchmarks, baseline, Path(out or data.get("out") or "runs/compare"),
                   int(boot.get("resamples", 10_000)), int(boot.get("seed", 0)), float(boot.get("confidence", 0.95)),
                   path, int(data.get("gallery_queries", 30)), data.get("wandb"),
                   list(data.get("rerankers") or []), int(data.get("shortlist", 100)),
                   _extra_columns(data.get("columns") or [], where),
                   Path(data["checkpoints"]) if data.get("checkpoints") else None)
        from instsearch.eval.rerank import build_reranker

        names = set()
        for i, r in enumerate(spec.rerankers):
            try:
                built = build_reranker(r)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: rerankers[{i}]: {e}") from e
            if built.name in names or built.name == "none":
                raise ValueError(f"{where}: rerankers[{i}]: name {built.name!r} is taken (give each a name)")
            names.add(built.name)
        if check_inputs:
            spec.check_inputs()
        return spec

    def check_inputs(self) -> None:
        missing = [f"method {m.name}: config {m.config}" for m in self.methods if not m.config.is_file()]
        missing += [f"method {m.name}: checkpoint {m.ckpt_path}" for m in self.methods
                    if isinstance(m.ckpt_path, Path) and not m.ckpt_path.is_file()]
        missing += [f"benchmark {b.name}: {b.path}" for b in self.benchmarks
                    if not b.path.is_file() and b.synthetic is None]
        if missing:
            raise FileNotFoundError(f"{self.source}: missing before any work could start: " + "; ".join(missing))


def _method_specs(i: int, entry: dict, where: str) -> list[MethodSpec]:
    """One entry of ``methods:``; with ``seeds: [S, ...]`` one method ``NAME@seedS`` per seed, each
    with ``seed_everything`` and every option of ``seed_options`` (e.g. a module's own ``seed``) set
    to S."""
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: methods[{i}].overrides is a mapping of option: value")
    overrides = {k: _checkpoint_ref(v, f"{where}: methods[{i}].overrides.{k}") for k, v in overrides.items()}
    ckpt = entry.get("ckpt_path")
    ckpt = _checkpoint_ref(ckpt, f"{where}: methods[{i}].ckpt_path") if isinstance(ckpt, dict) else \
        Path(ckpt) if ckpt else None
    only_on = entry.get("benchmarks")
    if only_on is not None and (not isinstance(only_on, list) or not all(isinstance(b, str) for b in only_on)):
        raise ValueError(f"{where}: methods[{i}].benchmarks is a list of benchmark names")
    base = MethodSpec(str(entry["name"]), Path(entry["config"]), ckpt, overrides, bool(entry.get("train", False)),
                      benchmarks=only_on)
    if "seeds" not in entry:
        if entry.get("seed_options"):
            raise ValueError(f"{where}: methods[{i}].seed_options needs seeds")
        return [base]
    seeds, options = entry["seeds"], entry.get("seed_options") or []
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) for x in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ValueError(f"{where}: methods[{i}].seeds is a list of distinct integers")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: methods[{i}].seed_options is a list of option names")
    return [MethodSpec(f"{base.name}@seed{seed}", base.config, base.ckpt_path and _copy_ref(base.ckpt_path),
                       {**{k: _copy_ref(v) for k, v in base.overrides.items()}, "seed_everything": seed,
                        **{o: seed for o in options}}, base.train, family=base.name, seed=seed,
                       benchmarks=base.benchmarks)
            for seed in seeds]


def _checkpoint_ref(value: Any, where: str) -> Any:
    if isinstance(value, dict) and "checkpoint_of" in value:
        if set(value) != {"checkpoint_of"}:
            raise ValueError(f"{where}: a checkpoint reference is {{checkpoint_of: METHOD}} alone")
        return CheckpointOf(str(value["checkpoint_of"]))
    if isinstance(value, dict) and where.endswith("ckpt_path"):
        raise ValueError(f"{where}: a path or {{checkpoint_of: METHOD}}")
    return value


def _copy_ref(value: Any) -> Any:
    return CheckpointOf(value.name) if isinstance(value, CheckpointOf) else value


def _check_references(methods: list[MethodSpec], where: str) -> None:
    """Every ``checkpoint_of`` names a method with a checkpoint (given or trained), without a
    cycle; a method run with seeds may name a family run with the same seed."""
    for m in methods:
        for ref in m.references():
            target = _referenced(methods, m, ref.name)
            if target is None:
                raise ValueError(f"{where}: method {m.name}: checkpoint_of {ref.name!r} is not a method (a method "
                                 f"run with seeds is named NAME@seedS; a seeded method may name a family of the "
                                 f"same seeds)")
            if target.ckpt_path is None and not target.train:
                raise ValueError(f"{where}: method {m.name}: checkpoint_of {ref.name!r}, which has no checkpoint "
                                 f"(give it a ckpt_path or train: true)")
    for m in methods:  # a cycle would train forever
        seen, todo = set(), [m]
        while todo:
            current = todo.pop()
            for ref in current.references():
                target = _referenced(methods, current, ref.name)
                if target is m:
                    raise ValueError(f"{where}: method {m.name}: its checkpoint references lead back to it")
                if target.name not in seen:
                    seen.add(target.name)
                    todo.append(target)


def _referenced(methods: Sequence[MethodSpec], by: MethodSpec, name: str) -> Optional[MethodSpec]:
    found = {m.name: m for m in methods}
    if name in found:
        return found[name]
    return found.get(f"{name}@seed{by.seed}") if by.seed is not None else None


#: the columns every row has (an extra column may not replace one)
RESERVED_COLUMNS = frozenset({
    "benchmark", "method", "reranker", "status", "family", "seed", "error", "shortlist", "vs_baseline",
    "delta_mAP@all", "ci_low", "ci_high", "ci_excludes_0", "vs_plain_delta_mAP@all", "vs_plain_ci_low",
    "vs_plain_ci_high", "vs_plain_ci_excludes_0", "mAP@10", "mAP@20", "mAP@50", "mAP@100", "mAP@all", "mIoU",
    "recall@IoU0.5", "recall@IoU0.7", "regions_per_image", "test_seconds", "extraction_items_per_s",
    "search_ms_per_query", "index_bytes_per_image", "commit", "dirty", "config", "cell_key",
    "checkpoint_sha256", "benchmark_sha256", "device", "torch", "faiss"})


def _extra_columns(entries: list, where: str) -> list[ExtraColumn]:
    columns = []
    for i, c in enumerate(entries):
        if not isinstance(c, dict) or "name" not in c or "key" not in c:
            raise ValueError(f"{where}: columns[{i}] needs a name and a key")
        column = ExtraColumn(str(c["name"]), str(c["key"]), str(c.get("from", "fit")), bool(c.get("every_epoch")))
        if column.name in RESERVED_COLUMNS:
            raise ValueError(f"{where}: columns[{i}]: {column.name!r} is a column of every row; name it otherwise")
        if column.source not in ExtraColumn.SOURCES:
            raise ValueError(f"{where}: columns[{i}].from is one of {ExtraColumn.SOURCES}")
        if column.every_epoch and column.source != "fit":
            raise ValueError(f"{where}: columns[{i}]: every_epoch reads a training log (from: fit)")
        columns.append(column)
    return columns


def _named_entries(data: dict, key: str, required: str, where: str, hint: str = ""):
    """``(i, entry)`` of the file's list ``key``, each a mapping with a unique ``name`` and ``required``."""
    seen = set()
    for i, entry in enumerate(data[key]):
        if not isinstance(entry, dict) or "name" not in entry or required not in entry:
            raise ValueError(f"{where}: {key}[{i}] needs a name and a {required}{hint}")
        if entry["name"] in seen:
            raise ValueError(f"{where}: {key[:-1]} name {entry['name']!r} appears twice")
        seen.add(entry["name"])
        yield i, entry


# ------------------------------------------------------------------------------ cells
def _sha256(path: Optional[Path]) -> Optional[str]:
    """A file's SHA-256, computed once per (path, size, modification time)."""
    if path is None:
        return None
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from instsearch.eval.shards import file_sha256

    return file_sha256(path)


def cell_key(method: MethodSpec, benchmark: BenchmarkSpec, benchmark_sha256: str) -> str:
    """What decides a cell's numbers, hashed: the composed config, overrides, checkpoint, benchmark
    and its protocol."""
    from instsearch.config_files import load_config
    from instsearch.eval.shards import config_sha256

    return config_sha256({"format": CELL_FORMAT, "config": load_config(method.config),
                          "overrides": method.hashed_overrides(), "checkpoint": _sha256(method.checkpoint),
                          "benchmark": benchmark_sha256, "protocol": benchmark.protocol_overrides})[:16]


def _override_args(overrides: dict[str, Any]) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def train_key(method: MethodSpec) -> str:
    """What decides a trained checkpoint: the composed config and the overrides."""
    from instsearch.config_files import load_config
    from instsearch.eval.shards import config_sha256

    return config_sha256({"format": TRAIN_FORMAT, "train": load_config(method.config),
                          "overrides": method.hashed_overrides()})[:16]


def train(method: MethodSpec, folder: Path, say=print) -> Path:
    """``instsearch fit`` of the method's config and overrides into ``folder``; returns its
    ``last.ckpt``. A finished training is reused; one killed midway resumes from its last.ckpt."""
    last, done = folder / "last.ckpt", folder / "trained.json"
    if done.is_file() and last.is_file():
        say(f"[cached] training {method.name}")
        return last
    folder.mkdir(parents=True, exist_ok=True)
    callbacks = [{"class_path": "instsearch.checkpointing.LastCheckpoint", "init_args": {"dirpath": str(folder)}}]
    # a resumed training logs into a version of its own: the CSV logger empties an existing one
    attempt = len(list((folder / "fit").glob("version_*")))
    argv = ["fit", "--config", str(method.config), *_override_args(method.command_overrides()),
            "--trainer.logger", _csv_logger(folder, "fit", attempt), "--trainer.callbacks", json.dumps(callbacks),
            *(["--ckpt_path", str(last)] if last.is_file() else [])]
    say(f"[train] {method.name}" + (" (resuming)" if last.is_file() else ""))
    t0 = time.perf_counter()
    _lightning(argv)
    if not last.is_file():
        raise RuntimeError(f"instsearch fit wrote no {last}")
    done.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "argv": argv}, indent=1) + "\n")
    return last


def prepare_checkpoints(methods: Sequence[MethodSpec], folder: Path, say=print) -> dict[str, str]:
    """Train every ``train: true`` method without a checkpoint (under ``folder``, cached by
    :func:`train_key`) and resolve every ``checkpoint_of`` reference, a referenced method before the
    one that names it. Returns ``{method: why it cannot run}`` for the methods whose training (or a
    training they depend on) failed; the others run."""
    failed: dict[str, str] = {}
    done: set[str] = set()

    def prepare(m: MethodSpec) -> None:
        if m.name in done:
            return
        done.add(m.name)
        for ref in m.references():
            target = _referenced(methods, m, ref.name)
            prepare(target)
            if target.name in failed:
                failed[m.name] = f"checkpoint_of {target.name}: {failed[target.name]}"
                return
            ref.path = target.checkpoint
            if ref is m.ckpt_path:
                m.training_log = target.training_log
        if m.train and m.ckpt_path is None:
            try:
                run = folder / f"{m.config.stem}__{train_key(m)}"  # shared by every method of that training
                m.ckpt_path = train(m, run, say)
                m.training_log = run / "fit"
            except Exception as e:  # the method's cells are failed rows; the comparison goes on
                failed[m.name] = f"training: {type(e).__name__}: {e}"
                say(f"[failed] training {m.name}: {failed[m.name]}")

    for m in methods:
        prepare(m)
    return failed


def _csv_logger(save_dir: Path, name: str, version: int = 0) -> str:
    """A ``--trainer.logger`` value: one CSV logger writing to ``save_dir/name/version_N``."""
    return json.dumps([{"class_path": "pytorch_lightning.loggers.CSVLogger",
                        "init_args": {"save_dir": str(save_dir), "name": name, "version": int(version)}}])


def _lightning(argv: list[str]):
    """The LightningCLI run of ``argv`` (``fit`` / ``test`` ...); a rejected option (the parser
    exits) becomes an error naming the command line, so that the cell fails and the rest goes on."""
    from instsearch.lightning_cli import lightning_cli

    try:
        return lightning_cli(argv)
    except SystemExit as e:
        raise RuntimeError(f"instsearch {argv[0]} rejected the options (exit {e.code}): {' '.join(argv)}") from e


def _cell_argv(command: str, method: MethodSpec, benchmark: BenchmarkSpec) -> list[str]:
    """``command`` (test / validate) of the method's config, checkpoint and overrides on the cell's
    benchmark. The benchmark and its protocol come after the method's overrides: they win over an
    override of the data's benchmark (which a fine-tuning on that collection may need for its fit)."""
    return [command, "--config", str(method.config),
            *(["--ckpt_path", str(method.checkpoint)] if method.checkpoint else []),
            *_override_args({**method.command_overrides(), "data.init_args.benchmark": str(benchmark.path),
                             **benchmark.protocol_overrides})]


def run_cell(method: MethodSpec, benchmark: BenchmarkSpec, folder: Path) -> dict[str, Any]:
    """``instsearch test`` of one cell, its outputs copied into ``folder`` (``cell.json`` last)."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="cell_", dir=folder.parent))
    argv = [*_cell_argv("test", method, benchmark), "--trainer.logger", _csv_logger(work, "test"),
            "--model.init_args.retrieval.grid_queries", "0"]
    t0 = time.perf_counter()
    cli = _lightning(argv)
    seconds = time.perf_counter() - t0
    found = sorted(work.rglob("metrics.json"))
    if not found:
        raise RuntimeError(f"instsearch test wrote no metrics.json under {work}")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "run.json", "costs.json"):
        if (found[0].parent / name).is_file():
            shutil.copyfile(found[0].parent / name, folder / name)
    shutil.rmtree(work, ignore_errors=True)
    reranking = save_rerank_inputs(getattr(cli.model, "_evaluator", None), folder / "features.npz")
    # the long side images are served at (at most); a network may resize them further itself
    max_side = getattr(cli.datamodule, "benchmark_max_side", None)
    return {"seconds": round(seconds, 2), "argv": argv, "rerankable": reranking, "served_max_side": max_side}


def validation_log(spec: "ComparisonSpec", method: MethodSpec, benchmark: BenchmarkSpec, folder: Path,
                   say=print) -> Optional[str]:
    """When a column reads ``from: validate``: ``instsearch validate`` of the cell's config,
    checkpoint and overrides, logged once into ``folder/validate`` (kept with the cell, so a
    column added later validates only then); the log's folder, or ``None``. A failing validation
    leaves those columns empty and says why; the cell stays."""
    if not any(c.source == "validate" for c in spec.columns):
        return None
    log = folder / "validate"
    if (log / "done").is_file():
        return str(log)
    say(f"[validate] {method.name} on {benchmark.name}")
    import shutil

    shutil.rmtree(log, ignore_errors=True)
    argv = [*_cell_argv("validate", method, benchmark), "--trainer.logger", _csv_logger(folder, "validate"),
            # no retrieval evaluation at the validation's end (the epoch is 0): the cell's test has it
            "--retrieval.every_n_epochs", "1000000"]
    try:
        _lightning(argv)
    except Exception as e:
        say(f"[failed] validate {method.name} on {benchmark.name}: {type(e).__name__}: {e}")
        return None
    (log / "done").write_text(json.dumps({"argv": argv}) + "\n")
    return str(log)


def save_rerank_inputs(evaluator, path: Path) -> Optional[str]:
    """The cell's region features and searched queries for re-ranking; ``None`` when saved, else
    why not (a method searched from codes alone keeps no features)."""
    import numpy as np

    from instsearch.eval.rerank import RerankInputs

    index = getattr(evaluator, "index", None)
    if index is None or evaluator.searched_queries is None:
        return "no index of the gathered search to re-rank (sharded evaluation)"
    store = index.store
    if len(store) and store.features.shape[1] == 0:
        return "the method searches codes alone: no region features to expand with"
    query_ids, queries = evaluator.searched_queries
    RerankInputs(list(store.image_ids), store.image_index, store.features, list(query_ids),
                 np.asarray(queries, np.float32)).save(path)
    return None


def provenance() -> dict[str, Any]:
    """Where the numbers come from: the code's commit (and whether it was modified), versions, device."""
    import faiss
    import numpy
    import pytorch_lightning
    import torch
    import torchvision

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {"commit": commit or "unknown", "dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": pytorch_lightning.__version__, "faiss": faiss.__version__, "numpy": numpy.__version__,
            "device": device}


# ------------------------------------------------------------------------------ the run
def compare(spec: ComparisonSpec, say=print) -> dict[str, Any]:
    """Run (or reuse) every cell, then write the tables. Returns ``{"rows": [...], "failed": n}``."""
    out = spec.out
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for b in spec.benchmarks:
        if not b.path.is_file():  # a synthetic benchmark, generated as instsearch test would
            from instsearch.synthetic import generate

            say(f"generating the synthetic benchmark {b.name} in {b.path.parent}")
            generate(b.path.parent, str(b.synthetic.get("preset", "tiny")), int(b.synthetic.get("seed", 0)))
            if not b.path.is_file():
                raise FileNotFoundError(f"benchmark {b.name}: generating the synthetic set wrote no {b.path}")
    bench_sha = {b.name: _sha256(b.path) for b in spec.benchmarks}
    prov = provenance()
    unusable = prepare_checkpoints(spec.methods, spec.checkpoint_folder, say)
    cells = []
    for b in spec.benchmarks:
        for m in spec.methods:
            if m.benchmarks is not None and b.name not in m.benchmarks:
                continue
            if m.name in unusable:
                cells.append({"format": CELL_FORMAT, "method": m.name, "benchmark": b.name, "key": "untrained",
                              "status": "failed", "error": unusable[m.name], "provenance": prov})
                continue
            key = cell_key(m, b, bench_sha[b.name])
            folder = out / "cells" / f"{m.name}__{b.name}__{key}"
            record = folder / "cell.json"
            if record.is_file() and json.loads(record.read_text()).get("status") == "ok":
                say(f"[cached] {m.name} on {b.name}")
                cached = json.loads(record.read_text())
                cached["training_log"] = str(m.training_log) if m.training_log else None  # where it is now
                cached["validation_log"] = validation_log(spec, m, b, folder, say)
                cells.append(cached)
                continue
            say(f"[run] {m.name} on {b.name}")
            cell = {"format": CELL_FORMAT, "method": m.name, "benchmark": b.name, "key": key,
                    "config": str(m.config), "config_key": key, "overrides": m.command_overrides(),
                    "family": m.family, "seed": m.seed,
                    "checkpoint": str(m.checkpoint) if m.checkpoint else None,
                    "checkpoint_sha256": _sha256(m.checkpoint), "benchmark_sha256": bench_sha[b.name],
                    "training_log": str(m.training_log) if m.training_log else None, "provenance": prov}
            try:
                cell.update(run_cell(m, b, folder))
                cell["status"] = "ok"
                cell["validation_log"] = validation_log(spec, m, b, folder, say)
            except Exception as e:  # a failed method is a failed row; the comparison goes on
                cell.update(status="failed", error=f"{type(e).__name__}: {e}",
                            traceback=traceback.format_exc(limit=5))
                say(f"[failed] {m.name} on {b.name}: {cell['error']}")
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / ".cell.json.tmp"
            tmp.write_text(json.dumps(cell, indent=1, default=str) + "\n")
            os.replace(tmp, record)
            cells.append(cell)
    return write_tables(spec, cells)


def write_tables(spec: ComparisonSpec, cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``results.csv``, ``per_query.csv``, the cost plots, ``report.md`` and ``report.html`` from the cells."""
    import numpy as np

    from instsearch.eval.metrics import per_query_average_precision, retrieval_metrics
    from instsearch.eval.rerank import RerankInputs, build_reranker, rerank_run
    from instsearch.eval.significance import paired_bootstrap
    from instsearch.formats import Benchmark, Run

    out = spec.out
    rows, per_query, cards = [], [], {}
    loaded: dict[str, Benchmark] = {}
    all_runs: dict[str, dict[str, Run]] = {}
    all_aps: dict[str, dict[str, np.ndarray]] = {}
    for b in spec.benchmarks:
        bench = loaded[b.name] = Benchmark.load(b.path)
        query_ids = [q.id for q in bench.queries]
        aps: dict[str, np.ndarray] = all_aps.setdefault(b.name, {})
        runs = all_runs.setdefault(b.name, {})
        mine = [c for c in cells if c["benchmark"] == b.name]
        for c in mine:
            if c.get("status") != "ok":
                continue
            folder = out / "cells" / f"{c['method']}__{b.name}__{c['key']}"
            metrics = json.loads((folder / "metrics.json").read_text())
            c["_metrics"] = metrics
            c["_costs"] = json.loads((folder / "costs.json").read_text()) if (folder / "costs.json").is_file() else {}
            run = runs[c["method"]] = Run.load(folder / "run.json", benchmark=bench)
            per = per_query_average_precision(bench, run, ks=KS, normalization=metrics["normalization"],
                                              protocol=metrics["protocol"])
            aps[c["method"]] = np.array([per[q][-1] for q in query_ids])
            per_query += _per_query_rows(b.name, c["method"], "none", query_ids, per)
        cards[b.name] = protocol_card(b, bench, mine)
        def baseline_of(cell: dict[str, Any]) -> Optional[str]:
            """The row a cell is compared with: the baseline method, or, when the baseline is a
            family run with seeds, its row of the cell's seed (paired by seed and by query)."""
            if spec.baseline in aps:
                return spec.baseline
            seeded = f"{spec.baseline}@seed{cell.get('seed')}"
            return seeded if cell.get("seed") is not None and seeded in aps else None

        def delta(ap: np.ndarray, reference: np.ndarray, prefix: str = "") -> dict[str, Any]:
            diff = paired_bootstrap(ap, reference, spec.resamples, spec.seed, spec.confidence)
            return {f"{prefix}delta_mAP@all": round(diff.mean, 6), f"{prefix}ci_low": round(diff.low, 6),
                    f"{prefix}ci_high": round(diff.high, 6), f"{prefix}ci_excludes_0": diff.excludes_zero}

        for c in mine:
            row = {"benchmark": b.name, "method": c["method"], "reranker": "none", "status": c.get("status"),
                   "family": c.get("family"), "seed": c.get("seed")}
            if c.get("status") == "ok":
                row.update(_metric_columns(c["_metrics"], c.get("_costs") or {}, c.get("seconds")))
                row.update(extra_columns(spec.columns, c))
                ref = baseline_of(c)
                if ref is not None and ref != c["method"]:
                    row.update(vs_baseline=ref, **delta(aps[c["method"]], aps[ref]))
            else:
                row["error"] = c.get("error")
            rows.append({**row, **_provenance_columns(c)})
            if c.get("status") != "ok":
                continue
            folder = out / "cells" / f"{c['method']}__{b.name}__{c['key']}"
            for r_spec in spec.rerankers:
                reranker = build_reranker(r_spec)
                row = {"benchmark": b.name, "method": c["method"], "reranker": reranker.name,
                       "family": c.get("family"), "seed": c.get("seed")}
                if not (folder / "features.npz").is_file():  # not applicable to this method, not a failure
                    row.update(status="n/a", error=f"re-ranking: {c.get('rerankable') or 'no features.npz'}")
                    rows.append({**row, **_provenance_columns(c)})
                    continue
                m = c["_metrics"]
                run = rerank_run(runs[c["method"]], RerankInputs.load(folder / "features.npz"), reranker,
                                 spec.shortlist)
                metrics = retrieval_metrics(bench, run, normalization=m["normalization"], protocol=m["protocol"])
                per = per_query_average_precision(bench, run, ks=KS, normalization=m["normalization"],
                                                  protocol=m["protocol"])
                per_query += _per_query_rows(b.name, c["method"], reranker.name, query_ids, per)
                row.update(status="ok", **_metric_columns({**m, **metrics}, {}, None), shortlist=spec.shortlist)
                reranked = np.array([per[q][-1] for q in query_ids])
                ref = baseline_of(c)
                if ref is not None:
                    row.update(vs_baseline=ref, **delta(reranked, aps[ref]))
                # the re-ranker's own effect: against the plain search of the same cell
                row.update(delta(reranked, aps[c["method"]], "vs_plain_"))
                rows.append({**row, **_provenance_columns(c)})
    _write_csv(out / "results.csv", rows)
    seeds = seed_summary(rows, spec.columns)
    if seeds:
        _write_csv(out / "seeds.csv", seeds)
    plots = {b.name: plot_costs([r for r in rows if r["benchmark"] == b.name and r["status"] == "ok"
                                 and r["reranker"] == "none"],
                                out / f"cost_{b.name}.png", b.name) for b in spec.benchmarks}
    _write_csv(out / "per_query.csv", per_query)
    for group in sorted({b.group for b in spec.benchmarks if b.group}):
        members = [b for b in spec.benchmarks if b.group == group]
        if len(members) > 1:
            sizes = {b.name: cards[b.name]["database images"] + cards[b.name]["distractor images"] for b in members}
            plots[f"group:{group}"] = plot_database_size(rows, sizes, out / f"size_{group}.png", group)
    (out / "report.md").write_text(report_markdown(spec, rows, cards, plots, seeds), encoding="utf-8")
    from instsearch.eval.report_html import comparison_html

    first = rows[0] if rows else {}
    prov = (f"commit {first.get('commit')}{' (modified)' if first.get('dirty') else ''}, {first.get('device')}, "
            f"torch {first.get('torch')}, faiss {first.get('faiss')}")
    page = comparison_html(f"Comparison: {spec.source}", loaded, cards, rows, all_runs, all_aps, plots,
                           provenance=prov, queries=spec.gallery_queries, extra_columns=_extra_names(rows, spec.columns),
                           seeds=seeds)
    (out / "report.html").write_text(page, encoding="utf-8")
    if spec.wandb is not None:
        log_to_wandb(spec, rows, plots)
    return {"rows": rows, "failed": sum(r["status"] == "failed" for r in rows)}


def log_to_wandb(spec: ComparisonSpec, rows: Sequence[dict[str, Any]], plots: dict[str, Optional[Path]]) -> str:
    """The results as a wandb Table and the cost plots as images, in a run of their own (online
    with credentials, else offline under ``DIR/wandb``: ``wandb sync`` uploads it). Returns the
    run's folder."""
    import wandb

    from instsearch.loggers import wandb_credentials_available

    offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_available()
    run = wandb.init(project=str(spec.wandb.get("project", "instsearch")), name=spec.wandb.get("name"),
                     dir=str(spec.out), mode="offline" if offline else "online", job_type="compare",
                     config={"comparison": str(spec.source), "baseline": spec.baseline})
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    table = wandb.Table(columns=columns, data=[[None if r.get(c) is None else str(r.get(c)) if isinstance(
        r.get(c), (dict, list)) else r.get(c) for c in columns] for r in rows])
    run.log({"comparison/results": table,
             **{f"comparison/cost_{name}": wandb.Image(str(path)) for name, path in plots.items() if path}})
    folder = str(run.dir)
    run.finish()
    return folder


def extra_columns(columns: Sequence[ExtraColumn], cell: dict[str, Any]) -> dict[str, Optional[float]]:
    """The ``columns:`` figures of one cell (``None`` where the cell has no such figure)."""
    values: dict[str, Optional[float]] = {}
    log, validated = cell.get("training_log"), cell.get("validation_log")
    logged = _read_training_log(Path(log)) if log and Path(log).exists() else []
    validation = _read_training_log(Path(validated)) if validated and Path(validated).exists() else []
    for column in columns:
        if column.source in ("fit", "validate"):
            series = [(r.get("epoch"), r[column.key]) for r in (logged if column.source == "fit" else validation)
                      if r.get(column.key) not in (None, "")]
            if column.every_epoch:
                per_epoch = {int(float(e)): v for e, v in series if e not in (None, "")}
                values.update({f"{column.name} e{e + 1}": _num(v) for e, v in sorted(per_epoch.items())})
            else:
                values[column.name] = _num(series[-1][1]) if series else None
        else:
            values[column.name] = _num(_lookup(cell.get("_costs" if column.source == "costs" else "_metrics") or {},
                                               column.key))
    return values


def _read_training_log(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV log, or of every attempt's ``version_N/metrics.csv`` under a logger's
    folder in attempt order (a resumed training's later rows come last)."""
    files = [path] if path.is_file() else sorted(
        path.glob("version_*/metrics.csv"), key=lambda f: int(f.parent.name.split("_")[-1]))
    rows: list[dict[str, str]] = []
    for file in files:
        with open(file, newline="", encoding="utf-8") as f:
            rows += list(csv.DictReader(f))
    return rows


def _lookup(data: dict[str, Any], key: str) -> Any:
    """``data[key]``, or a nested value by a dotted key (``network.cuts/img``)."""
    if key in data:
        return data[key]
    head, _, rest = key.partition(".")
    return _lookup(data[head], rest) if rest and isinstance(data.get(head), dict) else None


def _extra_names(rows: Sequence[dict[str, Any]], columns: Sequence[ExtraColumn]) -> list[str]:
    """The ``columns:`` names as they appear in the rows (a per-epoch column as one per epoch)."""
    names: list[str] = []
    for column in columns:
        found = [k for r in rows for k in r if k == column.name or (column.every_epoch and k.startswith(
            f"{column.name} e") and k[len(column.name) + 2:].isdigit())]
        names += [k for k in dict.fromkeys(found) if k not in names]
    return names


SEED_METRICS = ("mAP@10", "mAP@100", "mAP@all", "mIoU", "regions_per_image", "delta_mAP@all")


def seed_summary(rows: Sequence[dict[str, Any]], columns: Sequence[ExtraColumn] = ()) -> list[dict[str, Any]]:
    """Per benchmark, family run with seeds and re-ranker: the mean and sample standard deviation
    over its seeds of each metric and extra column (``seeds.csv``) -- the noise band a gain has to
    clear."""
    import numpy as np

    families: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("family") and r.get("status") == "ok":
            families.setdefault((r["benchmark"], r["family"], r["reranker"]), []).append(r)
    extra = _extra_names(rows, columns)
    out = []
    for (bench, family, reranker), members in families.items():
        row = {"benchmark": bench, "family": family, "reranker": reranker,
               "seeds": " ".join(str(m["seed"]) for m in members), "n": len(members)}
        for key in (*SEED_METRICS, *extra):
            values = [float(m[key]) for m in members if m.get(key) is not None]
            if values:
                row[f"{key} mean"] = round(float(np.mean(values)), 6)
                row[f"{key} std"] = round(float(np.std(values, ddof=1)), 6) if len(values) > 1 else None
        out.append(row)
    return out


def _per_query_rows(benchmark: str, method: str, reranker: str, query_ids: Sequence[str],
                    per: dict) -> list[dict[str, Any]]:
    from instsearch.eval.metrics import metric_key

    return [{"benchmark": benchmark, "method": method, "reranker": reranker, "query": q,
             **{metric_key(k).replace("mAP", "AP"): round(float(v), 6) for k, v in zip(KS, per[q])}}
            for q in query_ids]


def _metric_columns(metrics: dict[str, Any], costs: dict[str, Any], seconds: Optional[float]) -> dict[str, Any]:
    from instsearch.eval.metrics import metric_key

    return {**{metric_key(k): _num(metrics.get(metric_key(k))) for k in KS},
            "mIoU": _num(metrics.get("mIoU")), "recall@IoU0.5": _num(metrics.get("recall@IoU0.5")),
            "recall@IoU0.7": _num(metrics.get("recall@IoU0.7")),
            "regions_per_image": _num(metrics.get("regions_per_image")), "test_seconds": seconds,
            "extraction_items_per_s": costs.get("extraction_items_per_s"),
            "search_ms_per_query": costs.get("search_ms_per_query"),
            "index_bytes_per_image": costs.get("index_bytes_per_image")}


def _provenance_columns(cell: dict[str, Any]) -> dict[str, Any]:
    p = cell.get("provenance") or {}
    return {"commit": p.get("commit"), "dirty": p.get("dirty"), "config": cell.get("config"),
            "cell_key": cell.get("key"), "checkpoint_sha256": cell.get("checkpoint_sha256"),
            "benchmark_sha256": cell.get("benchmark_sha256"), "device": p.get("device"),
            "torch": p.get("torch"), "faiss": p.get("faiss")}


def _num(value: Any) -> Optional[float]:
    """A table number: ``None`` for a missing, NaN or non-numeric value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else round(number, 6)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def protocol_card(spec: BenchmarkSpec, bench, cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a benchmark's numbers mean: queries, junk rule, normalisation, protocol, sizes, hash."""
    own_image_junk = sum(1 for q in bench.queries if q.image in set(bench.ground_truth.get(q.id).junk
                                                                      if bench.ground_truth.get(q.id) else ()))
    listed = set(bench.database)
    query_in_database = sum(1 for q in bench.queries if q.image in listed)
    whole = sum(1 for q in bench.queries
                if tuple(q.box) == (0, 0, bench.images[q.image].width, bench.images[q.image].height))
    metrics = [c["_metrics"] for c in cells if c.get("_metrics")]
    return {
        "benchmark": str(spec.path), "sha256": _sha256(spec.path),
        "queries": len(bench.queries),
        "query": f"the region of the query box (a crop); {whole} of {len(bench.queries)} boxes are the whole image",
        "query images in the database": query_in_database,
        "junk": f"the benchmark's junk lists; the query's own image is junk for {own_image_junk} of "
                f"{len(bench.queries)} queries",
        "database images": len(bench.database),
        "distractor images": sum(int(d.get("count", 0)) for d in bench.distractors),
        "images served at (long side at most; the network may resize further)":
            ", ".join(f"{c['method']}: {c.get('served_max_side') or 'original'}" for c in cells
                      if c.get("status") == "ok") or "n/a",
        "normalization": spec.normalization, "protocol": spec.protocol,
        "imposed on every method": "yes (each cell's metrics.json confirms it)"
        if all(m.get("normalization") == spec.normalization and m.get("protocol") == spec.protocol for m in metrics)
        else "NO: a cell was scored otherwise",
    }


def pareto_front(cost: Sequence[float], score: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (a lower or equal cost and a higher or
    equal score, one of them strictly), by increasing cost."""
    points = sorted(range(len(cost)), key=lambda i: (cost[i], -score[i]))
    front, best = [], -math.inf
    for i in points:
        if score[i] > best:
            front.append(i)
            best = score[i]
    return front


def plot_costs(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    """mAP@all against search ms/query and against index bytes/image, the Pareto front joined."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("search_ms_per_query", "search ms / query"), ("index_bytes_per_image", "index bytes / image")]
    usable = [r for r in rows if r.get("mAP@all") is not None]
    if not usable:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, (key, label) in zip(axes, axes_spec):
        points = [r for r in usable if r.get(key)]
        x = [float(r[key]) for r in points]
        y = [float(r["mAP@all"]) for r in points]
        ax.scatter(x, y, color="tab:blue")
        for r, xi, yi in zip(points, x, y):
            ax.annotate(r["method"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front(x, y)
        ax.plot([x[i] for i in front], [y[i] for i in front], color="tab:red", lw=1, marker="o", ms=11,
                mfc="none", label="Pareto front")
        if x and max(x) > 10 * min(x):  # costs spanning decades on a log axis
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.margins(0.2)  # labels of the extreme points stay inside
        ax.set_xlabel(label)
        ax.set_ylabel("mAP@all")
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}: accuracy against cost")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_database_size(rows: Sequence[dict[str, Any]], sizes: dict[str, int], path: Path,
                       group: str) -> Optional[Path]:
    """mAP@all of each method (plain search) against the database size of the group's benchmarks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    drawn = False
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((sizes[r["benchmark"]], r["mAP@all"]) for r in rows
                        if r["method"] == method and r["reranker"] == "none" and r["status"] == "ok"
                        and r["benchmark"] in sizes and r.get("mAP@all") is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("database images (+ distractors)")
    ax.set_ylabel("mAP@all")
    ax.set_title(f"{group}: mAP against database size")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_markdown(spec: ComparisonSpec, rows: Sequence[dict[str, Any]], cards: dict[str, dict],
                    plots: Optional[dict[str, Optional[Path]]] = None,
                    seeds: Sequence[dict[str, Any]] = ()) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    plain = lambda v: "" if v is None else str(v)  # noqa: E731
    extra = _extra_names(rows, spec.columns)
    lines = [f"# Comparison: {spec.source}", ""]
    for key, plot in (plots or {}).items():
        if key.startswith("group:") and plot:
            lines += [f"![{key[6:]}: mAP against database size]({plot.name})", ""]
    for name, card in cards.items():
        lines += [f"## {name}", "", "| protocol | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in card.items()]
        lines += ["", "| method | mAP@10 | mAP@100 | mAP@all | mIoU | regions/image | search ms/query | "
                  f"index bytes/image | Δ mAP@all vs {spec.baseline or '—'} ({int(spec.confidence * 100)} % CI, "
                  f"{spec.resamples} resamples) | test s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in rows:
            if r["benchmark"] != name:
                continue
            label = r["method"] if r["reranker"] == "none" else f"{r['method']} + {r['reranker']}"
            if r["status"] != "ok":
                lines.append(f"| {label} | {r['status']}: {r.get('error')} | | | | | | | | |")
                continue
            delta = ""
            if "delta_mAP@all" in r:
                delta = _interval(r)
            elif spec.baseline in (r["method"], r.get("family")):
                delta = "baseline"
            if "vs_plain_delta_mAP@all" in r:
                delta += f" (vs plain search: {_interval(r, 'vs_plain_')})"
            lines.append(f"| {label} | {fmt(r['mAP@10'])} | {fmt(r['mAP@100'])} | {fmt(r['mAP@all'])} | "
                         f"{fmt(r['mIoU'])} | {fmt(r['regions_per_image'])} | {plain(r.get('search_ms_per_query'))} | "
                         f"{plain(r.get('index_bytes_per_image'))} | {delta} | {plain(r.get('test_seconds'))} |")
        lines += ["", "\\* the interval excludes 0.", ""]
        mine = [r for r in rows if r["benchmark"] == name and r["reranker"] == "none" and r["status"] == "ok"]
        if extra and mine:
            lines += ["| method | " + " | ".join(extra) + " |", "|---|" + "---:|" * len(extra)]
            lines += [f"| {r['method']} | " + " | ".join(fmt(r.get(k)) for k in extra) + " |" for r in mine]
            lines += [""]
        families = [f for f in seeds if f["benchmark"] == name]
        if families:
            keys = [k for k in (*SEED_METRICS, *extra) if any(f"{k} mean" in f for f in families)]
            lines += ["Over seeds (mean ± sample standard deviation):", "",
                      "| method | re-ranker | seeds | " + " | ".join(keys) + " |", "|---|---|---|" + "---:|" * len(keys)]
            for f in families:
                lines.append(f"| {f['family']} | {f['reranker']} | {f['seeds']} | " + " | ".join(
                    _band(f.get(f"{k} mean"), f.get(f"{k} std")) for k in keys) + " |")
            lines += [""]
        if plots and plots.get(name):
            lines += [f"![accuracy against cost]({plots[name].name})", ""]
    if rows:
        r = rows[0]
        lines += ["Provenance: commit " + str(r.get("commit")) + (" (modified)" if r.get("dirty") else "")
                  + f", {r.get('device')}, torch {r.get('torch')}, faiss {r.get('faiss')}.", ""]
    return "\n".join(lines)


def _interval(row: dict[str, Any], prefix: str = "") -> str:
    mark = " *" if row[f"{prefix}ci_excludes_0"] else ""
    return (f"{row[f'{prefix}delta_mAP@all']:+.4f} [{row[f'{prefix}ci_low']:+.4f}, "
            f"{row[f'{prefix}ci_high']:+.4f}]{mark}")


def _band(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return ""
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="the comparison file (configs/compare/NAME.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: the file's 'out')")
    p.add_argument("--only", nargs="+", metavar="METHOD", default=None,
                   help="run these methods only (a method run with seeds by its name), with the baseline and "
                        "the methods whose checkpoints they use; the tables then list those (the other "
                        "methods' cells stay cached for a full run)")
    args = p.parse_args(argv)
    try:
        spec = ComparisonSpec.load(args.config, args.out)
        if args.only:
            spec.only(args.only)
    except (FileNotFoundError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    result = compare(spec)
    print(f"results: {spec.out / 'results.csv'}\nreport: {spec.out / 'report.md'}, {spec.out / 'report.html'}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
