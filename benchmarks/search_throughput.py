"""Search throughput: exact region search (torch vs faiss flat), best-region-per-image reduction.

Prints queries/s for a database of N images x R regions (D-dim features): the framework's exact
search (torch matmul + topk, what ``index_factory="Flat"`` runs) next to the same search through
faiss's flat inner-product index (same rankings checked, speed ratio), bare faiss without the
framework, the speed-up of category pruning, and of the vectorised reduction over a Python loop.

    python benchmarks/search_throughput.py --images 20000 --regions 50 --dim 512 --queries 200
"""
from __future__ import annotations

import argparse

import faiss
import numpy as np
import torch
from timing import best_of

from instsearch.eval.search import RegionIndex, RegionStore, best_region_per_image
from instsearch.eval.searchers import FaissSearcher
from instsearch.structures import Regions


def make_store(images: int, regions: int, dim: int, labels: int, seed: int = 0) -> RegionStore:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((images * regions, dim), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (images * regions, 1))
    lab = rng.integers(1, labels + 1, images * regions)
    per = [Regions(torch.from_numpy(boxes[i * regions:(i + 1) * regions]), torch.ones(regions),
                   torch.from_numpy(feats[i * regions:(i + 1) * regions]), torch.from_numpy(lab[i * regions:(i + 1) * regions]))
           for i in range(images)]
    return RegionStore.from_regions([str(i) for i in range(images)], per)


def loop_reduction(d: np.ndarray, ids: np.ndarray, image_index: np.ndarray):
    """The obvious per-hit loop, for the ratio only."""
    out = []
    for row_d, row_i in zip(d, ids):
        best: dict[int, tuple[float, int]] = {}
        for s, r in zip(row_d.tolist(), row_i.tolist()):
            im = int(image_index[r])
            if im not in best:
                best[im] = (s, r)
        out.append(sorted(best.items(), key=lambda t: -t[1][0]))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--regions", type=int, default=40)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--labels", type=int, default=20)
    p.add_argument("--top", type=int, default=100)
    a = p.parse_args()
    store = make_store(a.images, a.regions, a.dim, a.labels)
    index = RegionIndex(store)  # exact: torch
    faiss_index = RegionIndex(store, FaissSearcher(faiss.IndexFlatIP(a.dim)))  # the same exact search through faiss
    rng = np.random.default_rng(1)
    q = rng.standard_normal((a.queries, a.dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ql = rng.integers(1, a.labels + 1, a.queries)
    print(f"database: {a.images} images x {a.regions} regions = {len(store)} regions, {a.dim}-D; {a.queries} queries")

    t_top = best_of(lambda: index.search(q, top_images=a.top))
    t_faiss = best_of(lambda: faiss_index.search(q, top_images=a.top))
    t_bare = best_of(lambda: faiss_index.searcher.index.search(q, 4 * a.top))
    same = all(np.array_equal(x.images, y.images) for x, y in zip(index.search(q, top_images=a.top),
                                                                  faiss_index.search(q, top_images=a.top)))
    t_all = best_of(lambda: index.search(q[:10], top_images=None), repeat=1) * a.queries / 10
    t_prune = best_of(lambda: index.search(q, top_images=a.top, query_labels=ql, prune_by_label=True))
    d, ids = index.searcher.search(q[:20], 20 * a.top)
    t_vec = best_of(lambda: best_region_per_image(d, ids, store.image_index, a.images))
    t_loop = best_of(lambda: loop_reduction(d, ids, store.image_index), repeat=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")
    print(f"top-{a.top} images, torch exact: {a.queries / t_top:8.1f} queries/s ({1000 * t_top / a.queries:.2f} ms/query)")
    print(f"top-{a.top} images, faiss flat:  {a.queries / t_faiss:8.1f} queries/s -> torch is x{t_faiss / t_top:.2f}; "
          f"same rankings: {same}")
    print(f"bare faiss search (k={4 * a.top} regions): {a.queries / t_bare:8.1f} queries/s")
    print(f"complete ranking:        {a.queries / t_all:10.1f} queries/s ({1000 * t_all / a.queries:.2f} ms/query)")
    print(f"category pruning top-{a.top}: {a.queries / t_prune:6.1f} queries/s, speed-up x{t_top / t_prune:.2f} "
          f"({a.labels} labels)")
    print(f"best-region reduction: vectorised {1000 * t_vec:.2f} ms vs loop {1000 * t_loop:.2f} ms "
          f"(x{t_loop / t_vec:.1f}) for 20 queries x {20 * a.top} hits")


if __name__ == "__main__":
    main()
