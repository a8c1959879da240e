"""PCA-whitening of region features: ``l2 -> centre -> rotate onto the principal axes -> divide by
the square root of each axis' variance -> l2``.

The DASR paper post-processes its region features this way ("l2-normalized, and undergone PCA
whitening and an once more l2-normalization"); the same step is common to most CNN retrieval
features (Babenko & Lempitsky; Radenovic et al.). Whitening lowers the weight of the directions
in which all regions vary together (co-occurring, bursty activations), so the cosine similarity
is less dominated by them.

It is fitted without labels on a set of features -- by default the database's own regions, in
the evaluator (``RetrievalConfig.whitening``), so every method can use it -- and applied to the
database and the query features alike.

Choices where the papers are silent (parameters of :meth:`PCAWhitening.fit`):

* **rank** -- a database of ``N`` regions in ``D`` dimensions has at most ``N - 1`` non-zero
  variances; axes with a variance below ``rel_eps`` times the largest are dropped instead of being
  divided by (almost) zero, which would blow noise up to unit length. ``dim`` keeps at most that
  many leading axes (dimensionality reduction).
* **shrinkage** -- ``shrinkage`` adds that fraction of the mean variance to every variance before
  the division (0 = plain whitening), a softer alternative to dropping axes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["PCAWhitening", "l2_rows"]


def l2_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit l2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@dataclass
class PCAWhitening:
    """A fitted whitening: ``transform(x) = l2((l2(x) - mean) @ projection)``.

    ``projection`` is ``(D, d)``: the principal axes (columns, decreasing variance) divided by the
    square root of their (shrunk) variance.
    """

    mean: np.ndarray  # (D,) float64
    projection: np.ndarray  # (D, d) float64
    variances: np.ndarray  # (d,) the kept variances, before shrinkage

    @classmethod
    def fit(cls, features: np.ndarray, dim: Optional[int] = None, rel_eps: float = 1e-6,
            shrinkage: float = 0.0) -> "PCAWhitening":
        """Fit on ``(N, D)`` features (l2-normalised first, as they will be at transform time)."""
        x = l2_rows(np.asarray(features, dtype=np.float64))
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"PCA-whitening needs at least 2 feature rows, got shape {x.shape}")
        mean = x.mean(axis=0)
        centred = x - mean
        cov = centred.T @ centred / len(x)
        variances, axes = np.linalg.eigh(cov)  # ascending
        order = np.argsort(variances)[::-1]
        variances, axes = variances[order], axes[:, order]
        keep = variances > rel_eps * max(float(variances[0]), 1e-300)
        if dim is not None:
            keep &= np.arange(len(variances)) < int(dim)
        variances, axes = variances[keep], axes[:, keep]
        if len(variances) == 0:
            raise ValueError("PCA-whitening: the features do not vary (every axis below rel_eps)")
        denominator = np.sqrt(variances + shrinkage * float(np.mean(variances)))
        return cls(mean=mean, projection=axes / denominator, variances=variances)

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    def transform(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` -> ``(N, d)`` float32, unit rows."""
        x = l2_rows(np.asarray(features, dtype=np.float64))
        return l2_rows((x - self.mean) @ self.projection).astype(np.float32)

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        np.savez(path, mean=self.mean, projection=self.projection, variances=self.variances)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "PCAWhitening":
        with np.load(path) as data:
            return cls(mean=data["mean"], projection=data["projection"], variances=data["variances"])
