"""Optimized product quantization (OPQ) for UDQ: pseudo-labels (Eq. 6), ``φ`` (Eq. 3) and ADC (Eq. 5).

UDQ's self-supervision comes from OPQ fitted on the current region features: an orthonormal
rotation ``R`` and ``M`` codebooks of ``K = 2^nbits`` codewords, minimising ``L_pq`` of Eq. 6. The
codes ``h_t`` are the pseudo-labels of the losses, ``φ(f_t)`` the quantised features, and at search
time the same codes are the compact database, scored by asymmetric distance computation (ADC).

**The rotated space.** Eq. 6 constrains ``R c`` to the product of the codebooks, so codewords are
vectors of the *rotated* space and a feature is quantised as ``R f``. Everything here works in that
space: :meth:`OPQCodebook.rotate` gives ``R f = f @ R^T``, :meth:`OPQCodebook.decode` returns
``φ(f)`` there, and the UDQ losses consume rotated features. ADC distances are the same in either
space because ``R`` is orthonormal: ``‖f_q − R^T φ‖ = ‖R f_q − φ‖``.

Fitting and encoding are faiss's own (``OPQMatrix`` + ``IndexPQ`` behind an ``IndexPreTransform``,
which is what ``index_factory("OPQ{M},PQ{M}x{nbits}")`` builds), so the labels are exactly what a
faiss index of the database would store. The fitted state is plain arrays (:meth:`to_state`), so
it can travel in a Lightning checkpoint and be rebuilt into the same faiss index.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Optional, Union

import faiss
import numpy as np
import torch
from torch import Tensor

__all__ = ["OPQCodebook", "adc_distances", "adc_tables", "pack_codes", "unpack_codes", "faiss_threads"]

ArrayLike = Union[np.ndarray, Tensor]


@contextlib.contextmanager
def faiss_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Run faiss with ``num_threads`` OpenMP threads inside the block (``None``: leave as is).

    faiss's k-means is seeded, but BLAS reductions may sum in a different order with a different
    thread count; fixing the count makes a fit bit-for-bit repeatable across machines.
    """
    if num_threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _as_float32_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def unpack_codes(packed: np.ndarray, num_subspaces: int, nbits: int) -> np.ndarray:
    """faiss's packed PQ codes ``(N, code_size)`` uint8 → indices ``(N, M)`` int64.

    faiss writes each ``nbits``-bit index least-significant bit first into one bit stream
    (``PQEncoderGeneric``); for ``nbits = 8`` the bytes are the indices.
    """
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if nbits == 8:
        return packed[:, :num_subspaces].astype(np.int64)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : num_subspaces * nbits]
    bits = bits.reshape(len(packed), num_subspaces, nbits).astype(np.int64)
    return (bits << np.arange(nbits, dtype=np.int64)).sum(axis=2)


def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Inverse of :func:`unpack_codes`: indices ``(N, M)`` → faiss's packed bytes ``(N, code_size)``."""
    codes = np.asarray(codes, dtype=np.int64)
    n, m = codes.shape
    code_size = (m * nbits + 7) // 8
    if nbits == 8:
        return np.ascontiguousarray(codes.astype(np.uint8))
    bits = ((codes[:, :, None] >> np.arange(nbits, dtype=np.int64)) & 1).astype(np.uint8).reshape(n, m * nbits)
    bits = np.pad(bits, ((0, 0), (0, code_size * 8 - m * nbits)))
    return np.packbits(bits, axis=1, bitorder="little")


@dataclass(frozen=True, eq=False)
class OPQCodebook:
    """A fitted OPQ quantizer: rotation ``R`` ``(d, d)`` and codebooks ``(M, K, d_m)`` in the rotated space.

    Fields are CPU float32 tensors; ``rotate(x) = x @ R^T`` (``R`` is faiss's ``OPQMatrix.A``).
    Compared by identity (``eq=False``): tensor fields have no single truth value.
    """

    rotation: Tensor
    codebooks: Tensor
    nbits: int

    def __post_init__(self) -> None:
        m, k, d_m = self.codebooks.shape
        if self.rotation.shape != (m * d_m, m * d_m):
            raise ValueError(f"rotation {tuple(self.rotation.shape)} does not match codebooks {(m, k, d_m)}")
        if k != 2 ** self.nbits:
            raise ValueError(f"{k} codewords per subspace is not 2^nbits with nbits={self.nbits}")

    # -- shape ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.rotation.shape[0]

    @property
    def num_subspaces(self) -> int:
        return self.codebooks.shape[0]

    @property
    def num_codewords(self) -> int:
        return self.codebooks.shape[1]

    @property
    def code_size(self) -> int:
        """Bytes per packed code, as faiss stores it: ``ceil(M·nbits / 8)``."""
        return (self.num_subspaces * self.nbits + 7) // 8

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(cls, features: ArrayLike, num_subspaces: int, nbits: int = 8, seed: int = 0,
            opq_iterations: int = 50, num_threads: Optional[int] = None) -> "OPQCodebook":
        """Minimise ``L_pq`` (Eq. 6) on ``features`` ``(N, d)`` with faiss's OPQ, then train the PQ.

        ``seed`` seeds faiss's k-means (``ClusteringParameters.seed``), which drives both OPQ's
        alternating optimisation and the final PQ; faiss initialises the rotation from its own
        fixed seed. The OPQ step is linked to a PQ of the requested ``nbits`` (faiss otherwise
        optimises the rotation for 8-bit codes whatever the final ``nbits``). ``opq_iterations``
        is faiss's default ``OPQMatrix.niter``.
        """
        x = _as_float32_numpy(features)
        d = x.shape[1]
        if d % num_subspaces:
            raise ValueError(f"feature dimension {d} is not divisible by M={num_subspaces}")
        opq = faiss.OPQMatrix(d, num_subspaces)
        opq.niter = opq_iterations
        index_pq = faiss.IndexPQ(d, num_subspaces, nbits)
        index_pq.pq.cp.seed = seed
        opq.pq = index_pq.pq
        index = faiss.IndexPreTransform(opq, index_pq)
        with faiss_threads(num_threads):
            index.train(x)
        rotation = faiss.vector_to_array(opq.A).reshape(d, d)
        centroids = faiss.vector_to_array(index_pq.pq.centroids).reshape(
            num_subspaces, 2 ** nbits, d // num_subspaces)
        return cls(torch.from_numpy(rotation.copy()), torch.from_numpy(centroids.copy()), nbits)

    # -- faiss ---------------------------------------------------------------------------------
    def to_faiss_index(self, fast_scan: bool = False, bbs: int = 32) -> faiss.IndexPreTransform:
        """An empty faiss ``IndexPreTransform(R, IndexPQ)`` with these parameters (L2 metric).

        ``add`` the database to it for faiss's own ADC search, ``faiss.write_index`` to store it.

        ``fast_scan=True`` (4-bit codes only) puts faiss's ``IndexPQFastScan`` behind the same
        rotation instead: the same centroids and codes, stored in blocks of ``bbs`` (a multiple of
        32) database vectors, and the ADC of UDQ's Eq. 5 computed with SIMD shuffles over lookup tables
        quantised to 8 bits. Distances are then approximate (to the table quantisation step);
        neighbours nearly always agree with the plain ``IndexPQ`` (tests/test_udq_quantizer.py).
        """
        if fast_scan and self.nbits != 4:
            raise ValueError(f"fast-scan PQ needs 4-bit codes (K = 16 codewords per subspace), "
                             f"this codebook has nbits={self.nbits}")
        d, m = self.dim, self.num_subspaces
        transform = faiss.LinearTransform(d, d, False)
        faiss.copy_array_to_vector(self.rotation.numpy().astype(np.float32).ravel(), transform.A)
        transform.is_trained = True
        transform.is_orthonormal = True
        index_pq = faiss.IndexPQ(d, m, self.nbits)
        faiss.copy_array_to_vector(self.codebooks.numpy().astype(np.float32).ravel(), index_pq.pq.centroids)
        index_pq.is_trained = True
        if fast_scan:
            # copies the PQ (centroids, metric) of the empty, trained IndexPQ
            index_pq = faiss.IndexPQFastScan(index_pq, bbs)
        index = faiss.IndexPreTransform(transform, index_pq)
        index.is_trained = True
        return index

    @cached_property
    def _encoder(self) -> faiss.IndexPreTransform:
        return self.to_faiss_index()

    # -- the quantizer ---------------------------------------------------------------------------
    def rotate(self, x: ArrayLike) -> ArrayLike:
        """``R f`` for each row: ``x @ R^T``. Tensors stay tensors (differentiable, on their device)."""
        if isinstance(x, Tensor):
            return x @ self.rotation.to(device=x.device, dtype=x.dtype).T
        return _as_float32_numpy(x) @ self.rotation.numpy().T

    def encode_packed(self, x: ArrayLike) -> np.ndarray:
        """faiss's packed codes ``(N, code_size)`` uint8 of unrotated features (``sa_encode``)."""
        return self._encoder.sa_encode(_as_float32_numpy(x))

    def encode(self, x: ArrayLike) -> Tensor:
        """Pseudo-labels ``h_t`` (Eqs. 4, 6) of unrotated features ``(N, d)``: ``(N, M)`` int64.

        faiss's own encoding; for ``K ≤ 256`` a label bank fits ``uint8``, ``G × M`` bytes.
        """
        return torch.from_numpy(unpack_codes(self.encode_packed(x), self.num_subspaces, self.nbits))

    def decode(self, codes: ArrayLike) -> Tensor:
        """``φ(f)`` of Eq. 3 in the rotated space: the concatenated codewords, ``(N, d)`` float32."""
        codes_t = torch.as_tensor(np.asarray(codes) if not isinstance(codes, Tensor) else codes).long().cpu()
        m = self.num_subspaces
        return self.codebooks[torch.arange(m), codes_t].reshape(len(codes_t), self.dim)

    def quantization_error(self, x: ArrayLike, codes: Optional[ArrayLike] = None) -> float:
        """``L_pq`` of Eq. 6 divided by ``N``: mean squared distance of ``R f`` to ``φ(f)``.

        ``codes``: ``x``'s codes when already computed (``encode(x)``), so they are not encoded again.
        """
        xr = torch.from_numpy(self.rotate(_as_float32_numpy(x)))
        return float((xr - self.decode(self.encode(x) if codes is None else codes)).pow(2).sum(dim=1).mean())

    # -- serialisation ---------------------------------------------------------------------------
    def to_state(self) -> dict[str, Tensor]:
        """Plain tensors (loadable with ``torch.load(weights_only=True)``) for a checkpoint."""
        return {"rotation": self.rotation.clone(), "codebooks": self.codebooks.clone(),
                "nbits": torch.tensor(self.nbits, dtype=torch.int64)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> "OPQCodebook":
        """Inverse of :meth:`to_state`; gives bit-identical encodings."""
        return cls(torch.as_tensor(state["rotation"], dtype=torch.float32).cpu().contiguous(),
                   torch.as_tensor(state["codebooks"], dtype=torch.float32).cpu().contiguous(),
                   int(state["nbits"]))


def adc_tables(queries: Tensor, codebook: OPQCodebook) -> Tensor:
    """Per-subspace lookup tables ``‖(R f_q)^m − c^m_k‖²``, ``(Q, M, K)``.

    Computed as explicit differences, not ``‖a‖² − 2ab + ‖b‖²``, so no cancellation error.
    """
    m, k, d_m = codebook.codebooks.shape
    q = codebook.rotate(queries).reshape(len(queries), m, 1, d_m)
    return (q - codebook.codebooks.to(device=queries.device, dtype=queries.dtype)).pow(2).sum(dim=3)


def adc_distances(queries: Tensor, codes: Tensor, codebook: OPQCodebook) -> Tensor:
    """Squared L2 ``‖R f_q − φ(f)‖²`` of every query to every code by table lookup, ``(Q, N)``.

    The asymmetric distance of Eq. 5 (before ``1/‖·‖``): the query stays real-valued, the database
    is its codes. Loops over the ``M`` subspaces only (each step vectorised over queries and
    codes), so memory stays ``Q × N`` rather than ``Q × N × M``.
    """
    tables = adc_tables(queries, codebook)
    codes = codes.to(tables.device).long()
    out = tables.new_zeros(len(queries), len(codes))
    for m in range(codebook.num_subspaces):
        out += tables[:, m].index_select(1, codes[:, m])
    return out
