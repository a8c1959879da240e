"""Search over region features against a brute-force reference."""
import numpy as np
import pytest
import torch

from instsearch.eval.search import RegionIndex, RegionStore, best_region_per_image
from instsearch.eval.searchers import FaissSearcher, searcher_from_factory
from instsearch.structures import Regions


def _random_store(rng, num_images=30, dim=16, max_regions=6, labels=True):
    regions = []
    for _ in range(num_images):
        n = int(rng.integers(0, max_regions + 1))
        f = torch.tensor(rng.normal(size=(n, dim)), dtype=torch.float32)
        f = torch.nn.functional.normalize(f, dim=1)
        xy = torch.tensor(rng.uniform(0, 50, size=(n, 2)), dtype=torch.float32)
        boxes = torch.cat([xy, xy + 10], dim=1)
        regions.append(Regions(boxes=boxes, scores=torch.rand(n), features=f,
                               labels=torch.tensor(rng.integers(1, 4, size=n)) if labels else None))
    ids = [f"im{i:03d}" for i in range(num_images)]
    return ids, regions


def _brute_force(ids, regions, q, label=None):
    """Per image: max similarity over its regions (optionally of one label), ranked."""
    out = []
    for i, r in enumerate(regions):
        if len(r) == 0:
            continue
        sims = r.features.numpy() @ q
        if label is not None:
            keep = r.labels.numpy() == label
            if not keep.any():
                continue
            sims = np.where(keep, sims, -np.inf)
        j = int(np.argmax(sims))
        out.append((float(sims[j]), i, r.boxes[j].numpy()))
    out.sort(key=lambda t: -t[0])
    return out


@pytest.mark.parametrize("top_images", [None, 3, 10])
def test_ranking_matches_brute_force(top_images):
    rng = np.random.default_rng(0)
    ids, regions = _random_store(rng)
    store = RegionStore.from_regions(ids, regions)
    index = RegionIndex(store)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    results = index.search(queries, top_images=top_images)
    for q, res in zip(queries, results):
        ref = _brute_force(ids, regions, q)
        if top_images is not None:
            ref = ref[:top_images]
        assert [i for _, i, _ in ref] == res.images.tolist()
        np.testing.assert_allclose([s for s, _, _ in ref], res.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.stack([b for _, _, b in ref]), store.boxes[res.regions])


def test_shortlist_grows_until_enough_images():
    # One image owns 200 near-identical regions that fill any small shortlist.
    dim = 8
    crowd = torch.nn.functional.normalize(torch.ones(200, dim) + 0.01 * torch.randn(200, dim), dim=1)
    others = torch.nn.functional.normalize(torch.randn(5, dim) - 3, dim=1)
    regions = [Regions(torch.zeros(200, 4) + torch.tensor([0, 0, 1, 1.0]), torch.ones(200), crowd)]
    regions += [Regions(torch.tensor([[0, 0, 2, 2.0]]), torch.ones(1), others[i:i + 1]) for i in range(5)]
    index = RegionIndex(RegionStore.from_regions([str(i) for i in range(6)], regions))
    q = torch.nn.functional.normalize(torch.ones(1, dim), dim=1)
    res = index.search(q, top_images=4)[0]
    assert len(res.images) == 4 and res.images[0] == 0


def test_category_pruning_compares_only_same_label():
    rng = np.random.default_rng(1)
    ids, regions = _random_store(rng)
    index = RegionIndex(RegionStore.from_regions(ids, regions))
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    labels = np.array([1, 2, 3, 1, 2])
    results = index.search(queries, query_labels=labels, prune_by_label=True)
    for q, label, res in zip(queries, labels, results):
        ref = _brute_force(ids, regions, q, label=label)
        assert [i for _, i, _ in ref] == res.images.tolist()
        assert (index.store.labels[res.regions] == label).all()


def test_to_run_carries_ids_scores_and_boxes():
    rng = np.random.default_rng(2)
    ids, regions = _random_store(rng, num_images=5, max_regions=2)
    index = RegionIndex(RegionStore.from_regions(ids, regions))
    q = regions[next(i for i, r in enumerate(regions) if len(r))].features[:1]
    run = index.to_run(["q1"], index.search(q), method="test")
    best = run.rankings["q1"][0]
    assert best.score == pytest.approx(1.0, abs=1e-5)
    assert best.image in ids and best.box is not None


def test_best_region_per_image_handles_padding():
    d = np.array([[0.9, 0.8, 0.7, -1.0]], dtype=np.float32)
    ids = np.array([[2, 0, 1, -1]])
    image_index = np.array([0, 1, 0])
    (r,) = best_region_per_image(d, ids, image_index, num_images=2)
    assert r.images.tolist() == [0, 1] and r.regions.tolist() == [2, 1]


def test_dimension_mismatch_is_refused():
    ids, regions = _random_store(np.random.default_rng(3))
    index = RegionIndex(RegionStore.from_regions(ids, regions))
    with pytest.raises(ValueError, match="16-D"):
        index.search(np.zeros((1, 8), np.float32))


def test_exact_torch_index_equals_faiss_flat_in_chunks():
    import faiss

    from instsearch.eval.searchers import ExactInnerProductSearcher

    rng = np.random.default_rng(3)
    feats = rng.normal(size=(500, 24)).astype(np.float32)
    queries = rng.normal(size=(9, 24)).astype(np.float32)
    ref = faiss.IndexFlatIP(24)
    ref.add(feats)
    d_ref, i_ref = ref.search(queries, 40)
    index = ExactInnerProductSearcher(24, max_scores=2 * len(feats))  # two queries per chunk
    index.add(feats[:200])
    index.add(feats[200:])  # added in parts, in order
    d, i = index.search(queries, 40)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-5)
    assert index.search(queries, 10_000)[1].shape == (9, 500)


def test_faiss_factory_indexes_still_serve_the_same_exact_ranking():
    rng = np.random.default_rng(4)
    ids, regions = _random_store(rng)
    store = RegionStore.from_regions(ids, regions)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    torch_rank = RegionIndex(store).search(queries, top_images=8)
    faiss_index = RegionIndex(store, searcher_from_factory("IVF1,Flat", store.dim))
    faiss_rank = faiss_index.search(queries, top_images=8)
    assert "IVF" in type(faiss_index.searcher.index).__name__  # a faiss index, exact with one list
    for a, b in zip(torch_rank, faiss_rank):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.regions, b.regions)


def test_l2_index_ranks_images_by_their_nearest_quantised_proposal():
    """UDQ's search (its Eq. 5): an image scores 1 / (ADC distance of its nearest proposal), and
    that proposal's box is returned; checked against explicit distances to the decoded codes."""
    from instsearch.networks.product_quantizer import OPQCodebook, adc_distances

    g = torch.Generator().manual_seed(3)
    sizes = [7, 1, 12, 5, 9]
    feats = [torch.randn(n, 8, generator=g) for n in sizes]
    regions = [Regions(boxes=torch.arange(4.0).repeat(n, 1) + 10 * torch.arange(n)[:, None].float(),
                       scores=torch.ones(n), features=f) for n, f in zip(sizes, feats)]
    store = RegionStore.from_regions([f"im{i}" for i in range(len(sizes))], regions)
    codebook = OPQCodebook.fit(torch.randn(300, 8, generator=g), num_subspaces=2, nbits=4, seed=0, num_threads=1)
    index = RegionIndex(store, FaissSearcher.adc(codebook.to_faiss_index()))
    assert index.store.features.shape == (len(all_feats := torch.cat(feats)), 0)  # codes only: features dropped
    queries = torch.randn(3, 8, generator=g)
    rankings = index.search(queries.numpy())

    dist = adc_distances(queries, codebook.encode(all_feats), codebook)  # (Q, N) squared L2
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    for q, ranking in enumerate(rankings):
        best = [int(torch.argmin(torch.where(owner == i, dist[q], torch.inf))) for i in range(len(sizes))]
        nearest = torch.stack([dist[q, b] for b in best])
        order = torch.argsort(nearest).tolist()
        assert ranking.images.tolist() == order
        assert ranking.regions.tolist() == [best[i] for i in order]
        assert np.allclose(ranking.scores, 1 / nearest[order].sqrt().numpy(), rtol=1e-4)


def test_adc_searcher_refuses_an_inner_product_untrained_or_filled_index():
    import faiss

    with pytest.raises(ValueError, match="L2"):
        FaissSearcher.adc(faiss.IndexFlatIP(8))
    with pytest.raises(ValueError, match="trained"):
        FaissSearcher.adc(faiss.IndexPQ(8, 2, 4))
    filled = faiss.IndexFlatL2(8)
    filled.add(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="already holds"):
        FaissSearcher.adc(filled)


def test_region_index_refuses_a_searcher_holding_other_regions():
    store = RegionStore.from_regions(["a"], [Regions(torch.zeros(1, 4), torch.ones(1), torch.ones(1, 8))])
    searcher = FaissSearcher.exact_l2(8)
    searcher.add(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="holds 2 vectors for a store of 1"):
        RegionIndex(store, searcher)


def test_exact_l2_searcher_scores_by_inverse_distance_nearest_first():
    """Hand-computed: database points at distances 3, 1 and 2 from the query."""
    searcher = FaissSearcher.exact_l2(2)
    searcher.add(np.array([[3.0, 0.0], [0.0, 1.0], [-2.0, 0.0]], np.float32))
    scores, ids = searcher.search(np.zeros((1, 2), np.float32), 3)
    assert ids.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(scores, [[1.0, 0.5, 1 / 3]], rtol=1e-6)


def test_category_pruning_is_refused_on_an_l2_searcher():
    regions = [Regions(torch.zeros(2, 4), torch.ones(2), torch.eye(2, 8), labels=torch.tensor([1, 2]))]
    index = RegionIndex(RegionStore.from_regions(["a"], regions), FaissSearcher.exact_l2(8))
    with pytest.raises(ValueError, match="inner product"):
        index.search(np.ones((1, 8), np.float32), query_labels=[1], prune_by_label=True)


@pytest.mark.parametrize("dense", [True, False])
def test_best_region_per_image_equals_a_per_hit_loop(dense, monkeypatch):
    import instsearch.eval.search as search

    monkeypatch.setattr(search, "DENSE_KEYS", 1 << 24 if dense else 0)  # the scatter path or np.unique's
    rng = np.random.default_rng(3)
    image_index = rng.integers(0, 30, 500)
    ids = np.stack([rng.choice(500, 60, replace=False) for _ in range(7)])
    ids[2, 50:] = -1  # padding
    scores = -np.sort(-rng.random((7, 60)), axis=1).astype(np.float32)
    for q, ranking in enumerate(search.best_region_per_image(scores, ids, image_index, num_images=30)):
        seen, expected = set(), []
        for r, s in zip(ids[q], scores[q]):  # hits best first: an image's first hit is its best
            if r >= 0 and image_index[r] not in seen:
                seen.add(image_index[r])
                expected.append((image_index[r], r, s))
        assert [(int(i), int(r)) for i, r in zip(ranking.images, ranking.regions)] == [(i, r) for i, r, _ in expected]
        np.testing.assert_array_equal(ranking.scores, np.array([s for *_, s in expected], np.float32))


@pytest.mark.parametrize("factory", ["Flat", "IVF1,Flat"])
def test_a_database_without_any_region_ranks_nothing(factory):
    """An untrained detector may keep no region in any image: every query gets an empty ranking
    (not a crash on the empty feature matrix)."""
    regions = [Regions(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 8)) for _ in range(3)]
    store = RegionStore.from_regions(["a", "b", "c"], regions)
    assert store.features.shape == (0, 0)
    index = RegionIndex(store, searcher_from_factory(factory, store.dim))
    rankings = index.search(np.ones((2, 8), np.float32), top_images=5)
    assert [len(r.images) for r in rankings] == [0, 0]


def test_every_searcher_saves_and_loads_to_the_same_ranking(tmp_path):
    """Exact torch inner product (written as a faiss IndexFlatIP), a faiss factory index and exact
    L2: a save -> load round trip answers with the same ids and scores."""
    from instsearch.eval.searchers import ExactInnerProductSearcher, load_searcher

    rng = np.random.default_rng(7)
    feats = rng.normal(size=(200, 12)).astype(np.float32)
    queries = rng.normal(size=(4, 12)).astype(np.float32)
    for name, searcher in (("ip", ExactInnerProductSearcher(12)), ("ivf", searcher_from_factory("IVF2,Flat", 12, nprobe=2)),
                           ("l2", FaissSearcher.exact_l2(12))):
        searcher.add(feats)
        searcher.save(tmp_path / f"{name}.faiss")
        again = load_searcher(tmp_path / f"{name}.faiss", searcher.score)
        assert again.codes_only  # a loaded index answers from its file alone
        s0, i0 = searcher.search(queries, 10)
        s1, i1 = again.search(queries, 10)
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_allclose(s0, s1, rtol=1e-5)
    with pytest.raises(ValueError, match="inverse_l2 index"):
        load_searcher(tmp_path / "l2.faiss", "inner_product")


def test_factory_searcher_trains_on_the_first_add_and_sets_nprobe():
    searcher = searcher_from_factory("IVF4,Flat", 8, nprobe=3)
    assert not searcher.index.is_trained and searcher.index.nprobe == 3
    searcher.add(np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32))
    assert searcher.index.is_trained and searcher.ntotal == 100 and not searcher.codes_only
    assert searcher_from_factory("Flat", 8).score == "inner_product"


def test_exact_inner_product_scores_are_the_dot_products_best_first():
    from instsearch.eval.searchers import ExactInnerProductSearcher

    searcher = ExactInnerProductSearcher(2)
    searcher.add(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], np.float32))
    scores, ids = searcher.search(np.array([[1.0, -1.0], [0.0, 1.0]], np.float32), 2)
    assert ids.tolist() == [[0, 2], [2, 1]]
    np.testing.assert_allclose(scores, [[1.0, 0.0], [3.0, 2.0]])


def test_category_pruning_is_refused_on_a_searcher_that_keeps_codes_only():
    from instsearch.networks.product_quantizer import OPQCodebook

    g = torch.Generator().manual_seed(0)
    regions = [Regions(torch.zeros(4, 4), torch.ones(4), torch.randn(4, 8, generator=g), labels=torch.tensor([1, 1, 2, 2]))]
    codebook = OPQCodebook.fit(torch.randn(200, 8, generator=g), num_subspaces=2, nbits=4, seed=0, num_threads=1)
    index = RegionIndex(RegionStore.from_regions(["a"], regions), FaissSearcher.adc(codebook.to_faiss_index()))
    with pytest.raises(ValueError, match="codes alone"):
        index.search(np.ones((1, 8), np.float32), query_labels=[1], prune_by_label=True)
