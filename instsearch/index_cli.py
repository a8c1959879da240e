"""``instsearch index``: approximate-nearest-neighbour indexes over region shards.

    instsearch index build --shards SHARDS --out INDEX [--factory KEY | --memory-budget 8GB]
                           [--metric ip|l2] [--train-size N] [--seed S] [--target-recall 0.95]
                           [--overwrite]

``build`` trains the index once on a sample of all parts and fills it part by part, the inverted
lists of IVF indexes merged on disk; under ``torchrun --nproc_per_node N`` every process adds
every N-th part and rank 0 merges (:mod:`instsearch.eval.index_build`); ``instsearch search
--index INDEX`` reads it back. Each subcommand is one function taking the parsed arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional

PROG = "instsearch index"


def _build(args: argparse.Namespace) -> int:
    from instsearch.eval.index_build import build_index, format_bytes, parse_memory

    if (args.factory is None) == (args.memory_budget is None):
        raise ValueError("give exactly one of --factory (a faiss index key, e.g. 'Flat' or 'IVF4096,PQ32') or "
                         "--memory-budget (e.g. 8GB: the index key is chosen to fit it)")
    budget = parse_memory(args.memory_budget) if args.memory_budget is not None else None
    rank = _join_process_group()
    t0 = time.perf_counter()
    out = build_index(args.shards, args.out, factory=args.factory, memory_budget=budget, metric=args.metric,
                      train_size=args.train_size, seed=args.seed, progress=not args.quiet, overwrite=args.overwrite,
                      target_recall=args.target_recall)
    if rank:
        return 0
    import json

    info = json.loads((out / "index.json").read_text())
    fits = f" (budget {format_bytes(budget)}, estimated {format_bytes(info['rule']['estimated_index_bytes'])})" \
        if budget is not None else ""
    print(f"{info['factory']}{fits}: {info['ntotal']} regions of {info['dim']}-D, {info['metric']}, trained on "
          f"{info['train_size']}, nprobe {info['nprobe']}\nindex: {out}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def _join_process_group() -> int:
    """Under torchrun (``WORLD_SIZE`` > 1) join the gloo process group its environment describes,
    so that every process adds its share of the parts; returns this process's rank."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return int(dist.get_rank())


def _build_parser(sub) -> None:
    p = sub.add_parser("build", help="train and fill an index from region shards",
                       description="Train an index once on a sample of the shards' regions and add every region "
                                   "(id = region id); IVF lists are merged on disk into INDEX/index.ivfdata.")
    p.add_argument("--shards", required=True, help="the folder 'instsearch extract' wrote")
    p.add_argument("--out", required=True, help="the index folder to write (index.faiss, index.json)")
    p.add_argument("--factory", default=None, help="a faiss factory key: Flat (exact), IVF4096,PQ32, "
                   "OPQ32_128,IVF65536_HNSW32,PQ32, ...")
    p.add_argument("--memory-budget", default=None, help="choose the key whose index fits this much memory "
                   "(8GB, 512MB, 1.5G; docs/scale.md gives the rule)")
    p.add_argument("--metric", choices=("ip", "l2"), default="ip", help="inner product (default) or L2")
    p.add_argument("--train-size", type=int, default=None, help="training sample (default: the rule's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    p.add_argument("--target-recall", type=float, default=0.95, help="the stored nprobe reaches this share of a "
                   "database sample's exact neighbours (IVF indexes; default 0.95)")
    p.add_argument("--overwrite", action="store_true", help="replace the index in a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_build)


SUBCOMMANDS: tuple[Callable, ...] = (_build_parser,)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Approximate-nearest-neighbour indexes over region shards.")
    sub = parser.add_subparsers(dest="command", metavar="{build}")
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
