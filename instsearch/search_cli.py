"""``instsearch search``: the queries of region shards against an index built from them.

    instsearch search --index INDEX --shards SHARDS --out RUN.json [--config C.yaml]
                      [--nprobe N] [--shortlist K] [--normalization ...] [--protocol ...]

Two stages (:mod:`instsearch.eval.shard_search`): the ANN index shortlists ``K`` images per
query, then every region of each shortlisted image is rescored exactly from the shards, so every
returned score and box is the image's exact best region. Writes ``RUN.json`` (instsearch-run/1)
and ``metrics.json`` beside it: the ranking metrics of ``instsearch test`` (the config's
``model.retrieval`` normalisation and protocol), detector recall@IoU, and what the numbers rest
on -- database and distractor counts, exact or ANN, index key, nprobe, shortlist, ms per query
of each stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

PROG = "instsearch search"


def retrieval_settings(config_path: Optional[str]) -> dict[str, Any]:
    """The ``model.init_args.retrieval`` block of a config file (its included pieces read in)."""
    if not config_path:
        return {}
    from instsearch.config_files import load_config

    config = load_config(config_path)
    return dict(((config.get("model") or {}).get("init_args") or {}).get("retrieval") or {})


def open_searcher(index_dir: str | Path, nprobe: Optional[int]):
    """The faiss index ``instsearch index build`` wrote, as a searcher, and its description."""
    from instsearch.eval.index_build import open_index
    from instsearch.eval.searchers import FaissSearcher

    index_dir = Path(index_dir)
    info_path = index_dir / "index.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"not an index folder: {info_path} is missing (expected the output of "
                                f"'instsearch index build')")
    info = json.loads(info_path.read_text())
    index = open_index(index_dir, nprobe=nprobe)
    return FaissSearcher(index, codes_only=True, nprobe=nprobe), info


def run_search(index_dir: str | Path, shards_dir: str | Path, out: str | Path, settings: dict[str, Any],
               nprobe: int | str | None = "auto", shortlist: Optional[int] = 300,
               benchmark_path: Optional[str] = None, batch_size: int = 256,
               tolerance: float = 1e-3) -> dict[str, Any]:
    """Search every stored query, score the run and write ``out`` and ``metrics.json`` beside it;
    returns the metrics.

    ``nprobe``: a number of inverted lists, ``"stored"`` (or ``None``: the index's database-sample
    estimate) or ``"auto"`` (tuned on the queries, :func:`~instsearch.eval.shard_search.
    tune_nprobe_on_queries`, with ``tolerance``; an index without lists, or scored by L2, keeps
    its stored value)."""
    from instsearch.eval.evaluator import RECALL_THRESHOLDS, add_database_metrics, detector_recall
    from instsearch.eval.metrics import json_ready, retrieval_metrics
    from instsearch.eval.shard_search import StageTimes, image_regions, search_shards, tune_nprobe_on_queries
    from instsearch.eval.shards import RegionShards
    from instsearch.formats import Benchmark

    for key, refused in (("whitening", False), ("prune_by_label", False)):
        if settings.get(key, refused) not in (refused, None):
            raise ValueError(f"the config sets retrieval.{key}={settings[key]!r}, which the search over shards does "
                             f"not apply yet: evaluate that setting with 'instsearch test'")
    shards = RegionShards(shards_dir)
    if nprobe not in (None, "auto", "stored") and (not str(nprobe).isdigit() or int(nprobe) < 1):
        raise ValueError(f"--nprobe must be a number of lists >= 1, 'auto' or 'stored', got {nprobe!r}")
    given = int(nprobe) if nprobe not in (None, "auto", "stored") else None
    searcher, info = open_searcher(index_dir, given)
    if searcher.ntotal != shards.num_regions or searcher.dim != shards.dim:
        raise ValueError(f"{index_dir} holds {searcher.ntotal} vectors of {searcher.dim}-D, {shards_dir} "
                         f"{shards.num_regions} regions of {shards.dim}-D: build the index from these shards")
    bench = Benchmark.load(benchmark_path or shards.manifest["benchmark"])
    stored_ids, features, _ = shards.queries()
    row = {q: i for i, q in enumerate(stored_ids)}
    query_ids = [q.id for q in bench.queries if q.id in row]
    rule: dict[str, Any] = {"rule": "given" if given else "stored"}
    if nprobe == "auto" and searcher.nprobe is not None and searcher.score == "inner_product":
        rule = tune_nprobe_on_queries(searcher, shards, features[[row[q] for q in query_ids]], shortlist,
                                      tolerance=tolerance).as_dict()
    times = StageTimes()
    run = search_shards(searcher, shards, query_ids, features[[row[q] for q in query_ids]], shortlist=shortlist,
                        method=shards.manifest.get("model", "regions"), batch_size=batch_size, times=times)
    metrics = retrieval_metrics(bench, run, normalization=settings.get("normalization", "relevant"),
                                protocol=settings.get("protocol", "standard"))
    # positions of the ground truth's images only (a dict of every image would cost ~100 bytes
    # per database image for a few hundred lookups)
    wanted = {i for g in bench.ground_truth.values() for i in g.positives}
    position = {image_id: i for i, image_id in enumerate(shards.image_ids) if image_id in wanted}
    starts = shards.image_starts

    def boxes_of(ids):
        import numpy as np

        images = np.array([position[i] for i in ids], dtype=np.int64)
        regions, _ = image_regions(starts, images)
        return np.split(shards.region_boxes(regions), np.cumsum(starts[images + 1] - starts[images])[:-1])

    curve = detector_recall(bench, boxes_of, available=position.__contains__, thresholds=RECALL_THRESHOLDS)
    add_database_metrics(metrics, curve, num_regions=shards.num_regions, num_images=len(shards.image_ids),
                         bad_items=len(shards.bad_images))
    exact = info.get("factory") == "Flat" and shortlist is None
    distractors = sum(1 for i in shards.image_ids if bench.is_distractor(i))
    nq = max(len(query_ids), 1)
    metrics.update({
        "database_images": len(shards.image_ids) - distractors,
        "distractor_images": distractors,
        "database_regions": shards.num_regions,
        "search": "exact" if exact else "ann+exact_rescoring",
        "index_key": info.get("factory"), "nprobe": searcher.nprobe, "ann_k": times.ann_k,
        **({"nprobe_rule": rule} if searcher.nprobe is not None else {}),
        "shortlist": shortlist if shortlist is not None else len(shards.image_ids),
        "ann_ms_per_query": 1000 * times.ann / nq, "rescoring_ms_per_query": 1000 * times.rescoring / nq,
    })
    out = Path(out)
    run.save(out)
    (out.parent / "metrics.json").write_text(json.dumps(json_ready(metrics), indent=1) + "\n")
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Search region shards' queries through an index built "
                                "from them (ANN shortlist, exact best-region rescoring); write run.json and "
                                "metrics.json.")
    p.add_argument("--index", required=True, help="the folder 'instsearch index build' wrote")
    p.add_argument("--shards", required=True, help="the folder 'instsearch extract' wrote")
    p.add_argument("--out", required=True, help="the run file to write (metrics.json goes beside it)")
    p.add_argument("--config", default=None, help="the model's config: its model.retrieval settings "
                   "(normalization, protocol) score the run as 'instsearch test' would")
    p.add_argument("--benchmark", default=None, help="benchmark.json (default: the one the shards were extracted from)")
    p.add_argument("--nprobe", default="auto", help="inverted lists visited per query (IVF indexes): a number, "
                   "'stored' (the index's estimate from a sample of the database) or 'auto' (default: from "
                   "the stored value, doubled while the top 100 images of a sample of 100 queries gain "
                   "at least --nprobe-tolerance of recall against their exact ranking)")
    p.add_argument("--nprobe-tolerance", type=float, default=1e-3, help="recall gain below which auto stops")
    p.add_argument("--shortlist", type=int, default=300,
                   help="images per query taken from the ANN stage and rescored exactly (0: every image); "
                   "about three times the depth scored (mAP@100), since compressed codes reorder the images "
                   "near the shortlist's end")
    p.add_argument("--normalization", default=None, help="override the config's AP normalisation")
    p.add_argument("--protocol", default=None, help="override the config's protocol")
    args = p.parse_args(argv)
    try:
        settings = retrieval_settings(args.config)
        settings.update({k: v for k, v in (("normalization", args.normalization), ("protocol", args.protocol)) if v})
        t0 = time.perf_counter()
        metrics = run_search(args.index, args.shards, args.out, settings, nprobe=args.nprobe,
                             shortlist=args.shortlist or None, benchmark_path=args.benchmark,
                             tolerance=args.nprobe_tolerance)
    except (FileNotFoundError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from instsearch.eval.score_run import format_metrics

    print(format_metrics(metrics))
    print(f"run: {args.out}\nmetrics: {Path(args.out).parent / 'metrics.json'}  ({time.perf_counter() - t0:.1f} s)")
    return 0
