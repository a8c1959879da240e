"""UDQ's search at the paper's scale: ADC over product-quantised proposals, best proposal per image.

UDQ (Table 7) answers a query in 80 ms over Oxford5K's ~1 M region proposals: each proposal is
stored as its OPQ code, scored by the inverse of its asymmetric distance to the query (UDQ, Eq. 5),
and an image is ranked by its best proposal. This script measures that search on synthetic
clustered data of the same size and prints one table:

(a) bare faiss ADC: the codebook's ``to_faiss_index()`` holding the codes, ``index.search`` for the
    ``k = max(4 * top_images, 64)`` regions the framework asks for - one batch of all queries, and
    one query at a time (ms/query);
(b) the framework's whole search, ``RegionIndex(store, FaissSearcher.adc(...)).search(queries, top_images)``
    (ADC + best proposal per image + ranking, with its retries when too few distinct images came
    back), in one batch and one query at a time, and its ratio to (a);
(c) exact search over the uncompressed features: the framework's default ``RegionIndex(store)``
    (torch inner product, another metric: timed only) and the exact L2 ranking (torch brute force
    behind the same ``RegionIndex``), which is the ground truth of recall@top: the share of the
    exact top images (by best-proposal L2 distance on the real features) found in the ADC top;
(d) the same ADC search with 9-bit codes (K = 512) and with faiss's 4-bit fast-scan layout at the
    same code size (M = 16 x 4 bits = 64 bits, features zero-padded to a multiple of 16 when the
    dimension is not one, which leaves every L2 distance unchanged);
(e) memory: the code bytes faiss holds, and the per-proposal metadata the framework keeps
    (``RegionStore.image_index``, ``boxes``, ``scores``), whether the float features stay alive, and
    what a ``RegionIndex.save`` / ``RegionIndex.load`` round trip keeps (and that it ranks the same).

Data: ``--centres`` gaussian centres with a decaying per-dimension scale (as PCA-reduced CNN
features have), proposals drawn around them (``--objects-per-image 0``: every proposal picks its
own centre; ``N > 0``: each image holds N objects and its proposals are drawn around those, so
proposals of one image crowd together as overlapping boxes do), queries are perturbed database
proposals. Generated in chunks with numpy's seeded Generator. The default dimension 296 = 8 x 37
stands in for the paper's PCA-300, which M = 8 does not divide.

On the default data a 64-bit code's quantisation error exceeds the spread of a cluster, so the
ADC finds the query's cluster but ranks within it mostly by chance: recall@100 then sits a little
above the within-cluster chance level (about 100 / 475 images at 1M proposals). The timings do not
depend on it.

Timings are the best of ``--repeat`` runs; ``--profile`` (or a framework search slower than 1.5x
bare faiss) prints a cProfile of the framework's batch search. OpenMP threads that spin-wait are
very slow on cores another process keeps busy (faiss's OPQ fit ran 20x slower with 2 threads than
with 1 on a loaded 2-core machine): pass ``--threads 1`` there.

    .venv/bin/python benchmarks/udq_search.py --quick      # 100k proposals, about a minute
    .venv/bin/python benchmarks/udq_search.py              # 1M proposals, a few minutes, ~6 GB
"""
from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import resource
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import faiss
import numpy as np
import torch
from timing import best_of

from instsearch.eval.search import ImageRanking, RegionIndex, RegionStore
from instsearch.eval.searchers import FaissSearcher
from instsearch.networks.product_quantizer import OPQCodebook, faiss_threads

CHUNK = 1 << 16  # rows generated per step


# -- data ------------------------------------------------------------------------------------------

def make_features(n: int, dim: int, centres: int, per_image: int, objects_per_image: int, noise: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features (n, dim) float32, image_index (n,) int64, scale (dim,))``, generated in chunks."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(1.0, 0.1, dim, dtype=np.float32)
    centre_vecs = rng.standard_normal((centres, dim), dtype=np.float32) * scale
    image_index = np.arange(n, dtype=np.int64) // per_image
    num_images = int(image_index[-1]) + 1 if n else 0
    objects = rng.integers(0, centres, (num_images, objects_per_image)) if objects_per_image else None
    features = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        if objects is None:
            assign = rng.integers(0, centres, b - a)
        else:
            assign = objects[image_index[a:b], rng.integers(0, objects_per_image, b - a)]
        features[a:b] = rng.standard_normal((b - a, dim), dtype=np.float32)
        features[a:b] *= noise * scale
        features[a:b] += centre_vecs[assign]
    return features, image_index, scale


def make_store(features: np.ndarray, image_index: np.ndarray, seed: int) -> RegionStore:
    rng = np.random.default_rng(seed + 1)
    n = len(features)
    xy = rng.uniform(0, 400, (n, 2)).astype(np.float32)
    wh = rng.uniform(16, 200, (n, 2)).astype(np.float32)
    num_images = int(image_index[-1]) + 1 if n else 0
    return RegionStore(image_ids=[f"img{i:06d}" for i in range(num_images)], features=features,
                       image_index=image_index, boxes=np.concatenate([xy, xy + wh], axis=1),
                       scores=rng.uniform(0, 1, n).astype(np.float32))


def pad_columns(x: np.ndarray, width: int) -> np.ndarray:
    """Zero columns up to ``width``: every L2 distance (and inner product) stays the same."""
    if x.shape[1] == width:
        return x
    out = np.zeros((len(x), width), dtype=np.float32)
    for a in range(0, len(x), CHUNK):
        out[a:a + CHUNK, :x.shape[1]] = x[a:a + CHUNK]
    return out


# -- exact L2 ranking ------------------------------------------------------------------------------

class ExactL2Index:
    """Brute-force L2 with torch, faiss's ``search`` signature, scores ``-‖q − f‖²`` (higher better).

    Put behind a :class:`RegionIndex` it gives the exact best-proposal L2 ranking of images.
    """

    def __init__(self, features: np.ndarray, max_scores: int = 1 << 25):
        self.features = torch.from_numpy(features)
        self.norms = self.features.pow(2).sum(1)
        self.max_scores = max_scores

    @property
    def ntotal(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        k = min(int(k), self.ntotal)
        chunk = max(1, self.max_scores // max(self.ntotal, 1))
        scores, ids = [], []
        for a in range(0, len(q), chunk):
            qc = q[a:a + chunk]
            s = torch.addmm(self.norms[None], qc, self.features.T, beta=-1, alpha=2) - qc.pow(2).sum(1, keepdim=True)
            top = torch.topk(s, k, dim=1, largest=True, sorted=True)
            scores.append(top.values)
            ids.append(top.indices)
        return torch.cat(scores).numpy(), torch.cat(ids).numpy().astype(np.int64)


# -- measuring -------------------------------------------------------------------------------------

def one_at_a_time(fn: Callable[[np.ndarray], object], queries: np.ndarray) -> Callable[[], None]:
    def run() -> None:
        for i in range(len(queries)):
            fn(queries[i:i + 1])
    return run


def recall(found: list[ImageRanking], truth: list[ImageRanking]) -> float:
    return float(np.mean([len(np.intersect1d(f.images, t.images)) / max(len(t.images), 1)
                          for f, t in zip(found, truth)]))


def count_searches(region_index: RegionIndex, queries: np.ndarray, top: int) -> tuple[int, int]:
    """How many ``index.search`` calls one batch search makes, and how many query rows they scan."""
    inner = region_index.searcher
    calls, rows = [0], [0]
    original = inner.search

    def counting(q: np.ndarray, k: int):
        calls[0] += 1
        rows[0] += len(q)
        return original(q, k)

    inner.search = counting  # instance attribute, shadows the method for this call only
    try:
        region_index.search(queries, top_images=top)
    finally:
        del inner.search
    return calls[0], rows[0]


@dataclass
class Row:
    name: str
    bits: int
    fit_s: float
    add_s: float
    bare_ms: float
    frame_ms: float
    recall: float
    calls: tuple[int, int]
    bare_single_ms: Optional[float] = None
    frame_single_ms: Optional[float] = None
    code_bytes: int = 0


def measure_adc(name: str, store: RegionStore, train: np.ndarray, queries: np.ndarray, truth: list[ImageRanking],
                m: int, nbits: int, fast_scan: bool, a: argparse.Namespace, k: int,
                single: bool = False) -> tuple[Row, RegionIndex]:
    t = time.perf_counter()
    codebook = OPQCodebook.fit(train, m, nbits, seed=a.seed)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    region_index = RegionIndex(store, FaissSearcher.adc(codebook.to_faiss_index(fast_scan=fast_scan)))
    add_s = time.perf_counter() - t
    faiss_index = region_index.searcher.index  # the same faiss index the framework searches
    bare = best_of(lambda: faiss_index.search(queries, k), a.repeat)
    frame = best_of(lambda: region_index.search(queries, top_images=a.top_images), a.repeat)
    row = Row(name, m * nbits, fit_s, add_s, 1000 * bare / len(queries), 1000 * frame / len(queries),
              recall(region_index.search(queries, top_images=a.top_images), truth),
              count_searches(region_index, queries, a.top_images),
              code_bytes=code_bytes(faiss_index))
    if single:
        row.bare_single_ms = 1000 * best_of(one_at_a_time(lambda q: faiss_index.search(q, k), queries),
                                            a.repeat) / len(queries)
        row.frame_single_ms = 1000 * best_of(one_at_a_time(lambda q: region_index.search(q, top_images=a.top_images),
                                                           queries), a.repeat) / len(queries)
    return row, region_index


def code_bytes(index: faiss.Index) -> int:
    """Bytes of the codes faiss holds (fast-scan pads the database to whole blocks of ``bbs``)."""
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    return int(inner.codes.size())


def profile(region_index: RegionIndex, queries: np.ndarray, top: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    region_index.search(queries, top_images=top)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def mb(n: float) -> str:
    return f"{n / 2 ** 20:9.1f} MiB"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            model = f"{model} ({names[0]})"
    except OSError:
        pass
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--proposals", type=int, default=None, help="database proposals (default 1000000, 100000 with --quick)")
    p.add_argument("--dim", type=int, default=296)
    p.add_argument("--subspaces", type=int, default=8)
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--proposals-per-image", type=int, default=200)
    p.add_argument("--top-images", type=int, default=100)
    p.add_argument("--train", type=int, default=None, help="OPQ training samples (default 100000, 50000 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="faiss and torch threads (default: as they are)")
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--objects-per-image", type=int, default=0,
                   help="0: every proposal around its own random centre; N: proposals around N objects per image")
    p.add_argument("--noise", type=float, default=0.5, help="proposal spread around its centre, relative")
    p.add_argument("--query-noise", type=float, default=0.25, help="query perturbation, relative to --noise")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="100k proposals, 50k training samples")
    p.add_argument("--no-variants", action="store_true", help="skip (d): the 9-bit and fast-scan indexes")
    p.add_argument("--profile", action="store_true", help="cProfile the framework's batch search")
    a = p.parse_args()
    a.proposals = a.proposals or (100_000 if a.quick else 1_000_000)
    a.train = min(a.train or (50_000 if a.quick else 100_000), a.proposals)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    with faiss_threads(a.threads):
        run(a)


def run(a: argparse.Namespace) -> None:
    print(f"machine: {machine()}, {os.cpu_count()} CPUs; faiss {faiss.__version__} with "
          f"{faiss.omp_get_max_threads()} threads, torch {torch.__version__} with {torch.get_num_threads()} threads")
    t = time.perf_counter()
    features, image_index, scale = make_features(a.proposals, a.dim, a.centres, a.proposals_per_image,
                                                 a.objects_per_image, a.noise, a.seed)
    store = make_store(features, image_index, a.seed)
    rng = np.random.default_rng(a.seed + 2)
    picked = np.sort(rng.choice(len(features), a.queries, replace=False))
    queries = features[picked] + rng.standard_normal((a.queries, a.dim), dtype=np.float32) * (
        a.query_noise * a.noise * scale)
    train = features[np.sort(rng.choice(len(features), a.train, replace=False))]
    k = min(len(features), max(4 * min(a.top_images, len(store.image_ids)), 64))
    print(f"data: {len(features)} proposals x {a.dim}-D in {len(store.image_ids)} images "
          f"({a.proposals_per_image} each), {a.centres} centres, objects/image {a.objects_per_image or 'any'}; "
          f"{a.queries} queries, top {a.top_images} images (k = {k} regions); OPQ trained on {a.train} "
          f"[{time.perf_counter() - t:.1f} s]")

    # (c) exact: the L2 ground truth and the framework's default inner-product search
    exact_l2 = RegionIndex(store)
    exact_l2.searcher = ExactL2Index(store.features)
    truth = exact_l2.search(queries, top_images=a.top_images)
    exact_l2_s = best_of(lambda: exact_l2.search(queries, top_images=a.top_images), a.repeat)
    exact_ip = RegionIndex(store)
    exact_ip_s = best_of(lambda: exact_ip.search(queries, top_images=a.top_images), a.repeat)
    exact_ip_recall = recall(exact_ip.search(queries, top_images=a.top_images), truth)
    del exact_l2, exact_ip

    rows: list[Row] = []
    main_row, main_index = measure_adc(f"OPQ{a.subspaces}x{a.nbits}", store, train, queries, truth,
                                       a.subspaces, a.nbits, False, a, k, single=True)
    rows.append(main_row)
    if not a.no_variants:
        rows.append(measure_adc(f"OPQ{a.subspaces}x9", store, train, queries, truth, a.subspaces, 9, False, a, k)[0])
        fs_m = max(1, a.subspaces * a.nbits // 4)
        width = -(-a.dim // fs_m) * fs_m
        fs_store = store if width == a.dim else RegionStore(store.image_ids, pad_columns(store.features, width),
                                                             store.image_index, store.boxes, store.scores)
        name = f"OPQ{fs_m}x4 fast-scan" + ("" if width == a.dim else f" ({a.dim}->{width}-D)")
        rows.append(measure_adc(name, fs_store, pad_columns(train, width), pad_columns(queries, width), truth,
                                fs_m, 4, True, a, k)[0])
        del fs_store

    q = a.queries
    print()
    print(f"{'search (top ' + str(a.top_images) + ' images)':34s} {'bits':>4s} {'faiss ms/q':>10s} "
          f"{'frame ms/q':>10s} {'frame/faiss':>11s} {'vs exact':>8s} {'recall@' + str(a.top_images):>10s} "
          f"{'searches':>9s} {'fit s':>6s} {'add s':>6s}")
    for r in rows:
        print(f"{r.name:34s} {r.bits:4d} {r.bare_ms:10.2f} {r.frame_ms:10.2f} {r.frame_ms / r.bare_ms:10.2f}x "
              f"{1000 * exact_l2_s / q / r.frame_ms:7.1f}x {r.recall:10.3f} {f'{r.calls[0]}/{r.calls[1]}':>9s} "
              f"{r.fit_s:6.1f} {r.add_s:6.1f}")
    print(f"{'exact L2 (torch, ground truth)':34s} {32 * a.dim:4d} {'':10s} {1000 * exact_l2_s / q:10.2f} "
          f"{'':11s} {1.0:7.1f}x {1.0:10.3f}")
    print(f"{'exact IP (RegionIndex default)':34s} {32 * a.dim:4d} {'':10s} {1000 * exact_ip_s / q:10.2f} "
          f"{'':11s} {exact_l2_s / exact_ip_s:7.1f}x {exact_ip_recall:10.3f}")
    print(f"batches of {q} queries, best of {a.repeat}; 'searches' = index.search calls / query rows scanned "
          f"by one framework batch (more than 1/{q}: retries for too few distinct images); "
          f"'vs exact' = speed-up over exact L2")
    print(f"one query at a time ({main_row.name}): bare faiss {main_row.bare_single_ms:.2f} ms/query, "
          f"framework {main_row.frame_single_ms:.2f} ms/query "
          f"(x{main_row.frame_single_ms / main_row.bare_single_ms:.2f}); UDQ Table 7: 80 ms/query on ~1M proposals")

    # (e) memory
    n = len(store)
    meta = store.image_index.nbytes + store.boxes.nbytes + store.scores.nbytes
    kept = main_index.store.features is features
    in_faiss_wrapper = any(v is features for v in vars(main_index.searcher).values())
    print()
    print(f"memory for {n} proposals:")
    for r in rows:
        print(f"  codes {r.name:30s} {mb(r.code_bytes)}  ({r.code_bytes / n:.2f} B/proposal)")
    print(f"  metadata (image_index, boxes, scores) {mb(meta)}  ({meta / n:.0f} B/proposal)")
    print(f"  float features                        {mb(store.features.nbytes)}  ({store.features.nbytes / n:.0f} "
          f"B/proposal): {'kept alive by RegionIndex.store' if kept else 'released'}"
          f"{', also by the faiss wrapper' if in_faiss_wrapper else ' (not by the searcher)'}")
    with tempfile.TemporaryDirectory() as tmp:
        main_index.save(tmp)
        on_disk = sum(f.stat().st_size for f in os.scandir(tmp))
        loaded = RegionIndex.load(tmp)
    same = all(np.array_equal(x.images, y.images) for x, y in zip(loaded.search(queries, top_images=a.top_images),
                                                                  main_index.search(queries, top_images=a.top_images)))
    loaded_s = best_of(lambda: loaded.search(queries, top_images=a.top_images), a.repeat)
    print(f"  RegionIndex.save -> load ({main_row.name}): {mb(on_disk)} on disk, float features kept "
          f"{mb(loaded.store.features.nbytes)}; same rankings: {same}; search {1000 * loaded_s / q:.2f} ms/query")
    print(f"  peak resident memory of this process  {mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")

    if a.profile or main_row.frame_ms > 1.5 * main_row.bare_ms:
        print(f"\nprofile of one framework batch search ({main_row.name}):")
        profile(main_index, queries, a.top_images)


if __name__ == "__main__":
    main()
