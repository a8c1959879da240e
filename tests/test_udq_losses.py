"""UDQ losses (Eqs. 7–9) against values worked out by hand, a per-subspace loop, and finite differences;
classifiers started from the codebooks are the nearest-codeword rule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instsearch.losses.udq import (SubspaceClassifiers, UDQLoss, discriminability_loss, residual_scale,
                                   separability_loss)

# Tiny case: d = 4, M = 2, K = 2, so d_m = 2 and f = [f^1 | f^2].
#   sample 1: f = [1, 0 | 0, 2], labels h = (0, 0)
#   sample 2: f = [0, 0 | 0, 0], labels h = (1, 1)
# Classifiers (W_m is d_m × K, rows = input dims, columns = codewords):
#   W_1 = [[1, 0], [0, 0]], b_1 = [0, 0];   W_2 = [[0, 0], [0, 1]], b_2 = [0.5, 0]
# Scores:  sample 1: s^1 = [1, 0], s^2 = [0.5, 2];  sample 2: s^1 = [0, 0], s^2 = [0.5, 0]
# Cross-entropies −log softmax(s)[h]:
#   1/m=1: log(1 + e^{-1})  = 0.31326168751822286     1/m=2: log(1 + e^{1.5}) = 1.7014132779827524
#   2/m=1: log 2            = 0.6931471805599453      2/m=2: log(1 + e^{0.5}) = 0.9740769841801067
# L_sep (sum over m, mean over samples) = (2.0146749655009753 + 1.667224164740052) / 2
FEATURES = [[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
CODES = [[0, 0], [1, 1]]
WEIGHT = [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]]
BIAS = [[0.0, 0.0], [0.5, 0.0]]
L_SEP = 1.8409495651205137
L_SEP_SUM_SAMPLES = 2 * L_SEP
L_SEP_MEAN_SUBSPACES = 0.9204747825602568
# Codebooks (M × K × d_m): C^1 = {[1, 1], [0, 0]}, C^2 = {[0, 2], [3, 0]}
#   sample 1: ‖[1,0] − [1,1]‖² + ‖[0,2] − [0,2]‖² = 1 + 0 = 1
#   sample 2: ‖[0,0] − [0,0]‖² + ‖[0,0] − [3,0]‖² = 0 + 9 = 9      → L_dis = (1 + 9) / 2 = 5
CODEBOOKS = [[[1.0, 1.0], [0.0, 0.0]], [[0.0, 2.0], [3.0, 0.0]]]
L_DIS = 5.0
L_TOTAL = 1.8909495651205137  # L_sep + 0.01 · 5


def _tiny(dtype=torch.float64):
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    return t(FEATURES), torch.tensor(CODES), t(WEIGHT), t(BIAS), t(CODEBOOKS)


def test_separability_matches_hand_computed_value():
    f, h, w, b, _ = _tiny()
    assert separability_loss(f, h, w, b).item() == pytest.approx(L_SEP, abs=1e-12)
    assert separability_loss(f, h, w, b, sample_reduction="sum").item() == pytest.approx(L_SEP_SUM_SAMPLES, abs=1e-12)
    assert (separability_loss(f, h, w, b, subspace_reduction="mean").item()
            == pytest.approx(L_SEP_MEAN_SUBSPACES, abs=1e-12))


def test_separability_accepts_uint8_labels():
    f, h, w, b, _ = _tiny()
    assert separability_loss(f, h.to(torch.uint8), w, b).item() == pytest.approx(L_SEP, abs=1e-12)


def test_discriminability_matches_hand_computed_value():
    f, h, _, _, c = _tiny()
    assert discriminability_loss(f, h, c).item() == pytest.approx(L_DIS, abs=1e-12)
    assert discriminability_loss(f, h, c, sample_reduction="sum").item() == pytest.approx(10.0, abs=1e-12)


def test_udq_loss_combines_with_lambda():
    f, h, w, b, c = _tiny()
    loss = UDQLoss(4, 2, 2).double()
    with torch.no_grad():
        loss.classifiers.weight.copy_(w)
        loss.classifiers.bias.copy_(b)
    out = loss(f, h, c)
    assert out.separability.item() == pytest.approx(L_SEP, abs=1e-12)
    assert out.discriminability.item() == pytest.approx(L_DIS, abs=1e-12)
    assert out.total.item() == pytest.approx(L_TOTAL, abs=1e-12)


def test_batched_classifiers_equal_one_linear_layer_per_subspace():
    torch.manual_seed(0)
    d, m, k, n = 12, 3, 5, 7
    clf = SubspaceClassifiers(d, m, k)
    f = torch.randn(n, d)
    h = torch.randint(0, k, (n, m))
    logits = clf(f)
    d_m = d // m
    expected_loss = 0.0
    for j in range(m):
        ref = F.linear(f[:, j * d_m:(j + 1) * d_m], clf.weight[j].T, clf.bias[j])
        torch.testing.assert_close(logits[:, j], ref)
        expected_loss = expected_loss + F.cross_entropy(ref, h[:, j], reduction="sum")
    got = separability_loss(f, h, clf.weight, clf.bias)
    torch.testing.assert_close(got, expected_loss / n)


def test_gradients_reach_features_and_classifiers_and_not_codebooks():
    torch.manual_seed(0)
    loss = UDQLoss(8, 2, 4)
    f = torch.randn(5, 8, requires_grad=True)
    h = torch.randint(0, 4, (5, 2))
    codebooks = torch.randn(2, 4, 4, requires_grad=True)
    loss(f, h, codebooks).total.backward()
    for g in (f.grad, loss.classifiers.weight.grad, loss.classifiers.bias.grad):
        assert g is not None and g.abs().sum() > 0
    assert codebooks.grad is None


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    f = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randint(0, 4, (3, 3))
    c = torch.randn(3, 4, 2, dtype=torch.float64)
    fn = lambda f, w, b: separability_loss(f, h, w, b) + 0.01 * discriminability_loss(f, h, c)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f, w, b))


def test_discriminability_gradient_is_twice_the_residual():
    f, h, _, _, c = _tiny()
    f.requires_grad_(True)
    discriminability_loss(f, h, c).backward()
    # d/df of mean_t Σ_m ‖f^m − c^m‖² = 2 (f − φ(f)) / N, N = 2: φ = [[1,1,0,2], [0,0,3,0]]
    expected = torch.tensor([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(f.grad, expected)


def test_rejects_dimension_not_divisible_by_subspaces():
    with pytest.raises(ValueError):
        SubspaceClassifiers(10, 3, 4)
    with pytest.raises(ValueError):
        discriminability_loss(torch.zeros(2, 10), torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 4, 3))


def test_empty_batch_gives_zero_not_nan():
    loss = UDQLoss(4, 2, 2)
    out = loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), torch.zeros(2, 2, 2))
    assert out.total.item() == 0.0 and not math.isnan(out.total.item())


# ---------------------------------------------------------------- classifiers started from the codebooks
def test_codebook_classifiers_are_the_nearest_codeword_rule():
    """W = s c, b = −s/2 ‖c‖²: logit_k = −s/2 ‖f^m − c_k‖² + s/2 ‖f^m‖², so the argmax is Eq. 4's code."""
    torch.manual_seed(0)
    d, m, k, n = 12, 3, 7, 50
    codebooks = torch.randn(m, k, d // m)
    clf = SubspaceClassifiers(d, m, k)
    scale = torch.tensor([0.5, 3.0, 40.0])
    clf.init_from_codebooks(codebooks, scale)
    f = torch.randn(n, d)
    sub = f.reshape(n, m, 1, d // m)
    distances = (sub - codebooks).pow(2).sum(dim=3)  # (n, m, k)
    expected = -scale[:, None] / 2 * distances + scale[:, None] / 2 * sub.pow(2).sum(dim=3)
    torch.testing.assert_close(clf(f), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(clf(f).argmax(dim=2), distances.argmin(dim=2))
    clf.init_from_codebooks(codebooks, 2.0)  # one scale for every subspace
    torch.testing.assert_close(clf.weight[1], 2.0 * codebooks[1].T)
    with pytest.raises(ValueError, match="do not fit"):
        clf.init_from_codebooks(codebooks[:, :3], 1.0)


def test_residual_scale_is_one_over_the_mean_squared_residual():
    f, h, _, _, c = _tiny()
    # residuals per subspace: sample 1 (1, 0), sample 2 (0, 9) -> means (0.5, 4.5); d_m = 2
    torch.testing.assert_close(residual_scale(f, h, c), torch.tensor([2.0, 1 / 4.5], dtype=torch.float64))
    torch.testing.assert_close(residual_scale(f, h, c, per_dimension=True),
                               torch.tensor([4.0, 2 / 4.5], dtype=torch.float64))


def test_per_sample_reduction_and_label_accuracy():
    f, h, w, b, c = _tiny()
    per = discriminability_loss(f, h, c, sample_reduction="none")
    torch.testing.assert_close(per, torch.tensor([1.0, 9.0], dtype=torch.float64))
    per_sep = separability_loss(f, h, w, b, sample_reduction="none")
    assert per_sep.shape == (2,) and per_sep.mean().item() == pytest.approx(L_SEP, abs=1e-12)
    loss = UDQLoss(4, 2, 2).double()
    with torch.no_grad():
        loss.classifiers.weight.copy_(w)
        loss.classifiers.bias.copy_(b)
    # argmax: sample 1 s^1 = [1, 0] -> 0 (label 0, hit), s^2 = [0.5, 2] -> 1 (label 0, miss);
    #         sample 2 s^1 = [0, 0] -> 0 (label 1, miss), s^2 = [0.5, 0] -> 0 (label 1, miss)
    assert loss(f, h, c).label_accuracy.item() == pytest.approx(0.25)


# ---------------------------------------------------------------- reductions, dtypes, init, messages
# Per (sample, subspace) cross-entropies from the table at the top: sample 1 (0.3133, 1.7014),
# sample 2 (0.6931, 0.9741); per-sample sums 2.0146749655009753 and 1.667224164740052.
SEP_PER_SAMPLE_SUM = [2.0146749655009753, 1.667224164740052]


def test_subspace_mean_is_taken_per_sample_before_the_sample_reduction():
    f, h, w, b, c = _tiny()
    per = separability_loss(f, h, w, b, sample_reduction="none", subspace_reduction="mean")
    torch.testing.assert_close(per, torch.tensor([v / 2 for v in SEP_PER_SAMPLE_SUM], dtype=torch.float64))
    summed = separability_loss(f, h, w, b, sample_reduction="sum", subspace_reduction="mean")
    assert summed.item() == pytest.approx(sum(SEP_PER_SAMPLE_SUM) / 2, abs=1e-12)
    # discriminability: sample 1 (1 + 0) / 2, sample 2 (0 + 9) / 2
    per_dis = discriminability_loss(f, h, c, sample_reduction="none", subspace_reduction="mean")
    torch.testing.assert_close(per_dis, torch.tensor([0.5, 4.5], dtype=torch.float64))


def test_separability_from_logits_defaults_to_eq8_sum_over_subspaces_mean_over_samples():
    from instsearch.losses.udq import separability_from_logits

    # the scores s^m of the table at the top, as (N, M, K) logits
    logits = torch.tensor([[[1.0, 0.0], [0.5, 2.0]], [[0.0, 0.0], [0.5, 0.0]]], dtype=torch.float64)
    assert separability_from_logits(logits, torch.tensor(CODES)).item() == pytest.approx(L_SEP, abs=1e-12)


def test_udq_loss_passes_its_subspace_reduction_to_both_terms():
    f, h, w, b, c = _tiny()
    loss = UDQLoss(4, 2, 2, subspace_reduction="mean").double()
    with torch.no_grad():
        loss.classifiers.weight.copy_(w)
        loss.classifiers.bias.copy_(b)
    out = loss(f, h, c)
    assert out.separability.item() == pytest.approx(L_SEP_MEAN_SUBSPACES, abs=1e-12)
    assert out.discriminability.item() == pytest.approx(2.5, abs=1e-12)  # mean of (0.5, 4.5)
    assert out.total.item() == pytest.approx(L_SEP_MEAN_SUBSPACES + 0.025, abs=1e-12)


def test_discriminability_is_computed_in_the_features_dtype():
    f, h, _, _, c = _tiny()
    loss = discriminability_loss(f.float(), h, c)  # float64 codebooks, float32 features
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(L_DIS)


def test_reset_parameters_draws_uniform_in_plus_minus_one_over_sqrt_d_m():
    """As nn.Linear(d_m, K): weight then bias, each uniform in ±1/sqrt(d_m) = ±0.5 for d_m = 4."""
    torch.manual_seed(0)
    clf = SubspaceClassifiers(8, 2, 5)  # d_m = 4, K = 5
    torch.manual_seed(0)
    weight = torch.empty(2, 4, 5).uniform_(-0.5, 0.5)
    bias = torch.empty(2, 5).uniform_(-0.5, 0.5)
    torch.testing.assert_close(clf.weight.detach(), weight, rtol=0, atol=0)
    torch.testing.assert_close(clf.bias.detach(), bias, rtol=0, atol=0)


def test_shape_errors_say_what_does_not_fit():
    from instsearch.losses.udq import split_subspaces, subspace_logits

    with pytest.raises(ValueError, match="feature dimension 10 is not divisible by M=3"):
        SubspaceClassifiers(10, 3, 4)
    with pytest.raises(ValueError, match="feature dimension 10 is not divisible by M=3"):
        split_subspaces(torch.zeros(2, 10), 3)
    with pytest.raises(ValueError, match="classifier expects d_m=3, features give 4"):
        subspace_logits(torch.zeros(2, 8), torch.zeros(2, 3, 5), torch.zeros(2, 5))


def test_empty_batch_label_accuracy_is_zero_not_nan():
    out = UDQLoss(4, 2, 2)(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), torch.zeros(2, 2, 2))
    assert out.label_accuracy.item() == 0.0


def test_residual_scale_averages_over_samples_not_subspaces():
    # M = 2 subspaces of d_m = 1, one codeword 0 each: squared residuals (1, 4), (9, 0), (1, 0)
    f = torch.tensor([[1.0, 2.0], [3.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    codes = torch.zeros(3, 2, dtype=torch.long)
    codebooks = torch.zeros(2, 1, 1, dtype=torch.float64)
    # E‖r^1‖² = 11/3, E‖r^2‖² = 4/3
    torch.testing.assert_close(residual_scale(f, codes, codebooks),
                               torch.tensor([3 / 11, 3 / 4], dtype=torch.float64))
