"""CLAID's region decomposition (networks/bisecting.py) against hand-computed cases, brute force,
scipy's connected-component labelling and planted hierarchies. "The public code" is the authors'
CLAID code (https://github.com/wlzhao22/CLAID, commit 8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instsearch.networks.bisecting import (affinity, average_connectivity, bisect_regions, build_hierarchy,
                                           connected_components, high_energy, ksums_bisect, ksums_objective,
                                           ncut_bisect, output_nodes, regions_to_boxes, select_seeds,
                                           upsample_masks)


# ----------------------------------------------------------------------------- planted grids
def planted_grid(noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A 12x16 grid of 32-D features: a background of direction e0 (norm ~1) around an object made
    of two adjacent parts of directions e1 (rows 3-6) and e2 (rows 7-9), columns 4-11, norm ~5.

    The three directions are orthogonal, so the affinity (alpha 0.2) joins exactly the patches of
    one group; the object's 56 patches are the 58 high-energy ones (ceil(0.3 * 192)) but for two
    background patches, which makes the background a dummy (xi = 2 / 136).
    """
    g = torch.Generator().manual_seed(seed)
    h, w, d = 12, 16, 32
    masks = {name: torch.zeros(h, w, dtype=torch.bool) for name in ("background", "top", "bottom")}
    masks["top"][3:7, 4:12] = True
    masks["bottom"][7:10, 4:12] = True
    masks["background"] = ~(masks["top"] | masks["bottom"])
    feats = noise * torch.randn(h, w, d, generator=g)
    feats[..., :3] = 0
    feats[masks["background"], 0] += 1.0
    feats[masks["top"], 1] += 5.0
    feats[masks["bottom"], 2] += 5.0
    masks["object"] = masks["top"] | masks["bottom"]
    return feats, masks


def brute_force_objective(x: torch.Tensor, side: torch.Tensor) -> float:
    """Eq. 1 by its definition: the sum over both clusters of ||x_i - x_j||^2 over pairs i < j."""
    xn = F.normalize(x.double(), dim=1)
    total = 0.0
    for part in (xn[side], xn[~side]):
        diff = part[:, None, :] - part[None, :, :]
        total += float(diff.square().sum()) / 2.0
    return total


# ----------------------------------------------------------------------------- equations
def test_affinity_thresholds_the_cosine_of_the_features():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.3], [0.0, 2.0], [-1.0, 0.1]])
    # cosines: (0,1) 0.995, (0,2) 0, (1,2) 0.0995, (0,3) -0.995, (2,3) 0.0995
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(affinity(x, alpha=0.2), expected)
    # alpha 0.05 adds the two ~0.0995 pairs
    expected[1, 2] = expected[2, 1] = expected[2, 3] = expected[3, 2] = True
    assert torch.equal(affinity(x, alpha=0.05), expected)


def test_average_connectivity_counts_pairs_without_the_diagonal():
    adj = torch.eye(4, dtype=torch.bool)
    adj[0, 1] = adj[1, 0] = adj[1, 2] = adj[2, 1] = True
    # two edges among the six pairs of four features
    assert float(average_connectivity(adj)) == pytest.approx(2 / 6)
    subsets = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    got = average_connectivity(adj, subsets)
    assert got.tolist() == pytest.approx([1.0, 0.0, 2 / 3, 1.0])  # a single feature: nothing to cut, c = 1


def test_high_energy_takes_the_rounded_up_share_by_l1_norm_with_ties_to_the_lower_index():
    norms = [5.0, 1.0, 7.0, 3.0, 7.0, 2.0, 0.5, 4.0, 1.0, 6.0]
    features = torch.tensor(norms)[:, None] * torch.tensor([[0.5, -0.5]])  # l1 norm = the value
    # 30 % of 10 = 3 patches: the two 7s and the 6
    assert high_energy(features, 0.3).nonzero().squeeze(1).tolist() == [2, 4, 9]
    # 25 % of 10 = 2.5 -> 3 as well; 20 % -> 2: the two 7s; a three-way tie resolved towards index 0
    assert high_energy(features, 0.25).sum() == 3
    assert high_energy(features, 0.2).nonzero().squeeze(1).tolist() == [2, 4]
    tied = torch.ones(5, 3)
    assert high_energy(tied, 0.4).nonzero().squeeze(1).tolist() == [0, 1]


def test_seeds_are_the_highest_and_lowest_degree_features():
    adj = torch.eye(5, dtype=torch.bool)
    for i, j in [(0, 1), (1, 2), (1, 3), (2, 3)]:
        adj[i, j] = adj[j, i] = True
    # degrees without the diagonal: 1, 3, 2, 2, 0
    assert select_seeds(adj) == (1, 4)
    # all degrees equal: b is the first feature and w the first of the others
    assert select_seeds(torch.ones(3, 3, dtype=torch.bool)) == (0, 1)


def test_ksums_objective_is_eq1_by_its_definition():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 6, generator=g)
    side = torch.rand(17, generator=g) > 0.4
    assert ksums_objective(x, side) == pytest.approx(brute_force_objective(x, side), rel=1e-6)


@pytest.mark.parametrize("solver", ["batched", "sequential"])
@pytest.mark.parametrize("seed_selection", [True, False])
def test_ksums_never_increases_the_objective_and_stops_at_a_local_optimum(solver, seed_selection):
    g = torch.Generator().manual_seed(11)
    centres = torch.randn(3, 8, generator=g)
    x = centres[torch.randint(0, 3, (90,), generator=g)] + 0.8 * torch.randn(90, 8, generator=g)
    side, history = ksums_bisect(x, solver=solver, seed_selection=seed_selection, return_history=True,
                                 generator=torch.Generator().manual_seed(5))
    assert len(history) >= 2
    assert all(b <= a + 1e-9 for a, b in zip(history, history[1:]))
    final = brute_force_objective(x, side)
    assert history[-1] == pytest.approx(final, rel=1e-6)
    assert 0 < int(side.sum()) < 90
    # no single move lowers Eq. 1 (beyond the solvers' rounding margin): the k-sums fixpoint
    for i in range(90):
        moved = side.clone()
        moved[i] = ~moved[i]
        if 0 < int(moved.sum()) < 90:
            assert brute_force_objective(x, moved) >= final - 1e-5 * 90 - 1e-9


def test_ksums_finds_the_brute_force_optimum_of_two_planted_clusters():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.tensor([1.0, 0, 0]) + 0.3 * torch.randn(6, 3, generator=g),
                   torch.tensor([0, 1.0, 0]) + 0.3 * torch.randn(5, 3, generator=g)])
    best = min((brute_force_objective(x, torch.tensor(bits, dtype=torch.bool)), bits)
               for bits in itertools.product([True, False], repeat=11) if 0 < sum(bits) < 11)
    for solver in ("batched", "sequential"):
        side = ksums_bisect(x, solver=solver)
        assert brute_force_objective(x, side) == pytest.approx(best[0], rel=1e-9)
        planted = torch.arange(11) < 6
        assert torch.equal(side, planted) or torch.equal(side, ~planted)


def test_batched_and_sequential_solvers_give_the_same_split_on_planted_grids():
    for seed in range(3):
        feats, masks = planted_grid(seed=seed)
        x = feats.reshape(-1, feats.shape[-1])
        batched = ksums_bisect(x, solver="batched")
        sequential = ksums_bisect(x, solver="sequential")
        assert torch.equal(batched, sequential)
        # the root splits into the background and the object
        assert torch.equal(batched.reshape(12, 16), masks["background"])


def test_ksums_max_iters_zero_returns_the_seed_assignment():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    # degrees (alpha 0.2): feature 4 is affine to all others -> b = 4; w = 0 (first of the lowest, degree 2)
    side = ksums_bisect(x, max_iters=0)
    # every feature joins the seed it is closer to; b's side is True
    assert side.tolist() == [False, False, True, True, True]


def test_ncut_separates_two_unconnected_groups():
    adj = torch.zeros(9, 9, dtype=torch.bool)
    adj[:5, :5] = True
    adj[5:, 5:] = True
    side = ncut_bisect(adj)
    assert side.tolist() == [True] * 5 + [False] * 4  # the highest-degree feature (group of 5) is True


# ----------------------------------------------------------------------------- components
@pytest.mark.parametrize("min_patches", [1, 3])
def test_connected_components_match_scipy_8_connectivity(min_patches):
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(7)
    masks = torch.rand(4, 13, 17, generator=g) > 0.55
    comps, source = connected_components(masks, min_patches)
    expected, expected_source = [], []
    for b, m in enumerate(masks.numpy()):
        labels, count = ndimage.label(m, structure=np.ones((3, 3)))
        for k in range(1, count + 1):
            comp = labels == k
            if comp.sum() >= min_patches:
                expected.append(comp)
                expected_source.append(b)
    assert comps.shape[0] == len(expected) > 5
    assert source.tolist() == expected_source
    for got, want in zip(comps.numpy(), expected):
        assert np.array_equal(got, want)


def test_connected_components_of_a_spiral_need_many_propagation_steps():
    spiral = torch.zeros(1, 9, 9, dtype=torch.bool)
    spiral[0, 0, :] = spiral[0, :, 8] = spiral[0, 8, :] = spiral[0, 2:, 0] = True
    spiral[0, 2, :7] = spiral[0, 2:7, 6] = spiral[0, 6, 2:7] = spiral[0, 4:7, 2] = True
    spiral[0, 4, 2:5] = True
    comps, _ = connected_components(spiral)
    assert comps.shape[0] == 1 and torch.equal(comps[0], spiral[0])


# ----------------------------------------------------------------------------- hierarchy
def test_planted_grid_gives_the_planted_hierarchy():
    feats, masks = planted_grid()
    nodes = build_hierarchy(feats)
    assert [(n.level, n.parent) for n in nodes] == [(0, -1), (1, 0), (1, 0), (2, 2), (2, 2)]
    assert torch.equal(nodes[1].mask, masks["background"])
    assert torch.equal(nodes[2].mask, masks["object"])
    assert torch.equal(nodes[3].mask, masks["top"])  # raster order of the first patch
    assert torch.equal(nodes[4].mask, masks["bottom"])
    assert [n.bisected for n in nodes] == [True, False, True, False, False]
    assert [n.dummy for n in nodes] == [True, True, False, False, False]
    assert nodes[1].energy_ratio == pytest.approx(2 / 136)
    assert nodes[2].energy_ratio == pytest.approx(1.0)
    assert nodes[1].connectivity == pytest.approx(1.0)
    # the root: the 3 groups' internal pairs among all pairs
    pairs = sum(int(m.sum()) * (int(m.sum()) - 1) for m in (masks["background"], masks["top"], masks["bottom"]))
    assert nodes[0].connectivity == pytest.approx(pairs / (192 * 191))


def test_bisect_regions_keeps_non_dummy_nodes_and_the_options_change_the_output():
    feats, masks = planted_grid()
    regions, levels = bisect_regions(feats)
    assert levels.tolist() == [1, 2, 2]
    assert torch.equal(regions, torch.stack([masks["object"], masks["top"], masks["bottom"]]))
    # the dummy background is output without the filter
    regions, levels = bisect_regions(feats, filter_dummy=False)
    assert levels.tolist() == [1, 1, 2, 2]
    # depth-limited: only the first cut
    regions, levels = bisect_regions(feats, max_depth=1)
    assert levels.tolist() == [1]
    # a root that is already coherent enough is not cut: no region
    regions, _ = bisect_regions(feats, tau1=0.3)
    assert regions.shape[0] == 0
    # tiny pieces are dropped: with min_patches above the object's parts, the object is a leaf
    regions, levels = bisect_regions(feats, min_patches=40)
    assert levels.tolist() == [1]
    # an energy share that covers the background makes it a region
    regions, levels = bisect_regions(feats, energy_top=0.9)
    assert levels.tolist() == [1, 1, 2, 2]


def test_output_nodes_drop_the_root_and_dummies():
    feats, _ = planted_grid()
    nodes = build_hierarchy(feats)
    position = {id(n): i for i, n in enumerate(nodes)}
    assert [position[id(n)] for n in output_nodes(nodes)] == [2, 3, 4]
    assert [position[id(n)] for n in output_nodes(nodes, filter_dummy=False)] == [1, 2, 3, 4]


def test_identical_features_are_never_cut():
    feats = torch.ones(6, 7, 4)
    nodes = build_hierarchy(feats)
    assert len(nodes) == 1 and not nodes[0].bisected
    assert nodes[0].connectivity == 1.0


def test_ncut_method_recovers_the_planted_hierarchy():
    feats, masks = planted_grid()
    regions, levels = bisect_regions(feats, method="ncut")
    assert levels.tolist() == [1, 2, 2]
    assert torch.equal(regions, torch.stack([masks["object"], masks["top"], masks["bottom"]]))


@pytest.mark.parametrize("solver", ["batched", "sequential"])
def test_random_initialisation_is_reproducible_from_the_generator(solver):
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(10, 12, 8, generator=g)
    run = [bisect_regions(feats, seed_selection=False, solver=solver, min_patches=3,
                          generator=torch.Generator().manual_seed(9))[0] for _ in range(2)]
    assert run[0].shape[0] > 0 and torch.equal(run[0], run[1])
    other = bisect_regions(feats, seed_selection=False, solver=solver, min_patches=3,
                           generator=torch.Generator().manual_seed(10))[0]
    assert not (other.shape == run[0].shape and torch.equal(other, run[0]))  # the generator is what decides


def test_invalid_options_are_refused():
    feats, _ = planted_grid()
    with pytest.raises(ValueError, match="method"):
        build_hierarchy(feats, method="kmeans")
    with pytest.raises(ValueError, match="solver"):
        build_hierarchy(feats, solver="fast")
    with pytest.raises(ValueError, match=r"\(h, w, D\)"):
        build_hierarchy(feats.reshape(-1, 32))


# ----------------------------------------------------------------------------- masks to pixels
def test_regions_to_boxes_cover_the_patches_in_image_pixels():
    masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4
    # a 40x100 image: a patch is 10 px high and 20 px wide
    boxes = regions_to_boxes(masks, (40, 100))
    assert boxes.tolist() == [[40.0, 10.0, 100.0, 30.0], [0.0, 0.0, 0.0, 0.0]]


def test_upsample_masks_take_the_patch_under_each_pixel_centre():
    masks = torch.zeros(1, 3, 2, dtype=torch.bool)
    masks[0, 1, 1] = True
    up = upsample_masks(masks, (20, 4))
    # 20 px over 3 patch rows: pixel y belongs to row floor((2y + 1) * 3 / 40) -> rows 7..12 are row 1
    rows = up[0, :, 3].nonzero().squeeze(1).tolist()
    assert rows == list(range(7, 13))
    assert up[0, :, :2].sum() == 0 and up.dtype == torch.float32
    # 4 px over 2 patch columns: pixel x takes column floor((2x + 1) * 2 / 8) -> pixels 2, 3 are column 1
    assert up[0, 7:13, 2:].eq(1).all() and up.sum() == 6 * 2


def test_affinity_is_strictly_above_alpha():
    # orthogonal features have cosine exactly 0: not linked at alpha = 0 (Eq. 5's strict ">")
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert affinity(x, alpha=0.0).tolist() == [[True, False, True], [False, True, True], [True, True, True]]


def test_ksums_objective_reads_side_as_a_mask_whatever_its_dtype():
    # clusters {x0, x1} and {x2}: ||x0 - x1||^2 = 2 for orthogonal unit vectors, a singleton adds 0
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert ksums_objective(x, torch.tensor([1, 1, 0])) == pytest.approx(2.0)
    assert ksums_objective(x, torch.tensor([True, True, False])) == pytest.approx(2.0)


def test_a_node_exactly_at_tau1_is_not_cut():
    from instsearch.networks.bisecting import _cut_wanted

    # Algorithm 1 line 8 cuts when c(S) < tau1: a node whose connectivity equals tau1 stays whole
    assert not _cut_wanted(0.5, level=1, tau1=0.5, max_depth=None)
    assert _cut_wanted(0.49, level=1, tau1=0.5, max_depth=None)


# ----------------------------------------------------------------------------- edge cases by hand
def test_regions_to_boxes_corner_patch_empty_set_and_bad_shape():
    masks = torch.zeros(1, 4, 5, dtype=torch.uint8)
    masks[0, 0, 0] = 1  # only the top-left patch: 20 px wide, 10 px high in a 40x100 image
    boxes = regions_to_boxes(masks, (40, 100))
    assert boxes.dtype == torch.float32 and boxes.tolist() == [[0.0, 0.0, 20.0, 10.0]]
    assert regions_to_boxes(torch.zeros(0, 4, 5, dtype=torch.bool), (40, 100)).shape == (0, 4)
    with pytest.raises(ValueError, match=r"regions_to_boxes expects \(R, h, w\) masks, got \(4, 5\)"):
        regions_to_boxes(torch.zeros(4, 5), (40, 100))


def test_high_energy_keeps_the_grid_shape_and_checks_its_arguments():
    # (h, w, D) = (2, 3, 2): l1 norms row by row 1 5 2 / 4 0 3 -> top ceil(0.5 * 6) = 3: 5, 4, 3
    features = torch.tensor([[[1.0, 0.0], [2.0, -3.0], [0.0, 2.0]], [[4.0, 0.0], [0.0, 0.0], [1.0, 2.0]]])
    expected = [[False, True, False], [True, False, True]]
    for rule in ("ceil", "public"):
        got = high_energy(features, 0.5, rule)
        assert got.dtype == torch.bool and got.tolist() == expected
        assert high_energy(features, 1.0, rule).tolist() == [[True] * 3] * 2  # the whole image
        none = high_energy(features, 0.0, rule)
        assert none.dtype == torch.bool and none.tolist() == [[False] * 3] * 2
    with pytest.raises(ValueError, match=r"high_energy: energy_top must be in \[0, 1\], got 1.5"):
        high_energy(features, 1.5)
    with pytest.raises(ValueError, match="high_energy: rule must be 'ceil' or 'public', got 'median'"):
        high_energy(features, 0.3, "median")


def test_average_connectivity_edge_cases_by_hand():
    # a single feature has nothing to cut: c = 1
    assert float(average_connectivity(torch.ones(1, 1))) == 1.0
    # two mutually affine features whose adjacency has a zero diagonal: one pair of two -> c = 1,
    # with the diagonal counted (public code) still 2 / 2 since A_ii = 0
    adj = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert float(average_connectivity(adj)) == 1.0
    assert float(average_connectivity(adj, diagonal=True)) == 1.0
    masks = torch.tensor([[True, True], [True, False]])
    assert average_connectivity(adj, masks).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"average_connectivity expects a square adjacency, got \(2, 3\)"):
        average_connectivity(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="average_connectivity: masks over 3 features for a 2-feature adjacency"):
        average_connectivity(adj, torch.ones(1, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- Gram matrix panels
def _integer_features(n: int, d: int, seed: int) -> torch.Tensor:
    """Small integers as float32: every dot product is an exact integer, whatever the summation order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (n, d), generator=g).to(torch.float32)


@pytest.mark.parametrize("n", [1025, 1100, 1537])
def test_gram_of_a_large_image_built_in_panels_is_the_full_product(n):
    # above 1024 features the Gram matrix is built one row panel at a time and mirrored; every entry
    # must still be x_i . x_j (an explicit integer product in numpy, exact here)
    from instsearch.networks.bisecting import _gram
    x = _integer_features(n, 3, seed=n)
    xi = x.numpy().astype(np.int64)
    gram = _gram(x)
    assert gram.shape == (n, n)
    assert np.array_equal(gram.numpy().astype(np.int64), xi @ xi.T)


def test_gram_of_few_long_features_is_small():
    # 4 features of 1100 dimensions: a (4, 4) matrix, whatever the feature length
    from instsearch.networks.bisecting import _gram
    x = _integer_features(4, 1100, seed=1)
    xi = x.numpy().astype(np.int64)
    gram = _gram(x)
    assert gram.shape == (4, 4)
    assert np.array_equal(gram.numpy().astype(np.int64), xi @ xi.T)


# ----------------------------------------------------------------------------- connected components
def _scipy_components(masks: np.ndarray, min_patches: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components by scipy.ndimage.label, ordered by mask then first raster patch."""
    from scipy import ndimage
    comps, source = [], []
    for b, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        for k in range(1, count + 1):
            comp = labels == k
            if comp.sum() >= min_patches:
                comps.append(comp)
                source.append(b)
    h, w = masks.shape[1:]
    return (np.array(comps, dtype=bool).reshape(-1, h, w), np.array(source, dtype=np.int64))


def test_connected_components_component_spanning_first_and_last_patch():
    # 3x3: component A runs along the top row and down the right column (patches 0, 1, 2, 5, 8:
    # it holds both the first and the last patch), component B is the lone bottom-left patch 6
    mask = torch.tensor([[[1, 1, 1], [0, 0, 1], [1, 0, 1]]], dtype=torch.bool)
    comps, source = connected_components(mask)
    a = torch.tensor([[1, 1, 1], [0, 0, 1], [0, 0, 1]], dtype=torch.bool)
    b = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(comps, torch.stack([a, b]))
    assert source.tolist() == [0, 0]


def test_connected_components_match_scipy_on_random_masks():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(40, 6, 7, generator=g) < 0.45
    comps, source = connected_components(masks)
    want_comps, want_source = _scipy_components(masks.numpy())
    assert np.array_equal(comps.numpy(), want_comps)
    assert np.array_equal(source.numpy(), want_source)
    assert source.dtype == torch.long


def test_connected_components_keeps_single_patches_by_default():
    # min_patches defaults to 1: an isolated patch is a component
    mask = torch.tensor([[[1, 0, 0], [0, 0, 1]]], dtype=torch.bool)
    comps, source = connected_components(mask)
    assert comps.shape == (2, 2, 3) and source.tolist() == [0, 0]
    assert comps[0, 0, 0] and comps[1, 1, 2] and int(comps.sum()) == 2


def test_connected_components_of_one_patch_grids():
    masks = torch.tensor([[[True]], [[False]], [[True]]])
    comps, source = connected_components(masks)
    assert torch.equal(comps, torch.ones(2, 1, 1, dtype=torch.bool))
    assert source.tolist() == [0, 2]


def test_connected_components_of_no_masks_and_of_empty_grids():
    comps, source = connected_components(torch.zeros(0, 4, 5, dtype=torch.bool))
    assert comps.shape == (0, 4, 5) and comps.dtype == torch.bool
    assert source.shape == (0,) and source.dtype == torch.long
    comps, source = connected_components(torch.zeros(2, 0, 3, dtype=torch.bool))
    assert comps.shape == (0, 0, 3) and comps.dtype == torch.bool
    assert source.shape == (0,) and source.dtype == torch.long


def test_connected_components_accept_float_masks():
    mask = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    comps, source = connected_components(mask)
    assert comps.dtype == torch.bool
    assert torch.equal(comps, torch.tensor([[[1, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]]], dtype=torch.bool))
    assert source.tolist() == [0, 0]


# ----------------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("call,message", [
    (lambda: connected_components(torch.zeros(3, 3, dtype=torch.bool)), r"expects \(B, h, w\) masks, got \(3, 3\)"),
    (lambda: affinity(torch.zeros(2, 3, 4)), r"expects \(n, D\) features, got \(2, 3, 4\)"),
    (lambda: select_seeds(torch.ones(1, 1, dtype=torch.bool)), r"needs at least 2 features, got 1"),
    (lambda: select_seeds(torch.ones(2, 2, dtype=torch.bool), rule="other"), r"rule must be 'closer' or 'public'"),
    (lambda: upsample_masks(torch.zeros(2, 2), (4, 4)), r"expects \(R, h, w\) masks, got \(2, 2\)"),
    (lambda: ksums_bisect(), r"ksums_bisect needs features or a Gram block"),
    (lambda: ksums_bisect(torch.eye(3), solver="other"), r"solver must be 'batched' or 'sequential', got 'other'"),
    (lambda: ksums_bisect(gram=torch.eye(3), solver="sequential"), r"the sequential solver works on the features"),
    (lambda: build_hierarchy(torch.ones(2, 2, 3), max_depth=-1), r"max_depth must be >= 0, got -1"),
])
def test_argument_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_batched_solver_on_a_node_by_index_needs_its_features():
    from instsearch.networks.bisecting import _ksums_batched
    with pytest.raises(ValueError, match="a node given by index needs its features"):
        _ksums_batched(torch.eye(3), torch.tensor([True, False, False]), 10, None, index=torch.arange(3))


# ----------------------------------------------------------------------------- small nodes and empty outputs
def test_ksums_bisect_of_fewer_than_two_features():
    for n in (0, 1):
        side = ksums_bisect(torch.ones(n, 3))
        assert side.dtype == torch.bool and side.shape == (n,) and bool(side.all())
    side = ksums_bisect(torch.ones(1, 3), return_history=False)
    assert isinstance(side, torch.Tensor)
    side, history = ksums_bisect(torch.ones(1, 3), return_history=True)
    assert side.tolist() == [True] and history == []


@pytest.mark.parametrize("solver", ["batched", "sequential"])
def test_ksums_bisect_of_two_orthogonal_features_splits_them(solver):
    # degrees 0 and 0: b = 0 (first maximum), w = 1; each feature stays with its own seed
    side = ksums_bisect(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), solver=solver)
    assert side.tolist() == [True, False]


def test_ncut_bisect_of_small_nodes():
    one = ncut_bisect(torch.ones(1, 1, dtype=torch.bool))
    assert one.dtype == torch.bool and one.tolist() == [True]
    assert ncut_bisect(torch.zeros(0, 0, dtype=torch.bool)).shape == (0,)
    # two features not affine to each other: the cut separates them, the highest-degree (first) on True
    assert ncut_bisect(torch.eye(2, dtype=torch.bool)).tolist() == [True, False]
    # a 0/1 float adjacency is read as the bool one
    assert ncut_bisect(torch.eye(2)).tolist() == [True, False]


def test_bisect_regions_without_regions_returns_typed_empty_tensors():
    # identical features: c(root) = 1 >= tau1, nothing is cut, no region
    masks, levels = bisect_regions(torch.ones(3, 4, 5))
    assert masks.shape == (0, 3, 4) and masks.dtype == torch.bool
    assert levels.shape == (0,) and levels.dtype == torch.long


def test_average_connectivity_of_a_pair_and_types():
    adj = torch.eye(2, dtype=torch.bool)  # two features, not affine to each other
    assert float(average_connectivity(adj, torch.tensor([[True, True]]))[0]) == 0.0
    whole = average_connectivity(adj)
    assert whole.dtype == torch.float64 and float(whole) == 0.0
    # integer 0/1 membership reads as bool: {0, 1, 2} of a 3-set with the one edge (0, 1): 2 / 6
    adj3 = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    got = average_connectivity(adj3, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert got.tolist() == [pytest.approx(2 / 6), 1.0]


def test_hierarchy_of_two_patches_and_depth_zero():
    # a 1x2 image of two orthogonal features: c(root) = 0 < tau1, cut into its two patches
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    nodes = build_hierarchy(feats, min_patches=1)
    assert [n.parent for n in nodes] == [-1, 0, 0]
    assert nodes[0].bisected
    assert [n.mask.tolist() for n in nodes[1:]] == [[[True, False]], [[False, True]]]
    # single patches: nothing to cut, c = 1
    assert [n.connectivity for n in nodes[1:]] == [1.0, 1.0]
    # max_depth = 0 cuts nothing, whatever c(root)
    nodes = build_hierarchy(feats, min_patches=1, max_depth=0)
    assert len(nodes) == 1 and not nodes[0].bisected


def test_seed_split_from_the_seeds_rows_by_hand():
    from instsearch.networks.bisecting import _split_from_seeds
    # public: affine to b (> 0.2) and not affine to w (not > 0.2); 0.2 itself is not affine
    row_b = torch.tensor([1.0, 0.5, 0.2, 0.1, 0.3])
    row_w = torch.tensor([0.1, 0.2, 0.2, 1.0, 0.5])
    assert _split_from_seeds(row_b, row_w, 0, 3, 0.2, "public").tolist() == [True, True, False, False, False]
    # closer: to b when x . x_b >= x . x_w (the tie of feature 1 goes to b); b and w forced onto their sides
    row_b = torch.tensor([0.1, 0.4, 0.3, 0.9])
    row_w = torch.tensor([0.5, 0.4, 0.1, 0.05])
    assert _split_from_seeds(row_b, row_w, 0, 3, 0.2, "closer").tolist() == [True, True, True, False]


@pytest.mark.parametrize("n,on_b", [(4, 2), (5, 3), (7, 4)])
def test_random_initialisation_puts_half_rounded_up_on_the_first_side(n, on_b):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    side = ksums_bisect(x, seed_selection=False, max_iters=0)
    assert int(side.sum()) == on_b


def test_packed_affinity_degrees_match_an_explicit_count():
    # degrees within each node (label) without the diagonal, for sizes that are not multiples of 8
    from instsearch.networks.bisecting import _Affinity
    for n in (13, 16, 21):
        g = torch.Generator().manual_seed(n)
        x = F.normalize(torch.randn(n, 3, generator=g), dim=1)
        gram = x @ x.T
        labels = torch.randint(-1, 3, (n,), generator=g)
        adj = (gram > 0.2).numpy()
        lab = labels.numpy()
        want = [0 if lab[i] < 0 else sum(1 for j in range(n) if j != i and lab[j] == lab[i] and adj[i, j])
                for i in range(n)]
        assert _Affinity(gram, 0.2).degrees(labels, 3).tolist() == want


def test_hierarchy_root_node_by_hand():
    # the root: every patch, level 0, no parent, always a dummy; xi(root) = |H| / n = ceil(0.3 * 192) / 192
    feats, _ = planted_grid()
    root = build_hierarchy(feats)[0]
    assert torch.equal(root.mask, torch.ones(12, 16, dtype=torch.bool))
    assert (root.level, root.parent, root.dummy) == (0, -1, True)
    assert root.energy_ratio == pytest.approx(58 / 192, abs=1e-12)
