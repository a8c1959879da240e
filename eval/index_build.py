"""An approximate-nearest-neighbour index over region shards, built within a memory budget.

    instsearch index build --shards SHARDS --out INDEX [--factory KEY | --memory-budget 8GB]

The index is trained once on a sample drawn from all parts, then filled part by part. The vectors
of an inverted-file (IVF) index go through temporary IVF files, one per group of rows, merged into
``INDEX/index.ivfdata`` (faiss's ``merge_ondisk``), so the inverted lists live on disk and the
build holds at most one group in memory, never the database. Other indexes (``Flat``, ``PQ…``,
``HNSW…``) are built in memory. Region ``r`` of the shards is vector id ``r`` of the index in
both cases, so the ids of a search index the shards directly.

Layout of an index folder::

    index.json      format, factory key, metric, dim, ntotal, the shards it was built from (path,
                    model and config hashes), the memory budget and the rule's inputs, train size,
                    the stored nprobe and how it was estimated (``nprobe_rule``), build seconds
    index.faiss     the faiss index (coarse quantizer, transforms, codebooks; the lists too
                    unless on disk)
    index.ivfdata   the inverted lists of an IVF index, memory-mapped when opened

Choosing the index from a memory budget (:func:`index_key_for`), in the spirit of autofaiss's
``get_optimal_index_keys_v2`` and faiss's "Guidelines to choose an index" but not the same rule
(the differences follow the steps); the budget counts the whole index as it would sit in memory
-- codes, ids, coarse quantizer, transforms, overhead (:func:`estimated_index_bytes`):

1. Fewer than 10,000 vectors: ``Flat`` (too few to train 256-centroid PQ codebooks with faiss's
   39 points per centroid; an exhaustive scan of them is cheap anyway).
2. ``nlist`` = ``4·sqrt(N)`` rounded to the nearest power of two, at most ``N / 39`` (faiss's k-means
   warns below 39 training points per centroid), at most 2^18, and small enough that 39 float32
   training points per centroid fit a quarter of the budget (at 10 M 512-D regions and 1 GB:
   4096 lists, not 16384, whose 39-point sample alone would take 1.2 GiB). From 2^14 lists on, the coarse
   quantizer is an HNSW graph (``IVF{nlist}_HNSW32``): scanning that many centroids per query
   costs more than walking the graph.
3. Fewer than 1,000,000 vectors and the uncompressed vectors fit: ``IVF{nlist},Flat``.
4. Otherwise the largest PQ code that fits, ``m`` bytes per vector tried in autofaiss's order
   256, 128, 64, 48, 32, 24, 16, 8, 4. A sub-quantizer spanning more than 4 dimensions loses
   most to the uneven variance of the subspaces, so when ``D > 4m`` an OPQ rotation to ``4m``
   dimensions goes first (``OPQ{m}_{4m},IVF…,PQ{m}``, faiss's usual 4 dimensions per
   sub-quantizer); otherwise plain ``PQ{m}``, ``m`` a divisor of ``D``.
5. Not even ``PQ4`` fits: refused.

Where it departs from autofaiss:

- ``nlist`` is ``4·sqrt(N)`` to a power of two at every size, then clipped as in step 2 (4096
  lists at 1 M vectors, 16384 at 10 M, 32768 at 100 M before the budget's clip); autofaiss uses
  that only below 1 M and takes 16384 lists for 1-10 M vectors and 65536 for 10-300 M.
- The coarse quantizer is HNSW32 from 2^14 lists (the reason in step 2); autofaiss uses it from
  1000 lists.
- The OPQ rotation, to ``4m`` dimensions, comes only when ``D > 4m`` (the reason in step 4);
  autofaiss always rotates first, to about ``D`` (``OPQ{m}_{y}``, ``y`` a multiple of ``m``
  just above ``D``, at most ``7m``).
- HNSW over the vectors themselves (autofaiss's first choice when it fits) is left out: its
  graph must sit in memory and cannot be built part by part onto disk.

The stored nprobe (what ``instsearch search`` uses unless given ``--nprobe``) is estimated on a
database sample, not a rule of thumb: :func:`tune_nprobe`.

Training takes 100 points per IVF centroid (and at least 100 per PQ centroid, 25,600), capped so
that the float32 sample stays within a quarter of the budget (training holds about three copies:
sample, residuals, sub-quantizer slices) but never below 39 per centroid.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import faiss
import numpy as np

from instsearch.eval.shards import RegionShards

INDEX_FORMAT = "instsearch-region-ann/1"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
INFO_FILE = "index.json"
PARTS_DIR = ".parts"

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
PQ_BYTES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # autofaiss's order, best first
FLAT_BELOW = 10_000
IVF_FLAT_BELOW = 1_000_000
MAX_NLIST = 1 << 18
HNSW_QUANTIZER_FROM = 1 << 14
HNSW_M = 32
MIN_POINTS_PER_CENTROID = 39  # below this faiss's k-means warns
POINTS_PER_CENTROID = 100
PQ_CENTROIDS = 256
ID_BYTES = 8  # faiss stores an idx_t per vector in inverted lists
LIST_BYTES = 48  # per inverted list: its size, capacity, offset (on disk) or two vectors (in memory)
FIXED_OVERHEAD = 16 << 20
PRECOMPUTED_TABLE_MAX = 2 << 30  # faiss's IndexIVFPQ.precomputed_table_max_bytes
DEFAULT_BUILD_MEMORY = 2 << 30  # bounds chunks and groups when only a factory key is given
TUNE_SAMPLE = 20_000  # database vectors the nprobe estimate searches among (10 MB at 128-D)

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# -- budgets ------------------------------------------------------------------------------------
def parse_memory(text: str | int) -> int:
    """Bytes of ``"8GB"``, ``"512MB"``, ``"1.5G"``, ``"2GiB"`` or a plain number (binary units,
    as autofaiss reads them: 1 GB = 2^30 bytes)."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not match:
        raise ValueError(f"cannot read the memory size {text!r}: expected e.g. 8GB, 512MB, 1.5G")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


# -- the rule -----------------------------------------------------------------------------------
def nlist_for(num_vectors: int, training_budget: Optional[int] = None, dim: int = 0) -> int:
    """Inverted lists for ``num_vectors``: ``4·sqrt(N)`` to the nearest power of two, clipped so
    that k-means sees at least 39 points per centroid and to 2^18. With ``training_budget`` (bytes)
    and ``dim``, also halved until 39 float32 training points per centroid fit that budget, so
    that training, like the rest of the build, stays within the memory budget."""
    n = max(int(num_vectors), 1)
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    points = n
    if training_budget is not None and dim:
        points = min(points, int(training_budget) // (4 * int(dim)))
    most = 2 ** int(math.floor(math.log2(max(points // MIN_POINTS_PER_CENTROID, 1))))
    return int(max(1, min(nlist, most, MAX_NLIST)))


def _ivf(nlist: int) -> str:
    return f"IVF{nlist}_HNSW{HNSW_M}" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"


def pq_key(m: int, dim: int, nlist: int) -> Optional[str]:
    """``IVF…,PQ{m}`` with an OPQ rotation to ``4m`` dimensions when ``D > 4m``; ``None`` when
    ``m`` bytes cannot code ``dim``-D vectors (plain PQ needs ``m`` to divide ``D``)."""
    if dim > 4 * m:
        return f"OPQ{m}_{4 * m},{_ivf(nlist)},PQ{m}"
    if m < dim and dim % m == 0:
        return f"{_ivf(nlist)},PQ{m}"
    return None


@dataclass(frozen=True)
class KeyParts:
    """What the size of an index depends on, read from its factory key."""

    nlist: int = 0
    hnsw_m: int = 0  # links of the coarse quantizer's HNSW graph
    pq_m: int = 0
    pq_bits: int = 8
    opq: bool = False
    opq_out: int = 0  # dimension after the OPQ rotation (0: unchanged)
    flat_codes: bool = False

    @classmethod
    def of(cls, key: str) -> "KeyParts":
        ivf = re.search(r"IVF(\d+)(?:_HNSW(\d+))?", key)
        pq = re.search(r"(?<!O)PQ(\d+)(?:x(\d+))?", key)
        opq = re.search(r"OPQ(\d+)(?:_(\d+))?", key)
        return cls(nlist=int(ivf.group(1)) if ivf else 0,
                   hnsw_m=int(ivf.group(2)) if ivf and ivf.group(2) else 0,
                   pq_m=int(pq.group(1)) if pq else 0, pq_bits=int(pq.group(2)) if pq and pq.group(2) else 8,
                   opq=opq is not None, opq_out=int(opq.group(2)) if opq and opq.group(2) else 0,
                   flat_codes=bool(re.search(r"(^|,)Flat$", key)))


def estimated_index_bytes(key: str, num_vectors: int, dim: int, metric: str = "ip") -> int:
    """The memory an index of ``key`` over ``num_vectors`` ``dim``-D vectors takes when loaded:
    codes + ids (IVF) + coarse centroids and HNSW links + OPQ matrix and PQ codebooks + L2's
    precomputed IVFPQ table + list headers + a fixed overhead. Keys this rule does not produce
    (e.g. ``HNSW32``, ``SQ8``) are refused."""
    parts = KeyParts.of(key)
    d = parts.opq_out or dim
    if parts.pq_m:
        code = math.ceil(parts.pq_m * parts.pq_bits / 8)
    elif parts.flat_codes:
        code = 4 * d
    else:
        raise ValueError(f"no size estimate for the index key {key!r} (Flat, IVF…,Flat and (OPQ…,)(IVF…,)PQ… only)")
    total = num_vectors * code + FIXED_OVERHEAD
    if parts.nlist:
        total += num_vectors * ID_BYTES + parts.nlist * (4 * d + LIST_BYTES)
        total += parts.nlist * parts.hnsw_m * 2 * 4  # level-0 links of the coarse HNSW, as autofaiss counts
    if parts.opq:
        total += 4 * dim * d
    if parts.pq_m:
        total += 4 * (1 << parts.pq_bits) * d
        table = parts.nlist * parts.pq_m * (1 << parts.pq_bits) * 4
        if metric == "l2" and parts.nlist and table <= PRECOMPUTED_TABLE_MAX:
            total += table
    return int(total)


def index_key_for(num_vectors: int, dim: int, memory_budget_bytes: int, metric: str = "ip") -> str:
    """The faiss factory key the module's rule picks for ``num_vectors`` ``dim``-D vectors within
    ``memory_budget_bytes`` (see the module docstring: in the spirit of autofaiss's
    ``get_optimal_index_keys_v2``, with the differences listed there); refuses a budget too small
    for any."""
    n, d, budget = int(num_vectors), int(dim), int(memory_budget_bytes)
    if n < FLAT_BELOW:
        need = estimated_index_bytes("Flat", n, d, metric)
        if need > budget:
            raise ValueError(f"a memory budget of {format_bytes(budget)} cannot hold {n} vectors of {d}-D even "
                             f"uncompressed (Flat needs {format_bytes(need)})")
        return "Flat"
    nlist = nlist_for(n, training_budget=budget // 4, dim=d)
    if n < IVF_FLAT_BELOW and estimated_index_bytes(f"{_ivf(nlist)},Flat", n, d, metric) <= budget:
        return f"{_ivf(nlist)},Flat"
    smallest = None
    for m in PQ_BYTES:
        key = pq_key(m, d, nlist)
        if key is None:
            continue
        smallest = key
        if estimated_index_bytes(key, n, d, metric) <= budget:
            return key
    if smallest is None:
        raise ValueError(f"no PQ code of {PQ_BYTES} bytes fits {d}-D vectors: give a --factory key")
    need = estimated_index_bytes(smallest, n, d, metric)
    raise ValueError(f"a memory budget of {format_bytes(budget)} is too small for {n} vectors of {d}-D: even the "
                     f"smallest PQ, {smallest}, needs {format_bytes(need)}; raise --memory-budget")


def train_size_for(key: str, num_vectors: int, dim: int, memory_budget_bytes: Optional[int] = None) -> int:
    """Training vectors for ``key``: 100 per IVF centroid, at least 100 per PQ centroid, the float32
    sample capped at a quarter of the budget but never below 39 per IVF centroid; 0 for keys that
    need no training (e.g. ``Flat``)."""
    parts = KeyParts.of(key)
    if not (parts.nlist or parts.pq_m or "OPQ" in key or "SQ" in key or "PCA" in key or "LSH" in key):
        return 0
    pq_centroids = (1 << parts.pq_bits) if parts.pq_m else PQ_CENTROIDS
    n = max(POINTS_PER_CENTROID * parts.nlist, POINTS_PER_CENTROID * pq_centroids)
    if memory_budget_bytes is not None:
        cap = int(memory_budget_bytes) // 4 // (4 * max(int(dim), 1))
        n = min(n, max(cap, MIN_POINTS_PER_CENTROID * parts.nlist))
    return int(min(n, num_vectors))


# -- building -----------------------------------------------------------------------------------
def _float32_chunks(features: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, float32 rows)`` of a memory-mapped part, ``rows`` at a time: only one chunk is
    ever converted, whatever the part's size."""
    for start in range(0, len(features), rows):
        yield start, np.ascontiguousarray(features[start:start + rows], dtype=np.float32)


def _copy(index: faiss.Index) -> faiss.Index:
    return faiss.deserialize_index(faiss.serialize_index(index))


def _factory(key: str, dim: int, metric: str) -> faiss.Index:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    try:
        return faiss.index_factory(int(dim), key, METRICS[metric])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ValueError(f"faiss cannot build the index key {key!r} for {dim}-D vectors ({first})") from err


def _skip_polysemous_training(index: faiss.Index) -> None:
    """Turn off the polysemous reordering of PQ centroids (Douze et al., "Polysemous codes") that
    faiss's factory asks for with 8-bit codes: it only serves Hamming-threshold filtering, which
    these searches never use, and its annealing dominates training at small and large ``m`` alike
    (seconds for PQ4 on a few thousand points)."""
    inner = faiss.downcast_index(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


def train_index(shards: RegionShards, key: str, metric: str = "ip", train_size: Optional[int] = None,
                seed: int = 0) -> faiss.Index:
    """A trained, empty index of ``key``: trained once on ``train_size`` regions sampled uniformly
    from all parts (``train_size_for`` when ``None``)."""
    index = _factory(key, shards.dim, metric)
    _skip_polysemous_training(index)
    if not index.is_trained:
        n = train_size if train_size is not None else train_size_for(key, shards.num_regions, shards.dim)
        sample = shards.sample(max(int(n), 1), seed=seed)
        index.train(sample)
        del sample
    return index


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="part")


def add_in_memory(index: faiss.Index, shards: RegionShards, chunk_rows: int = 1 << 16,
                  progress: bool = False) -> faiss.Index:
    """Add every region to ``index`` in order (ids = region ids), ``chunk_rows`` at a time."""
    ivf = faiss.try_extract_index_ivf(index)
    with _progress(len(shards.parts), progress, "adding") as bar:
        for first, features in shards.iter_features():
            for start, rows in _float32_chunks(features, chunk_rows):
                if ivf is not None:
                    index.add_with_ids(rows, np.arange(first + start, first + start + len(rows), dtype=np.int64))
                else:
                    if index.ntotal != first + start:
                        raise AssertionError(f"index holds {index.ntotal} vectors before region {first + start}")
                    index.add(rows)
            del features
            bar.update(1)
    return index


def write_groups(trained: faiss.Index, shards: RegionShards, tmp: str | Path, group_rows: int,
                 chunk_rows: int = 1 << 16, progress: bool = False, rank: int = 0, world: int = 1) -> list[str]:
    """Fill copies of the trained IVF index with the regions of every ``world``-th part from
    ``rank`` on (all parts by default), ``group_rows`` at a time, each group written to ``tmp`` as
    ``group-r{rank}-NNNNN.faiss``; returns the files. Memory holds one group and one chunk."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    group: Optional[faiss.Index] = None

    def flush() -> None:
        nonlocal group
        if group is not None and group.ntotal:
            files.append(str(tmp / f"group-r{rank:03d}-{len(files):05d}.faiss"))
            faiss.write_index(group, files[-1])
        group = None

    mine = len(range(rank, len(shards.parts), world))
    with _progress(mine, progress, "adding") as bar:
        for i, (first, features) in enumerate(shards.iter_features()):
            if i % world != rank:
                continue
            for start, rows in _float32_chunks(features, chunk_rows):
                while len(rows):
                    group = group if group is not None else _copy(trained)
                    take = rows[:group_rows - group.ntotal]
                    group.add_with_ids(take, np.arange(first + start, first + start + len(take), dtype=np.int64))
                    rows, start = rows[len(take):], start + len(take)
                    if group.ntotal >= group_rows:
                        flush()
            del features
            bar.update(1)
    flush()
    return files


def merge_groups(trained: faiss.Index, files: list[str], out: str | Path) -> faiss.Index:
    """A copy of the trained index whose inverted lists are ``files``' merged into
    ``out/index.ivfdata`` (faiss's ``merge_ondisk``); the group files' folder is removed."""
    from faiss.contrib.ondisk import merge_ondisk

    merged = _copy(trained)
    merge_ondisk(merged, sorted(files), str(Path(out) / IVFDATA_FILE))
    shutil.rmtree(Path(out) / PARTS_DIR, ignore_errors=True)
    return merged


def add_on_disk(trained: faiss.Index, shards: RegionShards, out: str | Path, group_rows: int,
                chunk_rows: int = 1 << 16, progress: bool = False) -> faiss.Index:
    """Fill a copy of the trained IVF index with every region (:func:`write_groups` into
    ``out/.parts``, then :func:`merge_groups`). Returns the merged index, its lists on disk."""
    files = write_groups(trained, shards, Path(out) / PARTS_DIR, group_rows, chunk_rows, progress)
    return merge_groups(trained, files, out)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Visit ``nprobe`` lists per query; an HNSW coarse quantizer explores ``2·nprobe`` candidates
    (autofaiss's setting) so that it can return them."""
    space = faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))
    ivf = faiss.extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(int(quantizer.hnsw.efSearch), 2 * int(nprobe))


def default_nprobe(nlist: int) -> int:
    """``nlist / 128``, at least 8: the nprobe of an index too small to tune (:func:`tune_nprobe`)."""
    return int(min(nlist, max(8, nlist // 128)))


@dataclass(frozen=True)
class NprobeEstimate:
    """What :func:`tune_nprobe` measured (stored in ``index.json``)."""

    nprobe: int
    target: float
    sample: int
    queries: int
    neighbours: int
    #: the share of the sample's exact neighbours inside the probed lists at ``nprobe`` (``None``:
    #: too small a sample to tell, ``default_nprobe`` used)
    estimated_recall: Optional[float]


def _pretransform(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """``x`` through the index's transforms (an OPQ rotation) into the coarse quantizer's space."""
    outer = faiss.downcast_index(index)
    return outer.apply_chain(len(x), x) if isinstance(outer, faiss.IndexPreTransform) else x


def tune_nprobe(index: faiss.Index, sample: np.ndarray, metric: str = "ip", target: float = 0.95,
                neighbours: int = 10, queries: int = 1000) -> NprobeEstimate:
    """The smallest nprobe at which the probed lists hold ``target`` of the exact neighbours, on
    a sample of the database itself (no query is needed, none is seen).

    The first ``queries`` vectors of ``sample`` are queries against the whole sample: their exact
    ``neighbours`` nearest (themselves left out) are found by brute force, every sample vector's
    list by the trained coarse quantizer, and each query's lists ranked by its centroid scores
    (exactly, over all centroids). The rank of each neighbour's list is the nprobe that reaches
    it; the ``target`` quantile of those ranks is returned. A sample's neighbours are farther than
    the database's (a sample of ``S`` of ``N`` vectors sees every ``N/S``-th), and farther
    neighbours are less often in the query's own list: the estimate errs towards more lists.
    Queries whose relevant items lie farther still than the sample's neighbours (hard positives)
    need more: ``instsearch search --nprobe`` overrides it, and docs/scale.md shows the trade-off."""
    ivf = faiss.extract_index_ivf(index)
    x = np.ascontiguousarray(sample, dtype=np.float32)
    nq = min(int(queries), len(x) - 1)
    k = min(int(neighbours), len(x) - 1)
    if nq < 1 or k < 1:
        return NprobeEstimate(default_nprobe(ivf.nlist), target, len(x), 0, 0, None)
    exact = faiss.IndexFlat(x.shape[1], METRICS[metric])
    exact.add(x)
    _, found = exact.search(x[:nq], k + 1)
    own = found == np.arange(nq)[:, None]
    # drop each query's own row (normally its first hit; equal vectors may put it anywhere)
    keep = np.where(own.any(1)[:, None], ~own, np.arange(k + 1)[None, :] < k)
    found = found[keep].reshape(nq, k)
    xt = np.ascontiguousarray(_pretransform(index, x), dtype=np.float32)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    coarse = faiss.IndexFlat(centroids.shape[1], ivf.metric_type)
    coarse.add(centroids)
    _, assigned = coarse.search(xt, 1)
    lists_of_neighbours = assigned[found.ravel(), 0].reshape(nq, k)
    needed = np.empty((nq, k), np.int64)
    step = max(1, (1 << 22) // ivf.nlist)  # queries per block: a block's list rankings stay within 32 MB
    for a in range(0, nq, step):
        _, order = coarse.search(xt[a:min(a + step, nq)], ivf.nlist)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(ivf.nlist), order.shape), axis=1)
        needed[a:a + step] = np.take_along_axis(rank, lists_of_neighbours[a:a + step], axis=1) + 1
    # the smallest nprobe reaching at least ``target`` of the neighbours
    ordered = np.sort(needed.ravel())
    nprobe = int(ordered[max(math.ceil(target * len(ordered)) - 1, 0)])
    return NprobeEstimate(nprobe, float(target), len(x), nq, k, float(np.mean(needed <= nprobe)))


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: --out must be a folder (it will hold {INDEX_FILE} and {INFO_FILE})")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty: choose a new --out folder or pass --overwrite to replace "
                                  f"the index there")
        for name in (INDEX_FILE, IVFDATA_FILE, INFO_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def build_index(shards: RegionShards | str | Path, out: str | Path, factory: Optional[str] = None,
                memory_budget: Optional[int | str] = None, metric: str = "ip", train_size: Optional[int] = None,
                seed: int = 0, progress: bool = True, overwrite: bool = False,
                target_recall: float = 0.95) -> Path:
    """Build the index of ``shards`` into the folder ``out`` and return it: the key from
    ``factory`` or chosen for ``memory_budget`` (exactly one), trained once on a sample of all
    parts, filled part by part -- into ``index.ivfdata`` on disk for IVF keys. An IVF index's
    stored nprobe is tuned to ``target_recall`` on a database sample (:func:`tune_nprobe`)."""
    t0 = time.perf_counter()
    if (factory is None) == (memory_budget is None):
        raise ValueError("give exactly one of factory (a faiss index key, e.g. 'IVF4096,PQ32') or memory_budget "
                         "(e.g. '8GB')")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    shards = shards if isinstance(shards, RegionShards) else RegionShards(shards)
    if shards.num_regions == 0 or shards.dim == 0:
        raise ValueError(f"{shards.root} holds no region features (parts/*.json count {shards.num_regions} regions): "
                         f"nothing to index")
    budget = parse_memory(memory_budget) if memory_budget is not None else None
    key = factory if factory is not None else index_key_for(shards.num_regions, shards.dim, budget, metric)
    build_memory = budget if budget is not None else DEFAULT_BUILD_MEMORY
    n_train = int(train_size) if train_size is not None else train_size_for(key, shards.num_regions, shards.dim,
                                                                             budget)
    _factory(key, shards.dim, metric)  # refuse a bad key before touching --out
    out = Path(out)
    rank, world = _process_group()
    if rank == 0:
        _prepare_out(out, overwrite)
    chunk_rows = int(np.clip(build_memory // 16 // (4 * shards.dim), 1024, 1 << 18))
    # Over a process group (torchrun) rank 0 trains (and estimates nprobe) and shares the trained
    # index through out/.parts; every rank adds every world-th part into its own group files (ids
    # are region ids, so which rank adds a part changes nothing); rank 0 merges them and writes the
    # index. An index without inverted lists is filled by rank 0 alone.
    tmp = out / PARTS_DIR
    estimate = None
    if rank == 0:
        trained = train_index(shards, key, metric, n_train, seed)
        if faiss.try_extract_index_ivf(trained) is not None:
            estimate = _tune(trained, shards, metric, seed, target_recall)
    if world > 1:
        if rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
            faiss.write_index(trained, str(tmp / "trained.faiss"))
        _barrier(world)
        if rank:
            trained = faiss.read_index(str(tmp / "trained.faiss"))
    ivf = faiss.try_extract_index_ivf(trained)
    if ivf is not None:
        write_groups(trained, shards, tmp, _group_rows(ivf, build_memory, chunk_rows), chunk_rows,
                     progress and rank == 0, rank, world)
    _barrier(world)
    if rank == 0:
        if ivf is not None:
            index = merge_groups(trained, [str(f) for f in tmp.glob("group-r*.faiss")], out)
        else:
            index = add_in_memory(trained, shards, chunk_rows, progress)
            shutil.rmtree(tmp, ignore_errors=True)
        faiss.write_index(index, str(out / INDEX_FILE))
        info = _info(shards, key, metric, index, budget, n_train, seed, time.perf_counter() - t0)
        info["nprobe_rule"] = asdict(estimate) if estimate is not None else None
        (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    _barrier(world)
    return out


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` group (torchrun, SLURM), or
    ``(0, 1)``; torch is not imported for it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0, 1
    return int(torch.distributed.get_rank()), int(torch.distributed.get_world_size())


def _barrier(world: int) -> None:
    """Wait for every process of the group (nothing to wait for alone)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _tune(trained: faiss.Index, shards: RegionShards, metric: str, seed: int, target_recall: float) -> NprobeEstimate:
    estimate = tune_nprobe(trained, shards.sample(min(TUNE_SAMPLE, shards.num_regions), seed=seed + 1), metric,
                           target=target_recall)
    set_nprobe(trained, estimate.nprobe)
    return estimate


def _group_rows(ivf, build_memory: int, chunk_rows: int) -> int:
    return max(chunk_rows, build_memory // 4 // (ivf.code_size + ID_BYTES))


def _info(shards: RegionShards, key: str, metric: str, index: faiss.Index, budget: Optional[int], train_size: int,
          seed: int, seconds: float) -> dict[str, Any]:
    ivf = faiss.try_extract_index_ivf(index)
    manifest = shards.manifest
    return {
        "format": INDEX_FORMAT, "factory": key, "metric": metric, "dim": int(index.d), "ntotal": int(index.ntotal),
        "files": [INDEX_FILE] + ([IVFDATA_FILE] if ivf is not None else []),
        "nlist": int(ivf.nlist) if ivf is not None else None, "nprobe": int(ivf.nprobe) if ivf is not None else None,
        "shards": {"path": str(shards.root.resolve()), "num_regions": shards.num_regions,
                   **{k: manifest.get(k) for k in ("model", "config_sha256", "checkpoint_sha256", "benchmark_sha256")}},
        "memory_budget_bytes": budget,
        "rule": ({"num_vectors": shards.num_regions, "dim": shards.dim, "memory_budget_bytes": budget,
                  "estimated_index_bytes": estimated_index_bytes(key, shards.num_regions, shards.dim, metric)}
                 if budget is not None else None),
        "train_size": int(train_size), "seed": int(seed), "faiss_version": faiss.__version__,
        "build_seconds": round(float(seconds), 3),
    }


# -- reading ------------------------------------------------------------------------------------
def open_index(path: str | Path, nprobe: Optional[int] = None) -> faiss.Index:
    """The index of a folder ``build_index`` wrote (or its ``index.faiss``). On-disk lists are
    memory-mapped from ``index.ivfdata`` beside the file (``IO_FLAG_ONDISK_SAME_DIR``), wherever
    the folder has moved. ``nprobe`` applies to IVF indexes only."""
    path = Path(path)
    file = path / INDEX_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"not an index folder: {file} is missing (expected the output of "
                                f"'instsearch index build')")
    index = faiss.read_index(str(file), faiss.IO_FLAG_ONDISK_SAME_DIR)
    if nprobe is not None and faiss.try_extract_index_ivf(index) is not None:
        set_nprobe(index, nprobe)
    return index
