"""Losses of UDQ, unsupervised deep quantization: separability (Eq. 8) and discriminability (Eq. 9).

UDQ trains the region feature ``f_t`` (the FC_S output, ``d`` dims) against pseudo-labels produced
by optimized product quantization (OPQ, Eq. 6): a rotation ``R`` and ``M`` codebooks of ``K``
codewords each. Each feature is split into ``M`` contiguous sub-vectors ``f_t^m`` of ``d_m = d / M``
dims, and ``h_t^m`` is the index of the codeword nearest to ``f_t^m`` (Eq. 4).

**One space.** OPQ's codebooks live in the rotated space: Eq. 6 quantises ``R c``, not ``c``. The
sub-vectors ``f_t^m``, the labels ``h_t^m`` and the codewords ``c^m_{h^m}`` must all be taken in that
space, so every function here expects features already rotated, ``R f_t``
(``OPQCodebook.rotate`` in :mod:`instsearch.networks.product_quantizer`). ``R`` is fixed during a
round, so gradients flow through the rotation back to the unrotated feature.

**Reductions.** The paper writes both losses as sums over the ``G`` training proposals and over the
``M`` subspaces. Summing over subspaces is kept (it is the equation's); over samples the default is
the mean, so the loss does not scale with the batch size (with mini-batches the sum over ``G`` is
only ever estimated). Both losses use the same sample reduction, so their ratio, which ``λ`` of
Eq. 7 balances, is the paper's. Both are parameters.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "split_subspaces",
    "separability_loss",
    "separability_from_logits",
    "discriminability_loss",
    "SubspaceClassifiers",
    "residual_scale",
    "UDQLoss",
    "UDQLossOutput",
]

SampleReduction = Literal["mean", "sum", "none"]
SubspaceReduction = Literal["sum", "mean"]


def split_subspaces(features: Tensor, num_subspaces: int) -> Tensor:
    """``(N, d)`` → ``(N, M, d_m)``: the ``M`` contiguous blocks of Eq. 3, ``f = [f^1, …, f^M]``.

    Contiguous blocks are what faiss's product quantizer uses, so the labels it produces refer to
    these very sub-vectors.
    """
    n, d = features.shape
    if d % num_subspaces:
        raise ValueError(f"feature dimension {d} is not divisible by M={num_subspaces}")
    return features.reshape(n, num_subspaces, d // num_subspaces)


def _reduce(per_sample_subspace: Tensor, sample_reduction: SampleReduction,
            subspace_reduction: SubspaceReduction) -> Tensor:
    """``(N, M)`` → scalar: subspaces first (sum in Eqs. 8–9), then samples (``"none"``: the
    ``(N,)`` per-sample values)."""
    per_sample = (per_sample_subspace.sum(dim=1) if subspace_reduction == "sum"
                  else per_sample_subspace.mean(dim=1))
    if sample_reduction == "none":
        return per_sample
    if per_sample.numel() == 0:
        return per_sample.sum() * 0.0  # empty batch: zero, not the NaN of an empty mean
    return per_sample.mean() if sample_reduction == "mean" else per_sample.sum()


def subspace_logits(features: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Scores ``W_m^T f^m + b_m`` of every subspace's ``K``-way classifier, ``(N, M, K)``.

    One batched einsum over all subspaces: ``weight`` is ``(M, d_m, K)``, ``bias`` ``(M, K)``.
    """
    m, d_m, _ = weight.shape
    sub = split_subspaces(features, m)
    if sub.shape[2] != d_m:
        raise ValueError(f"classifier expects d_m={d_m}, features give {sub.shape[2]}")
    return torch.einsum("nmd,mdk->nmk", sub, weight) + bias


def separability_from_logits(logits: Tensor, codes: Tensor, sample_reduction: SampleReduction = "mean",
                             subspace_reduction: SubspaceReduction = "sum") -> Tensor:
    """``L_sep`` (Eq. 8) of given ``(N, M, K)`` logits against the ``(N, M)`` pseudo-labels."""
    n, m, k = logits.shape
    per = F.cross_entropy(logits.reshape(n * m, k), codes.to(logits.device).reshape(n * m).long(), reduction="none")
    return _reduce(per.reshape(n, m), sample_reduction, subspace_reduction)


def separability_loss(features: Tensor, codes: Tensor, weight: Tensor, bias: Tensor,
                      sample_reduction: SampleReduction = "mean",
                      subspace_reduction: SubspaceReduction = "sum") -> Tensor:
    """``L_sep`` of Eq. 8: softmax cross-entropy of each subspace's classifier against ``h_t^m``.

    ``L_sep = - Σ_m Σ_t log( exp(W_{m,h}^T f_t^m + b_{m,h}) / Σ_{l=1..K} exp(W_{m,l}^T f_t^m + b_{m,l}) )``
    with ``h = h_t^m``. The seed text's denominator reads ``l = 1..M``; the classifier has ``K``
    outputs (``W_m ∈ R^{d_m×K}``, ``b_m ∈ R^K``), so the sum runs over the ``K`` codewords.

    Args:
        features: ``(N, d)`` features in OPQ's rotated space.
        codes: ``(N, M)`` integer pseudo-labels ``h_t^m`` in ``[0, K)`` (any integer dtype).
        weight: ``(M, d_m, K)`` classifier weights ``W_m``.
        bias: ``(M, K)`` classifier biases ``b_m``.
        sample_reduction: ``"mean"`` over samples (default), ``"sum"`` as written in Eq. 8, or
            ``"none"`` (the ``(N,)`` per-sample values).
        subspace_reduction: ``"sum"`` over subspaces as in Eq. 8 (default), or ``"mean"``.
    """
    return separability_from_logits(subspace_logits(features, weight, bias), codes, sample_reduction,
                                    subspace_reduction)


def quantize(codes: Tensor, codebooks: Tensor) -> Tensor:
    """``φ(f)`` of Eq. 3 as sub-vectors: the assigned codewords ``c^m_{h^m}``, ``(N, M, d_m)``."""
    m = codebooks.shape[0]
    return codebooks[torch.arange(m, device=codebooks.device), codes.long()]


def discriminability_loss(features: Tensor, codes: Tensor, codebooks: Tensor,
                          sample_reduction: SampleReduction = "mean",
                          subspace_reduction: SubspaceReduction = "sum") -> Tensor:
    """``L_dis`` of Eq. 9: ``Σ_m ‖f_t^m − f̃_t^m‖²``, the squared distance to the assigned codeword.

    The codewords are self-supervision targets fixed for the round (Algorithm 1 refits them between
    rounds), so no gradient reaches ``codebooks``: only the features are pulled to their centres.

    Args:
        features: ``(N, d)`` features in OPQ's rotated space.
        codes: ``(N, M)`` pseudo-labels ``h_t^m``.
        codebooks: ``(M, K, d_m)`` codewords in the rotated space.
    """
    m = codebooks.shape[0]
    target = quantize(codes.to(codebooks.device), codebooks.detach().to(features.dtype))
    per = (split_subspaces(features, m) - target).pow(2).sum(dim=2)
    return _reduce(per, sample_reduction, subspace_reduction)


def residual_scale(features: Tensor, codes: Tensor, codebooks: Tensor, per_dimension: bool = False) -> Tensor:
    """A softmax scale per subspace from the residuals ``r^m = f^m − c^m_{h^m}``, ``(M,)``.

    Default ``s_m = 1 / E‖r^m‖²``: the logit gap between two codewords is the difference of their
    squared distances in units of the mean squared residual, halved -- a codeword as far again as the
    assigned one's typical residual loses half a nat. ``per_dimension``: ``s_m = d_m / E‖r^m‖² =
    1/σ_m²``, the isotropic Gaussian around each codeword that fits the residuals (maximum likelihood),
    ``d_m`` times sharper: :meth:`SubspaceClassifiers.init_from_codebooks` then starts as that mixture's
    posterior, nearly one-hot in ``d_m = 16`` dimensions, with gradients ``d_m`` times larger.
    ``features`` ``(N, d)`` rotated, ``codes`` ``(N, M)``, ``codebooks`` ``(M, K, d_m)``.
    """
    m, _, d_m = codebooks.shape
    residual = (split_subspaces(features, m) - quantize(codes, codebooks)).pow(2).sum(dim=2).mean(dim=0)
    return (d_m if per_dimension else 1.0) / residual.clamp_min(torch.finfo(residual.dtype).tiny)


class SubspaceClassifiers(nn.Module):
    """The ``M`` per-subspace ``K``-way linear classifiers of Eq. 8 (``W_m``, ``b_m``), batched.

    Held as one ``(M, d_m, K)`` weight and one ``(M, K)`` bias so the forward pass is one einsum.
    Two initialisations:

    * :meth:`reset_parameters`: as ``nn.Linear(d_m, K)`` would be (uniform in ``±1/sqrt(d_m)``);
      on unit-norm features the logits are then ~0.05, the softmax is uniform and ``L_sep`` sits at
      ``M·ln K`` -- a round of the paper's length barely moves it;
    * :meth:`init_from_codebooks`: ``W_{m,k} = s_m c^m_k``, ``b_{m,k} = −s_m/2 ‖c^m_k‖²``, so
      ``logit_k = −s_m/2 ‖f^m − c^m_k‖² + s_m/2 ‖f^m‖²``: the argmax is exactly the nearest
      codeword (the pseudo-label of Eq. 4) from the first step, and ``s_m`` sets how sharp the
      softmax is. ``W`` and ``b`` stay free parameters, so boundaries and scale are learnt from
      there; the scale lives in ``W`` and ``b`` themselves (entries ~``s·c``), so a step moves the
      classifiers by a fraction ``~1/s`` of what it would move them at unit scale -- they change
      slowly against features that move, which is what keeps their accuracy. (A separate learnt
      scale multiplying the logits was tried: its gradient is ``s`` times the logits' and it swung
      the softmax to uniform within a few steps at the learning rates FC_S needs.)
    """

    def __init__(self, dim: int, num_subspaces: int, num_codewords: int) -> None:
        super().__init__()
        if dim % num_subspaces:
            raise ValueError(f"feature dimension {dim} is not divisible by M={num_subspaces}")
        self.dim, self.num_subspaces, self.num_codewords = dim, num_subspaces, num_codewords
        d_m = dim // num_subspaces
        self.weight = nn.Parameter(torch.empty(num_subspaces, d_m, num_codewords))
        self.bias = nn.Parameter(torch.empty(num_subspaces, num_codewords))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reinitialise as ``nn.Linear``."""
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def init_from_codebooks(self, codebooks: Tensor, scale) -> None:
        """Nearest-codeword classifiers: ``W_m = s_m C_m^T``, ``b_m = −s_m/2 ‖c^m_k‖²``.

        ``codebooks`` ``(M, K, d_m)`` in the rotated space the features are classified in;
        ``scale`` a positive number or one per subspace ``(M,)`` (e.g. :func:`residual_scale`).
        """
        m, k, d_m = codebooks.shape
        if (m, d_m, k) != tuple(self.weight.shape):
            raise ValueError(f"codebooks {(m, k, d_m)} do not fit classifiers {tuple(self.weight.shape)} (M, d_m, K)")
        c = codebooks.to(self.weight)
        s = torch.as_tensor(scale, dtype=c.dtype, device=c.device).reshape(-1)
        s = s.expand(m) if s.numel() == 1 else s
        self.weight.copy_(s[:, None, None] * c.transpose(1, 2))
        self.bias.copy_(-0.5 * s[:, None] * c.pow(2).sum(dim=2))

    def forward(self, features: Tensor) -> Tensor:
        """``(N, d)`` rotated features → ``(N, M, K)`` logits."""
        return subspace_logits(features, self.weight, self.bias)


class UDQLossOutput(NamedTuple):
    """The total of Eq. 7, its two terms, and (detached, for logging) the share of sub-vectors whose
    classifier's argmax is their pseudo-label, over samples and subspaces."""

    total: Tensor
    separability: Tensor
    discriminability: Tensor
    label_accuracy: Tensor


class UDQLoss(nn.Module):
    """``L = L_sep + λ·L_dis`` (Eq. 7), owning the subspace classifiers of ``L_sep``.

    ``λ = 0.01`` is the paper's best value (Fig. 4); larger values made training unstable there.
    """

    def __init__(self, dim: int, num_subspaces: int, num_codewords: int, lambda_dis: float = 0.01,
                 sample_reduction: SampleReduction = "mean",
                 subspace_reduction: SubspaceReduction = "sum") -> None:
        super().__init__()
        self.classifiers = SubspaceClassifiers(dim, num_subspaces, num_codewords)
        self.lambda_dis = lambda_dis
        self.sample_reduction: SampleReduction = sample_reduction
        self.subspace_reduction: SubspaceReduction = subspace_reduction

    def forward(self, features: Tensor, codes: Tensor, codebooks: Tensor) -> UDQLossOutput:
        """``features`` ``(N, d)`` rotated by OPQ's ``R``; ``codes`` ``(N, M)``; ``codebooks`` ``(M, K, d_m)``."""
        logits = self.classifiers(features)
        sep = separability_from_logits(logits, codes, self.sample_reduction, self.subspace_reduction)
        dis = discriminability_loss(features, codes, codebooks, self.sample_reduction,
                                    self.subspace_reduction)
        with torch.no_grad():
            hits = logits.argmax(dim=2) == codes.to(logits.device).long()
            accuracy = hits.float().mean() if hits.numel() else logits.new_zeros(())
        return UDQLossOutput(sep + self.lambda_dis * dis, sep, dis, accuracy)
