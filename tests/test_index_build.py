"""Index building over region shards: exact and on-disk IVF searches against in-memory references,
global ids, moved folders, the memory-budget rule by hand, the command's refusals."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from instsearch.cli import main as instsearch_main
from instsearch.eval.index_build import (FIXED_OVERHEAD, IVFDATA_FILE, PQ_BYTES, add_in_memory, add_on_disk,
                                         build_index, estimated_index_bytes, index_key_for, nlist_for, open_index,
                                         parse_memory, pq_key, set_nprobe, train_index, train_size_for,
                                         tune_nprobe)
from instsearch.eval.shards import RegionShards, ShardImage, ShardWriter
from instsearch.index_cli import main

GB, MB = 1 << 30, 1 << 20


def _shards(root, regions_per_part: list[int], dim: int = 16, dtype: str = "float16", seed: int = 0,
            planned: int | None = None) -> RegionShards:
    """Shards with one image per 50 regions, random features; ``planned`` parts announced (default:
    as many as written)."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(root, {"model": "m", "config_sha256": "c", "checkpoint_sha256": None, "benchmark_sha256": "b",
                                "part_size": 4, "num_parts": planned or len(regions_per_part)}, dtype=dtype)
    writer.write_manifest()
    for p, n in enumerate(regions_per_part):
        counts = [min(50, n - i) for i in range(0, n, 50)]
        writer.write_part(p, [ShardImage(f"p{p}i{i}", boxes=np.zeros((c, 4), np.float32), scores=np.ones(c, np.float32),
                                         features=rng.standard_normal((c, dim)).astype(np.float32))
                              for i, c in enumerate(counts)])
    return RegionShards(root) if planned is None else None


def _queries(n: int, dim: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


# -- searches -----------------------------------------------------------------------------------
def test_flat_index_equals_brute_force_inner_products(tmp_path):
    shards = _shards(tmp_path / "shards", [120, 0, 75, 40])
    out = build_index(shards, tmp_path / "index", factory="Flat", progress=False)
    index = open_index(out)
    features = shards.rows(np.arange(shards.num_regions))  # float16 rows as float32
    q = _queries(7, shards.dim)
    scores, ids = index.search(q, 10)
    brute = q @ features.T
    expected_ids = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected_ids, axis=1), rtol=1e-5, atol=1e-5)
    info = json.loads((out / "index.json").read_text())
    assert (info["format"], info["factory"], info["metric"], info["dim"], info["ntotal"]) == \
        ("instsearch-region-ann/1", "Flat", "ip", 16, 235)
    assert info["files"] == ["index.faiss"] and not (out / IVFDATA_FILE).exists()
    assert info["shards"]["model"] == "m" and info["shards"]["config_sha256"] == "c"
    assert info["shards"]["path"] == str((tmp_path / "shards").resolve())


def test_ivfpq_merged_on_disk_equals_the_same_index_built_in_memory(tmp_path):
    shards = _shards(tmp_path / "shards", [700, 350, 0, 950])
    trained = train_index(shards, "IVF8,PQ4", train_size=1500, seed=3)  # trained once for both
    in_memory = add_in_memory(faiss.deserialize_index(faiss.serialize_index(trained)), shards, chunk_rows=256)
    # groups of 300 rows: parts split across groups and groups across parts
    on_disk = add_on_disk(faiss.deserialize_index(faiss.serialize_index(trained)), shards, tmp_path / "index",
                          group_rows=300, chunk_rows=128)
    faiss.write_index(on_disk, str(tmp_path / "index" / "index.faiss"))
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["index.faiss", "index.ivfdata"]
    reopened = open_index(tmp_path / "index", nprobe=3)
    set_nprobe(in_memory, 3)
    assert reopened.ntotal == in_memory.ntotal == 2000
    q = _queries(20, shards.dim)
    d_mem, i_mem = in_memory.search(q, 15)
    d_disk, i_disk = reopened.search(q, 15)
    np.testing.assert_array_equal(i_disk, i_mem)
    np.testing.assert_array_equal(d_disk, d_mem)


def test_ids_are_the_global_region_ids_of_the_shards(tmp_path):
    shards = _shards(tmp_path / "shards", [300, 0, 260, 180], dtype="float32")
    out = build_index(shards, tmp_path / "index", factory="IVF4,Flat", metric="l2", progress=False)
    index = open_index(out, nprobe=4)  # every list: exact
    ids = np.array([0, 299, 300, 559, 560, 739])  # first and last region of each non-empty part
    distances, found = index.search(shards.rows(ids), 1)
    np.testing.assert_array_equal(found[:, 0], ids)
    np.testing.assert_array_equal(distances[:, 0], np.zeros(len(ids), np.float32))


def test_a_moved_index_folder_opens_and_answers_the_same(tmp_path):
    shards = _shards(tmp_path / "shards", [600, 400, 500])
    out = build_index(shards, tmp_path / "a" / "index", factory="IVF8,PQ4", train_size=1500, progress=False)
    q = _queries(10, shards.dim)
    before = open_index(out, nprobe=4).search(q, 10)
    moved = shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    assert not out.exists()
    after = open_index(f"{moved}/index", nprobe=4).search(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_nprobe_is_stored_and_can_be_changed(tmp_path):
    shards = _shards(tmp_path / "shards", [500, 500])
    out = build_index(shards, tmp_path / "index", factory="IVF16,Flat", progress=False)
    stored = json.loads((out / "index.json").read_text())["nprobe"]
    assert faiss.extract_index_ivf(open_index(out)).nprobe == stored
    assert faiss.extract_index_ivf(open_index(out, nprobe=5)).nprobe == 5


# -- the memory-budget rule ---------------------------------------------------------------------
def test_memory_sizes_parse():
    assert parse_memory("8GB") == 8 * GB
    assert parse_memory("512MB") == 512 * MB
    assert parse_memory("1.5G") == 3 * GB // 2
    assert parse_memory("2GiB") == 2 * GB
    assert parse_memory("1000") == 1000
    with pytest.raises(ValueError, match="cannot read the memory size 'lots'"):
        parse_memory("lots")


def test_nlist_is_four_square_roots_to_a_power_of_two_clipped_to_39_points_per_list():
    assert nlist_for(1_000_000) == 4096  # 4000
    assert nlist_for(10_000_000) == 16384  # 12,649
    assert nlist_for(100_000_000) == 32768  # 40,000
    assert nlist_for(10_000) == 256  # 400 -> 512, but 10,000 / 39 = 256.4 allows 256


def test_pq_keys_rotate_when_a_sub_quantizer_would_span_more_than_four_dimensions():
    assert pq_key(32, 512, 4096) == "OPQ32_128,IVF4096,PQ32"
    assert pq_key(128, 512, 4096) == "IVF4096,PQ128"
    assert pq_key(32, 128, 65536) == "IVF65536_HNSW32,PQ32"
    assert pq_key(48, 128, 4096) is None  # 48 does not divide 128 and 128 <= 4 * 48
    assert pq_key(128, 128, 4096) is None  # one dimension per byte: no compression


def test_the_coarse_quantizer_is_hnsw_from_exactly_16384_lists():
    assert pq_key(32, 128, 8192) == "IVF8192,PQ32"
    assert pq_key(32, 128, 16384) == "IVF16384_HNSW32,PQ32"
    assert pq_key(32, 512, 8192) == "OPQ32_128,IVF8192,PQ32"
    assert pq_key(32, 512, 16384) == "OPQ32_128,IVF16384_HNSW32,PQ32"


def test_index_size_estimate_by_hand():
    # IVF4096,PQ32 over 1M 128-D: codes 32 + id 8 bytes per vector, 4096 centroids of 128 floats plus
    # a 48-byte list header each, 256 PQ centroids of 128 floats, fixed overhead
    assert estimated_index_bytes("IVF4096,PQ32", 1_000_000, 128) == \
        1_000_000 * 40 + 4096 * (512 + 48) + 256 * 128 * 4 + FIXED_OVERHEAD
    # OPQ to 128-D: the 512x128 matrix, centroids and codebooks in 128-D; HNSW32 quantizer: 64 links
    assert estimated_index_bytes("OPQ32_128,IVF16384_HNSW32,PQ32", 10_000_000, 512) == \
        10_000_000 * 40 + 16384 * (512 + 48 + 64 * 4) + 512 * 128 * 4 + 256 * 128 * 4 + FIXED_OVERHEAD
    # L2 adds IVFPQ's precomputed table: nlist x m x 256 floats
    assert estimated_index_bytes("IVF4096,PQ32", 1_000_000, 128, "l2") - \
        estimated_index_bytes("IVF4096,PQ32", 1_000_000, 128) == 4096 * 32 * 256 * 4
    assert estimated_index_bytes("Flat", 5000, 128) == 5000 * 512 + FIXED_OVERHEAD


@pytest.mark.parametrize("n, dim, budget, key", [
    (5_000, 128, GB, "Flat"),
    (100_000, 128, GB, "IVF1024,Flat"),
    (100_000, 128, 25 * MB, "IVF256,PQ64"),  # IVF256,Flat needs 68 MB; 6.25 MiB of training floats: 12,800 128-D points, 256 lists of 39
    (100_000, 128, 22 * MB, "IVF256,PQ32"),  # PQ64: 16 MiB + 7.2 MB codes + ids + 0.6 MB > 22 MiB
    (1_000_000, 512, GB, "IVF2048,PQ256"),  # a million: quantised even when floats would fit; 131,072 512-D
    # training points in a quarter GB: 2048 lists of 39 (3360 at most), not 4·sqrt(N) = 4096
    (10_000_000, 512, GB, "OPQ64_256,IVF2048,PQ64"),
    (100_000_000, 512, 4 * GB, "OPQ32_128,IVF8192,PQ32"),  # 524,288 points: 13,443 lists at most
    (100_000_000, 128, 16 * GB, "IVF32768_HNSW32,PQ64"),  # 4·sqrt(N) lists fit the training budget
])
def test_keys_for_a_budget_by_hand(n, dim, budget, key):
    assert index_key_for(n, dim, budget) == key
    assert estimated_index_bytes(key, n, dim) <= budget
    larger = [pq_key(m, dim, nlist_for(n, budget // 4, dim)) for m in PQ_BYTES]
    larger = [k for k in larger[:larger.index(key)] if k] if key in larger else []
    assert all(estimated_index_bytes(k, n, dim) > budget for k in larger)  # the largest code that fits


def test_a_budget_below_the_smallest_pq_is_refused():
    with pytest.raises(ValueError, match=r"too small for 100000000 vectors of 512-D: even the smallest PQ, "
                                         r"OPQ4_16,IVF2048,PQ4, needs"):
        index_key_for(100_000_000, 512, GB)


def test_training_fits_a_quarter_of_the_budget():
    # 10 M 512-D regions in 1 GB: 4·sqrt(N) = 16384 lists would need 39 · 16384 · 2 KiB = 1.2 GiB of
    # training floats; 256 MiB holds 131,072 points, 3360 lists of 39, rounded down to 2048
    assert nlist_for(10_000_000) == 16384
    assert nlist_for(10_000_000, GB // 4, 512) == 2048
    key = index_key_for(10_000_000, 512, GB)
    assert train_size_for(key, 10_000_000, 512, GB) * 4 * 512 <= GB // 4


def test_training_sizes():
    assert train_size_for("IVF4096,PQ32", 1_000_000, 128) == 409_600  # 100 per centroid
    assert train_size_for("IVF4096,PQ32", 1_000_000, 512, GB) == 39 * 4096  # the quarter-GB cap, floored
    assert train_size_for("IVF4096,PQ32", 1_000_000, 128, 512 * MB) == 262_144  # a quarter of 512 MB in 128-D floats
    assert train_size_for("IVF16,PQ4", 3000, 16) == 3000  # never more than the database
    assert train_size_for("PQ8", 1_000_000, 64) == 25_600  # 100 per PQ centroid
    assert train_size_for("Flat", 1_000_000, 128) == 0


# -- the command --------------------------------------------------------------------------------
def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_the_command_builds_from_a_budget_through_instsearch(tmp_path, capsys):
    _shards(tmp_path / "shards", [6000, 6000], dim=32)
    rc = instsearch_main(["index", "build", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "index"),
                          "--memory-budget", "1GB", "--quiet"])
    assert rc == 0
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    assert info["factory"] == "IVF256,Flat" and info["ntotal"] == 12000 and info["train_size"] == 12000
    assert info["rule"] == {"num_vectors": 12000, "dim": 32, "memory_budget_bytes": GB,
                            "estimated_index_bytes": estimated_index_bytes("IVF256,Flat", 12000, 32)}
    assert sorted(info["files"]) == ["index.faiss", "index.ivfdata"]
    assert "IVF256,Flat (budget 1.0 GiB" in capsys.readouterr().out


def test_the_command_refuses_clearly(tmp_path, capsys):
    shards = tmp_path / "shards"
    _shards(shards, [100])
    out = str(tmp_path / "index")
    rc, err = _run(capsys, "build", "--shards", str(tmp_path / "nope"), "--out", out, "--factory", "Flat")
    assert rc == 2 and f"{tmp_path / 'nope' / 'manifest.json'} is missing" in err
    rc, err = _run(capsys, "build", "--shards", str(shards), "--out", out)
    assert rc == 2 and "give exactly one of --factory" in err
    rc, err = _run(capsys, "build", "--shards", str(shards), "--out", out, "--factory", "Flat", "--memory-budget", "1GB")
    assert rc == 2 and "give exactly one of --factory" in err
    rc, err = _run(capsys, "build", "--shards", str(shards), "--out", out, "--memory-budget", "1KB")
    assert rc == 2 and "memory budget of 1.0 KiB cannot hold 100 vectors of 16-D" in err
    rc, err = _run(capsys, "build", "--shards", str(shards), "--out", out, "--factory", "IVF8,Nonsense")
    assert rc == 2 and "faiss cannot build the index key 'IVF8,Nonsense' for 16-D vectors" in err
    assert not (tmp_path / "index").exists()  # refused before anything was written
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "notes.txt").write_text("x")
    rc, err = _run(capsys, "build", "--shards", str(shards), "--out", out, "--factory", "Flat", "--quiet")
    assert rc == 2 and f"{out} is not empty: choose a new --out folder or pass --overwrite" in err
    assert main(["build", "--shards", str(shards), "--out", out, "--factory", "Flat", "--overwrite", "--quiet"]) == 0
    assert (tmp_path / "index" / "index.faiss").is_file()


def test_incomplete_or_empty_shards_are_refused(tmp_path, capsys):
    _shards(tmp_path / "partial", [100, 100], planned=3)
    rc, err = _run(capsys, "build", "--shards", str(tmp_path / "partial"), "--out", str(tmp_path / "i"),
                   "--factory", "Flat")
    assert rc == 2 and "1 of 3 parts are not complete (first: part-00002)" in err
    _shards(tmp_path / "empty", [0, 0])
    rc, err = _run(capsys, "build", "--shards", str(tmp_path / "empty"), "--out", str(tmp_path / "i"),
                   "--factory", "Flat")
    assert rc == 2 and "holds no region features" in err


# -- the stored nprobe ----------------------------------------------------------------------------
def _unit(degrees) -> np.ndarray:
    r = np.radians(np.asarray(degrees, np.float64))
    return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)


def test_nprobe_estimate_by_hand():
    # four lists with centroids at 0, 90, 180, 270 degrees; sample points at 10 (list 0), 80 (list 1),
    # 200 (list 2) and 350 degrees (list 0). Nearest other point and the rank of its list among the
    # query's lists (by inner product with the centroids):
    #   10 deg: 350 deg, list 0, ranked 1st -> needs 1 list
    #   80 deg: 10 deg, list 0, ranked 2nd after 90 deg's list 1 -> needs 2
    #   200 deg: 80 deg (120 deg away; 350 is 150, 10 is 170), list 1, ranked 3rd (180, 270, 90) -> needs 3
    index, sample = _four_lists()
    for target, nprobe, recall in [(0.3, 1, 1 / 3), (0.5, 2, 2 / 3), (0.95, 3, 1.0)]:
        estimate = tune_nprobe(index, sample, "ip", target=target, neighbours=1, queries=3)
        assert (estimate.nprobe, estimate.queries, estimate.neighbours, estimate.sample) == (nprobe, 3, 1, 4)
        assert estimate.estimated_recall == pytest.approx(recall)


def _four_lists() -> tuple[faiss.Index, np.ndarray]:
    """The index and sample of :func:`test_nprobe_estimate_by_hand`."""
    quantizer = faiss.IndexFlatIP(2)
    index = faiss.IndexIVFFlat(quantizer, 2, 4, faiss.METRIC_INNER_PRODUCT)
    quantizer.add(_unit([0, 90, 180, 270]))
    index.is_trained = True
    return index, _unit([10, 80, 200, 350])


def test_nprobe_estimate_needs_the_ceiling_of_target_hits():
    # the same three queries, needing 1, 2 and 3 lists. A target of t of the 3 neighbours needs
    # ceil(3t) of them found, i.e. the ceil(3t)-th smallest need:
    #   t = 1/3: 1 hit  -> 1 list     t = 2/3: 2 hits -> 2 lists     t = 1: 3 hits -> 3 lists
    #   t = 0.4: 1.2 -> 2 hits -> 2 lists (rounding 1.2 down would stop at 1 list, recall 1/3 < 0.4)
    # Exact fractions: taking the int(3t)-th *zero-based* need would ask one hit too many
    # (t = 2/3: 3 lists)
    index, sample = _four_lists()
    for target, nprobe in [(1 / 3, 1), (2 / 3, 2), (1.0, 3), (0.4, 2)]:
        estimate = tune_nprobe(index, sample, "ip", target=target, neighbours=1, queries=3)
        assert estimate.nprobe == nprobe, target
        assert estimate.estimated_recall == pytest.approx(nprobe / 3)


def test_built_ivf_index_stores_the_estimated_nprobe(tmp_path):
    shards = _shards(tmp_path / "shards", [600, 600])
    out = build_index(shards, tmp_path / "index", factory="IVF16,Flat", progress=False, target_recall=0.9)
    info = json.loads((out / "index.json").read_text())
    rule = info["nprobe_rule"]
    assert rule["target"] == 0.9 and rule["sample"] == 1200 and rule["queries"] == 1000 and rule["neighbours"] == 10
    assert info["nprobe"] == rule["nprobe"] == faiss.extract_index_ivf(open_index(out)).nprobe
    assert rule["estimated_recall"] >= 0.9
    lower = build_index(shards, tmp_path / "lower", factory="IVF16,Flat", progress=False, target_recall=0.3)
    assert json.loads((lower / "index.json").read_text())["nprobe"] < rule["nprobe"]


# -- several processes ----------------------------------------------------------------------------
def _build_in_group(rank: int, world: int, init_file: str, shards_root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        build_index(shards_root, out, factory="IVF16,Flat", progress=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_build_the_index_of_one(tmp_path):
    # each rank adds every other part, rank 0 trains and merges: the same lists, the same searches
    import torch.multiprocessing as mp

    shards = _shards(tmp_path / "shards", [300, 0, 250, 400, 120])
    one = build_index(shards, tmp_path / "one", factory="IVF16,Flat", progress=False)
    mp.spawn(_build_in_group, args=(2, str(tmp_path / "init"), str(shards.root), str(tmp_path / "two")), nprocs=2)
    two = tmp_path / "two"
    assert not (two / ".parts").exists()
    a, b = open_index(one, nprobe=16), open_index(two, nprobe=16)  # every list: exact
    assert (a.ntotal, faiss.extract_index_ivf(b).nprobe) == (b.ntotal, faiss.extract_index_ivf(a).nprobe)
    q = _queries(9, shards.dim)
    (sa, ia), (sb, ib) = a.search(q, 25), b.search(q, 25)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(sa, sb)
    ivf_a, ivf_b = faiss.extract_index_ivf(a), faiss.extract_index_ivf(b)
    assert [ivf_a.get_list_size(i) for i in range(16)] == [ivf_b.get_list_size(i) for i in range(16)]
    info_a, info_b = (json.loads((p / "index.json").read_text()) for p in (one, two))
    assert {k: v for k, v in info_a.items() if k != "build_seconds"} == \
        {k: v for k, v in info_b.items() if k != "build_seconds"}
