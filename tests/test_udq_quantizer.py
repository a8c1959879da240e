"""OPQ pseudo-labels, φ, ADC and the refinements of UDQ, each against faiss or brute-force numpy."""
from __future__ import annotations

import io

import faiss
import numpy as np
import pytest
import torch

from instsearch.networks.product_quantizer import (OPQCodebook, adc_distances, faiss_threads,
                                                   pack_codes, unpack_codes)
from instsearch.networks.udq_refine import kmeans_cells, refine_bfr, refine_cbr, refine_pbr

D, M, NBITS = 16, 4, 4  # K = 16 codewords of 4 dims per subspace


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    rng = np.random.default_rng(0)
    # anisotropic, correlated data so the rotation matters
    mix = rng.standard_normal((D, D)).astype(np.float32)
    return (rng.standard_normal((800, D)).astype(np.float32) * np.linspace(3, 0.3, D, dtype=np.float32)) @ mix


@pytest.fixture(scope="module")
def codebook(features) -> OPQCodebook:
    return OPQCodebook.fit(features, M, NBITS, seed=3, num_threads=1)


def _faiss_reference(features: np.ndarray, seed: int):
    """faiss's OPQ + PQ trained directly: ``(IndexPreTransform, OPQMatrix, IndexPQ)``."""
    opq = faiss.OPQMatrix(D, M)
    index_pq = faiss.IndexPQ(D, M, NBITS)
    index_pq.pq.cp.seed = seed
    opq.pq = index_pq.pq
    index = faiss.IndexPreTransform(opq, index_pq)
    with faiss_threads(1):
        index.train(features)
    return index, opq, index_pq


def _brute_force_codes(rotated: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    m, k, d_m = codebooks.shape
    sub = rotated.reshape(len(rotated), m, 1, d_m)
    return ((sub - codebooks[None]) ** 2).sum(-1).argmin(-1)


def test_pseudo_labels_are_faiss_own_encoding(features, codebook):
    ref, opq, index_pq = _faiss_reference(features, seed=3)
    np.testing.assert_array_equal(codebook.rotation.numpy(), faiss.vector_to_array(opq.A).reshape(D, D))
    np.testing.assert_array_equal(codebook.codebooks.numpy().ravel(), faiss.vector_to_array(index_pq.pq.centroids))
    packed = ref.sa_encode(features)
    np.testing.assert_array_equal(codebook.encode_packed(features), packed)
    # the unpacked labels are the PQ's codes of the rotated features
    rotated = opq.apply(features)
    np.testing.assert_array_equal(codebook.encode(features).numpy(),
                                  unpack_codes(index_pq.pq.compute_codes(rotated), M, NBITS))
    np.testing.assert_allclose(codebook.rotate(features), rotated, atol=1e-5)


def test_rotation_is_orthonormal_and_tensors_stay_differentiable(codebook):
    r = codebook.rotation.double()
    torch.testing.assert_close(r @ r.T, torch.eye(D, dtype=torch.float64), atol=1e-5, rtol=0)
    x = torch.randn(3, D, requires_grad=True)
    codebook.rotate(x).sum().backward()
    torch.testing.assert_close(x.grad, codebook.rotation.sum(0).expand(3, D))


def test_encode_is_nearest_codeword_and_decode_concatenates_them(features, codebook):
    rotated = codebook.rotate(features)
    cb = codebook.codebooks.numpy()
    codes = codebook.encode(features).numpy()
    np.testing.assert_array_equal(codes, _brute_force_codes(rotated, cb))
    decoded = codebook.decode(codes).numpy()
    expected = np.concatenate([cb[m, codes[:, m]] for m in range(M)], axis=1)
    np.testing.assert_array_equal(decoded, expected)
    # faiss's decode of the same codes
    _, _, index_pq = _faiss_reference(features, seed=3)
    np.testing.assert_allclose(decoded, index_pq.pq.decode(codebook.encode_packed(features)), atol=1e-6)


def test_quantization_error_is_mean_squared_residual(features, codebook):
    rotated = codebook.rotate(features)
    residual = rotated - codebook.decode(codebook.encode(features)).numpy()
    assert codebook.quantization_error(features) == pytest.approx(float((residual ** 2).sum(1).mean()), rel=1e-5)


@pytest.mark.parametrize("nbits,m", [(4, 3), (9, 3), (8, 2), (5, 5)])
def test_pack_unpack_round_trip_and_faiss_layout(nbits, m):
    rng = np.random.default_rng(nbits)
    d_m = 2
    codewords = torch.from_numpy(rng.standard_normal((m, 2 ** nbits, d_m)).astype(np.float32))
    cb = OPQCodebook(torch.eye(m * d_m), codewords, nbits)
    x = rng.standard_normal((50, m * d_m)).astype(np.float32)
    codes = cb.encode(x).numpy()
    np.testing.assert_array_equal(codes, _brute_force_codes(x, cb.codebooks.numpy()))
    np.testing.assert_array_equal(pack_codes(codes, nbits), cb.encode_packed(x))
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, nbits), m, nbits), codes)


def test_adc_equals_explicit_distances_and_faiss_index_pq(features, codebook):
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((6, D)).astype(np.float32) * 2)
    database = features[:300]
    codes = codebook.encode(database)
    adc = adc_distances(queries, codes, codebook)
    explicit = ((codebook.rotate(queries)[:, None, :] - codebook.decode(codes)[None]) ** 2).sum(-1)
    torch.testing.assert_close(adc, explicit, atol=1e-4, rtol=1e-6)
    # ‖f_q − R^T φ(f)‖² in the unrotated space is the same (R orthonormal)
    unrotated = ((queries[:, None, :] - codebook.decode(codes) @ codebook.rotation) ** 2).sum(-1)
    torch.testing.assert_close(adc, unrotated, atol=1e-3, rtol=1e-5)
    index = codebook.to_faiss_index()
    index.add(database)
    dist, ids = index.search(queries.numpy(), len(database))
    faiss_matrix = np.empty_like(dist)
    np.put_along_axis(faiss_matrix, ids, dist, axis=1)
    np.testing.assert_allclose(adc.numpy(), faiss_matrix, atol=1e-4, rtol=1e-5)


def test_state_round_trip_through_checkpoint_bytes(features, codebook):
    buffer = io.BytesIO()
    torch.save({"udq.codebook": codebook.to_state()}, buffer)
    buffer.seek(0)
    restored = OPQCodebook.from_state(torch.load(buffer, weights_only=True)["udq.codebook"])
    assert restored.nbits == NBITS
    torch.testing.assert_close(restored.rotation, codebook.rotation, atol=0, rtol=0)
    np.testing.assert_array_equal(restored.encode_packed(features), codebook.encode_packed(features))
    index_a, index_b = codebook.to_faiss_index(), restored.to_faiss_index()
    index_a.add(features)
    index_b.add(features)
    np.testing.assert_array_equal(faiss.serialize_index(index_a), faiss.serialize_index(index_b))


def test_fit_is_deterministic_for_a_seed(features, codebook):
    again = OPQCodebook.fit(features, M, NBITS, seed=3, num_threads=1)
    torch.testing.assert_close(again.rotation, codebook.rotation, atol=0, rtol=0)
    torch.testing.assert_close(again.codebooks, codebook.codebooks, atol=0, rtol=0)
    other = OPQCodebook.fit(features, M, NBITS, seed=4, num_threads=1)
    assert not torch.equal(other.codebooks, codebook.codebooks)


def test_fit_rejects_indivisible_dimension(features):
    with pytest.raises(ValueError):
        OPQCodebook.fit(features[:, :15], M, NBITS)


# -- 4-bit fast-scan ADC -----------------------------------------------------------------------------

def _top10_overlap(ids_a: np.ndarray, ids_b: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / ids_a.shape[1] for a, b in zip(ids_a, ids_b)]))


def test_fast_scan_index_finds_the_index_pq_neighbours():
    d, m = 64, 16  # 16 subspaces of 4 dims, K = 16: the fast-scan layout, 8 bytes per code
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((d, d)).astype(np.float32) / 8
    scale = np.linspace(3, 0.3, d, dtype=np.float32)
    database = (rng.standard_normal((3000, d)).astype(np.float32) * scale) @ mix
    queries = (rng.standard_normal((200, d)).astype(np.float32) * scale) @ mix
    codebook = OPQCodebook.fit(database, m, 4, seed=0, opq_iterations=10, num_threads=1)
    plain, fast = codebook.to_faiss_index(), codebook.to_faiss_index(fast_scan=True)
    assert isinstance(faiss.downcast_index(fast.index), faiss.IndexPQFastScan)
    assert fast.metric_type == faiss.METRIC_L2 and fast.is_trained and fast.ntotal == 0
    plain.add(database)
    fast.add(database)
    d_plain, i_plain = plain.search(queries, 10)
    d_fast, i_fast = fast.search(queries, 10)
    # fast-scan quantises the lookup tables to 8 bits: near-ties may swap, the top 10 barely change
    # (measured: 98% of the ids shared, every distance within 1.2% of the exact ADC)
    assert _top10_overlap(i_plain, i_fast) >= 0.95
    adc = adc_distances(torch.from_numpy(queries), codebook.encode(database), codebook).numpy()
    np.testing.assert_allclose(d_fast, np.take_along_axis(adc, i_fast, axis=1), rtol=0.03)
    np.testing.assert_allclose(d_fast, d_plain, rtol=0.03)
    # it is stored like any faiss index (RegionIndex.save / load)
    reloaded = faiss.deserialize_index(faiss.serialize_index(fast))
    np.testing.assert_array_equal(reloaded.search(queries, 10)[1], i_fast)
    # the check is sensitive to the centroids: the same codes scored with the codewords of each
    # subspace permuted share almost no neighbours (measured 0.5%)
    fast_scan = faiss.downcast_index(fast.index)
    shuffled = codebook.codebooks.numpy()[:, np.random.default_rng(1).permutation(16)]
    faiss.copy_array_to_vector(np.ascontiguousarray(shuffled).ravel(), fast_scan.pq.centroids)
    _, i_wrong = fast.search(queries, 10)
    assert _top10_overlap(i_plain, i_wrong) < 0.2


def test_fast_scan_needs_4_bit_codes(codebook):
    assert codebook.nbits == 4
    codebook.to_faiss_index(fast_scan=True)
    rng = np.random.default_rng(0)
    eight_bit = OPQCodebook(torch.eye(4), torch.from_numpy(rng.standard_normal((2, 256, 2)).astype(np.float32)), 8)
    with pytest.raises(ValueError, match="4-bit"):
        eight_bit.to_faiss_index(fast_scan=True)
    eight_bit.to_faiss_index()  # the plain IndexPQ takes any nbits


# -- refinement (Section 3.4), against brute force ---------------------------------------------------

@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((240, 6)).astype(np.float32)


def _pairwise(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return ((x64[:, None] - x64[None]) ** 2).sum(-1)


def _brute_neighbour_mean(x: np.ndarray, allowed: np.ndarray, s: int, scores: np.ndarray) -> np.ndarray:
    """For each row: mean of itself and its ``s`` best-scoring (lowest) allowed other rows."""
    out = np.empty_like(x, dtype=np.float64)
    for t in range(len(x)):
        cand = np.flatnonzero(allowed[t])
        cand = cand[cand != t]
        nn = cand[np.argsort(scores[t, cand], kind="stable")][:s]
        out[t] = (x[t] + x[nn].sum(0)) / (len(nn) + 1)
    return out


def test_bfr_equals_brute_force(small):
    expected = _brute_neighbour_mean(small, np.ones((len(small),) * 2, bool), 10, _pairwise(small))
    np.testing.assert_allclose(refine_bfr(small, 10, chunk_size=64), expected, atol=1e-5)


def test_bfr_inner_product_equals_brute_force(small):
    scores = -(small.astype(np.float64) @ small.T.astype(np.float64))
    expected = _brute_neighbour_mean(small, np.ones((len(small),) * 2, bool), 4, scores)
    np.testing.assert_allclose(refine_bfr(small, 4, metric="ip"), expected, atol=1e-5)


def test_bfr_keeps_self_out_and_exact_duplicates_in():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    # S = 1: point 0's nearest other proposal is its duplicate, point 2's is point 0 or 1 (dist 100)
    out = refine_bfr(x, 1)
    np.testing.assert_allclose(out[:2], 0.0)
    np.testing.assert_allclose(out[2], [5.0, 0.0])


def test_kmeans_cells_assign_to_the_nearest_centroid(small):
    cells = kmeans_cells(small, 5, seed=1)
    d = ((small[:, None].astype(np.float64) - cells.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(cells.assignment, d.argmin(1))
    again = kmeans_cells(small, 5, seed=1)
    np.testing.assert_array_equal(again.centroids, cells.centroids)


def test_pbr_equals_brute_force_within_cells(small):
    cells = kmeans_cells(small, 6, seed=2)
    same_cell = cells.assignment[:, None] == cells.assignment[None]
    expected = _brute_neighbour_mean(small, same_cell, 8, _pairwise(small))
    np.testing.assert_allclose(refine_pbr(small, 6, 8, cells=cells, chunk_size=50), expected, atol=1e-5)
    # the same k-means when built inside
    np.testing.assert_allclose(refine_pbr(small, 6, 8, seed=2), expected, atol=1e-5)


def test_pbr_small_cell_uses_all_members():
    # two clusters of 3 points far apart, S = 50 > cell size: each point averages its whole cell
    x = np.array([[0, 0], [1, 0], [0, 1], [100, 100], [101, 100], [100, 101]], np.float32)
    out = refine_pbr(x, 2, 50, seed=0)
    np.testing.assert_allclose(out[:3], np.tile([1 / 3, 1 / 3], (3, 1)), atol=1e-6)
    np.testing.assert_allclose(out[3:], np.tile([100 + 1 / 3, 100 + 1 / 3], (3, 1)), atol=1e-4)


def test_cbr_is_mean_with_own_centroid(small):
    cells = kmeans_cells(small, 6, seed=2)
    expected = np.stack([(small[t] + cells.centroids[cells.assignment[t]]) / 2 for t in range(len(small))])
    np.testing.assert_allclose(refine_cbr(small, 6, cells=cells), expected, atol=1e-6)
    np.testing.assert_allclose(refine_cbr(small, 6, seed=2), expected, atol=1e-6)
