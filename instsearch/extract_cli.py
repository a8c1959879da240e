"""``instsearch extract``: a benchmark's regions and query features into region shards on disk.

    instsearch extract --config C.yaml [--ckpt_path X.ckpt] [--data.benchmark B.json] --out SHARDS/
                       [--dtype float16|float32] [--part-size 1000] [trainer / model options]

Lightning's predict loop under the config's Trainer (one device, or DDP with ``--trainer.devices``
/ ``torchrun`` / SLURM) runs the module's ``search_step`` -- the step of ``instsearch test`` -- and a
prediction writer stores every part as it completes (layout: :mod:`instsearch.eval.shards`).
Rerunning the same command after an interruption skips the complete parts; a folder holding
another model's, config's, checkpoint's or benchmark's parts is refused.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional


def manifest_for(model, datamodule, benchmark_path: str, ckpt_path: Optional[str], layout,
                 distractors: list[dict[str, Any]]) -> dict[str, Any]:
    """The extraction's identity: what decides the features, hashed, and where they came from."""
    from instsearch.eval.shards import config_sha256, file_sha256

    settings = {"model": dict(model.hparams), "max_side": getattr(datamodule, "benchmark_max_side", None),
                "regions_per_image": model.retrieval.regions_per_image,
                "prune_by_label": model.retrieval.prune_by_label}
    return {"model": model.method_name, "config_sha256": config_sha256(settings),
            "checkpoint": str(ckpt_path) if ckpt_path else None,
            "checkpoint_sha256": file_sha256(ckpt_path) if ckpt_path else None,
            "benchmark": str(benchmark_path), "benchmark_sha256": file_sha256(benchmark_path),
            "part_size": layout.part_size, "num_items": int(layout.segments[0][1]), "num_parts": layout.num_parts,
            "distractors": distractors}


def extract_shards(model, datamodule, trainer, out: str | Path, ckpt_path: Optional[str] = None,
                   dtype: str = "float16", part_size: int = 1000) -> dict[str, Any]:
    """Extract ``datamodule``'s benchmark (database images and queries) into shards at ``out``
    with ``trainer.predict``; returns the manifest (with totals once every part is complete)."""
    from instsearch.datamodules.benchmark import BenchmarkImages, collate_images
    from instsearch.distributed import broadcast_from_rank0
    from instsearch.eval.shard_extraction import (DistractorPartBatches, PartLayout, PartSampler, RegionShardWriter,
                                                  finalize_manifest, part_loader)
    from instsearch.eval.shards import ShardWriter
    import torch

    if trainer.local_rank == 0:  # e.g. the synthetic benchmark, generated when missing (as fit and test do)
        datamodule.prepare_data()
    trainer.strategy.barrier("instsearch-extract-prepare")
    bench = datamodule.load_benchmark() if hasattr(datamodule, "load_benchmark") else None
    if bench is None:
        raise ValueError(f"{type(datamodule).__name__} has no benchmark: pass --data.benchmark path/to/benchmark.json")
    dataset = BenchmarkImages(bench, "all", max_side=datamodule.benchmark_max_side)
    # Parts hold whole batches, so a batch never spans two parts: the batches -- and with them any
    # padding a detector's transform adds to batch images together -- are the same whichever
    # process extracts a part, and the same as `instsearch test`'s on one process.
    batch = int(datamodule.benchmark_batch_size)
    part_size = -(-int(part_size) // batch) * batch
    folders = [(bench.distractor_root(d), str(d.get("id_prefix", "distractor:")), d.get("count")) for d in bench.distractors]
    counts = []
    for root, _, count in folders:
        if count is None:  # an older benchmark file without the count: walk the folder once
            from instsearch.datamodules.distractors import count_image_files

            count = count_image_files(root)
        counts.append(int(count))
    layout = PartLayout.build(part_size, [len(dataset), *counts])
    distractors = [{"root": str(root), "id_prefix": prefix, "count": n, "first_item": first}
                   for (root, prefix, _), n, (first, _) in zip(folders, counts, layout.segments[1:])]
    manifest = manifest_for(model, datamodule, datamodule.benchmark, ckpt_path, layout, distractors)
    writer = ShardWriter(out, manifest, dtype=dtype)
    if trainer.is_global_zero and not (Path(out) / "manifest.json").is_file():
        writer.write_manifest()
    done = writer.complete_parts()
    sampler = PartSampler(len(dataset), part_size, skip=done)
    loaders = [part_loader(dataset, sampler, batch, datamodule.num_workers, collate_images)]
    for entry in distractors:
        source = DistractorPartBatches(entry["root"], entry["id_prefix"], entry["first_item"], layout, batch, skip=done,
                                       max_side=datamodule.benchmark_max_side)
        loaders.append(torch.utils.data.DataLoader(source, batch_size=None, num_workers=datamodule.num_workers))
    shard_writer = RegionShardWriter(writer, layout, model.retrieval.regions_per_image)
    trainer.callbacks.append(shard_writer)
    if len(done) < layout.num_parts:
        import warnings

        # distractor batches number their items themselves (meta.extra["item"]): Lightning's
        # warning that it cannot track an iterable source's indices does not apply
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched")
        trainer.predict(model, dataloaders=loaders, ckpt_path=ckpt_path, return_predictions=False)
    trainer.strategy.barrier("instsearch-extract")  # every rank's parts are on disk
    totals = finalize_manifest(writer, layout.num_parts) if trainer.is_global_zero else None
    totals = broadcast_from_rank0(totals)
    return {**writer.manifest, **(totals or {}), "skipped_parts": len(done),
            "written_parts": len(shard_writer.parts_written)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="instsearch extract",
        description="Extract a benchmark's regions and query features into region shards (numpy + parquet parts "
                    "and a manifest), restartably. Unknown options go to LightningCLI (--config, --data.*, "
                    "--model.*, --trainer.*).")
    parser.add_argument("--out", required=True, help="the shards folder to write (rerun with the same folder to "
                        "finish an interrupted extraction)")
    parser.add_argument("--ckpt_path", default=None, help="weights of the model (default: the config's)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="stored region features (queries are always float32); default float16")
    parser.add_argument("--part-size", type=int, default=1000, help="benchmark items per part, rounded up to a "
                        "multiple of the batch size (default 1000)")
    args, rest = parser.parse_known_args(argv)
    if args.part_size < 1:
        parser.error(f"--part-size must be >= 1, got {args.part_size}")

    from instsearch.lightning_cli import lightning_cli

    # no logger: extraction writes shards, not a run
    cli = lightning_cli([*rest, "--trainer.logger", "false"], run=False, save_config_callback=None)
    result = extract_shards(cli.model, cli.datamodule, cli.trainer, args.out, ckpt_path=args.ckpt_path,
                            dtype=args.dtype, part_size=args.part_size)
    if cli.trainer.is_global_zero:
        if result.get("complete"):
            print(f"shards: {args.out} ({result['images']} images, {result['regions']} regions of {result['dim']}-D "
                  f"{args.dtype}, {result['queries']} queries, {result['num_parts']} parts: {result['written_parts']} "
                  f"written, {result['skipped_parts']} already complete)")
        else:
            print(f"shards: {args.out} is not complete yet (another process may still be writing parts)")
    return 0
