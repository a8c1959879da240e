"""One UDQ round's refinement and OPQ refit at the paper's scale: 1 M proposals x 296-D on the CPU.

At every round boundary UDQ (unsupervised deep quantization, Section 3.4) refines each proposal's
feature - BFR (Eq. 11), PBR (Eq. 12) or CBR (Eq. 13) - and refits OPQ on the refined features
(Eq. 6), whose codes become the next round's pseudo-labels. On rank 0 and between epochs, this is
time the GPUs wait. The paper's Oxford5K holds 5,063 images x 200 proposals, about 1 M. This
script times, on simulated features of that size and one process:

(a) each refinement as ``lightning_modules/udq.py`` calls it: BFR through faiss's IVF index
    (``refine_bfr(method="ivf")``, S = 10), PBR (S = 50) and CBR with ``round(sqrt(G))`` k-means
    cells (the module's default), each including its own k-means / index training;
(b) the OPQ refit on the BFR-refined features: ``OPQCodebook.fit`` (M = 8, ``--nbits``, 50 OPQ
    iterations) - faiss trains the rotation on a 65,536-row sample (``OPQMatrix.max_train_points``),
    then rotates all G rows and trains the final PQ on faiss's subsample of them (see the JSON's
    ``opq_sampling``) - and the labels: ``encode`` of all G rows and ``quantization_error``, as
    ``UDQ._fit_labels`` does;
(c) exact BFR (``method="exact"``) at smaller G, at ``--threads`` and at 1 thread (what UDQ's
    module pins faiss to), extrapolated to G as ``O(G^2)`` from the largest measured size, with
    the IVF path at the same sizes for comparison;
(d) the IVF path's quality on a seeded sample of ``--sample`` proposals: recall@S of its
    neighbours against exact search over all G (faiss ``IndexFlat``), and the cosine of each
    sampled proposal's IVF refinement to its exact refinement; and the same recall for other
    ``nprobe`` (``--nprobe-sweep``: an IVF index built as ``refine_bfr`` builds it, searched for
    the sample only).

Data: a two-level Gaussian mixture on the unit sphere. ``G / 2000`` object centres are drawn
with a per-dimension scale decaying linearly from 1 to 0.1 (as PCA-reduced CNN features have
decaying variance) and normalised; ``G / 20`` instance centres each perturb one object centre by
``--object-spread`` times such noise (noise norm about ``--object-spread``) and are normalised;
each proposal perturbs a uniformly drawn instance by ``--view-spread`` the same way and is
normalised. With the defaults a proposal's nearest neighbour is at about 0.9 and its tenth at
about 1.0, against 1.41 for two random proposals (printed). Generated in chunks from numpy's seeded
Generator.

Each step is timed once (``time.perf_counter``) - at 1 M the steps take minutes, so there is no
best-of - and the load average is printed before and after: other processes on the machine
slow every step. Peak memory is this process's peak resident set (``getrusage``), also recorded
after each step. faiss and torch run on ``--threads`` threads; the IVF path takes them through
``refine_bfr(threads=...)``.

Measured at 1 M x 296 (defaults, nbits 9, --threads 2) on a 2-core AMD EPYC VM that another
process kept busy throughout (load average 3.3 before, 3.4 after; every time below is inflated by
it, perhaps twofold):

    step                              G          threads   seconds
    BFR, IVF (nlist 4000, nprobe 32)  1,000,000  2           821
    PBR (S = 50, 1000 cells)          1,000,000  2           238
    CBR (1000 cells)                  1,000,000  2            69
    OPQ fit (M 8, nbits 9, 50 iter.)  1,000,000  2           884
    encode all + quantization error   1,000,000  2            17
    BFR exact                            50,000  2 / 1      9.4 / 16.7   (IVF: 4.6)
    BFR exact                           100,000  2 / 1     95.9 / 65.6   (IVF: 28.2)
    BFR exact, extrapolated (x 100)  1,000,000  2 / 1    9,593 / 6,563

One round (refinement + refit + labels): BFR 1,721 s, PBR 1,138 s, CBR 970 s; with exact BFR
about 7,460 s. IVF quality on 1,000 sampled proposals: recall@10 1.000 (nprobe 8: 0.996, 16:
1.000, 64: 1.000), all sampled refinements equal to the exact ones (mean cosine 1.000000). Peak
resident memory 8.65 GB, reached while encoding (the BFR step peaked at 4.6 GB, PBR at 6.0 GB).

What ``OPQCodebook.fit`` samples (faiss's verbose log, checked separately): the rotation is
fitted on 65,536 sampled rows (``OPQMatrix.max_train_points``; 40 PQ k-means iterations in the
first OPQ iteration, 4 in the others); then all G rows are rotated and the final PQ is trained on
a subsample of min(G, 1000 K) rows per subspace (256,000 for K = 256, 512,000 for K = 512), with
the 4 k-means iterations OPQ left in the shared ``ProductQuantizer.cp.niter``.

    .venv/bin/python benchmarks/udq_refit_scale.py --quick        # 100k proposals, 10 OPQ iterations, a few minutes
    .venv/bin/python benchmarks/udq_refit_scale.py --out runs/udq_refit_scale.json
        # 1M x 296, --threads 2: about 45 minutes on the loaded 2-core machine, 8.7 GB
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import faiss
import numpy as np
import torch

from instsearch.networks.product_quantizer import OPQCodebook, faiss_threads
from instsearch.networks.udq_refine import (BFR_NPROBE, bfr_ivf_lists, neighbour_mean, refine_bfr, refine_cbr,
                                            refine_pbr)

CHUNK = 1 << 16  # rows generated per step


def _sphere(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_features(n: int, dim: int, seed: int, per_object: int = 2000, per_instance: int = 20,
                  object_spread: float = 1.0, view_spread: float = 1.0) -> np.ndarray:
    """``(n, dim)`` float32 unit vectors from the two-level mixture of the module docstring."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(1.0, 0.1, dim, dtype=np.float32)
    scale /= np.sqrt((scale ** 2).sum())  # a standard normal times this has norm ~1
    objects = _sphere(rng.standard_normal((max(1, n // per_object), dim), dtype=np.float32) * scale)
    num_instances = max(1, n // per_instance)
    instances = np.empty((num_instances, dim), np.float32)
    for a in range(0, num_instances, CHUNK):
        b = min(num_instances, a + CHUNK)
        noise = rng.standard_normal((b - a, dim), dtype=np.float32) * (object_spread * scale)
        instances[a:b] = _sphere(objects[rng.integers(0, len(objects), b - a)] + noise)
    x = np.empty((n, dim), np.float32)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        noise = rng.standard_normal((b - a, dim), dtype=np.float32) * (view_spread * scale)
        x[a:b] = _sphere(instances[rng.integers(0, num_instances, b - a)] + noise)
    return x


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Steps:
    """Times named steps, records the peak RSS after each, prints a table row per step."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(self, name: str, fn, size: int, threads: int, note: str = ""):
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        row = {"step": name, "proposals": size, "threads": threads, "seconds": seconds,
               "peak_rss_mb": peak_rss_mb(), "note": note}
        self.rows.append(row)
        print(f"  {name:<34} {size:>9,} {threads:>3} {seconds:>10.1f} {row['peak_rss_mb']:>9,.0f}  {note}", flush=True)
        return out

    def add(self, name: str, seconds: float, size: int, threads: int, note: str) -> None:
        self.rows.append({"step": name, "proposals": size, "threads": threads, "seconds": seconds,
                          "peak_rss_mb": peak_rss_mb(), "note": note})
        print(f"  {name:<34} {size:>9,} {threads:>3} {seconds:>10.1f} {'':>9}  {note}", flush=True)


def exact_neighbours(x: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` (self included) of ``x[rows]`` over all of ``x``: faiss ``IndexFlat``."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index.search(x[rows], k)[1]


def recall(found: np.ndarray, truth: np.ndarray, rows: np.ndarray) -> float:
    """Share of each row's exact neighbours (self excluded) among its found ones (self excluded)."""
    hits, total = 0, 0
    for r, f, t in zip(rows, found, truth):
        t = t[t != r][: truth.shape[1] - 1]
        f = f[(f != r) & (f >= 0)][: truth.shape[1] - 1]
        hits += len(np.intersect1d(t, f))
        total += len(t)
    return hits / max(total, 1)


def nprobe_sweep(x: np.ndarray, rows: np.ndarray, truth: np.ndarray, k: int, seed: int,
                 probes: list[int]) -> dict[int, float]:
    """Recall of an IVF index built as ``refine_bfr`` builds it, searched for ``rows`` only."""
    g, d = x.shape
    nlist = bfr_ivf_lists(g)
    n_train = min(g, 40 * nlist)
    train = x if n_train == g else x[np.sort(np.random.default_rng(seed).choice(g, n_train, replace=False))]
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist)
    index.cp.seed, index.cp.niter = seed, 10
    index.cp.max_points_per_centroid, index.cp.min_points_per_centroid = n_train // nlist + 1, 1
    index.train(train)
    index.add(x)
    out = {}
    for p in probes:
        index.nprobe = min(p, nlist)
        out[p] = recall(index.search(x[rows], k)[1], truth, rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=None, help="proposals G (default 1000000, 100000 with --quick)")
    p.add_argument("--dim", type=int, default=296)
    p.add_argument("--threads", type=int, default=2, help="faiss and torch threads")
    p.add_argument("--subspaces", type=int, default=8)
    p.add_argument("--nbits", type=int, default=9, help="9: K = 512 as the paper's Oxford5K; 8: K = 256")
    p.add_argument("--opq-iterations", type=int, default=None, help="default 50, 10 with --quick")
    p.add_argument("--bfr-neighbours", type=int, default=10)
    p.add_argument("--pbr-neighbours", type=int, default=50)
    p.add_argument("--nprobe", type=int, default=BFR_NPROBE)
    p.add_argument("--exact-sizes", type=str, default=None,
                   help="comma-separated G for exact BFR (default 50000,100000; 10000,20000 with --quick)")
    p.add_argument("--sample", type=int, default=1000, help="proposals the IVF recall is measured on")
    p.add_argument("--nprobe-sweep", type=str, default="8,16,32,64", help="'' to skip")
    p.add_argument("--object-spread", type=float, default=1.0)
    p.add_argument("--view-spread", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="100k proposals, 10 OPQ iterations, exact BFR at 10k and 20k")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    a = p.parse_args()
    g = a.num or (100_000 if a.quick else 1_000_000)
    if a.opq_iterations is None:
        a.opq_iterations = 10 if a.quick else 50
    exact_sizes = [int(s) for s in (a.exact_sizes or ("10000,20000" if a.quick else "50000,100000")).split(",")]
    exact_sizes = [n for n in exact_sizes if n <= g]
    sweep = [int(s) for s in a.nprobe_sweep.split(",") if s]
    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    cells = max(1, int(round(np.sqrt(g))))
    steps = Steps()
    load_before = os.getloadavg()
    print(f"UDQ round refit at G = {g:,} x {a.dim}-D, {a.threads} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, faiss {faiss.__version__}, load average {load_before[0]:.2f}")
    print(f"  {'step':<34} {'G':>9} {'thr':>3} {'seconds':>10} {'peak MB':>9}  note")

    x = steps.run("generate features", lambda: make_features(g, a.dim, a.seed, object_spread=a.object_spread,
                                                             view_spread=a.view_spread), g, a.threads, "not part of a round")
    rng = np.random.default_rng(a.seed + 1)
    rows = np.sort(rng.choice(g, min(a.sample, g), replace=False))
    k = a.bfr_neighbours + 1

    # (a) refinements
    bfr, bfr_nb = steps.run("BFR ivf (S=%d)" % a.bfr_neighbours,
                            lambda: refine_bfr(x, a.bfr_neighbours, method="ivf", nprobe=a.nprobe, seed=a.seed,
                                               threads=a.threads, return_neighbours=True), g, a.threads,
                            f"nlist {bfr_ivf_lists(g)}, nprobe {a.nprobe}")
    steps.run("PBR (S=%d)" % a.pbr_neighbours,
              lambda: refine_pbr(x, cells, a.pbr_neighbours, seed=a.seed), g, a.threads, f"{cells} k-means cells")
    steps.run("CBR", lambda: refine_cbr(x, cells, seed=a.seed), g, a.threads, f"{cells} k-means cells")

    # (b) OPQ refit and labels on the BFR targets
    codebook = steps.run("OPQ fit", lambda: OPQCodebook.fit(bfr, a.subspaces, a.nbits, seed=a.seed,
                                                            opq_iterations=a.opq_iterations, num_threads=a.threads),
                         g, a.threads, f"M {a.subspaces}, nbits {a.nbits}, {a.opq_iterations} OPQ iterations")
    codes = steps.run("encode all", lambda: codebook.encode(bfr), g, a.threads, "codebook.encode")
    qerr = steps.run("quantization error", lambda: codebook.quantization_error(bfr, codes), g, a.threads,
                     "with the codes given")
    del codes

    # (d) quality of the IVF path on a sample
    truth = steps.run("exact kNN of the sample", lambda: exact_neighbours(x, rows, k), len(rows), a.threads,
                      "ground truth over all G")
    ivf_recall = recall(bfr_nb[rows], truth, rows)
    exact_rows = neighbour_mean(x, truth, a.bfr_neighbours, True, rows=rows)
    cos = (exact_rows * bfr[rows]).sum(1) / np.linalg.norm(exact_rows, axis=1) / np.linalg.norm(bfr[rows], axis=1)
    same = float(np.mean([set(f[(f != r) & (f >= 0)]) == set(t[t != r][:a.bfr_neighbours])
                          for r, f, t in zip(rows, bfr_nb[rows], truth)]))
    dists = np.sqrt(((x[rows, None] - x[truth[:, [1, -1]]]) ** 2).sum(-1)).mean(0)
    random_pair = float(np.sqrt(((x[rows] - x[rng.choice(g, len(rows))]) ** 2).sum(1)).mean())
    del bfr, bfr_nb
    sweep_recall = {}
    if sweep:
        sweep_recall = steps.run("nprobe sweep (index for sample)",
                                 lambda: nprobe_sweep(x, rows, truth, k, a.seed, sweep), g, a.threads,
                                 "train + add + sample searches")

    # (c) exact BFR at smaller sizes, extrapolated
    exact_times: dict[int, dict[int, float]] = {}
    for n in exact_sizes:
        sub = np.ascontiguousarray(x[:n])
        for t in sorted({a.threads, 1}, reverse=True):
            with faiss_threads(t):
                start = time.perf_counter()
                refine_bfr(sub, a.bfr_neighbours, method="exact")
                exact_times.setdefault(t, {})[n] = time.perf_counter() - start
            steps.add("BFR exact", exact_times[t][n], n, t, "IndexFlat")
        steps.run("BFR ivf", lambda: refine_bfr(sub, a.bfr_neighbours, method="ivf", nprobe=a.nprobe, seed=a.seed,
                                                threads=a.threads), n, a.threads, f"nlist {bfr_ivf_lists(n)}")
    extrapolated = {}
    for t, times in exact_times.items():
        n = max(times)
        extrapolated[t] = times[n] * (g / n) ** 2
        steps.add("BFR exact, extrapolated", extrapolated[t], g, t, f"(G / {n:,})^2 x measured")

    load_after = os.getloadavg()
    round_rows = {r["step"]: r["seconds"] for r in steps.rows if r["proposals"] == g}
    refit = round_rows["OPQ fit"] + round_rows["encode all"] + round_rows["quantization error"]
    bfr_name = "BFR ivf (S=%d)" % a.bfr_neighbours
    print(f"\none round at G = {g:,}: refinement + OPQ fit + labels")
    for name in (bfr_name, "PBR (S=%d)" % a.pbr_neighbours, "CBR"):
        print(f"  {name:<20} {round_rows[name] + refit:>8.1f} s  ({round_rows[name]:.1f} s refinement + {refit:.1f} s refit)")
    print(f"  exact BFR would be   {extrapolated[min(extrapolated)] + refit:>8.1f} s at {min(extrapolated)} thread(s) "
          f"(extrapolated), {extrapolated[max(extrapolated)] + refit:.1f} s at {max(extrapolated)}")
    print(f"\nIVF BFR on {len(rows):,} sampled proposals: recall@{a.bfr_neighbours} {ivf_recall:.4f}, "
          f"all {a.bfr_neighbours} neighbours exact for {same:.1%}; cosine to the exact refinement "
          f"mean {cos.mean():.6f}, min {cos.min():.4f}")
    if sweep_recall:
        print("  recall by nprobe: " + ", ".join(f"{q}: {r:.4f}" for q, r in sweep_recall.items()))
    print(f"  distances: nearest {dists[0]:.3f}, {a.bfr_neighbours}th {dists[1]:.3f}, random pair {random_pair:.3f}")
    print(f"OPQ quantization error (per proposal) {qerr:.4f}; peak resident memory {peak_rss_mb():,.0f} MB; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")

    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        result = {
            "proposals": g, "dim": a.dim, "threads": a.threads, "cpus": os.cpu_count(),
            "faiss": faiss.__version__, "subspaces": a.subspaces, "nbits": a.nbits,
            "opq_iterations": a.opq_iterations, "bfr_neighbours": a.bfr_neighbours,
            "pbr_neighbours": a.pbr_neighbours, "cells": cells, "nlist": bfr_ivf_lists(g), "nprobe": a.nprobe,
            "data": {"kind": "two-level Gaussian mixture on the unit sphere", "objects": max(1, g // 2000),
                     "instances": max(1, g // 20), "object_spread": a.object_spread,
                     "view_spread": a.view_spread, "seed": a.seed,
                     "mean_distance_nearest": float(dists[0]), "mean_distance_kth": float(dists[1]),
                     "mean_distance_random_pair": random_pair},
            "steps": steps.rows,
            "round_seconds": {name: round_rows[name] + refit
                              for name in (bfr_name, "PBR (S=%d)" % a.pbr_neighbours, "CBR")},
            "exact_bfr_seconds": {str(t): {str(n): s for n, s in v.items()} for t, v in exact_times.items()},
            "exact_bfr_extrapolated_seconds": {str(t): s for t, s in extrapolated.items()},
            "ivf_quality": {"sample": len(rows), "recall": ivf_recall, "all_neighbours_exact": same,
                            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                            "recall_by_nprobe": {str(q): r for q, r in sweep_recall.items()}},
            "opq_sampling": {"rotation_rows": int(faiss.OPQMatrix(a.dim, a.subspaces).max_train_points),
                             "final_pq_rows": min(g, 1000 * 2 ** a.nbits),
                             "note": "final PQ sample and its 4 k-means iterations as faiss's verbose log showed"},
            "quantization_error": qerr,
            "peak_rss_mb": peak_rss_mb(),
            "load_average": {"before": load_before, "after": load_after},
        }
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
