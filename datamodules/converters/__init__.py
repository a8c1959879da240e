"""``instsearch convert``: public instance-search benchmarks -> ``benchmark.json`` (docs/formats.md).

One module per dataset family parses the distributor's on-disk layout into a
:class:`~instsearch.datamodules.converters.common.Draft`; :func:`convert` measures the images, drops bad ones,
clips boxes, writes the benchmark (paths relative to the output's folder) and a
``convert_report.json`` beside it. Families and their exact layouts/protocols:

* ``instre`` — :mod:`instsearch.datamodules.converters.instre` (1,250-query protocol, or ``protocol="instre-m"``)
* ``oxford5k``, ``paris6k`` — :mod:`instsearch.datamodules.converters.oxford` (classic gt_files)
* ``roxford5k``, ``rparis6k`` — :mod:`instsearch.datamodules.converters.revisited` (Easy / Medium / Hard)
* ``holidays`` — :mod:`instsearch.datamodules.converters.holidays`
* ``instance160``, ``instance335`` — :mod:`instsearch.datamodules.converters.instance`
* ``folder`` — :mod:`instsearch.datamodules.converters.folder` (any image folder: database only, ``--queries`` unjudged)

A distractor folder (``--distractors``) is appended by reference only:
``"distractors": [{"root": <relative path>, "count": N, "id_prefix": ...}]`` (see
:mod:`instsearch.datamodules.distractors`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from instsearch.datamodules.converters import folder, holidays, instance, instre, oxford, revisited
from instsearch.datamodules.converters.common import REPORT_NAME, ConvertResult, Draft
from instsearch.datamodules.distractors import DEFAULT_ID_PREFIX, count_image_files
from instsearch.datamodules.image_io import MAX_PIXELS
from instsearch.datamodules.restricted_pickle import UnsafePickleError
from instsearch.formats import FormatError

__all__ = ["ConverterSpec", "CONVERTERS", "register_converter", "convert", "main", "ConvertResult", "Draft"]


@dataclass(frozen=True)
class ConverterSpec:
    """A registered benchmark converter: ``build(root, **options) -> Draft``."""

    name: str
    build: Callable[..., Draft]
    description: str
    options: frozenset[str] = field(default_factory=frozenset)  # keyword options build() accepts


CONVERTERS: dict[str, ConverterSpec] = {}


def register_converter(spec: ConverterSpec) -> ConverterSpec:
    if spec.name in CONVERTERS:
        raise ValueError(f"converter '{spec.name}' is already registered")
    CONVERTERS[spec.name] = spec
    return spec


register_converter(ConverterSpec("instre", instre.build, "INSTRE: S1, S2, M class folders; 1,250 or INSTRE-M queries",
                                 frozenset({"protocol", "queries_per_class"})))
for _name, _what in (("oxford5k", "Oxford Buildings"), ("paris6k", "Paris")):
    register_converter(ConverterSpec(_name, partial(oxford.build, dataset=_name),
                                     f"{_what}, classic protocol: jpg/ + gt_files/"))
for _name, _what in (("roxford5k", "Revisited Oxford"), ("rparis6k", "Revisited Paris")):
    register_converter(ConverterSpec(_name, partial(revisited.build, dataset=_name),
                                     f"{_what}: gnd_{_name}.pkl + jpg/; Easy / Medium / Hard", frozenset({"setting"})))
register_converter(ConverterSpec("holidays", holidays.build, "INRIA Holidays: jpg/NNNNNN.jpg"))
for _name in ("instance160", "instance335"):
    register_converter(ConverterSpec(_name, partial(instance.build, dataset=_name),
                                     f"{_name.capitalize()}: query.txt, reference.txt, groundtruth/NNN.txt"))
register_converter(ConverterSpec("folder", folder.build, "any folder of images (any depth): a database-only benchmark; "
                                 "--queries FILE adds queries without ground truth", frozenset({"queries"})))


def convert(name: str, root: str | Path, out: str | Path, *, distractors: Sequence[str | Path] = (),
            verify_images: bool = False, max_pixels: int = MAX_PIXELS, workers: int = 8,
            **options: Any) -> ConvertResult:
    """Convert dataset ``name`` found at ``root`` into the benchmark file ``out``.

    ``options`` go to the converter (``setting`` for the revisited datasets, ``protocol`` and
    ``queries_per_class`` for INSTRE); ``None`` values mean the converter's default. Writes
    ``out`` and ``convert_report.json`` beside it.
    """
    if name not in CONVERTERS:
        raise ValueError(f"unknown dataset '{name}'; known: {', '.join(sorted(CONVERTERS))}")
    spec = CONVERTERS[name]
    options = {k: v for k, v in options.items() if v is not None}
    for key in options:
        if key not in spec.options:
            users = sorted(n for n, s in CONVERTERS.items() if key in s.options)
            raise ValueError(f"option '{key}' does not apply to {name} (it applies to: {', '.join(users) or 'none'})")
    draft = spec.build(Path(root), **options)

    out = Path(os.path.abspath(out))
    benchmark, report = draft.finalize(out, verify=verify_images, max_pixels=max_pixels, workers=workers)
    report["source_root"] = os.path.abspath(root)
    entries = []
    for k, folder in enumerate(distractors):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"distractor folder not found: {folder} (expected a folder of images, any depth)")
        entries.append({"root": Path(os.path.relpath(os.path.abspath(folder), out.parent)).as_posix(),
                        "count": count_image_files(folder),
                        "id_prefix": DEFAULT_ID_PREFIX if k == 0 else f"distractor{k}:"})
    if entries:
        benchmark.extra["distractors"] = entries
        report["distractors"] = entries
    report["counts"]["distractors"] = sum(e["count"] for e in entries)

    benchmark.save(out)
    report_path = out.parent / REPORT_NAME
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    return ConvertResult(benchmark=benchmark, report=report, path=out, report_path=report_path)


def summary(result: ConvertResult) -> str:
    c = result.report["counts"]
    lines = [f"{result.benchmark.name}: {c['queries']} queries, {c['database']} database images"
             + (f" (+{c['distractors']} distractors)" if c.get("distractors") else "")
             + f", {c['positives_mean']:.2f} positives per query (mean)"]
    if c["bad_images"] or c["queries_dropped"] or c["boxes_clipped"]:
        lines.append(f"  skipped {c['bad_images']} bad images, dropped {c['queries_dropped']} queries, "
                     f"clipped {c['boxes_clipped']} boxes (see {result.report_path})")
    if c["queries_without_positives"]:
        lines.append(f"  {c['queries_without_positives']} queries have no positive in the database")
    expected = result.report.get("expected", {})
    off = {k: (v, c[k]) for k, v in expected.items() if k in c and c[k] != v}
    if off:
        lines.append("  differs from the published size: "
                     + ", ".join(f"{k} {got} (published {want})" for k, (want, got) in off.items()))
    lines.append(f"  wrote {result.path} and {result.report_path}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instsearch convert",
        description="Convert a public instance-search dataset into a benchmark.json.",
        epilog="datasets: " + "; ".join(f"{n} ({s.description})" for n, s in CONVERTERS.items()))
    parser.add_argument("name", choices=list(CONVERTERS), help="dataset to convert")
    parser.add_argument("--root", required=True, type=Path, help="the dataset folder as distributed")
    parser.add_argument("--out", required=True, type=Path, help="benchmark.json to write")
    parser.add_argument("--setting", choices=revisited.SETTINGS, default=None,
                        help=f"revisited Oxford/Paris setting (default {revisited.DEFAULT_SETTING})")
    parser.add_argument("--protocol", choices=instre.PROTOCOLS, default=None,
                        help="INSTRE: '1250' (default, all queries) or 'instre-m' (the 250 multi-instance queries)")
    parser.add_argument("--queries", type=Path, default=None, metavar="FILE",
                        help="folder: one query per line, '<path> x1 y1 x2 y2' (path relative to --root)")
    parser.add_argument("--distractors", action="append", default=[], type=Path, metavar="DIR",
                        help="a distractor image folder (any depth) appended to the database; repeatable")
    parser.add_argument("--verify-images", action="store_true",
                        help="decode every image fully (catches truncated files; slower than header reads)")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="larger images count as bad")
    parser.add_argument("--workers", type=int, default=8, help="threads reading image headers")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = convert(args.name, args.root, args.out, setting=args.setting, protocol=args.protocol,
                         queries=args.queries, distractors=args.distractors, verify_images=args.verify_images,
                         max_pixels=args.max_pixels, workers=args.workers)
    except (FileNotFoundError, FormatError, UnsafePickleError, ValueError) as e:
        print(f"instsearch convert: error: {e}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0
