"""Memory and time of sharded evaluation at 1 M - 10 M regions, without a network.

    python benchmarks/sharded_evaluation.py --shards S [--world 2] [--spill-dir DIR] [--run-depth 100]
                                           [--json OUT.json]

``instsearch test`` with ``retrieval.evaluation: sharded`` runs a network over the benchmark and
hands each batch's regions to :class:`~instsearch.eval.evaluator.RetrievalEvaluator`; this script
hands it the regions of a planted collection instead (``benchmarks/scale_simulation.py``), so the
evaluation side runs at sizes no extraction on this machine reaches. ``--world`` gloo processes
each get every ``world``-th image, in batches, as Lightning's distributed sampler strides them,
and every ``world``-th query; then ``compute()`` ranks and scores exactly as ``instsearch test``
does (``--spill-dir``: regions spilled to shards and ranked streamed; without it, in memory).

Each process samples its own ``/proc/self/status`` every 20 ms; printed per rank: the peak
anonymous memory (its own allocations: what must fit) and file-backed pages (mapped shards), the
seconds spent handing over the batches and in ``compute()``, and rank 0's metrics. Run it once
per database size to see whether memory grows with the database. Measurements: ``docs/scale.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


class PeakSampler:
    """Peak ``RssAnon`` / ``RssFile`` of this process, sampled by a daemon thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, {"RssAnon": 0, "RssFile": 0}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {k: round(v / 2**20, 1) for k, v in self.peak.items()}


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    sampler = PeakSampler()
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from instsearch.distributed import all_gather_objects
    from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator
    from instsearch.eval.extraction import QueryFeature, SearchBatch
    from instsearch.formats import Benchmark
    from instsearch.structures import ImageMeta, Regions

    import pyarrow.parquet as pq

    # the source is read one part at a time, its records (every image id) dropped after each, as
    # a data loader serves images: what is measured is the evaluation's memory, not the source's
    source = Path(args.shards)
    manifest = json.loads((source / "manifest.json").read_text())
    bench = Benchmark.load(manifest["benchmark"])
    config = RetrievalConfig(evaluation="sharded", spill_dir=args.spill_dir, run_depth=args.run_depth,
                             grid_queries=0)
    evaluator = RetrievalEvaluator(bench, config)
    t0 = time.perf_counter()
    item, images, regions = 0, 0, 0
    batch: list = []
    query_ids: list[str] = []
    queries = []
    for path in sorted((source / "parts").glob("part-*.json")):
        record = json.loads(path.read_text())
        name = path.stem
        features = np.load(source / "emb" / f"{name}.npy", mmap_mode="r")
        meta = pq.read_table(source / "meta" / f"{name}.parquet", columns=["x1", "y1", "x2", "y2", "score"])
        boxes = np.stack([meta.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], 1).astype(np.float32)
        scores = meta.column("score").to_numpy().astype(np.float32)
        query_ids += pq.read_table(source / "queries" / f"{name}.parquet").column("query_id").to_pylist()
        queries.append(np.load(source / "queries" / f"{name}.npy"))
        images, regions = images + len(record["images"]), regions + record["regions"]
        ends = np.cumsum(record["region_counts"])
        for image_id, b, n in zip(record["images"], ends.tolist(), record["region_counts"]):
            a = b - n
            if item % world == rank:
                batch.append((ImageMeta(image_id, (480, 640)), Regions(
                    boxes=torch.from_numpy(boxes[a:b]), scores=torch.from_numpy(scores[a:b]),
                    features=torch.from_numpy(np.asarray(features[a:b], dtype=np.float32)), image_size=(480, 640))))
                if len(batch) == args.batch_size:
                    evaluator.process(SearchBatch(database=batch))
                    batch = []
            item += 1
        del features
    queries = np.concatenate(queries).astype(np.float32)
    mine = range(rank, len(query_ids), world)
    evaluator.process(SearchBatch(database=batch, queries=[
        QueryFeature(ImageMeta(f"query-image:{query_ids[j]}", (480, 640), query_ids[j], (0, 0, 10, 10)),
                     torch.from_numpy(queries[j])) for j in mine]))
    t1 = time.perf_counter()
    before_compute = dict(sampler.peak)
    result = evaluator.compute()
    t2 = time.perf_counter()
    memory = sampler.stop()
    report = {"rank": rank, "peak_anon_mib": memory["RssAnon"], "peak_file_mib": memory["RssFile"],
              "peak_anon_mib_before_compute": round(before_compute["RssAnon"] / 2**20, 1),
              "feed_s": round(t1 - t0, 1), "compute_s": round(t2 - t1, 1)}
    reports = all_gather_objects(report)
    if rank == 0:
        keys = ("mAP@10", "mAP@100", "mAP@all", "mIoU", "regions_per_image")
        summary = {"shards": str(args.shards), "regions": regions, "images": images,
                   "world": world, "spill": args.spill_dir is not None, "run_depth": args.run_depth,
                   "ranks": reports, "metrics": {k: result.metrics[k] for k in keys},
                   "run_hits": sum(len(h) for h in result.run.rankings.values())}
        Path(out).write_text(json.dumps(summary, indent=1))
    if world > 1:
        dist.barrier()  # neither process tears the group down while the other still uses it
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, type=Path, help="a planted collection (scale_simulation.py)")
    p.add_argument("--world", type=int, default=2, help="gloo processes")
    p.add_argument("--spill-dir", default=None, help="spill each process's regions here (streamed ranking)")
    p.add_argument("--run-depth", type=int, default=100, help="images per query each process sends rank 0")
    p.add_argument("--batch-size", type=int, default=64, help="images per handed-over batch")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    tmp = Path(tempfile.mkdtemp(prefix="sharded_evaluation_"))
    out = tmp / "summary.json"
    mp.spawn(_worker, args=(args.world, f"file://{tmp / 'rendezvous'}", args, str(out)), nprocs=args.world)
    summary = json.loads(out.read_text())
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
