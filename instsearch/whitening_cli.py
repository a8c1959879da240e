"""``instsearch whitening``: fit the PCA-whitening on another benchmark's database and save it.

The usual protocol learns the whitening on an independent set -- Paris 6k for Oxford 5k and the
converse, an unrelated collection for Holidays -- instead of the searched database itself::

    instsearch whitening --config configs/dasr_holidays.yaml --benchmark /data/other/benchmark.json \\
        --out /data/holidays_whitening.npz [--ckpt_path X.ckpt] [--model.init_args... overrides]
    instsearch test --config configs/dasr_holidays.yaml \\
        --model.init_args.retrieval.whitening /data/holidays_whitening.npz

The config's model extracts the database regions of ``--benchmark`` as ``instsearch predict``
does (the module's ``predict_step`` under the config's Trainer, on one device, with the
checkpoint's weights when one is given), keeps ``retrieval.regions_per_image`` per image as the
evaluator does, and :meth:`~instsearch.eval.whitening.PCAWhitening.fit` is run on the features
with the config's ``retrieval.whitening_dim`` / ``whitening_shrinkage`` unless ``--dim`` /
``--shrinkage`` are given. Every option it does not know goes to LightningCLI.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


def database_features(model, benchmark: str, ckpt_path: Optional[str], trainer) -> np.ndarray:
    """``(N, D)`` float32: the region features of ``benchmark``'s database images, as the evaluator
    would search them (``regions_per_image`` applied)."""
    from instsearch.datamodules.benchmark import benchmark_dataloader
    from instsearch.eval.extraction import capped
    from instsearch.eval.search import RegionStore
    from instsearch.formats import Benchmark

    bench = Benchmark.load(benchmark)
    if not bench.database:
        raise ValueError(f"benchmark {benchmark} has no database images to fit a whitening on")
    dm = getattr(trainer, "datamodule", None)
    loader = benchmark_dataloader(bench, "database", batch_size=getattr(dm, "benchmark_batch_size", 4),
                                  num_workers=getattr(dm, "num_workers", 0),
                                  max_side=getattr(dm, "benchmark_max_side", 1600))
    batches = trainer.predict(model, dataloaders=loader, ckpt_path=ckpt_path, return_predictions=True)
    cap = model.retrieval.regions_per_image
    found = {meta.image_id: capped(regions, cap) for batch in batches for meta, regions in batch.database}
    ids = [i for i in bench.database if i in found]
    return RegionStore.from_regions(ids, [found[i] for i in ids]).features


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="instsearch whitening",
        description="Fit the PCA-whitening on another benchmark's database region features (extracted with a "
                    "config's model) and save it for retrieval.whitening. Unknown options go to LightningCLI.")
    parser.add_argument("--config", required=True, help="the model's config (as for instsearch test)")
    parser.add_argument("--benchmark", required=True, help="benchmark.json whose database the whitening is fitted on")
    parser.add_argument("--out", required=True, help="the whitening file to write (.npz)")
    parser.add_argument("--ckpt_path", default=None, help="weights of the model (default: the config's)")
    parser.add_argument("--dim", type=int, default=None, help="keep at most this many dimensions "
                        "(default: the config's retrieval.whitening_dim)")
    parser.add_argument("--shrinkage", default=None, help="'auto' (Ledoit-Wolf) or a weight in [0, 1] "
                        "(default: the config's retrieval.whitening_shrinkage)")
    args, rest = parser.parse_known_args(argv)

    from instsearch.lightning_cli import lightning_cli
    from instsearch.eval.whitening import PCAWhitening, check_shrinkage

    if args.shrinkage is not None:
        check_shrinkage(args.shrinkage)
    # one device: predictions are returned, not gathered across ranks; no logger or saved config
    # writes a run
    cli = lightning_cli(["--config", args.config, *rest, "--trainer.devices", "1", "--trainer.logger", "false"],
                        run=False, save_config_callback=None)
    retrieval = cli.model.retrieval
    features = database_features(cli.model, args.benchmark, args.ckpt_path, cli.trainer)
    if len(features) < 2:
        raise ValueError(f"{args.benchmark}: {len(features)} region feature(s), too few to fit a whitening")
    white = PCAWhitening.fit(features, dim=args.dim if args.dim is not None else retrieval.whitening_dim,
                             shrinkage=args.shrinkage if args.shrinkage is not None else retrieval.whitening_shrinkage)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path = white.save(args.out)
    print(f"whitening: {path} ({len(features)} regions of {white.input_dim} dimensions from {args.benchmark} -> "
          f"{white.dim} dimensions, shrinkage {white.shrinkage:.3g})")
    return 0
