"""``instsearch evaluate``: score a run file against a benchmark file.

    instsearch evaluate --benchmark B.json --run RUN.json [--normalization relevant|min|retrieved]
                        [--protocol standard|oxford] [--output M.json]

Prints a (metric, value) table and, with ``--output``, writes the metrics as JSON with the keys
of :func:`instsearch.eval.metrics.retrieval_metrics`. An unusable input (missing file, malformed JSON, a
run naming an unknown query or image, a malformed box) is reported on stderr with the offending
file and entry, and the exit status is 2; no traceback, since the fix is in the input, not here.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from instsearch.eval.metrics import DEFAULT_IOU_TOP_K, NORMALIZATIONS, PROTOCOLS, json_ready, retrieval_metrics
from instsearch.formats import Benchmark, FormatError, Run

PROG = "instsearch evaluate"
EXIT_INPUT_ERROR = 2  # the same status argparse uses for a bad command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Score a run (ranking per query) against a benchmark.")
    p.add_argument("--benchmark", required=True, type=Path, help="benchmark JSON (instsearch-benchmark/1)")
    p.add_argument("--run", required=True, type=Path, help="run JSON (instsearch-run/1), as written by 'instsearch test'")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="relevant",
                   help="AP denominator: R (relevant, = trec_eval map_cut), min(k, R) (min), "
                        "or the hits in the top k (retrieved, = torchmetrics RetrievalMAP); default: relevant")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                   help="standard: precision at each positive; oxford: the Oxford/Paris trapezoid rule")
    p.add_argument("--iou-top-k", type=int, default=DEFAULT_IOU_TOP_K,
                   help=f"mIoU over the positives in each query's top k (default {DEFAULT_IOU_TOP_K}; 0 = whole list)")
    p.add_argument("--output", type=Path, default=None, help="write the metrics to this JSON file")
    return p


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """One run's metrics as a two-column (metric, value) table."""
    width = max([len("metric"), *(len(k) for k in metrics)])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 6}"]
    lines += [f"{k:<{width}}  {_fmt(v)}" for k, v in metrics.items()]
    return "\n".join(lines)


def format_metrics_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Several named runs side by side: one line per run, one column per metric.

    Columns are the union of the rows' keys in first-seen order; a missing value prints as
    ``n/a``. Text-valued keys that agree across all rows (the convention: ``normalization``,
    ``protocol``) are moved to a footer line, so the numbers stay comparable at a glance while
    the table still names its convention.
    """
    if not rows:
        return ""
    keys: list[str] = []
    for metrics in rows.values():
        keys += [k for k in metrics if k not in keys]
    shared = {}
    for k in keys:
        values = [m.get(k) for m in rows.values()]
        if all(isinstance(v, str) for v in values) and len(set(values)) == 1:
            shared[k] = values[0]
    columns = [k for k in keys if k not in shared]
    cells = [[name, *(_fmt(m.get(k)) for k in columns)] for name, m in rows.items()]
    header = ["run", *columns]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        first = f"{values[0]:<{widths[0]}}"
        return "  ".join([first, *(f"{v:>{w}}" for v, w in zip(values[1:], widths[1:]))]).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)]
    if shared:
        out.append("(" + ", ".join(f"{k}={v}" for k, v in shared.items()) + ")")
    return "\n".join(out)


def evaluate_files(benchmark_path: str | Path, run_path: str | Path, normalization: str = "relevant",
                   protocol: str = "standard", iou_top_k: int | None = DEFAULT_IOU_TOP_K) -> tuple[dict[str, Any], Run, Benchmark]:
    """Load and validate both files, then compute :func:`retrieval_metrics`."""
    benchmark = Benchmark.load(benchmark_path)
    run = Run.load(run_path, benchmark=benchmark)
    metrics = retrieval_metrics(benchmark, run, normalization=normalization, protocol=protocol,  # type: ignore[arg-type]
                                iou_top_k=iou_top_k)
    return metrics, run, benchmark


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad command line (2, message already printed)
        return int(e.code or 0)
    if args.iou_top_k < 0:
        print(f"{PROG}: error: --iou-top-k must be >= 0, got {args.iou_top_k}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    try:
        metrics, run, benchmark = evaluate_files(args.benchmark, args.run, args.normalization, args.protocol,
                                                 args.iou_top_k or None)
    except (FormatError, FileNotFoundError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    missing = [q.id for q in benchmark.queries if q.id not in run.rankings]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        print(f"{PROG}: warning: the run ranks nothing for {len(missing)} of {len(benchmark.queries)} "
              f"queries ({shown}); they count as AP 0", file=sys.stderr)
    print(f"{benchmark.name} / {run.method}")
    print(format_metrics(metrics))
    if args.output is not None:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(json_ready(metrics), indent=1) + "\n")
        except OSError as e:
            print(f"{PROG}: error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
            return EXIT_INPUT_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
