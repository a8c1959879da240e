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
    assert index.store.features.dtype == np.float32
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

    with pytest.raises(ValueError, match=r"^an ADC searcher wraps an L2 faiss index \(e\.g\. OPQCodebook\.to_faiss_index\(\)\)$"):
        FaissSearcher.adc(faiss.IndexFlatIP(8))
    with pytest.raises(ValueError, match=r"^an ADC searcher needs a trained index: its codebooks come from the model$"):
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
    with pytest.raises(ValueError, match=r"^category pruning searches the region features, which a searcher that answers "
                                         r"from codes alone \(a product quantiser, a reloaded index\) does not keep$"):
        index.search(np.ones((1, 8), np.float32), query_labels=[1], prune_by_label=True)


# -- the stored database: RegionStore ----------------------------------------------------------------
def test_region_store_concatenates_every_field_in_image_order_with_its_dtypes():
    """Hand-built: image a has 2 regions, b none, c 1; float64 inputs are stored as float32."""
    a = Regions(torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2]], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64),
                torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), labels=torch.tensor([3, 1], dtype=torch.int32))
    b = Regions(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 2), labels=torch.zeros(0, dtype=torch.int64))
    c = Regions(torch.tensor([[5.0, 5, 9, 9]]), torch.tensor([0.75]), torch.tensor([[0.5, 0.75]]), labels=torch.tensor([2]))
    store = RegionStore.from_regions(["a", "b", "c"], [a, b, c])
    assert store.image_ids == ["a", "b", "c"] and len(store) == 3 and store.dim == 2
    np.testing.assert_array_equal(store.image_index, [0, 0, 2])
    np.testing.assert_array_equal(store.features, [[1, 0], [0, 1], [0.5, 0.75]])
    np.testing.assert_array_equal(store.boxes, [[0, 0, 1, 1], [1, 1, 2, 2], [5, 5, 9, 9]])
    np.testing.assert_array_equal(store.scores, [0.5, 0.25, 0.75])
    np.testing.assert_array_equal(store.labels, [3, 1, 2])
    assert (store.features.dtype, store.boxes.dtype, store.scores.dtype) == (np.float32,) * 3
    assert (store.image_index.dtype, store.labels.dtype) == (np.int64, np.int64)
    assert store.features.flags.c_contiguous


def test_region_store_without_regions_keeps_the_field_shapes_and_dtypes():
    store = RegionStore.from_regions(["a", "b"], [Regions(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 8))] * 2)
    assert store.features.shape == (0, 0) and store.boxes.shape == (0, 4)
    assert store.scores.shape == (0,) and store.image_index.shape == (0,)
    assert (store.features.dtype, store.boxes.dtype, store.scores.dtype) == (np.float32,) * 3
    assert store.labels is not None and store.labels.shape == (0,) and store.labels.dtype == np.int64
    none = RegionStore.from_regions([], [])  # no image at all: no labels either
    assert len(none) == 0 and none.image_ids == [] and none.labels is None and none.image_index.dtype == np.int64


def test_region_store_refuses_inconsistent_regions():
    one = Regions(torch.zeros(1, 4), torch.ones(1), torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"^2 image ids for 1 region sets$"):
        RegionStore.from_regions(["a", "b"], [one])
    with pytest.raises(ValueError, match=r"^regions have features of different sizes: \[4, 8\]$"):
        RegionStore.from_regions(["a", "b"], [one, Regions(torch.zeros(2, 4), torch.ones(2), torch.ones(2, 4))])
    with pytest.raises(ValueError, match=r"^every database region needs a feature$"):
        RegionStore.from_regions(["a", "b"], [one, Regions(torch.zeros(1, 4), torch.ones(1), None)])


def test_region_index_refuses_a_searcher_of_another_dimension():
    store = RegionStore.from_regions(["a"], [Regions(torch.zeros(2, 4), torch.ones(2), torch.ones(2, 8))])
    searcher = FaissSearcher.exact_l2(4)
    searcher.add(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"^the store's features are 8-D, the searcher's 4-D$"):
        RegionIndex(store, searcher)


# -- queries and their arguments ----------------------------------------------------------------------
def test_queries_must_be_a_matrix():
    ids, regions = _random_store(np.random.default_rng(3), num_images=4)
    index = RegionIndex(RegionStore.from_regions(ids, regions))
    with pytest.raises(ValueError, match=r"^queries must be \(Q, D\), got shape \(16,\)$"):
        index.search(np.zeros(16, np.float32))


def test_category_pruning_needs_labels_on_both_sides():
    labelled = RegionIndex(RegionStore.from_regions(*_random_store(np.random.default_rng(5), num_images=4)))
    unlabelled = RegionIndex(RegionStore.from_regions(*_random_store(np.random.default_rng(5), num_images=4, labels=False)))
    q = np.ones((1, 16), np.float32)
    message = r"^category pruning needs labels on the database regions and the queries$"
    with pytest.raises(ValueError, match=message):
        labelled.search(q, query_labels=None, prune_by_label=True)
    with pytest.raises(ValueError, match=message):
        unlabelled.search(q, query_labels=[1], prune_by_label=True)


@pytest.mark.parametrize("top_images", [2, 4])
def test_category_pruning_keeps_only_the_top_images(top_images):
    rng = np.random.default_rng(6)
    ids, regions = _random_store(rng)
    index = RegionIndex(RegionStore.from_regions(ids, regions))
    queries = rng.normal(size=(4, 16)).astype(np.float32)
    labels = np.array([1, 2, 3, 2])
    for q, label, res in zip(queries, labels, index.search(queries, top_images=top_images, query_labels=labels,
                                                           prune_by_label=True)):
        ref = _brute_force(ids, regions, q, label=label)[:top_images]
        assert res.images.tolist() == [i for _, i, _ in ref]
        np.testing.assert_allclose(res.scores, [s for s, _, _ in ref], rtol=1e-5, atol=1e-6)


def test_to_run_names_the_method_and_carries_every_ranked_hit():
    rng = np.random.default_rng(8)
    ids, regions = _random_store(rng, num_images=6, max_regions=3)
    index = RegionIndex(RegionStore.from_regions(ids, regions))
    q = rng.normal(size=(1, 16)).astype(np.float32)
    run = index.to_run(["q1"], index.search(q), method="mine")
    assert run.method == "mine"
    ref = _brute_force(ids, regions, q[0])
    hits = run.rankings["q1"]
    assert [h.image for h in hits] == [ids[i] for _, i, _ in ref]
    np.testing.assert_allclose([h.score for h in hits], [s for s, _, _ in ref], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([h.box for h in hits], [b for *_, b in ref])


def test_empty_database_rankings_are_typed_and_convert_to_an_empty_run():
    store = RegionStore.from_regions(["a", "b"], [Regions(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 8))] * 2)
    index = RegionIndex(store)
    rankings = index.search(np.ones((2, 8), np.float32))
    for r in rankings:
        assert (r.images.shape, r.scores.shape, r.regions.shape) == ((0,), (0,), (0,))
        assert (r.images.dtype, r.scores.dtype, r.regions.dtype) == (np.int64, np.float32, np.int64)
    assert index.to_run(["q1", "q2"], rankings, method="m").rankings == {"q1": [], "q2": []}


def test_best_region_per_image_returns_float32_scores_for_float64_distances():
    d = np.array([[0.9, 0.8, 0.7]], dtype=np.float64)
    (r,) = best_region_per_image(d, np.array([[1, 0, 2]]), np.array([0, 0, 1]), num_images=2)
    assert r.scores.dtype == np.float32 and r.images.dtype == np.int64
    np.testing.assert_array_equal(r.scores, np.float32([0.9, 0.7]))
    assert r.images.tolist() == [0, 1] and r.regions.tolist() == [1, 2]


# -- how many regions the searcher is asked for -----------------------------------------------------
class _SpySearcher:
    """Exact inner product (numpy), recording every call's (number of queries, k, query dtype)."""

    score = "inner_product"
    codes_only = False

    def __init__(self, features):
        self.features = np.asarray(features, np.float32)
        self.calls = []

    ntotal = property(lambda self: len(self.features))
    dim = property(lambda self: self.features.shape[1])

    def add(self, features):
        raise AssertionError("filled already")

    def search(self, queries, k):
        self.calls.append((len(queries), k, queries.dtype, queries.flags.c_contiguous))
        s = queries @ self.features.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), order.astype(np.int64)


def _graded_index(sizes):
    """Image i owns sizes[i] regions; 1-D features, every region scoring lower than all before it."""
    total = sum(sizes)
    feats = np.arange(total, 0, -1, dtype=np.float32)[:, None]  # region r scores total - r for query [1]
    regions, start = [], 0
    for n in sizes:
        regions.append(Regions(torch.zeros(n, 4), torch.ones(n), torch.from_numpy(feats[start:start + n])))
        start += n
    store = RegionStore.from_regions([f"im{i}" for i in range(len(sizes))], regions)
    spy = _SpySearcher(feats)
    return RegionIndex(store, spy), spy


def test_shortlist_starts_at_four_per_wanted_image_and_grows_by_the_images_per_region_rate():
    # image 0 owns 1000 regions scoring above the 5 one-region images: k = 64, then
    # min(1005, max(2·64, ⌈1.5·64·4/1⌉ = 384)) = 384, then max(768, 2304) capped at 1005
    index, spy = _graded_index([1000, 1, 1, 1, 1, 1])
    (r,) = index.search(np.ones((1, 1), np.float32), top_images=4)
    assert r.images.tolist() == [0, 1, 2, 3] and r.regions.tolist() == [0, 1000, 1001, 1002]
    assert [k for _, k, *_ in spy.calls] == [64, 384, 1005]


@pytest.mark.parametrize("top_images, ks", [
    (8, [64]),  # the first 64 regions hold exactly the 8 wanted images: no second call
    (10, [64, 128]),  # 8 images in 64: max(2·64, ⌈1.5·64·10/8⌉ = 120) = 128 holds 8 + 7 images
    (20, [80, 240]),  # k = 4·20 = 80 holds 8 + 2 images: max(160, ⌈1.5·80·20/10⌉ = 240)
    (None, [264]),  # a complete ranking asks for every region at once
])
def test_shortlist_sizes_for_crowded_and_sparse_images(top_images, ks):
    index, spy = _graded_index([8] * 8 + [10] * 20)  # 264 regions
    (r,) = index.search(np.ones((1, 1), np.float32), top_images=top_images)
    assert r.images.tolist() == list(range(28 if top_images is None else top_images))
    assert [k for _, k, *_ in spy.calls] == ks


def test_queries_reach_the_searcher_as_float32_in_batches_of_256():
    index, spy = _graded_index([3, 2, 1])
    queries = np.ones((300, 2), np.float64)[:, :1]  # float64 and not C-contiguous
    rankings = index.search(queries)
    assert [(n, k) for n, k, *_ in spy.calls] == [(256, 6), (44, 6)]
    assert all(dtype == np.float32 and contiguous for *_, dtype, contiguous in spy.calls)
    assert all(r.images.tolist() == [0, 1, 2] for r in rankings)


# -- saving and reloading a region index -----------------------------------------------------------
def test_region_index_saves_and_reloads_its_store_and_ranking(tmp_path):
    rng = np.random.default_rng(9)
    ids, regions = _random_store(rng, num_images=8, max_regions=3)
    store = RegionStore.from_regions(ids, regions)
    index = RegionIndex(store)
    target = tmp_path / "a" / "b"  # parents are created
    assert index.save(str(target)) == target
    assert sorted(p.name for p in target.iterdir()) == ["index.faiss", "regions.npz"]
    with np.load(target / "regions.npz") as z:
        assert str(z["format"]) == "instsearch-region-index/1" and str(z["kind"]) == "inner_product"
        assert int(z["dim"]) == 16 and z["image_ids"].tolist() == ids
        np.testing.assert_array_equal(z["image_index"], store.image_index)
        np.testing.assert_array_equal(z["boxes"], store.boxes)
        np.testing.assert_array_equal(z["scores"], store.scores)
        np.testing.assert_array_equal(z["labels"], store.labels)

    again = RegionIndex.load(str(target))
    assert again.store.image_ids == ids and again.dim == 16 and again.searcher.score == "inner_product"
    assert again.store.features.shape == (len(store), 0) and again.store.features.dtype == np.float32
    for name in ("image_index", "boxes", "scores", "labels"):
        np.testing.assert_array_equal(getattr(again.store, name), getattr(store, name))
        assert getattr(again.store, name).dtype == getattr(store, name).dtype
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    for q, res in zip(queries, again.search(queries, top_images=5)):
        ref = _brute_force(ids, regions, q)[:5]
        assert res.images.tolist() == [i for _, i, _ in ref]
        np.testing.assert_allclose(res.scores, [s for s, _, _ in ref], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(again.store.boxes[res.regions], np.stack([b for *_, b in ref]))
    with pytest.raises(ValueError, match="codes alone"):  # the features stayed behind
        again.search(queries, query_labels=[1, 1, 1], prune_by_label=True)


def test_an_l2_region_index_without_labels_reloads_as_l2(tmp_path):
    ids, regions = _random_store(np.random.default_rng(10), num_images=5, labels=False)
    store = RegionStore.from_regions(ids, regions)
    index = RegionIndex(store, FaissSearcher.exact_l2(16))
    index.save(tmp_path)
    with np.load(tmp_path / "regions.npz") as z:
        assert str(z["kind"]) == "inverse_l2" and "labels" not in z.files
    again = RegionIndex.load(tmp_path)
    assert again.store.labels is None and again.searcher.score == "inverse_l2"
    q = np.ones((1, 16), np.float32)
    (a,), (b,) = index.search(q), again.search(q)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)


def test_loading_refuses_a_missing_foreign_or_inconsistent_index(tmp_path):
    import re

    index_file, regions_file = tmp_path / "index.faiss", tmp_path / "regions.npz"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(
            f"not a saved region index: missing {index_file}, {regions_file} (expected index.faiss and regions.npz "
            f"as written by RegionIndex.save)") + "$"):
        RegionIndex.load(tmp_path)
    ids, regions = _random_store(np.random.default_rng(11), num_images=4, max_regions=3)
    store = RegionStore.from_regions(ids, regions)
    RegionIndex(store).save(tmp_path)
    index_file.rename(tmp_path / "moved.faiss")
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing {index_file} (expected")):
        RegionIndex.load(tmp_path)
    (tmp_path / "moved.faiss").rename(index_file)

    with np.load(regions_file) as z:
        fields = {name: z[name] for name in z.files}
    np.savez(regions_file, **{**fields, "format": np.array("other/2")})
    with pytest.raises(ValueError, match="^" + re.escape(
            f"{regions_file}: format 'other/2', expected 'instsearch-region-index/1'") + "$"):
        RegionIndex.load(tmp_path)
    n = len(store)
    np.savez(regions_file, **{**fields, "image_index": fields["image_index"][:-1]})
    with pytest.raises(ValueError, match="^" + re.escape(
            f"{index_file} holds {n} vectors of 16-D but {regions_file} lists {n - 1} regions of 16-D") + "$"):
        RegionIndex.load(tmp_path)
    np.savez(regions_file, **{**fields, "dim": np.array(8)})
    with pytest.raises(ValueError, match="^" + re.escape(
            f"{index_file} holds {n} vectors of 16-D but {regions_file} lists {n} regions of 8-D") + "$"):
        RegionIndex.load(tmp_path)
    np.savez(regions_file, **{**fields, "kind": np.array("inverse_l2")})
    with pytest.raises(ValueError, match="saved as 'inverse_l2'"):
        RegionIndex.load(tmp_path)


# -- searchers ---------------------------------------------------------------------------------------
def test_exact_searcher_converts_float64_and_integer_input_to_float32():
    from instsearch.eval.searchers import ExactInnerProductSearcher

    searcher = ExactInnerProductSearcher(2)
    searcher.add(np.array([[1.0, 0.5], [2.0, -1.0]], np.float64))
    assert searcher.features.dtype == torch.float32
    scores, ids = searcher.search(np.array([[1, 2]], np.int64), 2)  # 1·1 + 2·0.5 = 2, 1·2 − 2·1 = 0
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert ids.tolist() == [[0, 1]]
    np.testing.assert_array_equal(scores, [[2.0, 0.0]])


def test_exact_searchers_keep_their_vectors_on_the_chosen_device():
    """The meta device stands in for a GPU: the vectors must live where the caller put the searcher."""
    from instsearch.eval.searchers import ExactInnerProductSearcher

    searcher = ExactInnerProductSearcher(4, device="meta")
    assert searcher.device == torch.device("meta") and searcher.features.device.type == "meta"
    searcher.add(np.ones((3, 4), np.float32))
    assert searcher.features.device.type == "meta" and searcher.ntotal == 3
    flat = searcher_from_factory("Flat", 4, device="meta")
    assert isinstance(flat, ExactInnerProductSearcher) and flat.features.device.type == "meta"
    store = RegionStore.from_regions(["a"], [Regions(torch.zeros(2, 4), torch.ones(2), torch.ones(2, 4))])
    index = RegionIndex(store, device="meta")
    assert index.searcher.features.device.type == "meta" and index.searcher.ntotal == 2


def test_factory_strings_other_than_flat_build_inner_product_faiss_indexes():
    from instsearch.eval.searchers import ExactInnerProductSearcher

    assert isinstance(searcher_from_factory("Flat", 4), ExactInnerProductSearcher)  # "Flat" is the torch searcher
    assert isinstance(searcher_from_factory("IDMap,Flat", 4), FaissSearcher)
    assert searcher_from_factory("IVF4,Flat", 8).index.nprobe == 16  # the default nprobe
    assert FaissSearcher.from_factory(8, "IVF4,Flat").index.nprobe == 16
    searcher = searcher_from_factory("IVF1,Flat", 2)
    assert searcher.score == "inner_product"
    searcher.add(np.array([[3.0, 0.0], [0.0, 1.0]], np.float32))
    scores, ids = searcher.search(np.array([[1.0, 1.0]], np.float32), 2)  # inner products 3 and 1 (L2 would prefer 1)
    assert ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(scores, [[3.0, 1.0]])


def test_factory_searcher_of_one_dimension():
    searcher = searcher_from_factory("IVF1,Flat", 1)
    assert searcher.dim == 1
    searcher.add(np.array([[1.0], [-2.0], [3.0]], np.float32))
    scores, ids = searcher.search(np.array([[2.0]], np.float32), 3)
    assert ids.tolist() == [[2, 0, 1]]
    np.testing.assert_allclose(scores, [[6.0, 2.0, -4.0]])


def test_inverse_l2_scores_below_unit_distance_and_at_zero_distance():
    """Hand-computed: points at distance 0.5 and 0 from the query score 2 and 1/sqrt(1e-12) = 1e6."""
    searcher = FaissSearcher.exact_l2(2)
    searcher.add(np.array([[0.5, 0.0], [4.0, 0.0]], np.float32))
    scores, ids = searcher.search(np.array([[0.0, 0.0], [4.0, 0.0]], np.float32), 2)
    assert scores.dtype == np.float32
    assert ids.tolist() == [[0, 1], [1, 0]]
    np.testing.assert_allclose(scores, [[2.0, 0.25], [1e6, 1 / 3.5]], rtol=1e-6)


def test_faiss_searcher_refuses_another_metric():
    import faiss

    with pytest.raises(ValueError, match=rf"^a searcher needs an inner-product or L2 faiss index, got metric {faiss.METRIC_L1}$"):
        FaissSearcher(faiss.IndexFlat(4, faiss.METRIC_L1))


def test_loading_refuses_pickled_objects_in_the_region_file(tmp_path):
    """regions.npz is read without unpickling: an object array (which could run code) is refused."""
    ids, regions = _random_store(np.random.default_rng(12), num_images=3, max_regions=2)
    RegionIndex(RegionStore.from_regions(ids, regions)).save(tmp_path)
    with np.load(tmp_path / "regions.npz") as z:
        fields = {name: z[name] for name in z.files}
    np.savez(tmp_path / "regions.npz", **{**fields, "image_ids": np.array(ids, dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        RegionIndex.load(tmp_path)


def test_best_region_per_image_with_padding_only_and_no_images():
    rankings = best_region_per_image(np.full((2, 3), -1.0, np.float32), np.full((2, 3), -1), np.zeros(0, np.int64),
                                     num_images=0)
    assert [(r.images.tolist(), r.scores.tolist(), r.regions.tolist()) for r in rankings] == [([], [], [])] * 2
