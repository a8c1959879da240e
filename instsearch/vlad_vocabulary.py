"""``instsearch vlad-vocabulary``: fit DASR's VLAD* vocabulary on another benchmark's database.

    instsearch vlad-vocabulary --benchmark B.json --out vocabulary.npz [--star] [--k 4] [--max-images 1000]

The k-means words, the per-word local coordinate systems and the final PCA rotation
(:func:`~instsearch.networks.vlad.fit_vocabulary`) are learnt on the DASR region features of an
independent image set, as the DASR paper (after Delhumeau et al.) prescribes, then given to
``DASRVLAD(codebook=...)``. The images are extracted like any benchmark's
(:func:`~instsearch.eval.extraction.extract`: streamed, undecodable files reported and skipped).
An ``--out`` ending in ``.npy`` writes the k-means words only.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instsearch vlad-vocabulary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", type=Path, required=True, help="benchmark JSON whose database images are used")
    p.add_argument("--out", type=Path, required=True, help=".npz: the whole vocabulary; .npy: the words only")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default=None)
    p.add_argument("--star", action="store_true", help="DASR* regions")
    p.add_argument("--long-side", type=int, default=512, help="DASR's image size (as the config searched)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=1000, help="the first N database images")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-residual-normalisation", action="store_true")
    p.add_argument("--no-local-coordinate-system", action="store_true")
    p.add_argument("--no-pca-rotation", action="store_true")
    p.add_argument("--power", type=float, default=0.5)
    p.add_argument("--intra", action="store_true", help="intra-normalisation (for the PCA fitted here)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from instsearch.datamodules.benchmark import benchmark_dataloader
    from instsearch.eval.extraction import extract
    from instsearch.formats import Benchmark
    from instsearch.networks.dasr import DASR
    from instsearch.networks.vlad import fit_codebook, fit_vocabulary

    bench = Benchmark.load(a.benchmark)
    indices = list(range(min(a.max_images, len(bench.database))))
    loader = benchmark_dataloader(bench, part="database", batch_size=a.batch_size, indices=indices)
    dasr = DASR(a.backbone, weights=a.weights, star=a.star, long_side=a.long_side)
    collection = extract(dasr, [loader], desc="DASR regions")
    store = collection.store()
    if not len(store):
        raise SystemExit(f"{a.benchmark}: no DASR region in its first {len(indices)} database images")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.out.suffix == ".npy":
        codebook = fit_codebook(store.features, k=a.k, seed=a.seed)
        np.save(a.out, codebook)
        print(f"codebook {codebook.shape} -> {a.out}")
        return 0
    vocabulary = fit_vocabulary(
        store.features, store.image_index, len(store.image_ids), k=a.k, seed=a.seed,
        residual_normalisation=not a.no_residual_normalisation,
        local_coordinate_system=not a.no_local_coordinate_system, power=a.power, intra=a.intra,
        pca_rotation=not a.no_pca_rotation)
    out = vocabulary.save(a.out)
    pca = "none" if vocabulary.pca_axes is None else f"{vocabulary.pca_axes.shape[0]} axes"
    skipped = f", {len(collection.bad_images)} unreadable skipped" if collection.bad_images else ""
    print(f"vocabulary {vocabulary.codebook.shape}, LCS {'yes' if vocabulary.lcs is not None else 'no'}, "
          f"PCA {pca} ({len(store.image_ids)} images, {len(store)} regions{skipped}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
