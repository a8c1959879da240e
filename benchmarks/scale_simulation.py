"""Planted region shards at 1 M - 10 M regions, for measuring index building, two-stage search and
the metrics at scale on a machine without images or a GPU.

    python benchmarks/scale_simulation.py --regions 10000000 --dim 128 --out /tmp/scale/sim10m_128 \\
        [--regions-per-image 20] [--queries 100] [--positives 5 | 3..8] [--seed 0] \\
        [--dtype float16] [--part-size 1000]

Writes, through the extractor's own writer, a shards folder ``instsearch index build`` and
``instsearch search`` read as if ``instsearch extract`` had written it -- the manifest says
``"model": "simulated"``, with the generator's arguments and their hash -- and ``benchmark.json``
inside it (referenced by the manifest): database images with sizes, one query image and box per
query, each query's planted positives with their boxes as ground truth. The planted set (a
Gaussian mixture of unit vectors, instances planted in a few images each, whole-pixel boxes) and
why it is drawn in fixed blocks are described in ``benchmarks/scale_data.py``, which also holds
the exact reference of the region index (``exact_ground_truth``: top-k regions, streamed over the
parts); the exact image ranking is ``instsearch.eval.streamed.exact_image_ranking``.

Prints progress, then the time, the size written and the peak resident memory (``ru_maxrss``).
Measurements: ``docs/scale.md``, section "Simulated collections".
"""
from __future__ import annotations

import argparse
import resource
import time
from typing import Optional

from scale_data import SimulationConfig, folder_bytes, write_simulation


def int_range(text: str) -> tuple[int, int]:
    """``"5"`` or ``"3..8"`` (inclusive)."""
    lo, _, hi = text.partition("..")
    return int(lo), int(hi or lo)


def float_range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("..")
    return float(lo), float(hi or lo)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regions", type=int, required=True, help="database regions in all (exactly)")
    p.add_argument("--dim", type=int, required=True, help="feature size")
    p.add_argument("--out", required=True, help="shards folder to write (benchmark.json goes inside)")
    p.add_argument("--regions-per-image", type=float, default=20.0, help="mean regions of an image (default 20)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--positives", type=int_range, default=(5, 5), help="planted images per query: N or LO..HI")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored region features")
    p.add_argument("--part-size", type=int, default=1000, help="items (images, then queries) per part")
    p.add_argument("--clusters", type=int, default=1024, help="mixture centres of the features")
    p.add_argument("--spread", type=float, default=1.5, help="noise norm of a region around its centre")
    p.add_argument("--background", choices=("listed", "distractors"), default="listed",
                   help="images without a planted instance: listed in benchmark.json (default), or given by "
                        "reference as a distractor collection (ids 'distractor:…', as the +1M protocols)")
    p.add_argument("--spectrum", choices=("power", "linear"), default="power",
                   help="per-dimension profile: variances decaying as 1/i (default) or scales linear 1 -> 0.1")
    p.add_argument("--positive-noise", type=float_range, default=(0.3, 1.5),
                   help="noise norm of a planted region around its instance, uniform in LO..HI")
    p.add_argument("--query-noise", type=float, default=0.3, help="noise norm of a query around its instance")
    p.add_argument("--empty-fraction", type=float, default=0.02, help="share of images without a region")
    p.add_argument("--junk", type=int, default=0, help="junk images per query")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    config = SimulationConfig(regions=args.regions, dim=args.dim, regions_per_image=args.regions_per_image,
                              queries=args.queries, positives=args.positives, seed=args.seed, clusters=args.clusters,
                              spread=args.spread, spectrum=args.spectrum, background=args.background, positive_noise=args.positive_noise, query_noise=args.query_noise,
                              empty_fraction=args.empty_fraction, junk=args.junk)
    t0 = time.perf_counter()
    manifest = write_simulation(config, args.out, dtype=args.dtype, part_size=args.part_size)
    seconds = time.perf_counter() - t0
    size = folder_bytes(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"{manifest['regions']:,} regions x {args.dim} ({args.dtype}), {manifest['images']:,} images, "
          f"{manifest['queries']} queries -> {args.out}: {seconds:.1f} s, {size / 2**30:.3f} GiB, "
          f"peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
