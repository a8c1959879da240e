"""PCA-whitening of region features: ``l2 -> centre -> rotate onto the principal axes -> divide by
the square root of each axis' (shrunk) variance -> l2``.

The DASR paper post-processes its region features this way ("l2-normalized, and undergone PCA
whitening and an once more l2-normalization"); the same step is common to most CNN retrieval
features (Babenko & Lempitsky; Radenovic et al.). Whitening lowers the weight of the directions
in which all regions vary together (co-occurring, bursty activations), so the cosine similarity
is less dominated by them.

It is fitted without labels on a set of features and applied to the database and the query
features alike. The usual protocol fits it on an *independent* set -- Paris 6k for Oxford 5k and
the converse, an unrelated image set for Holidays -- saved with :meth:`PCAWhitening.save` (the
``instsearch whitening`` command extracts another benchmark's database features with a config's
model, fits and saves) and named by ``RetrievalConfig.whitening: path/to/W.npz``. The evaluator
can also fit it on the searched database's own regions (``whitening: true``), so every method can
use it without another set.

Choices where the papers are silent (parameters of :meth:`PCAWhitening.fit`):

* **rank** -- ``N`` centred vectors in ``D`` dimensions span at most ``min(D, N - 1)`` axes: no
  more are kept, and axes with a variance below ``rel_eps`` times the largest are dropped instead
  of being divided by (almost) zero, which would blow noise up to unit length. ``dim`` keeps at
  most that many leading axes (dimensionality reduction).

* **shrinkage** -- every kept variance ``l`` is replaced by ``(1 - rho) * l + rho * m`` before
  the division, ``m = trace(S) / D`` being the mean variance of the ``D`` input dimensions (the
  Ledoit-Wolf target ``m * I``). ``rho = 0`` is the textbook whitening, ``rho = 1`` a plain PCA
  rotation (no reweighting). The default, ``shrinkage="auto"``, is the Ledoit & Wolf (2004)
  estimate of ``rho`` from the fitting set itself (``rho = min(b2, d2) / d2``,
  ``d2 = ||S - m I||^2``, ``b2 = sum_k ||x_k x_k^T - S||^2 / N^2``, norms ``||A||^2 =
  trace(A A^T) / D``, ``S = X^T X / N`` of the centred rows ``x_k``).

  Why: whitened on all of its ``N - 1`` non-zero axes, a set of ``N <= D + 1`` vectors becomes a
  regular simplex -- every whitened pair has the same cosine ``-1 / (N - 1)`` -- so a search among
  the fitting set's own vectors (Holidays' queries *are* database images; 1,491 VLAD vectors of
  8,192 dimensions) ranks by noise. Any ``rho > 0`` keeps the variances' ratios away from 1 and
  so the similarities apart; Ledoit-Wolf chooses ``rho`` from the data (large when ``N`` is small
  against ``D``, near 0 when the covariance is well estimated, ``N >> D``, where whitening is
  then almost the textbook one) instead of a constant that suits one ``N / D`` only. A fit that
  would collapse -- ``rho = 0`` with every one of the ``N - 1`` axes kept (``N > 2``) -- is
  refused. Fitted on fewer vectors than dimensions, the fit warns (``logging``), naming the kept
  dimension count and the usual protocol.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["PCAWhitening", "l2_rows", "ledoit_wolf_shrinkage"]

log = logging.getLogger(__name__)

Shrinkage = Union[float, str]


def l2_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit l2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def ledoit_wolf_shrinkage(centred: np.ndarray, scatter: Optional[np.ndarray] = None) -> float:
    """The Ledoit-Wolf weight ``rho`` of the target ``m I`` for the centred ``(N, D)`` rows (see the
    module docstring). ``scatter``: ``X X^T`` or ``X^T X`` if already computed (both have the same
    Frobenius norm); by default the smaller of the two is computed."""
    n, p = centred.shape
    if scatter is None:
        scatter = centred @ centred.T if n <= p else centred.T @ centred
    sq_norms = np.einsum("ij,ij->i", centred, centred)
    s_fro2 = float(np.sum(scatter * scatter)) / n ** 2  # ||S||_F^2, unnormalised
    m = float(sq_norms.sum()) / n / p
    d2 = s_fro2 / p - m ** 2
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - N ||S||_F^2
    b2 = (float(np.sum(sq_norms ** 2)) - n * s_fro2) / n ** 2 / p
    if d2 <= 0:
        return 1.0  # S is already a multiple of the identity
    return float(min(max(b2, 0.0), d2) / d2)


@dataclass
class PCAWhitening:
    """A fitted whitening: ``transform(x) = l2((l2(x) - mean) @ projection)``.

    ``projection`` is ``(D, d)``: the principal axes (columns, decreasing variance) divided by the
    square root of their shrunk variance.
    """

    mean: np.ndarray  # (D,) float64
    projection: np.ndarray  # (D, d) float64
    variances: np.ndarray  # (d,) the kept variances, before shrinkage
    shrinkage: float = 0.0  # rho, the weight of the mean variance in the shrunk variances
    num_samples: int = 0  # N, the rows it was fitted on (0: unknown)
    source: Optional[str] = field(default=None, compare=False)  # the file it was loaded from

    @classmethod
    def fit(cls, features: np.ndarray, dim: Optional[int] = None, rel_eps: float = 1e-6,
            shrinkage: Shrinkage = "auto") -> "PCAWhitening":
        """Fit on ``(N, D)`` features (l2-normalised first, as they will be at transform time).

        ``shrinkage``: ``"auto"`` (Ledoit-Wolf) or ``rho`` in ``[0, 1]`` (module docstring).
        """
        x = l2_rows(np.asarray(features, dtype=np.float64))
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"PCA-whitening needs at least 2 feature rows, got shape {x.shape}")
        n, d_in = x.shape
        if dim is not None and int(dim) < 1:
            raise ValueError(f"PCA-whitening: dim must be >= 1 or None, got {dim}")
        rho = check_shrinkage(shrinkage)
        mean = x.mean(axis=0)
        centred = x - mean
        if n <= d_in:  # the N x N Gram matrix has the same non-zero spectrum, and is smaller
            scatter = centred @ centred.T
            eig, vecs = np.linalg.eigh(scatter)
            order = np.argsort(eig)[::-1]
            eig, vecs = eig[order], vecs[:, order]
            variances = eig / n
            axes = centred.T @ vecs / np.sqrt(np.maximum(eig, 1e-300))  # unit columns where eig > 0
        else:
            scatter = centred.T @ centred
            variances, axes = np.linalg.eigh(scatter / n)
            order = np.argsort(variances)[::-1]
            variances, axes = variances[order], axes[:, order]
        rank = min(d_in, n - 1)
        keep = (variances > rel_eps * max(float(variances[0]), 1e-300)) & (np.arange(len(variances)) < rank)
        if dim is not None:
            keep &= np.arange(len(variances)) < int(dim)
        variances, axes = variances[keep], axes[:, keep]
        if len(variances) == 0:
            raise ValueError("PCA-whitening: the features do not vary (every axis below rel_eps)")
        if rho is None:
            rho = ledoit_wolf_shrinkage(centred, scatter)
        kept = len(variances)
        if rho == 0.0 and kept == n - 1 and kept > 1:
            raise ValueError(f"PCA-whitening without shrinkage on all {kept} axes of {n} vectors maps them onto a "
                             f"regular simplex (every pairwise whitened cosine = -1/{n - 1}): set shrinkage > 0 "
                             f"(or 'auto'), dim < {n - 1}, or fit on more vectors")
        mean_variance = float(np.sum(centred * centred)) / n / d_in  # trace(S) / D
        shrunk = (1.0 - rho) * variances + rho * mean_variance
        if n <= d_in:
            log.warning("PCA-whitening fitted on %d vectors of %d dimensions (fewer vectors than dimensions): kept "
                        "%d dimensions (at most N - 1 = %d), shrinkage %.3g toward the mean variance. The usual "
                        "protocol fits the whitening on another set (e.g. Paris 6k for Oxford 5k): `instsearch "
                        "whitening --config C.yaml --benchmark OTHER.json --out W.npz`, then "
                        "retrieval.whitening: W.npz", n, d_in, kept, n - 1, rho)
        return cls(mean=mean, projection=axes / np.sqrt(shrunk), variances=variances, shrinkage=float(rho),
                   num_samples=n)

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[0])

    def check_input_dim(self, input_dim: int) -> None:
        """Refuse features of another dimension than the one this whitening was fitted on."""
        if int(input_dim) != self.input_dim:
            where = f" {self.source}" if self.source else ""
            raise ValueError(f"the whitening{where} was fitted on {self.input_dim}-D features but the features are "
                             f"{int(input_dim)}-D: fit it with the same model and layer "
                             f"(`instsearch whitening --config ... --out W.npz`)")

    def transform(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` -> ``(N, d)`` float32, unit rows."""
        x = l2_rows(np.asarray(features, dtype=np.float64))
        self.check_input_dim(x.shape[1])
        return l2_rows((x - self.mean) @ self.projection).astype(np.float32)

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        np.savez(path, mean=self.mean, projection=self.projection, variances=self.variances,
                 shrinkage=np.float64(self.shrinkage), num_samples=np.int64(self.num_samples))
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: Union[str, Path], input_dim: Optional[int] = None) -> "PCAWhitening":
        """A saved whitening; with ``input_dim``, refuse it unless it was fitted on features of that
        dimension (the error names the file and both dimensions)."""
        with np.load(path) as data:
            white = cls(mean=data["mean"], projection=data["projection"], variances=data["variances"],
                        shrinkage=float(data["shrinkage"]) if "shrinkage" in data else 0.0,
                        num_samples=int(data["num_samples"]) if "num_samples" in data else 0, source=str(path))
        if input_dim is not None:
            white.check_input_dim(input_dim)
        return white


def check_shrinkage(shrinkage: Shrinkage) -> Optional[float]:
    """``None`` for ``"auto"``, else ``rho`` as a float in ``[0, 1]``."""
    if isinstance(shrinkage, str):
        if shrinkage == "auto":
            return None
        try:
            shrinkage = float(shrinkage)
        except ValueError:
            raise ValueError(f"whitening shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}") from None
    if isinstance(shrinkage, bool) or not 0.0 <= float(shrinkage) <= 1.0:
        raise ValueError(f"whitening shrinkage must be 'auto' or a number in [0, 1], got {shrinkage!r}")
    return float(shrinkage)
