"""The search over region shards at scale: memory, speed of each stage, accuracy against exact.

    python benchmarks/scale_search.py --shards SHARDS --index INDEX [--nprobe N] [--shortlist 100]
                                      [--exact] [--json OUT.json]

Runs ``instsearch search``'s code (:func:`instsearch.search_cli.run_search`: ANN shortlist of
images, then every region of each shortlisted image rescored exactly from the memory-mapped
shards) on every stored query and prints:

* peak RSS of the process right after the search (``ru_maxrss``; run it once per database size,
  each in a fresh process, to see whether memory grows with the database);
* ms per query of the ANN stage, of bare faiss ``search`` on the same index with the same nprobe
  and the largest ``k`` the ANN stage used (their ratio: what the shortlist logic adds), and of
  the exact rescoring;
* with ``--exact``: image recall@K of the shortlist against the exact image ranking (each image
  scored by its best region, streamed over the parts: ``benchmarks/scale_data.py``) and mAP@100 of
  the run against that of the exact ranking, both scored on the shards' ``benchmark.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--shortlist", type=int, default=100)
    p.add_argument("--exact", action="store_true", help="also measure recall and mAP against the exact ranking")
    p.add_argument("--threads", type=int, default=None, help="faiss / torch threads (default: all cores)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import faiss
    import torch

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    from instsearch.eval.index_build import open_index
    from instsearch.eval.shards import RegionShards
    from instsearch.search_cli import run_search

    out = Path(tempfile.mkdtemp(prefix="scale_search_")) / "run.json"
    t0 = time.perf_counter()
    metrics = run_search(args.index, args.shards, out, {}, nprobe=args.nprobe, shortlist=args.shortlist)
    wall = time.perf_counter() - t0
    rss_search = peak_rss_mib()
    shards = RegionShards(args.shards)
    query_ids, queries, _ = shards.queries()
    nq = len(query_ids)

    # bare faiss on the same index, nprobe and k, in the same batches of 256 queries
    index = open_index(args.index, nprobe=args.nprobe)
    k = int(metrics["ann_k"])
    t1 = time.perf_counter()
    for start in range(0, nq, 256):
        index.search(np.ascontiguousarray(queries[start:start + 256], dtype=np.float32), k)
    bare_ms = 1000 * (time.perf_counter() - t1) / max(nq, 1)
    result = {
        "regions": shards.num_regions, "images": len(shards.image_ids), "dim": shards.dim, "queries": nq,
        "index_key": metrics["index_key"], "nprobe": metrics["nprobe"], "shortlist": metrics["shortlist"], "k": k,
        "peak_rss_mib_after_search": round(rss_search, 1), "search_wall_s": round(wall, 2),
        "ann_ms_per_query": round(metrics["ann_ms_per_query"], 3), "bare_faiss_ms_per_query": round(bare_ms, 3),
        "ann_over_bare_faiss": round(metrics["ann_ms_per_query"] / bare_ms, 3),
        "rescoring_ms_per_query": round(metrics["rescoring_ms_per_query"], 3),
        "rescoring_over_ann": round(metrics["rescoring_ms_per_query"] / metrics["ann_ms_per_query"], 3),
        "mAP@100": metrics.get("mAP@100"), "threads": args.threads or os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    if args.exact:
        from scale_data import exact_image_ranking

        from instsearch.eval.metrics import retrieval_metrics
        from instsearch.formats import Benchmark, Hit, Run

        t2 = time.perf_counter()
        exact = exact_image_ranking(shards, queries, args.shortlist)
        result["exact_ranking_s"] = round(time.perf_counter() - t2, 1)
        run = json.loads(out.read_text())["rankings"]
        ids = shards.image_ids
        recalls = []
        for qi, qid in enumerate(query_ids):
            truth = {ids[i] for i in exact.images[qi] if i >= 0}
            got = {h["image"] for h in run[qid][: args.shortlist]}
            recalls.append(len(truth & got) / max(len(truth), 1))
        result[f"image_recall@{args.shortlist}"] = round(float(np.mean(recalls)), 4)
        bench = Benchmark.load(shards.manifest["benchmark"])
        from instsearch.eval.shard_search import region_boxes

        boxes = region_boxes(shards, np.where(exact.regions >= 0, exact.regions, 0).ravel()).reshape(len(queries), -1, 4)
        exact_run = Run("exact", {qid: [Hit(ids[i], float(s), tuple(map(float, b)))
                                        for i, s, b in zip(exact.images[qi], exact.scores[qi], boxes[qi]) if i >= 0]
                                  for qi, qid in enumerate(query_ids)})
        exact_metrics = retrieval_metrics(bench, exact_run)
        result["exact_mAP@100"] = exact_metrics["mAP@100"]
        result["mAP@100_minus_exact"] = round(metrics["mAP@100"] - exact_metrics["mAP@100"], 5)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
