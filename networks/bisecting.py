"""CLAID region decomposition: repeated k-sums bisecting of one image's patch-feature grid.

The CLAID paper ("Class Agnostic Instance-level Descriptor for Instance Search", Sec. III and
Algorithm 1) detects instance regions without any class knowledge: the self-supervised ViT patch
features of an image are bisected again and again, every half is split into its 8-connected pieces
(``getObject``), and each piece becomes a node of a hierarchy. A node is cut further while its
patches are not yet mutually similar (average connectivity ``c(S) < tau1``, Eq. 8-9); it yields a
region unless it is a "dummy" dominated by low-energy background (``xi(S) <= tau2``, Eq. 10). The
nodes of all depths together describe an image at every granularity, from "most of the picture"
down to single parts, which is what lets one index serve image retrieval and instance search.

Why the implementation looks the way it does:

* **One Gram matrix per image, one packed affinity, no per-node blocks.** The affinity of Eq. 5,
  the degrees of the seed selection (Eq. 6-7) and the connectivity of every node (Eq. 8-9) are
  functions of the dot products of the l2-normalised patch features, computed by one matmul per
  image (the only ``O(n^2 D)`` step). Its affinity is bit-packed once (1/32 of the Gram matrix);
  the nodes of one depth are disjoint, so the degrees of all their patches within their own node
  are one AND with the node's packed mask and one popcount per level (:class:`_Affinity`), exact
  integers. A node never gathers its ``m x m`` block: the batched k-sums takes the products
  ``G s`` from the features (``x (x^T s)``, ``O(m D)``) and the seeds' two rows from the Gram
  matrix. The nodes of a level are bisected in turn and their halves split into pieces by one
  :func:`connected_components` call.
* **Batched k-sums.** The paper's k-sums moves one feature at a time (Eq. 2-4). For l2-normalised
  features the cost of a cluster is ``n^2 - ||D||^2`` (``D`` = the cluster's feature sum), so the
  objective after moving *any prefix* of a list of features is available in closed form from
  cumulative sums. The batched solver (:func:`ksums_bisect`, ``solver="batched"``) moves, in each
  iteration, the prefix of the gain-sorted improving features that lowers Eq. 1 the most - a few
  tensor operations instead of a Python loop over patches. ``solver="sequential"`` is the paper's
  procedure written directly from Eq. 2-4 (a per-patch loop in random order) and is kept as the
  reference the tests and ``benchmarks/claid_bisect.py`` compare against.
* **Batched components.** ``getObject`` labels many masks at once by 3x3 max-pool label
  propagation with pointer jumping (:func:`connected_components`), no loop over pixels.
* **Determinism.** The only randomness (the random initialisation of the Table VII ablation and the
  visiting order of the sequential solver) comes from the ``generator`` argument, a fixed-seed
  generator when none is given, and every tie is broken towards the lowest patch index.

Points where the paper leaves a choice, and what is done here (each is repeated at the code):

* ``c(S)`` counts the pairs ``i < j`` of Eq. 8 - the diagonal ``A_ii`` is **not** counted
  (the public code, cited below, counts it, which inflates ``c`` of small nodes); ``c = 1`` for a
  single patch (nothing left to cut).
* Eq. 6 and 7 name ``argmin`` for the highest-degree seed and ``argmax`` for the lowest, the
  reverse of their text; only the pair matters. Degrees exclude the feature itself.
* ``H`` holds ``ceil(energy_top * n)`` patches of the image, ranked by the l1 norm of the raw
  (un-normalised) features, ties to the lower index.
* A node is not cut again when it has fewer than 2 patches, when its bisection leaves one side
  empty, or when its only child is the node itself: without these guards a node whose features are
  identical, or which k-sums cannot split, would be popped and re-queued forever.
* Nodes are processed first-in first-out, so the returned list is ordered by depth; Algorithm 1's
  "pop" does not fix an order and the set of nodes does not depend on it.

The paper's rules and the authors' public code (https://github.com/wlzhao22/CLAID at commit
8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7, ``CALID/detector.py``) differ in five places that change
the regions. Each is an option of :func:`ksums_bisect` / :func:`build_hierarchy` /
:func:`bisect_regions`, the paper's reading the default and ``"public"`` (or True) the code's; the
full account is at the code of each rule:

* ``seed_rule`` (:func:`_seed_split`): ``"closer"`` - every feature joins the seed it has the larger
  dot product with (Sec. III-B); ``"public"`` - ``ksum_Is`` with ``init_way="aim"``: a feature goes to
  the highest-degree seed's side only if it is affine to that seed and not to the lowest-degree one.
* ``move_rule`` (:func:`_move_bar`): ``"tolerance"`` - move a feature when Eq. 1 decreases by more
  than a rounding margin; ``"public"`` - ``ksum_Is``'s ``Imm`` vector makes the decrease exceed
  ``||x_i||^2 = 1``. The sweep limit stays ``max_iters`` (the public code's ``iters=500``).
* ``cut_root``: the public ``k_sum_main`` bisects the whole image without testing ``c(root) < tau1``.
* ``connectivity_diagonal`` (:func:`average_connectivity`): the public ``k_sum_main`` counts the
  diagonal ``A_ii`` in ``c(S)``.
* ``energy_rule`` (:func:`high_energy`): ``"ceil"`` - ``H`` holds ``ceil(0.3 n)`` patches;
  ``"public"`` - ``updata_total_param``'s ``l1 >= sorted(l1)[n * 7 // 10]``, ties at the threshold
  included.

With all five set to the public code's, ``tau2=0.1`` and ``max_iters=500``, the decomposition follows
``k_sum_main``; ``benchmarks/claid_bisect.py --reference`` measures how often the two agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RegionNode",
    "affinity",
    "average_connectivity",
    "high_energy",
    "select_seeds",
    "ksums_objective",
    "ksums_bisect",
    "ncut_bisect",
    "connected_components",
    "build_hierarchy",
    "bisect_regions",
    "output_nodes",
    "regions_to_boxes",
    "upsample_masks",
]

Method = Literal["ksums", "ncut"]
Solver = Literal["batched", "sequential"]
SeedRule = Literal["closer", "public"]
MoveRule = Literal["tolerance", "public"]
EnergyRule = Literal["ceil", "public"]

# A k-sums move has to lower Eq. 1 by more than this many units per patch of the node. The batched
# solver reads the dot products from a float32 Gram matrix, whose row sums carry a rounding error of
# roughly 1e-7 * n; the margin keeps rounding from ever triggering (or cycling) a move, and both
# solvers use it so that they converge to the same partitions.
_MOVE_TOLERANCE = 1e-5


@dataclass
class RegionNode:
    """One node of an image's CLAID hierarchy.

    Attributes:
        mask: ``(h, w)`` bool, the node's patches.
        level: depth in the hierarchy: the root (all patches) is 0, its children 1, ...
        parent: index of the parent in the list :func:`build_hierarchy` returns, -1 for the root.
        connectivity: the average internal connectivity ``c(S)`` of Eq. 8-9.
        energy_ratio: ``xi(S) = |H n S| / |S|`` of Eq. 10.
        dummy: ``xi(S) <= tau2``. Always True for the root, which is never a region.
        bisected: whether this node was cut (Table V's "#cut" counts these).
    """

    mask: Tensor
    level: int
    parent: int
    connectivity: float
    energy_ratio: float
    dummy: bool
    bisected: bool


def _as_float(x: Tensor) -> Tensor:
    """Floating point at no less than float32 precision (float64 stays float64)."""
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def affinity(x: Tensor, alpha: float = 0.2) -> Tensor:
    """Eq. 5: ``(n, n)`` bool, ``A_ij = x_i . x_j > alpha`` on the l2-normalised rows of ``x (n, D)``.

    The diagonal is True for every non-zero feature (``x_i . x_i = 1``); Eq. 8 and the degrees of
    :func:`select_seeds` leave it out.
    """
    if x.ndim != 2:
        raise ValueError(f"affinity expects (n, D) features, got {tuple(x.shape)}")
    xn = F.normalize(_as_float(x), dim=1)
    return (xn @ xn.T) > alpha


def average_connectivity(adjacency: Tensor, masks: Optional[Tensor] = None, diagonal: bool = False) -> Tensor:
    """Eq. 8-9: ``c(S) = 2 c(S) / (n (n - 1))`` with ``c(S) = sum_{i<j in S} A_ij``.

    The pairs ``i < j`` of Eq. 8 exclude the diagonal, so a set whose features are all mutually
    affine has ``c = 1`` exactly. A set of one patch has nothing to cut and gets ``c = 1``; so does
    an empty set.

    ``diagonal=True`` is the public code's reading (``k_sum_main`` in ``CALID/detector.py`` of
    https://github.com/wlzhao22/CLAID at 8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7:
    ``np.sum(self.correspend[np.ix_(p_list, p_list)]) / (len(p_list) * (len(p_list) - 1))``): the
    sum runs over the whole block, ``A_ii`` included, so ``c = (2 c(S) + n) / (n (n - 1))``, above 1
    for a fully affine set. (That block also holds ``1e-5`` instead of 0 for the non-edges - the
    ``eps`` of ``updata_total_param`` - which adds at most ``1e-5 n / (n - 1)`` to ``c``; it is not
    reproduced here, it only matters for a ``c`` within ``1e-5`` of ``tau1``.)

    Args:
        adjacency: ``(n, n)`` affinity (bool, or 0/1 float) of the features of a set.
        masks: ``(K, n)`` bool membership of ``K`` subsets of those features, all measured by one
            matmul (``diag(M A M^T)``); ``None``: the whole set.
        diagonal: count ``A_ii`` in the sum (the public code), not only the pairs ``i < j`` (the paper).

    Returns:
        float64 ``(K,)``, or a 0-dim tensor when ``masks`` is None.
    """
    n = adjacency.shape[0]
    if adjacency.ndim != 2 or adjacency.shape[1] != n:
        raise ValueError(f"average_connectivity expects a square adjacency, got {tuple(adjacency.shape)}")
    adj = adjacency.to(torch.float32)
    if masks is None:
        # row sums are exact integers in float32 (< 2^24); their total is taken in float64
        pairs = n * (n - 1)
        edges = float(_degrees(adj).double().sum())
        if diagonal:
            edges += float((adj.diagonal() > 0).sum())
        return torch.tensor(1.0 if pairs == 0 else edges / pairs, dtype=torch.float64)
    member = masks.reshape(masks.shape[0], -1).to(device=adjacency.device, dtype=torch.bool)
    if member.shape[1] != n:
        raise ValueError(f"average_connectivity: masks over {member.shape[1]} features for a {n}-feature adjacency")
    # A M^T holds, per feature and subset, how many affine features of the subset it has: exact
    # integers in float32 (< 2^24); the products are summed in float64 so the totals stay exact too.
    per_feature = (adj @ member.T.to(torch.float32)).double()  # (n, K)
    within = (per_feature * member.T).sum(0)  # m^T A m, diagonal included
    if not diagonal:
        within = within - (member & (adj.diagonal() > 0)[None, :]).sum(1).double()
    size = member.sum(1).double()
    pairs = size * (size - 1)
    return torch.where(pairs > 0, within / pairs.clamp(min=1), torch.ones_like(pairs))


def high_energy(features: Tensor, energy_top: float = 0.3, rule: EnergyRule = "ceil") -> Tensor:
    """``H`` of Sec. III-D: the top ``energy_top`` share of the patches by the l1 norm of the raw features.

    Args:
        features: ``(..., D)`` raw (not normalised) features of one image, e.g. ``(h, w, D)``.
        energy_top: share of the patches in ``H`` (``theta`` = 30 % in the paper).
        rule: ``"ceil"`` (the paper's "top 30 %"): ``H`` holds exactly ``k = ceil(energy_top * n)``
            patches (the product first rounded to 9 decimals so that e.g. ``0.3 * 10`` gives 3, not
            4); ties in the norm go to the lower patch index. ``"public"``: the public code's
            threshold (``updata_total_param`` in ``CALID/detector.py`` of
            https://github.com/wlzhao22/CLAID at 8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7:
            ``taothre = sort(l1norm)[n * 7 // 10]``, ``l1_labels = l1norm >= taothre``), generalised to
            any share as the ``(n - k)``-th smallest norm: every patch whose norm reaches it, so all the
            patches tied with the threshold are in ``H`` (more than ``k`` then). For ``energy_top = 0.3``
            the index ``n - ceil(0.3 n)`` is ``n * 7 // 10`` exactly; without ties the two rules agree.

    Returns:
        bool of shape ``features.shape[:-1]``.
    """
    if not 0.0 <= energy_top <= 1.0:
        raise ValueError(f"high_energy: energy_top must be in [0, 1], got {energy_top}")
    if rule not in ("ceil", "public"):
        raise ValueError(f"high_energy: rule must be 'ceil' or 'public', got {rule!r}")
    flat = _as_float(features.reshape(-1, features.shape[-1]))
    n = flat.shape[0]
    count = min(n, math.ceil(round(energy_top * n, 9)))
    energy = flat.abs().sum(1)
    if rule == "public":
        if count == 0:
            return torch.zeros(features.shape[:-1], dtype=torch.bool, device=flat.device)
        threshold = torch.sort(energy).values[n - count]
        return (energy >= threshold).reshape(features.shape[:-1])
    order = torch.sort(energy, descending=True, stable=True).indices
    out = torch.zeros(n, dtype=torch.bool, device=flat.device)
    out[order[:count]] = True
    return out.reshape(features.shape[:-1])


def _rows(matrix: Tensor, index: Tensor) -> Tensor:
    """``matrix[index]``. An embedding lookup copies whole rows at memory speed, several times faster
    on CPU than ``index_select`` / advanced indexing, which gather element by element."""
    return F.embedding(index, matrix)


def _block(gram: Tensor, index: Tensor) -> Tensor:
    """``gram[index][:, index]``: the rows first (fast, see :func:`_rows`), then the columns of the
    much smaller ``(m, n)`` slab."""
    return _rows(gram, index).index_select(1, index)


def _degrees(adjacency: Tensor) -> Tensor:
    """Row sums of the affinity without the diagonal, exact integers as float32."""
    adj = adjacency.to(torch.float32)
    return adj.sum(1) - adj.diagonal()


def select_seeds(adjacency: Tensor, rule: SeedRule = "closer") -> tuple[int, int]:
    """Eq. 6-7: the seeds ``(b, w)`` of a bisection, the highest- and the lowest-degree features.

    The paper's Eq. 6 and 7 swap ``argmin`` and ``argmax`` relative to its text ("x_b holds the
    highest degree"); the pair is what matters, and ``b`` is the highest here.

    ``rule="closer"`` (the paper's reading): a degree counts the *other* features a feature is affine
    to (the diagonal is left out, as in Eq. 8). Ties go to the lowest index; ``w`` is chosen among
    the features other than ``b`` so that the two seeds differ even when all degrees are equal.

    ``rule="public"``: the public code (``ksum_Is`` in ``CALID/detector.py`` of
    https://github.com/wlzhao22/CLAID at 8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7) takes
    ``d_i = np.sum(A, axis=1)`` over the block with its diagonal and ``1e-5`` for non-edges, and
    ``min_index, max_index = argsort(d_i)[0], argsort(d_i)[-1]``. The degree here counts the
    diagonal (the ``1e-5`` terms keep the same order: one more edge outweighs ``n`` of them). Ties:
    ``b`` is the *last* feature of the highest degree and ``w`` the *first* of the lowest, what an
    ascending stable sort puts at its two ends. (numpy's default ``argsort`` is not stable and the
    float64 sums of equal integer degrees can differ in their last bit, so the public code's own
    choice among tied features is not reproducible; this is the nearest fixed rule.) The two seeds
    differ for ``n >= 2``: all degrees equal gives ``b = n - 1``, ``w = 0``.

    Args:
        adjacency: ``(n, n)`` affinity (Eq. 5) of the node's features, ``n >= 2``.
        rule: ``"closer"`` or ``"public"``, as above.
    """
    n = adjacency.shape[0]
    if n < 2:
        raise ValueError(f"select_seeds needs at least 2 features, got {n}")
    if rule not in ("closer", "public"):
        raise ValueError(f"select_seeds: rule must be 'closer' or 'public', got {rule!r}")
    return _seeds_from_degrees(_degrees(adjacency), adjacency.diagonal() > 0, rule)


def _seeds_from_degrees(degree: Tensor, diagonal: Tensor, rule: SeedRule) -> tuple[int, int]:
    """:func:`select_seeds` from the degrees without the diagonal (exact integers, any dtype) and the
    diagonal's flags (``x_i . x_i > alpha``, False only for an all-zero feature)."""
    degree = degree.to(torch.float64)
    if rule == "public":
        degree = degree + diagonal.to(degree.dtype)
        b = degree.numel() - 1 - int(torch.argmax(degree.flip(0)))  # last maximum
        return b, int(torch.argmin(degree))  # first minimum
    b = int(torch.argmax(degree))  # first maximum
    others = degree.clone()
    others[b] = math.inf
    w = int(torch.argmin(others))  # first minimum among the rest
    return b, w


def _split_from_seeds(row_b: Tensor, row_w: Tensor, b: int, w: int, alpha: float, rule: SeedRule) -> Tensor:
    """The seed split of :func:`_seed_split` from the seeds' rows of the node's Gram block (their
    dot products with every feature of the node)."""
    if rule == "public":
        return (row_b > alpha) & ~(row_w > alpha)
    side = row_b >= row_w
    side[b] = True
    side[w] = False
    return side


def _seed_split(gram: Tensor, adjacency: Tensor, rule: SeedRule = "closer") -> Tensor:
    """Sec. III-B initialisation; True = the side of ``b``, the highest-degree seed.

    ``rule="closer"`` (the paper: "the rest of the features in S are assigned to a cluster of x_b or
    x_w by checking whether they are closer to x_b or x_w"): every feature joins the seed it has the
    larger dot product with, ties to ``b``; ``b`` and ``w`` on their own sides.

    ``rule="public"`` (``ksum_Is``, ``init_way="aim"``: ``L = np.where((A[max_index] - A[min_index]) > 0,
    1, 0)`` on the 1 / 1e-5 affinity block): a feature goes to ``b``'s side only if it is affine to
    ``b`` and not to ``w``. Everything else goes to ``w``'s side: the features affine to neither
    seed or to both, whatever their dot products, and ``b`` itself when ``b`` is affine to ``w`` -
    ``b``'s side can then start empty (k-sums usually fills it; if it stays empty the node is not
    cut, as ``k_sum_main``'s ``if L.any() == False: continue``).
    """
    b, w = select_seeds(adjacency, rule)
    if rule == "public":
        edges = adjacency if adjacency.dtype == torch.bool else adjacency > 0
        return edges[b] & ~edges[w]
    side = gram[b] >= gram[w]  # rows, as the Gram matrix is symmetric
    side[b] = True
    side[w] = False
    return side


def _random_split(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """k-sums' random initialisation (the Table VII "rand" ablation): a random balanced split,
    ``ceil(n / 2)`` features on the True side, so neither side starts empty."""
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    side = torch.zeros(n, dtype=torch.bool, device=device)
    side[perm[: (n + 1) // 2]] = True
    return side


def ksums_objective(features: Tensor, side: Tensor) -> float:
    """Eq. 1 for two clusters: ``sum over clusters of sum_{i<j} ||x_i - x_j||^2`` of the
    l2-normalised ``features (n, D)``, in float64, via ``n_S * sum ||x||^2 - ||D_S||^2`` per cluster."""
    x = F.normalize(_as_float(features), dim=1).double()
    side = side.to(device=x.device, dtype=torch.bool)
    total = 0.0
    for part in (x[side], x[~side]):
        total += float(part.shape[0] * (part * part).sum() - part.sum(0).square().sum())
    return total


def _move_bar(q: Tensor, n: int, rule: MoveRule) -> Tensor:
    """How much a move has to lower Eq. 1 for k-sums to make it, per feature (``q_i = ||x_i||^2``).

    ``rule="tolerance"``: more than ``_MOVE_TOLERANCE * n``, a margin above the float32 rounding of
    the Gram row sums, the same for every feature of a node of ``n``.

    ``rule="public"``: more than ``q_i`` (1 for an l2-normalised feature). In ``ksum_Is`` (``CALID/
    detector.py`` of https://github.com/wlzhao22/CLAID at 8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7),
    for feature ``x_i`` of cluster ``l`` (``D[l]``, ``N[l]``, ``D_ftf[l]`` still counting ``x_i``)::

        now_dw = N[l] q_i - 2 x_i . D[l] + D_ftf[l]                  # = d(x_i, S_l): its j = i term is 0
        dv[v]  = N[v] q_i - 2 x_i . D[v] + D_ftf[v] - [v == l] q_i   # D_ftf_i: q_i taken off l only
        Imm    = now_dw - dv

    For the other cluster ``v``, ``dv[v] = d(x_i, S_v)`` and ``Imm[v] = d(x_i, S_l) - d(x_i, S_v)``,
    exactly the decrease of Eq. 1 the move brings. For its own cluster ``dv[l] = now_dw - q_i``, so
    ``Imm[l] = q_i``: a hidden self-term. The move is made when ``argmax(Imm)`` is not ``l`` (and
    ``max(Imm) > 0``), i.e. when the decrease exceeds ``q_i``. (An exact tie ``Imm[v] == q_i`` moves
    the feature only when ``v`` is cluster 0, numpy's first maximum; the strict ``>`` is kept here.)
    """
    if rule == "public":
        return q
    return torch.full_like(q, _MOVE_TOLERANCE * n)


def _signed_prefix_norms(rows: Tensor, sign: Tensor, chunk: int = 32) -> Tensor:
    """``||sum_{t<=k} s_t x_t||^2`` for every ``k``, in float64, from ``(c, D)`` features and ``(c,)``
    signs. The prefix sums are scanned in chunks of rows: a fixed ``chunk - 1`` in-place adds of
    one row of every chunk to the next, then the chunks' running totals - an order of magnitude
    faster on CPU than ``torch.cumsum`` down dimension 0 of a ``(c, D)`` matrix."""
    c, d = rows.shape
    if c <= chunk:
        prefix = torch.cumsum(rows.to(torch.float64) * sign.to(torch.float64)[:, None], 0)
        return (prefix * prefix).sum(1)
    buffer = rows.new_empty((c + chunk - 1) // chunk * chunk, d, dtype=torch.float64)
    buffer[c:] = 0
    buffer[:c].copy_(rows).mul_(sign.to(torch.float64)[:, None])
    scan = buffer.view(-1, chunk, d)
    for j in range(1, chunk):  # positions within a chunk, not patches
        scan[:, j] += scan[:, j - 1]
    scan[1:] += torch.cumsum(scan[:-1, -1], 0)[:, None]
    prefix = buffer[:c]
    return (prefix * prefix).sum(1)


def _ksums_batched(gram: Tensor, side: Tensor, max_iters: int, history: Optional[list[float]],
                   move_rule: MoveRule = "tolerance", index: Optional[Tensor] = None,
                   x: Optional[Tensor] = None) -> Tensor:
    """Batched k-sums on a node's Gram block: prefix moves of the gain-sorted improving features.

    With ``q_i = ||x_i||^2`` (1, or 0 for an all-zero feature), ``p_i = x_i . D_b``,
    ``t_i = x_i . D`` (``D`` = the node's feature sum), Eq. 2-3 give for every feature, member or
    not, ``d(x_i, S) = n_S q_i - 2 x_i . D_S + Q_S`` (the ``j = i`` term of Eq. 2 is zero, so the
    member and non-member forms coincide - for unit vectors this is the paper's ``2 n - 2 x . D``),
    and moving ``x_i`` changes Eq. 1 by ``d(x_i, other) - d(x_i, own)``. After moving the first
    ``k`` features of a list with signs ``s`` (-1 when leaving ``S_b``), ``D_b`` becomes
    ``D_b + sum s x``, whose squared norm needs ``sum_{t,u<=k} s_t s_u G_tu``: a 2-D prefix sum of
    the moved features' Gram block. So the objective of every prefix costs ``O(m^2)`` for ``m``
    candidates, and the best prefix is applied at once. Since the first candidate alone lowers the
    objective by its gain, the best prefix lowers it at least as much: the objective strictly
    decreases and the loop ends. A feature is a candidate when its gain exceeds :func:`_move_bar`
    (``move_rule``); the loop ends when none does, the fixpoint of both solvers.

    The node's Gram block is ``gram`` itself, or, with ``index``, ``gram[index][:, index]`` without
    ever being gathered (how :func:`build_hierarchy` calls it): the products ``G s`` (``t`` and
    ``p``) are then taken from the node's l2-normalised features ``x`` as ``x (x^T s)``, ``O(m D)``
    instead of ``O(m^2)``, and the double sum of a prefix as the squared norm of the prefix sums of
    the signed candidates, ``||sum_{t<=k} s_t x_t||^2`` (float64, ``O(c D)`` for ``c`` candidates,
    no ``c x c`` block gathered); only the diagonal ``q`` is read from ``gram``.
    """
    f64 = torch.float64
    side = side.clone()
    if index is None:
        n = gram.shape[0]
        q = gram.diagonal().to(f64)

        def product(v: Tensor) -> Tensor:
            return gram @ v

        def prefix_norms(positions: Tensor, sign32: Tensor) -> Tensor:
            # ||D_b + sum_{t<=k} s_t x_t||^2 - ||D_b||^2 = 2 sum s p + sum_{t,u<=k} s_t s_u G_tu, where the
            # double sum grows by 2 s_k sum_{u<=k} s_u G_ku - G_kk at step k (G symmetric, s^2 = 1).
            block = _block(gram, positions)
            lower = sign32 * (block.tril_() @ sign32)
            return torch.cumsum((2 * lower - block.diagonal()).to(f64), 0)
    else:
        if x is None:
            raise ValueError("_ksums_batched: a node given by index needs its features")
        n = index.numel()
        q = gram.diagonal().index_select(0, index).to(f64)

        def product(v: Tensor) -> Tensor:
            return x @ (v @ x)

        def prefix_norms(positions: Tensor, sign32: Tensor) -> Tensor:
            return _signed_prefix_norms(_rows(x, positions), sign32)
    bar = _move_bar(q, n, move_rule)
    q_all = float(q.sum())
    if index is None:
        t = gram.sum(1).to(f64)
        p = (gram @ side.to(gram.dtype)).to(f64)
    else:  # both products in one pass over the features
        both = x @ (torch.stack([torch.ones_like(side, dtype=x.dtype), side.to(x.dtype)]) @ x).T
        t, p = both[:, 0].to(f64), both[:, 1].to(f64)
    total_sq = float(t.sum())  # ||D||^2
    sidef = side.to(f64)
    n_b = float(sidef.sum())
    q_b = float((q * sidef).sum())
    dbb = float((p * sidef).sum())  # ||D_b||^2
    dbt = float((t * sidef).sum())  # D_b . D

    def objective(n_b: float, q_b: float, dbb: float, dbt: float) -> float:
        dww = total_sq - 2 * dbt + dbb
        return n_b * q_b - dbb + (n - n_b) * (q_all - q_b) - dww

    current = objective(n_b, q_b, dbb, dbt)
    if history is not None:
        history.append(current)
    for _ in range(max_iters):
        n_w, q_w = n - n_b, q_all - q_b
        d_b = n_b * q - 2 * p + q_b
        d_w = n_w * q - 2 * (t - p) + q_w
        gain = torch.where(side, d_b - d_w, d_w - d_b)  # d(own) - d(other): the decrease of Eq. 1
        candidates = torch.nonzero(gain > bar).squeeze(1)
        if candidates.numel() == 0:
            break
        order = torch.sort(gain[candidates], descending=True, stable=True).indices
        moved = candidates[order]
        sign32 = torch.where(side[moved], -1.0, 1.0).to(gram.dtype)
        sign = sign32.to(f64)
        cross = prefix_norms(moved, sign32)
        nb_k = n_b + torch.cumsum(sign, 0)
        qb_k = q_b + torch.cumsum(sign * q[moved], 0)
        dbb_k = dbb + 2 * torch.cumsum(sign * p[moved], 0) + cross
        dbt_k = dbt + torch.cumsum(sign * t[moved], 0)
        obj_k = nb_k * qb_k - dbb_k + (n - nb_k) * (q_all - qb_k) - (total_sq - 2 * dbt_k + dbb_k)
        obj_k = torch.where((nb_k >= 1) & (nb_k <= n - 1), obj_k, torch.full_like(obj_k, math.inf))
        best = int(torch.argmin(obj_k))
        best_obj = float(obj_k[best])
        if not best_obj < current:  # only when every prefix would empty a side
            break
        take = moved[: best + 1]
        side[take] = ~side[take]
        n_b, q_b, dbb, dbt = float(nb_k[best]), float(qb_k[best]), float(dbb_k[best]), float(dbt_k[best])
        current = best_obj
        if history is not None:
            history.append(current)
        # p = G s_b: from the features, or update with the moved columns when they are few, else
        # recompute (same O(n m))
        if index is not None:
            p = product(side.to(gram.dtype)).to(f64)
        elif 8 * take.numel() < n:
            p += (sign32[: best + 1] @ _rows(gram, take)).to(f64)  # G symmetric: rows = columns
        else:
            p = (gram @ side.to(gram.dtype)).to(f64)
    return side


def _ksums_sequential(features: Tensor, gram: Optional[Tensor], adjacency: Optional[Tensor], alpha: float,
                      seed_selection: bool, max_iters: int, generator: torch.Generator,
                      history: Optional[list[float]], seed_rule: SeedRule = "closer",
                      move_rule: MoveRule = "tolerance") -> Tensor:
    """The paper's k-sums, one feature at a time (Eq. 2-4): the per-patch reference.

    Degrees (Eq. 5-7) and the seed assignment (``seed_rule``, see :func:`_seed_split`) are computed
    patch by patch; the node's sums ``D_b, D_w, n_b, n_w`` are kept as Eq. 3 intends and updated on
    every move. Each sweep visits the features in a fresh random order from ``generator`` and moves
    a feature when ``d(x_i, S_v) < d(x_i, S_w)`` by more than :func:`_move_bar` (``move_rule``);
    sweeps repeat until one moves nothing or ``max_iters`` sweeps were made. Float64 throughout.
    """
    x = F.normalize(_as_float(features), dim=1).double()
    n = x.shape[0]
    if seed_selection:
        rows = []
        for i in range(n):
            if adjacency is not None:
                row = adjacency[i] > 0
            elif gram is not None:
                row = gram[i] > alpha
            else:
                row = (x @ x[i]) > alpha
            rows.append(row)
        if seed_rule == "public":
            degree = [int(torch.count_nonzero(row)) for row in rows]  # the diagonal included
            b = max(reversed(range(n)), key=degree.__getitem__)  # last maximum
            w = min(range(n), key=degree.__getitem__)  # first minimum
            label = [0 if bool(rows[b][i]) and not bool(rows[w][i]) else 1 for i in range(n)]  # 0 = S_b
        else:
            degree = [int(torch.count_nonzero(row)) - int(bool(row[i])) for i, row in enumerate(rows)]
            b = max(range(n), key=degree.__getitem__)  # first maximum
            w = min((i for i in range(n) if i != b), key=degree.__getitem__)  # first minimum among the rest
            sim_b = (gram[b] if gram is not None else x @ x[b]).tolist()
            sim_w = (gram[w] if gram is not None else x @ x[w]).tolist()
            label = [0 if sim_b[i] >= sim_w[i] else 1 for i in range(n)]  # 0 = S_b, ties to b
            label[b], label[w] = 0, 1
    else:
        label = [0 if s else 1 for s in _random_split(n, generator, x.device).tolist()]
    in_b = torch.tensor([lab == 0 for lab in label], device=x.device)
    sums = torch.stack([x[in_b].sum(0), x[~in_b].sum(0)])  # D_b, D_w
    sq_t = (x * x).sum(1)
    sq = sq_t.tolist()
    bar = _move_bar(sq_t, n, move_rule).tolist()
    count = [sum(1 for lab in label if lab == 0), sum(1 for lab in label if lab == 1)]
    sq_sum = [sum(sq[i] for i in range(n) if label[i] == 0), sum(sq[i] for i in range(n) if label[i] == 1)]

    def objective() -> float:
        norms = (sums * sums).sum(1).tolist()
        return count[0] * sq_sum[0] - norms[0] + count[1] * sq_sum[1] - norms[1]

    if history is not None:
        history.append(objective())
    for _ in range(max_iters):
        moved = False
        for i in torch.randperm(n, generator=generator, device=generator.device).tolist():
            own = label[i]
            other = 1 - own
            if count[own] == 1:  # never empty a side
                continue
            xi = x[i]
            dots = (sums @ xi).tolist()  # x_i . D_b, x_i . D_w
            d_own = count[own] * sq[i] - 2 * dots[own] + sq_sum[own]  # Eq. 3
            d_other = count[other] * sq[i] - 2 * dots[other] + sq_sum[other]  # Eq. 4
            if d_own - d_other > bar[i]:
                sums[own] -= xi
                sums[other] += xi
                count[own] -= 1
                count[other] += 1
                sq_sum[own] -= sq[i]
                sq_sum[other] += sq[i]
                label[i] = other
                moved = True
        if history is not None:
            history.append(objective())
        if not moved:
            break
    return torch.tensor([lab == 0 for lab in label], device=x.device)


_RULES = {"seed_rule": ("closer", "public"), "move_rule": ("tolerance", "public"), "energy_rule": ("ceil", "public")}


def _check_rules(**rules: str) -> None:
    for name, value in rules.items():
        if value not in _RULES[name]:
            raise ValueError(f"{name} must be one of {_RULES[name]}, got {value!r}")


def ksums_bisect(features: Optional[Tensor] = None, *, gram: Optional[Tensor] = None,
                 adjacency: Optional[Tensor] = None, alpha: float = 0.2, seed_selection: bool = True,
                 solver: Solver = "batched", max_iters: int = 100, generator: Optional[torch.Generator] = None,
                 return_history: bool = False, seed_rule: SeedRule = "closer",
                 move_rule: MoveRule = "tolerance") -> Union[Tensor, tuple[Tensor, list[float]]]:
    """Bisect one node by k-sums (Eq. 1-4) from the seed (Eq. 5-7) or a random initialisation.

    Args:
        features: ``(n, D)`` features of the node (normalised here). The batched solver only needs
            them to build ``gram`` when it is not given; the sequential one always uses them.
        gram: ``(n, n)`` dot products of the l2-normalised features (a block of the image's Gram
            matrix). Computed from ``features`` when None.
        adjacency: ``(n, n)`` Eq. 5 affinity (``gram > alpha``); derived from ``gram`` when None.
        alpha: the affinity threshold of Eq. 5.
        seed_selection: True: the Sec. III-B seeds, every other feature to the seed with the larger
            dot product (ties to the highest-degree seed). False: a random balanced split from
            ``generator`` (the "random initialisation" of the paper's Table VII).
        solver: ``"batched"``: per iteration, apply the prefix of the gain-sorted improving moves
            that lowers Eq. 1 the most (closed form, no loop over patches); repeat until no move
            improves or ``max_iters`` iterations. ``"sequential"``: the paper's own procedure, a
            per-patch loop in random order (from ``generator``) moving a feature when
            ``d(x_i, S_v) < d(x_i, S_w)``, sweeping until a sweep moves nothing or ``max_iters``
            sweeps; the reference of the tests and of ``benchmarks/claid_bisect.py``.
        max_iters: iteration (batched) or sweep (sequential) limit; 0 returns the initial split.
        generator: random source of the random initialisation and of the sequential visiting
            order; a generator seeded with 0 when None, so results are reproducible.
        return_history: also return Eq. 1 after the initialisation and after every iteration/sweep.
        seed_rule: ``"closer"`` (the paper) or ``"public"`` (the public code's ``init_way="aim"``):
            how the features are split between the seeds, see :func:`_seed_split`.
        move_rule: ``"tolerance"`` (a move lowers Eq. 1 by more than a rounding margin) or
            ``"public"`` (by more than ``||x_i||^2 = 1``, the public ``ksum_Is``), see :func:`_move_bar`.
            Both solvers honour it. The public code's sweep limit is ``iters=500`` (its loop test
            ``iter <= iters`` after ``iter += 1`` allows 501 sweeps); set it with ``max_iters``.

    Returns:
        ``(n,)`` bool, True for ``S_b`` (the side that holds the highest-degree seed, or the first
        half of the random split). Both sides are non-empty for ``n >= 2``, except under
        ``seed_rule="public"``, whose initial ``S_b`` may be empty and stay so. With
        ``return_history``, ``(side, objectives)``.
    """
    if features is None and gram is None:
        raise ValueError("ksums_bisect needs features or a Gram block")
    if solver not in ("batched", "sequential"):
        raise ValueError(f"ksums_bisect: solver must be 'batched' or 'sequential', got {solver!r}")
    _check_rules(seed_rule=seed_rule, move_rule=move_rule)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if gram is None:
        gram = _gram(F.normalize(_as_float(features), dim=1))
    n = gram.shape[0]
    history: Optional[list[float]] = [] if return_history else None
    if n < 2:
        side = torch.ones(n, dtype=torch.bool, device=gram.device)
        return (side, history) if return_history else side
    if solver == "sequential":
        if features is None:
            raise ValueError("ksums_bisect: the sequential solver works on the features; pass them")
        side = _ksums_sequential(features, gram, adjacency, alpha, seed_selection, max_iters, generator, history,
                                 seed_rule, move_rule)
        return (side, history) if return_history else side
    if seed_selection:
        side = _seed_split(gram, adjacency if adjacency is not None else gram > alpha, seed_rule)
    else:
        side = _random_split(n, generator, gram.device)
    side = _ksums_batched(gram, side, max_iters, history, move_rule)
    return (side, history) if return_history else side


def ncut_bisect(adjacency: Tensor) -> Tensor:
    """The "CLAID (NCut)" variant of the paper's Table I/V: one normalised cut of a node.

    As in TokenCut, the graph is the Eq. 5 affinity with ``1e-5`` instead of 0 for non-edges, so it
    stays connected and the second eigenvector is well defined. The second-smallest eigenvector
    ``v`` of the symmetric normalised Laplacian ``I - D^-1/2 W D^-1/2`` (``torch.linalg.eigh``,
    float64) is mapped to the generalised eigenvector ``y = D^-1/2 v`` of ``(D - W) y = l D y``,
    Shi and Malik's relaxed cut indicator that TokenCut thresholds, and the node is split at the
    mean of ``y``. (``v`` and ``y`` have the same signs; thresholding at the mean differs only in
    which borderline features follow which side.)

    Returns:
        ``(n,)`` bool, True for the side holding the highest-degree feature (orientation only: the
        eigenvector's sign is arbitrary). One side may be empty when the cut finds no structure.
    """
    n = adjacency.shape[0]
    if n < 2:
        return torch.ones(n, dtype=torch.bool, device=adjacency.device)
    edges = adjacency.to(torch.bool)
    weight = torch.where(edges, 1.0, 1e-5).to(torch.float64)
    inv_sqrt = weight.sum(1).rsqrt()
    laplacian = torch.eye(n, dtype=torch.float64, device=weight.device) - inv_sqrt[:, None] * weight * inv_sqrt[None, :]
    _, vectors = torch.linalg.eigh(laplacian)
    y = inv_sqrt * vectors[:, 1]
    side = y > y.mean()
    b, _ = select_seeds(edges)
    return side if bool(side[b]) else ~side


def connected_components(masks: Tensor, min_patches: int = 1) -> tuple[Tensor, Tensor]:
    """``getObject`` of Algorithm 1 for many masks at once: 8-connected components, small ones dropped.

    Every foreground patch starts with the label ``n - index`` (``n = h * w``); each round takes the
    3x3 maximum over foreground neighbours and then jumps: a patch adopts the label of the patch its
    label points to (labels only grow and stay inside the component, so this converges to
    ``n - (smallest index in the component)``, usually in a logarithmic number of rounds). All
    masks are processed by the same tensor operations; nothing loops over patches.

    Args:
        masks: ``(B, h, w)`` bool.
        min_patches: components with fewer patches are dropped ("tiny regions are ignored").

    Returns:
        ``(components (K, h, w) bool, source (K,) long)``: the kept components and the index of the
        mask each comes from, ordered by mask and then by the raster position of the component's
        first patch (the order of ``scipy.ndimage.label``).
    """
    if masks.ndim != 3:
        raise ValueError(f"connected_components expects (B, h, w) masks, got {tuple(masks.shape)}")
    fg = masks.to(torch.bool)
    batch, h, w = fg.shape
    n = h * w
    device = fg.device
    if batch == 0 or n == 0:
        return torch.zeros(0, h, w, dtype=torch.bool, device=device), torch.zeros(0, dtype=torch.long, device=device)
    fgf = fg.to(torch.float32)[:, None]  # (B, 1, h, w)
    start = (n - torch.arange(n, device=device, dtype=torch.float32)).reshape(1, 1, h, w)
    labels = start * fgf  # float32 holds indices exactly up to 2^24 patches
    while True:
        grown = F.max_pool2d(labels, kernel_size=3, stride=1, padding=1) * fgf
        flat = grown.reshape(batch, n)
        pointer = (n - flat).long().clamp_(0, n - 1)  # background (label 0) points anywhere; masked below
        jumped = torch.maximum(flat, flat.gather(1, pointer)).reshape_as(grown) * fgf
        if torch.equal(jumped, labels):
            break
        labels = jumped
    flat = labels.reshape(batch, n).long()
    first = n - flat  # index of each component's first patch; n on the background
    key = torch.arange(batch, device=device)[:, None] * (n + 1) + first
    keys, counts = torch.unique(key[fg.reshape(batch, n)], return_counts=True)  # sorted: mask, first patch
    keys = keys[counts >= max(int(min_patches), 1)]
    source = keys // (n + 1)
    components = first[source] == (keys % (n + 1))[:, None]
    return components.reshape(-1, h, w), source


def _gram(x: Tensor) -> Tensor:
    """``x x^T`` for the ``(n, D)`` normalised features of an image, exactly symmetric.

    This is the one ``O(n^2 D)`` step of the decomposition and dominates its time, so for large
    ``n`` only the part on and above the diagonal is multiplied, one row panel of ~512 features at
    a time (``x[panel] @ x[panel start:]^T``), and mirrored: about ``(p + 1) / 2p`` of the flops for
    ``p`` panels (a 45x60 grid of 768-D features: about 80 -> 50 ms on one core). Each diagonal square
    is symmetrised (its two triangles come from different BLAS sums and may differ in the last bit),
    so every block gathered later is symmetric too.
    """
    n = x.shape[0]
    if n <= 1024:
        g = x @ x.T
        return torch.maximum(g, g.T)
    edges = [round(i * n / math.ceil(n / 512)) for i in range(math.ceil(n / 512) + 1)]
    g = x.new_empty(n, n)
    for lo, hi in zip(edges[:-1], edges[1:]):
        panel = x[lo:hi] @ x[lo:].T  # (hi - lo, n - lo)
        square = panel[:, : hi - lo]
        g[lo:hi, lo:hi] = torch.maximum(square, square.T)
        g[lo:hi, hi:] = panel[:, hi - lo:]
        g[hi:, lo:hi] = panel[:, hi - lo:].T
    return g


def _pack_bits(mask: Tensor) -> Tensor:
    """``(..., n)`` bool -> ``(..., ceil(n / 8))`` uint8, 8 features a byte: bit ``k`` of byte ``j``
    holds feature ``k * ceil(n / 8) + j``. Eight shifted copies of contiguous column blocks (a
    strided byte-per-bit layout would make each of the 8 passes touch every cache line); only the
    agreement of the layout between two packed operands matters, see :func:`_popcount`."""
    n = mask.shape[-1]
    width = (n + 7) // 8
    packed = torch.zeros(*mask.shape[:-1], width, dtype=torch.uint8, device=mask.device)
    octets = mask.contiguous().view(torch.uint8)
    for k in range(8):
        lo, hi = k * width, min((k + 1) * width, n)
        if lo >= hi:
            break
        packed[..., : hi - lo] |= octets[..., lo:hi] << k
    return packed


def _popcount(packed: Tensor) -> Tensor:
    """Set bits of ``(..., W)`` uint8 rows, summed over the last dimension, as int64 (SWAR on bytes:
    unsigned, so no step can overflow)."""
    v = packed - ((packed >> 1) & 0x55)
    v = (v & 0x33).add_((v >> 2).bitwise_and_(0x33))
    v = v.add_(v >> 4).bitwise_and_(0x0F)
    return v.sum(-1, dtype=torch.int64)


class _Affinity:
    """Eq. 5 on a whole image, bit-packed: ``(n, ceil(n / 8))`` bytes, 1/32 of the Gram matrix.

    Every node of a level owns a disjoint set of patches, so the degrees of all the patches of a
    level within their own node - what the seeds (Eq. 6-7) and the connectivity (Eq. 8-9) need -
    are one AND of each patch's packed row with its node's packed mask and one popcount
    (:meth:`degrees`): the nodes never gather their ``m x m`` blocks. Counts are exact integers.
    """

    def __init__(self, gram: Tensor, alpha: float) -> None:
        affine = gram > alpha
        self.diagonal = affine.diagonal().clone()
        self.rows = _pack_bits(affine)

    def degrees(self, labels: Tensor, count: int) -> Tensor:
        """``(n,)`` long: for each patch with ``labels >= 0`` the number of *other* patches of the same
        label it is affine to (``labels < 0``: 0). ``count``: the number of labels."""
        member = labels >= 0
        patches = torch.nonzero(member).squeeze(1)
        onehot = torch.zeros(count, labels.numel(), dtype=torch.bool, device=labels.device)
        onehot[labels[patches], patches] = True
        masks = _pack_bits(onehot)  # (count, W)
        within = _popcount(self.rows.index_select(0, patches) & masks.index_select(0, labels[patches]))
        out = torch.zeros(labels.numel(), dtype=torch.long, device=labels.device)
        out[patches] = within - self.diagonal[patches].long()
        return out


def _cut_wanted(connectivity: float, level: int, tau1: float, max_depth: Optional[int],
                cut_root: bool = False) -> bool:
    """Algorithm 1 line 8 (``c(S) < tau1``), or the Table VIII variant's ``level < max_depth``.

    ``cut_root``: the root (level 0) is cut whatever its connectivity. The public ``k_sum_main``
    (``CALID/detector.py`` of https://github.com/wlzhao22/CLAID at
    8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7) starts its queue with the whole image and tests
    ``connect < 0.97`` only on the pieces it creates; Algorithm 1 pushes the root and tests it like
    any node (line 8), so a root already coherent is not cut. With ``max_depth`` set the depth alone
    decides (``max_depth=0`` cuts nothing).
    """
    if max_depth is not None:
        return level < max_depth
    return (cut_root and level == 0) or connectivity < tau1


def build_hierarchy(features: Tensor, tau1: float = 0.97, tau2: float = 0.2, alpha: float = 0.2,
                    energy_top: float = 0.3, min_patches: int = 15, seed_selection: bool = True,
                    method: Method = "ksums", max_depth: Optional[int] = None, filter_dummy: bool = True,
                    solver: Solver = "batched", max_iters: int = 100,
                    generator: Optional[torch.Generator] = None, seed_rule: SeedRule = "closer",
                    move_rule: MoveRule = "tolerance", cut_root: bool = False,
                    connectivity_diagonal: bool = False, energy_rule: EnergyRule = "ceil") -> list[RegionNode]:
    """Algorithm 1 of the CLAID paper on one image: every node of the region hierarchy.

    The queue starts with the root (all patches). A popped node is cut when ``c(S) < tau1`` (with
    ``max_depth`` set: when its level is below ``max_depth``, ``tau1`` ignored - the depth-limited
    variant of the paper's Table VIII), into ``S_b, S_w`` by k-sums (or NCut); its children are the
    8-connected pieces of ``S_b`` and ``S_w`` with at least ``min_patches`` patches. Dummy nodes
    (``xi(S) <= tau2``) are cut like any other; they are only kept out of the output.

    A node is not cut when it has fewer than 2 patches, when the bisection leaves a side empty, or
    when its only child would be the node itself (``bisected`` stays False): the guards that keep
    a node the solver cannot split from being re-queued forever.

    Args:
        features: ``(h, w, D)`` raw patch features of one image, on any device. The affinity and
            k-sums use their l2-normalised form, ``H`` the raw l1 norms.
        tau1: connectivity threshold of the terminate condition (Sec. III-C).
        tau2: dummy threshold on ``xi`` (Sec. III-D; 0.2 in the paper, the public code keeps a
            node when ``xi > 0.1``).
        alpha: affinity threshold of Eq. 5.
        energy_top: share of the image's patches in ``H`` (rounded up, see :func:`high_energy`).
        min_patches: smallest connected piece that becomes a node.
        seed_selection: Sec. III-B seeds, or a random initialisation (Table VII), see :func:`ksums_bisect`.
        method: ``"ksums"`` or ``"ncut"`` (:func:`ncut_bisect`).
        max_depth: None for the terminate condition; an int for the depth-limited variant.
        filter_dummy: does not change the hierarchy (``dummy`` is always recorded); accepted so that
            one option set serves this function and :func:`bisect_regions`, which uses it.
        solver: ``"batched"`` or ``"sequential"`` k-sums (:func:`ksums_bisect`).
        max_iters: k-sums iteration / sweep limit (the public code: 500).
        generator: random source (random initialisation, sequential order); seeded with 0 when None.
        seed_rule: ``"closer"`` (paper) or ``"public"``: the seed split, see :func:`_seed_split`.
        move_rule: ``"tolerance"`` (paper) or ``"public"``: the k-sums move bar, see :func:`_move_bar`.
        cut_root: cut the root whatever ``c(root)`` (public) instead of only when ``c(root) < tau1``
            (paper), see :func:`_cut_wanted`.
        connectivity_diagonal: count ``A_ii`` in ``c(S)`` (public) or only the pairs ``i < j``
            (paper), see :func:`average_connectivity`.
        energy_rule: ``"ceil"`` (paper) or ``"public"``: which patches form ``H``, see :func:`high_energy`.

    The public code's configuration is ``seed_rule="public", move_rule="public", cut_root=True,
    connectivity_diagonal=True, energy_rule="public", tau2=0.1, max_iters=500`` (its sweep order
    is random, so ``solver="sequential"`` is the one to compare with it).

    Returns:
        All nodes, the root first, in the order they were created (by depth). ``parent`` indexes
        this list.
    """
    if features.ndim != 3:
        raise ValueError(f"build_hierarchy expects (h, w, D) patch features, got {tuple(features.shape)}")
    if method not in ("ksums", "ncut"):
        raise ValueError(f"build_hierarchy: method must be 'ksums' or 'ncut', got {method!r}")
    if solver not in ("batched", "sequential"):
        raise ValueError(f"build_hierarchy: solver must be 'batched' or 'sequential', got {solver!r}")
    if max_depth is not None and max_depth < 0:
        raise ValueError(f"build_hierarchy: max_depth must be >= 0, got {max_depth}")
    _check_rules(seed_rule=seed_rule, move_rule=move_rule, energy_rule=energy_rule)
    del filter_dummy  # output filtering only, see bisect_regions
    h, w, dim = features.shape
    n_all = h * w
    device = features.device
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    raw = _as_float(features.reshape(n_all, dim))
    x = F.normalize(raw, dim=1)
    gram = _gram(x)  # the image's only O(n^2 D) step
    # H as 0/1; xi = |H n S| / |S| is taken in float64 from exact counts, so a node with xi = tau2
    # exactly (e.g. 4 of 20 patches for 0.2) compares equal to the float tau2 and is a dummy
    energy = high_energy(raw, energy_top, energy_rule).to(torch.float32)
    affine = _Affinity(gram, alpha)

    everything = torch.ones(n_all, dtype=torch.bool, device=device)
    root_degree = affine.degrees(torch.zeros(n_all, dtype=torch.long, device=device), 1)
    root_connectivity = _connectivity(root_degree[None], everything[None], affine.diagonal,
                                      connectivity_diagonal)[0]
    nodes = [RegionNode(mask=everything.reshape(h, w), level=0, parent=-1, connectivity=root_connectivity,
                        energy_ratio=float(energy.double().sum()) / n_all if n_all else 0.0, dummy=True,
                        bisected=False)]
    # Algorithm 1's queue, first-in first-out, processed a level at a time: the nodes of one depth
    # to be cut, as (node number, global patch indices, degrees within the node)
    level_nodes: list[tuple[int, Tensor, Tensor]] = []
    if _cut_wanted(root_connectivity, 0, tau1, max_depth, cut_root) and n_all >= 2:
        level_nodes.append((0, torch.arange(n_all, device=device), root_degree))
    while level_nodes:
        owners, halves = [], []
        for k, index, degree in level_nodes:
            side = _bisect_node(gram, x, affine, index, degree, alpha, method, solver, seed_selection, seed_rule,
                                move_rule, max_iters, generator)
            n_b = int(torch.count_nonzero(side))
            if n_b == 0 or n_b == side.numel():
                continue  # guard: k-sums / NCut found no split
            pair = torch.zeros(2, n_all, dtype=torch.bool, device=device)
            pair[0, index[side]] = True
            pair[1, index[~side]] = True
            owners.append((k, index.numel()))
            halves.append(pair)
        if not owners:
            break
        # getObject for every node of the level at once; pieces come ordered by node, half, position
        pieces, source = connected_components(torch.cat(halves).reshape(-1, h, w), min_patches)
        pieces = pieces.reshape(-1, n_all)
        sizes = pieces.sum(1)
        owner_of = (source // 2).tolist()
        per_owner = [0] * len(owners)
        for o in owner_of:
            per_owner[o] += 1
        keep = torch.ones(pieces.shape[0], dtype=torch.bool, device=device)
        for o, (k, size) in enumerate(owners):
            mine = [c for c, oc in enumerate(owner_of) if oc == o]
            if len(mine) == 1 and int(sizes[mine[0]]) == size:
                keep[mine[0]] = False  # guard: the only child is the node itself (impossible with two sides)
                continue
            nodes[k].bisected = True
        pieces, sizes = pieces[keep], sizes[keep]
        owner_of = [o for o, kept in zip(owner_of, keep.tolist()) if kept]
        if pieces.shape[0] == 0:
            break
        # the pieces of a level are disjoint: one label vector, one popcount for all their degrees
        rows, patches = torch.nonzero(pieces, as_tuple=True)
        labels = torch.full((n_all,), -1, dtype=torch.long, device=device)
        labels[patches] = rows
        degree = affine.degrees(labels, pieces.shape[0])
        connectivity = _connectivity(degree[None] * pieces, pieces, affine.diagonal, connectivity_diagonal)
        ratio = ((pieces.to(torch.float32) @ energy).double() / sizes.double()).tolist()  # exact counts
        next_level = []
        for c, size in enumerate(sizes.tolist()):
            parent = owners[owner_of[c]][0]
            level = nodes[parent].level + 1
            nodes.append(RegionNode(mask=pieces[c].reshape(h, w), level=level, parent=parent,
                                    connectivity=connectivity[c], energy_ratio=ratio[c],
                                    dummy=ratio[c] <= tau2, bisected=False))
            if size >= 2 and _cut_wanted(connectivity[c], level, tau1, max_depth):
                index = torch.nonzero(pieces[c]).squeeze(1)
                next_level.append((len(nodes) - 1, index, degree.index_select(0, index)))
        level_nodes = next_level
    return nodes


def _connectivity(degree: Tensor, members: Tensor, diagonal: Tensor, with_diagonal: bool) -> list[float]:
    """Eq. 8-9 of ``K`` disjoint nodes from their patches' degrees within the node (without the
    diagonal): ``(K, n)`` degrees (0 outside the node) and ``(K, n)`` bool membership. The same exact
    integers as :func:`average_connectivity` on the node's block, divided in float64."""
    edges = degree.sum(1).double()
    if with_diagonal:
        edges = edges + (members & diagonal[None]).sum(1).double()
    size = members.sum(1).double()
    pairs = size * (size - 1)
    return torch.where(pairs > 0, edges / pairs.clamp(min=1), torch.ones_like(pairs)).tolist()


def _bisect_node(gram: Tensor, x: Tensor, affine: _Affinity, index: Tensor, degree: Tensor, alpha: float,
                 method: Method, solver: Solver, seed_selection: bool, seed_rule: SeedRule, move_rule: MoveRule,
                 max_iters: int, generator: torch.Generator) -> Tensor:
    """One node's bisection for :func:`build_hierarchy`: True for ``S_b``, over the node's patches.

    The batched k-sums never gathers the node's ``m x m`` Gram block: its seeds come from the node's
    degrees (computed by the level's popcount) and the seeds' two rows, and the solver reads the
    features and the candidates' entries of the image's Gram matrix. NCut and the sequential
    reference get the block (and its affinity) as :func:`ncut_bisect` / :func:`ksums_bisect` take it.
    """
    whole = index.numel() == gram.shape[0]
    if method == "ncut" or solver == "sequential":
        block = gram if whole else _block(gram, index)
        adjacency = block > alpha
        if method == "ncut":
            return ncut_bisect(adjacency)
        return ksums_bisect(x if whole else _rows(x, index), gram=block, adjacency=adjacency, alpha=alpha,
                            seed_selection=seed_selection, solver=solver, max_iters=max_iters, generator=generator,
                            seed_rule=seed_rule, move_rule=move_rule)
    if seed_selection:
        b, w = _seeds_from_degrees(degree, affine.diagonal.index_select(0, index), seed_rule)
        rows = _rows(gram, index[[b, w]])
        if not whole:
            rows = rows.index_select(1, index)
        side = _split_from_seeds(rows[0], rows[1], b, w, alpha, seed_rule)
    else:
        side = _random_split(index.numel(), generator, gram.device)
    return _ksums_batched(gram, side, max_iters, None, move_rule, index=index, x=x if whole else _rows(x, index))


def output_nodes(nodes: list[RegionNode], filter_dummy: bool = True) -> list[RegionNode]:
    """The nodes Algorithm 1 outputs as regions: every node but the root (the whole image is not an
    instance region), and without the dummy nodes when ``filter_dummy``."""
    return [node for node in nodes if node.parent >= 0 and not (filter_dummy and node.dummy)]


def bisect_regions(features: Tensor, tau1: float = 0.97, tau2: float = 0.2, alpha: float = 0.2,
                   energy_top: float = 0.3, min_patches: int = 15, seed_selection: bool = True,
                   method: Method = "ksums", max_depth: Optional[int] = None, filter_dummy: bool = True,
                   solver: Solver = "batched", max_iters: int = 100,
                   generator: Optional[torch.Generator] = None, seed_rule: SeedRule = "closer",
                   move_rule: MoveRule = "tolerance", cut_root: bool = False, connectivity_diagonal: bool = False,
                   energy_rule: EnergyRule = "ceil") -> tuple[Tensor, Tensor]:
    """The regions Algorithm 1 outputs: every non-root node, except dummies when ``filter_dummy``.

    Options as :func:`build_hierarchy`; ``filter_dummy=False`` outputs the dummy nodes too (the
    "dummy x" ablation of Table VII and the depth-limited runs of Table VIII).

    Returns:
        ``(masks (R, h, w) bool, levels (R,) long)`` in hierarchy order (by depth).
    """
    nodes = build_hierarchy(features, tau1=tau1, tau2=tau2, alpha=alpha, energy_top=energy_top,
                            min_patches=min_patches, seed_selection=seed_selection, method=method,
                            max_depth=max_depth, filter_dummy=filter_dummy, solver=solver, max_iters=max_iters,
                            generator=generator, seed_rule=seed_rule, move_rule=move_rule, cut_root=cut_root,
                            connectivity_diagonal=connectivity_diagonal, energy_rule=energy_rule)
    kept = output_nodes(nodes, filter_dummy)
    h, w = features.shape[:2]
    if not kept:
        return (torch.zeros(0, h, w, dtype=torch.bool, device=features.device),
                torch.zeros(0, dtype=torch.long, device=features.device))
    masks = torch.stack([node.mask for node in kept])
    levels = torch.tensor([node.level for node in kept], dtype=torch.long, device=features.device)
    return masks, levels


def regions_to_boxes(masks: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(R, h, w)`` patch masks -> ``(R, 4)`` float ``[x1, y1, x2, y2]`` boxes in image pixels.

    The patch grid covers the whole ``(H, W) = image_size`` image (the network resizes an image to
    a multiple of the patch size, without padding), so patch column ``j`` covers
    ``[j W / w, (j + 1) W / w)`` and a mask's box runs from its first patch's near edge to its last
    patch's far edge: ``[x_min W / w, y_min H / h, (x_max + 1) W / w, (y_max + 1) H / h]``. (The
    authors' public code puts the far edge at ``x_max * (patch + 1)``, which is not a patch border;
    the patch-cover reading of the paper is used here.) An empty mask gives a zero box.
    """
    if masks.ndim != 3:
        raise ValueError(f"regions_to_boxes expects (R, h, w) masks, got {tuple(masks.shape)}")
    r, h, w = masks.shape
    big_h, big_w = float(image_size[0]), float(image_size[1])
    if r == 0:
        return torch.zeros(0, 4, device=masks.device)
    m = masks.to(torch.bool)
    rows, cols = m.any(2), m.any(1)  # (R, h), (R, w)
    ys = torch.arange(h, device=m.device)
    xs = torch.arange(w, device=m.device)
    y_min = torch.where(rows, ys, h).amin(1)
    y_max = torch.where(rows, ys, -1).amax(1)
    x_min = torch.where(cols, xs, w).amin(1)
    x_max = torch.where(cols, xs, -1).amax(1)
    boxes = torch.stack([x_min * (big_w / w), y_min * (big_h / h), (x_max + 1) * (big_w / w),
                         (y_max + 1) * (big_h / h)], dim=1).to(torch.float32)
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def upsample_masks(masks: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(R, h, w)`` patch masks -> ``(R, H, W)`` float masks in {0, 1} over the image.

    Nearest neighbour in the same patch-cover model as :func:`regions_to_boxes`: pixel ``y`` takes
    patch row ``floor((y + 0.5) h / H)``, the patch whose cover holds the pixel's centre (computed
    in integers, so ratios like 20 px over 3 patches are exact). ``F.interpolate(mode="nearest")``
    would take ``floor(y h / H)``, the patch under the pixel's corner.
    """
    if masks.ndim != 3:
        raise ValueError(f"upsample_masks expects (R, h, w) masks, got {tuple(masks.shape)}")
    _, h, w = masks.shape
    big_h, big_w = int(image_size[0]), int(image_size[1])
    rows = ((2 * torch.arange(big_h, device=masks.device) + 1) * h) // (2 * big_h)
    cols = ((2 * torch.arange(big_w, device=masks.device) + 1) * w) // (2 * big_w)
    return masks.to(torch.float32).index_select(1, rows).index_select(2, cols)
