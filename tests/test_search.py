"""Search over region features against a brute-force reference."""
import numpy as np
import pytest
import torch

from instsearch.eval.search import RegionIndex, RegionStore, best_region_per_image
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

    from instsearch.eval.search import ExactInnerProductIndex

    rng = np.random.default_rng(3)
    feats = rng.normal(size=(500, 24)).astype(np.float32)
    queries = rng.normal(size=(9, 24)).astype(np.float32)
    ref = faiss.IndexFlatIP(24)
    ref.add(feats)
    d_ref, i_ref = ref.search(queries, 40)
    index = ExactInnerProductIndex(feats, max_scores=2 * len(feats))  # two queries per chunk
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
    faiss_rank = RegionIndex(store, index_factory="IVF1,Flat").search(queries, top_images=8)
    assert "IVF" in type(RegionIndex(store, index_factory="IVF1,Flat").index).__name__  # a faiss index, exact with one list
    for a, b in zip(torch_rank, faiss_rank):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.regions, b.regions)
