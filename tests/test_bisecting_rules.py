"""The paper's rules of CLAID's region decomposition against the authors' public code's
(https://github.com/wlzhao22/CLAID, commit 8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7), as options of
networks/bisecting.py: hand-built cases where the two readings give different partitions, with the
expected results worked out by hand in the comments (never computed by the code under test)."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from instsearch.networks import bisecting
from instsearch.networks.bisecting import (average_connectivity, bisect_regions, build_hierarchy, high_energy,
                                           ksums_bisect, select_seeds)


def unit(*degrees: float) -> torch.Tensor:
    """2-D unit vectors at the given angles; ``||x_i - x_j||^2 = 2 - 2 cos(angle_i - angle_j)`` and
    ``x_i . x_j > 0.2`` (Eq. 5) exactly when the angles differ by less than 78.46 degrees."""
    a = torch.tensor(degrees, dtype=torch.float64) * (math.pi / 180)
    return torch.stack([a.cos(), a.sin()], 1)


SOLVERS = ["batched", "sequential"]


# ----------------------------------------------------------------------------- defaults
# option -> the paper's value (Sec. III, Algorithm 1) or, where the paper is silent, this module's
PAPER_DEFAULTS = {
    "tau1": 0.97,               # terminate when c(S) >= tau1 (Sec. III-C)
    "tau2": 0.2,                # dummy when xi(S) <= tau2 (Sec. III-D; the public code keeps xi > 0.1)
    "alpha": 0.2,               # Eq. 5
    "energy_top": 0.3,          # H = top 30 % by l1 norm
    "min_patches": 15,          # tiny regions ignored
    "seed_selection": True,     # Sec. III-B seeds, not the random initialisation of Table VII
    "method": "ksums",
    "max_depth": None,          # the terminate condition, not the depth of Table VIII
    "filter_dummy": True,
    "seed_rule": "closer",      # "assigned ... by checking whether they are closer to x_b or x_w"
    "move_rule": "tolerance",
    "cut_root": False,          # Algorithm 1 tests the root like any node
    "connectivity_diagonal": False,  # Eq. 8 sums the pairs i < j
    "energy_rule": "ceil",
    "solver": "batched",
    "max_iters": 100,
}


@pytest.mark.parametrize("function", [build_hierarchy, bisect_regions])
@pytest.mark.parametrize("option,value", sorted(PAPER_DEFAULTS.items()))
def test_decomposition_defaults_are_the_papers(function, option, value):
    parameter = inspect.signature(function).parameters[option]
    assert parameter.default == value and type(parameter.default) is type(value)


@pytest.mark.parametrize("option", ["alpha", "seed_selection", "solver", "max_iters", "seed_rule", "move_rule"])
def test_ksums_bisect_defaults_match_build_hierarchy(option):
    assert (inspect.signature(ksums_bisect).parameters[option].default
            == inspect.signature(build_hierarchy).parameters[option].default)


def test_rule_options_reach_the_solvers(monkeypatch):
    seen = []

    def spy(name, record):
        original = getattr(bisecting, name)

        def wrapper(*args, **kwargs):
            seen.append(record(*args, **kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(bisecting, name, wrapper)

    # the sequential reference goes through ksums_bisect; the batched path reads seeds from the
    # level's degrees and runs the batched solver on the node's patches
    spy("ksums_bisect", lambda *a, **k: ("ksums_bisect", k["seed_rule"], k["move_rule"], k["max_iters"]))
    spy("_seeds_from_degrees", lambda degree, diagonal, rule: ("seeds", rule))
    spy("_ksums_batched", lambda gram, side, max_iters, history, move_rule, **k: ("batched", move_rule, max_iters))
    feats = torch.zeros(4, 5, 3)
    feats[:2, :, 0] = 1.0
    feats[2:, :, 1] = 1.0
    options = dict(min_patches=1, seed_rule="public", move_rule="public", max_iters=7)
    bisect_regions(feats, solver="sequential", **options)
    assert ("ksums_bisect", "public", "public", 7) in seen
    seen.clear()
    bisect_regions(feats, **options)
    assert ("seeds", "public") in seen and ("batched", "public", 7) in seen
    assert all(entry in {("seeds", "public"), ("batched", "public", 7)} for entry in seen)


@pytest.mark.parametrize("option,value", [("seed_rule", "aim"), ("move_rule", "strict"), ("energy_rule", "floor")])
def test_unknown_rules_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        build_hierarchy(torch.ones(4, 4, 3), **{option: value})


# ----------------------------------------------------------------------------- seed rule
def test_public_seed_ties_take_the_last_highest_and_the_first_lowest_degree():
    # edges 0-1, 1-2, 2-3, 1-4, 2-4: degrees without the diagonal 1, 3, 3, 1, 2
    adj = torch.eye(5, dtype=torch.bool)
    for i, j in [(0, 1), (1, 2), (2, 3), (1, 4), (2, 4)]:
        adj[i, j] = adj[j, i] = True
    assert select_seeds(adj) == (1, 0)  # the paper's reading: first maximum, first minimum of the rest
    assert select_seeds(adj, "public") == (2, 0)  # a stable ascending argsort: last maximum, first minimum
    # all degrees equal: the two ends of the order differ
    assert select_seeds(torch.ones(4, 4, dtype=torch.bool), "public") == (3, 0)


def test_seed_rule_on_a_hand_built_gram_block():
    # the graph above, with dot products > 0.2 on its edges and <= 0.2 elsewhere
    g = torch.eye(5)
    for (i, j), v in {(0, 1): .8, (1, 2): .5, (2, 3): .7, (1, 4): .6, (2, 4): .4,
                      (0, 2): .1, (0, 3): 0., (0, 4): .15, (1, 3): .05, (3, 4): .1}.items():
        g[i, j] = g[j, i] = v
    adj = g > 0.2
    # closer: b = 1, w = 0; a feature joins b when g[1, i] >= g[0, i]:
    # 0: .8 < 1 -> w; 1: b; 2: .5 >= .1; 3: .05 >= 0; 4: .6 >= .15
    assert ksums_bisect(gram=g, adjacency=adj, max_iters=0).tolist() == [False, True, True, True, True]
    # public: b = 2, w = 0; b's side = affine to 2 and not to 0 = {1, 2, 3, 4} - {0, 1} = {2, 3, 4};
    # 1, affine to both seeds, goes to w's side (with b = 1, the first maximum, b's side would be
    # {1, 2, 4} - {0, 1} = {2, 4}; with w = 3, the last minimum, {1, 2, 3, 4} - {2, 3} = {1, 4})
    assert ksums_bisect(gram=g, adjacency=adj, max_iters=0, seed_rule="public").tolist() == \
        [False, False, True, True, True]


@pytest.mark.parametrize("solver", SOLVERS)
def test_seed_rule_on_features(solver):
    # 0-2: e0; 3: e1; 4: (0.6, 0.8, 0); 5-7 near e2, leaning a little towards e0
    x = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0.6, 0.8, 0],
                      [0.15, 0, 1], [0.15, 0.01, 1], [0.15, -0.01, 1]], dtype=torch.float64)
    # dots: e0.4 = 0.6, 3.4 = 0.8, 5-7 with e0 ~0.148, with 4 ~0.089, with 3 ~0, among themselves ~1
    # degrees (no diagonal): 0-2: 3, 3: 1, 4: 4, 5-7: 2 -> b = 4, w = 3 under both rules
    # closer: every feature but w has a larger dot with 4 than with 3 (5-7: 0.089 > 0)
    closer = ksums_bisect(x, solver=solver, max_iters=0)
    assert closer.tolist() == [True, True, True, False, True, True, True, True]
    # public: b's side = affine to 4 and not to 3 = {0, 1, 2}; 4 (affine to 3) and 5-7 (affine to neither) -> w
    public = ksums_bisect(x, solver=solver, max_iters=0, seed_rule="public")
    assert public.tolist() == [True, True, True, False, False, False, False, False]


@pytest.mark.parametrize("solver", SOLVERS)
def test_public_seed_split_may_leave_the_b_side_empty(solver):
    # 0, 10, 20 degrees: all affine, so b (= 2, the last maximum) is affine to w (= 0) and so is
    # every other feature: b's side starts empty. Moving a feature into it lowers Eq. 1 by its
    # d(own) = 0.151 (0 or 20 degrees) or 0.061 (10 degrees), never by 1: under the public bar it stays empty.
    x = unit(0, 10, 20)
    assert ksums_bisect(x, solver=solver, seed_rule="public", move_rule="public").tolist() == [False] * 3
    # a 3x5 grid, one angle per row: the root (cut by cut_root, its c is 1) has all 15 degrees equal,
    # b = 14, w = 0, b's side empty; the largest decrease, 5 (2-2cos10) + 5 (2-2cos20) = 0.755 for a
    # patch of the first or last row, stays below 1: the node is not cut (``if L.any() == False``)
    grid = x.float()[:, None, :].expand(3, 5, 2).contiguous()
    public = dict(seed_rule="public", move_rule="public", cut_root=True, min_patches=1, solver=solver)
    assert [n.bisected for n in build_hierarchy(grid, **public)] == [False]
    # under the tolerance the first move (any decrease) fills the side and the root is cut
    assert build_hierarchy(grid, **{**public, "move_rule": "tolerance"})[0].bisected


# ----------------------------------------------------------------------------- move rule
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_move_that_lowers_eq1_by_less_than_one_is_made_only_under_the_tolerance(solver):
    x = unit(30, 45, 100, 150, 155, 160)
    # degrees (angle gaps < 78.46): 2, 2, 5, 3, 3, 3 -> b = 2 (100), w = 0 (30); closer split
    # {30, 45} | {100, 150, 155, 160} (45: cos55 = 0.57 < cos15 = 0.97). For 100:
    # d(own) = (2-2cos50) + (2-2cos55) + (2-2cos60) = 0.7144 + 0.8528 + 1 = 2.5672,
    # d(other) = (2-2cos70) + (2-2cos55) = 1.3160 + 0.8528 = 2.1688: moving it lowers Eq. 1 by
    # 0.398 - more than the tolerance, less than ||x||^2 = 1. Every other move raises Eq. 1,
    # before and after 100 moves.
    seed = [False, False, True, True, True, True]
    moved = [False, False, False, True, True, True]
    assert ksums_bisect(x, solver=solver, max_iters=0).tolist() == seed
    assert ksums_bisect(x, solver=solver).tolist() == moved
    assert ksums_bisect(x, solver=solver, move_rule="public").tolist() == seed
    assert ksums_bisect(x, solver=solver, move_rule="tolerance").tolist() == moved


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_move_that_lowers_eq1_by_more_than_one_is_made_under_both_rules(solver):
    x = unit(0, 20, 55, 80, 110, 130)
    # degrees 2, 3, 5, 4, 3, 3 -> b = 2 (55), w = 0 (0); closer split {0, 20} | {55, 80, 110, 130}.
    # For 55: d(own) = (2-2cos25) + (2-2cos55) + (2-2cos75) = 0.1874 + 0.8528 + 1.4824 = 2.5226,
    # d(other) = (2-2cos55) + (2-2cos35) = 0.8528 + 0.3617 = 1.2145: a decrease of 1.308 > 1.
    moved = [False, False, False, True, True, True]
    for rule in ("tolerance", "public"):
        assert ksums_bisect(x, solver=solver, move_rule=rule).tolist() == moved


# ----------------------------------------------------------------------------- dummy nodes
def two_halves(high_left: int, high_right: int) -> torch.Tensor:
    """A 5x8 grid: columns 0-3 of direction e0, 4-7 of e1 (20 patches each); the first
    ``high_left`` / ``high_right`` patches of each half in raster order have l1 norm 3, the rest 1."""
    feats = torch.zeros(5, 8, 2)
    feats[:, :4, 0] = 1.0
    feats[:, 4:, 1] = 1.0
    left = feats[:, :4].reshape(20, 2)
    right = feats[:, 4:].reshape(20, 2)
    left[:high_left] *= 3
    right[:high_right] *= 3
    feats[:, :4] = left.reshape(5, 4, 2)
    feats[:, 4:] = right.reshape(5, 4, 2)
    return feats


def mask_set(masks: torch.Tensor) -> set[tuple[bool, ...]]:
    return {tuple(m.flatten().tolist()) for m in masks}


def test_a_node_whose_energy_ratio_is_exactly_tau2_is_a_dummy():
    # H = ceil(0.3 * 40) = 12 patches = the 4 + 8 of norm 3; the root (c = 2 * 20 * 19 / (40 * 39) = 0.49)
    # splits into its halves: xi(left) = 4 / 20 = 0.2 = tau2 -> dummy; xi(right) = 8 / 20 = 0.4 -> region
    feats = two_halves(4, 8)
    left = torch.zeros(5, 8, dtype=torch.bool)
    left[:, :4] = True
    nodes = build_hierarchy(feats)
    assert len(nodes) == 3
    got = {bool(n.mask[0, 0]): (n.level, n.energy_ratio, n.dummy) for n in nodes[1:]}
    assert got == {True: (1, 0.2, True), False: (1, 0.4, False)}
    regions, _ = bisect_regions(feats)
    assert mask_set(regions) == mask_set((~left)[None])
    # the public code's threshold keeps xi > 0.1: both halves are regions
    regions, _ = bisect_regions(feats, tau2=0.1)
    assert mask_set(regions) == mask_set(torch.stack([left, ~left]))


# ----------------------------------------------------------------------------- root cut
def planted() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """12x16 grid: background e0 (norm 1), object rows 3-9 x columns 4-11 of two parts, e1 (rows 3-6,
    32 patches) and e2 (rows 7-9, 24 patches), norm 5. No noise: the affinity is exact."""
    masks = {k: torch.zeros(12, 16, dtype=torch.bool) for k in ("top", "bottom")}
    masks["top"][3:7, 4:12] = True
    masks["bottom"][7:10, 4:12] = True
    masks["object"] = masks["top"] | masks["bottom"]
    feats = torch.zeros(12, 16, 3)
    feats[~masks["object"], 0] = 1.0
    feats[masks["top"], 1] = 5.0
    feats[masks["bottom"], 2] = 5.0
    return feats, masks


def test_cut_root_cuts_a_coherent_image():
    feats, masks = planted()
    # c(root) = (136 * 135 + 32 * 31 + 24 * 23) / (192 * 191) = 19904 / 36672 = 0.543
    # tau1 = 0.3: the paper leaves the root uncut -> no region
    assert bisect_regions(feats, tau1=0.3)[0].shape[0] == 0
    # the public code cuts it anyway: background (dummy, xi = 2 / 136) and object; the object's
    # c = (32 * 31 + 24 * 23) / (56 * 55) = 0.501 >= 0.3 is not cut
    regions, levels = bisect_regions(feats, tau1=0.3, cut_root=True)
    assert levels.tolist() == [1] and torch.equal(regions[0], masks["object"])
    # with the terminate condition met everywhere, only the root's own cut is made
    assert [n.bisected for n in build_hierarchy(feats, tau1=0.3, cut_root=True)] == [True, False, False]


# ----------------------------------------------------------------------------- connectivity
def test_connectivity_diagonal_counts_a_ii():
    adj = torch.eye(4, dtype=torch.bool)
    adj[0, 1] = adj[1, 0] = adj[1, 2] = adj[2, 1] = True
    # pairs: 2 edges -> 2 * 2 / (4 * 3) = 1/3; with the diagonal (4 + 4) / 12 = 2/3
    assert float(average_connectivity(adj)) == pytest.approx(1 / 3)
    assert float(average_connectivity(adj, diagonal=True)) == pytest.approx(2 / 3)
    subsets = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    # {0, 1}: (2 + 2) / 2 = 2; {0, 2}: 2 / 2 = 1; {0, 1, 2}: (4 + 3) / 6
    assert average_connectivity(adj, subsets, diagonal=True).tolist() == pytest.approx([2.0, 1.0, 7 / 6])


def test_connectivity_diagonal_changes_the_cut_of_a_node():
    feats, masks = planted()
    # the object: c = 1544 / 3080 = 0.5013 without the diagonal, (1544 + 56) / 3080 = 0.5195 with it;
    # tau1 = 0.51 cuts it only without (the root, c >= 0.54 either way, is cut by cut_root)
    regions, levels = bisect_regions(feats, tau1=0.51, cut_root=True)
    assert levels.tolist() == [1, 2, 2]
    assert torch.equal(regions, torch.stack([masks["object"], masks["top"], masks["bottom"]]))
    regions, levels = bisect_regions(feats, tau1=0.51, cut_root=True, connectivity_diagonal=True)
    assert levels.tolist() == [1] and torch.equal(regions[0], masks["object"])


# ----------------------------------------------------------------------------- energy rule
def test_public_energy_rule_keeps_every_patch_tied_with_the_threshold():
    norms = [5.0, 1.0, 7.0, 3.0, 7.0, 2.0, 0.5, 4.0, 1.0, 6.0]
    features = torch.tensor(norms)[:, None] * torch.tensor([[0.5, -0.5]])
    # no tie at the threshold: sorted(l1)[10 * 7 // 10] = 6 -> {7, 7, 6}, the same 3 as ceil(0.3 * 10)
    assert high_energy(features, 0.3, "public").nonzero().squeeze(1).tolist() == [2, 4, 9]
    # 0.5 of 10 -> threshold sorted(l1)[5] = 4: {5, 7, 7, 4, 6}, again 5 patches
    assert high_energy(features, 0.5, "public").nonzero().squeeze(1).tolist() == [0, 2, 4, 7, 9]
    # 0.8 -> threshold sorted(l1)[2] = 1, tied with index 1 and 8: 9 patches, not ceil(8) = 8
    assert high_energy(features, 0.8, "public").nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert high_energy(features, 0.8).nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    tied = torch.ones(5, 3)
    assert high_energy(tied, 0.4, "public").all() and high_energy(tied, 0.4).sum() == 2
    assert not high_energy(tied, 0.0, "public").any()


def test_energy_rule_changes_the_dummy_nodes():
    # 6x8 grid, rows 0-2 e0 and rows 3-5 e1, every l1 norm 1. ceil: H = the first ceil(14.4) = 15 patches
    # in raster order, all in the top half: xi(top) = 15 / 24, xi(bottom) = 0 (dummy). public: all 48
    # patches tie with the threshold, xi = 1 everywhere.
    feats = torch.zeros(6, 8, 2)
    feats[:3, :, 0] = 1.0
    feats[3:, :, 1] = 1.0
    top = torch.zeros(6, 8, dtype=torch.bool)
    top[:3] = True
    regions, _ = bisect_regions(feats)
    assert torch.equal(regions, top[None])
    regions, _ = bisect_regions(feats, energy_rule="public")
    assert mask_set(regions) == mask_set(torch.stack([top, ~top]))
