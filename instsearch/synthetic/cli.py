"""``instsearch synth``: the command line of the synthetic benchmark generator."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from instsearch.formats import Benchmark
from instsearch.synthetic.generator import generate
from instsearch.synthetic.presets import PRESETS

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="instsearch synth",
        description="Generate the synthetic instance-search benchmark (COCO train/val, test benchmark.json).")
    parser.add_argument("--out", required=True, type=Path, help="output folder (new, empty, or a previous synth output)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="size preset (default: tiny)")
    parser.add_argument("--seed", default=0, type=int, help="random seed; same seed and preset give identical bytes")
    parser.add_argument("--workers", default=min(os.cpu_count() or 1, 8), type=int,
                        help="rendering processes (output does not depend on it)")
    args = parser.parse_args(argv)
    try:
        bench_path = generate(args.out, args.preset, args.seed, workers=args.workers, progress=True)
    except (FileExistsError, ValueError, KeyError) as e:
        print(f"instsearch synth: error: {e}", file=sys.stderr)
        return 2
    out = args.out
    synth = json.loads((out / "synth.json").read_text())
    bench = Benchmark.load(bench_path)
    n_train = len(json.loads((out / "train.json").read_text())["images"])
    n_val = len(json.loads((out / "val.json").read_text())["images"])
    seen = [c["name"] for c in synth["categories"] if c["seen_in_training"]]
    unseen = [c["name"] for c in synth["categories"] if not c["seen_in_training"]]
    n_junk = sum(len(g.junk) for g in bench.ground_truth.values())
    n_pos = sum(len(g.positives) for g in bench.ground_truth.values())
    print(f"synthetic benchmark '{args.preset}' (seed {args.seed}) in {out}")
    print(f"  categories: {len(seen)} seen in training ({', '.join(seen)}); unseen: {', '.join(unseen)}")
    print(f"  train {n_train} images, val {n_val} images; test: {len(bench.queries)} queries, "
          f"{len(bench.database)} database images, {n_pos} positives, {n_junk} junk")
    for name in ("train.json", "val.json", "test.json", "benchmark.json", "synth.json", "images/"):
        print(f"  wrote {out / name}")
    return 0
