"""VLAD over an image's region features: the DASR paper's image-level descriptor.

"DASR descriptors that are extracted from each image are embedded into one vector with VLAD"
(Jégou et al., "Aggregating local descriptors into a compact image representation"), with a tiny
vocabulary -- 4 words, since an image has only about ten regions -- post-processed with "the
schemes proposed in VLAD*" (Delhumeau, Gosselin, Jégou & Pérez, "Revisiting the VLAD image
representation", ACM MM 2013). With ``x`` a region feature, ``c_k`` its nearest word and ``Q_k``,
``P`` learnt on an independent image set:

1. **residual normalisation** (``residual_normalisation``): each residual is l2-normalised before
   it is summed into its word's block, ``v_k = sum_x (x - c_k) / ||x - c_k||``;
2. **local coordinate system** (LCS, ``lcs``): per word, the residuals are rotated by the PCA basis
   ``Q_k`` learnt on the residuals of the training regions assigned to that word,
   ``v_k = sum_x Q_k^T r(x)`` with ``Q_k``'s columns the axes (stored as ``lcs[k] = Q_k^T``;
   applied to the block's sum, the same by linearity);
3. **power-law normalisation** (``power``, 0.5): ``sign(v) |v|^0.5`` per component, then a global
   l2;
4. **PCA rotation** (``pca``): ``P^T (v - mean)`` with the PCA learnt on the VLAD vectors of the
   training images (optionally the first ``pca_dim`` axes only), then l2.

The variant this module computed before, kept as an option, is "VLAD with intra-normalisation"
(Arandjelović & Zisserman, "All about VLAD", CVPR 2013): plain residual sums, power law,
``intra=True`` (each word's block l2-normalised on its own), global l2, no LCS and no PCA.
:data:`VLAD_STAR` and :data:`VLAD_INTRA_NORMALISATION` name the two sets of options.

The learnt parts -- the k-means vocabulary, the per-word LCS rotations and the final PCA -- are
fitted together by :func:`fit_vocabulary` on region features of an independent image set and saved
as one ``.npz`` file (:class:`VladVocabulary`); a vocabulary-only ``(k, D)`` ``.npy`` file
(:func:`fit_codebook`) still loads. ``instsearch vlad-vocabulary`` fits one on another
benchmark's database images.

Everything is batched: the regions of every image are assigned and accumulated with one
``index_add_``, the LCS rotations are one ``einsum`` over the ``(images, words)`` blocks, no loop
over images or regions. :class:`DASRVLAD` serves the descriptor as a search network (one
whole-frame region per image), for image retrieval benchmarks (Holidays, Oxford, Paris).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instsearch.networks.dasr import DASR
from instsearch.networks.contract import ClassAgnostic, check_box_lists, check_images, require_eval_mode
from instsearch.networks.crops import crop_boxes
from instsearch.structures import Regions

__all__ = ["VLAD_STAR", "VLAD_INTRA_NORMALISATION", "VladVocabulary", "fit_codebook", "fit_vocabulary",
           "fit_local_coordinate_systems", "fit_pca_rotation", "assign_words", "vlad", "DASRVLAD",
           "load_vocabulary"]

#: Delhumeau et al.'s VLAD* (the DASR paper's post-processing): residual normalisation, LCS,
#: power law 0.5, global l2, PCA rotation, l2.
VLAD_STAR = dict(residual_normalisation=True, local_coordinate_system=True, power=0.5, intra=False,
                 pca_rotation=True)
#: VLAD with intra-normalisation (Arandjelović & Zisserman): residual sums, power law 0.5,
#: per-word l2, global l2.
VLAD_INTRA_NORMALISATION = dict(residual_normalisation=False, local_coordinate_system=False, power=0.5,
                                intra=True, pca_rotation=False)

ArrayLike = Union[np.ndarray, Tensor]


def _as_float32(x: ArrayLike) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, dtype=torch.float32)


def fit_codebook(features: ArrayLike, k: int = 4, niter: int = 25, seed: int = 0) -> np.ndarray:
    """``(k, D)`` float32 k-means centroids of ``(N, D)`` features (faiss, deterministic for a
    ``seed``); features are l2-normalised first, as the descriptors they will encode."""
    import faiss

    x = _as_float32(features)
    x = np.ascontiguousarray(F.normalize(x, dim=1).numpy())
    if len(x) < k:
        raise ValueError(f"fit_codebook: {len(x)} features for {k} words")
    kmeans = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), seed=int(seed), verbose=False)
    kmeans.train(x)
    return kmeans.centroids.astype(np.float32)


def assign_words(features: Tensor, codebook: Tensor) -> Tensor:
    """Index ``(N,)`` of each feature's nearest word (Euclidean)."""
    return torch.cdist(features, codebook).argmin(dim=1)


def _signed_axes(axes: Tensor) -> Tensor:
    """Rows of ``axes`` with the sign that makes each row's largest-magnitude entry positive (an
    eigenvector's sign is arbitrary; this fixes one)."""
    pivot = axes.gather(1, axes.abs().argmax(dim=1, keepdim=True))
    return axes * torch.where(pivot < 0, -1.0, 1.0).to(axes)


def _residuals(features: Tensor, codebook: Tensor, residual_normalisation: bool) -> tuple[Tensor, Tensor]:
    words = assign_words(features, codebook)
    residuals = features - codebook[words]
    if residual_normalisation:
        residuals = F.normalize(residuals, dim=1)
    return words, residuals


def fit_local_coordinate_systems(features: ArrayLike, codebook: ArrayLike,
                                 residual_normalisation: bool = True) -> np.ndarray:
    """Delhumeau et al.'s local coordinate system: ``(k, D, D)`` float32, row ``j`` of block ``k``
    the ``j``-th principal axis (decreasing variance) of the residuals ``x - c_k`` (l2-normalised
    with ``residual_normalisation``) of the ``features`` assigned to word ``k``: the eigenvectors of
    their covariance. A word with fewer than two features keeps the identity."""
    x = _as_float32(features).double()
    c = _as_float32(codebook).double()
    words, residuals = _residuals(x, c, residual_normalisation)
    k, dim = c.shape
    bases = torch.eye(dim, dtype=torch.float64).repeat(k, 1, 1)
    for word in range(k):  # one covariance per word (k is 4), each a single matrix product
        r = residuals[words == word]
        if len(r) < 2:
            continue
        r = r - r.mean(dim=0)
        _, vectors = torch.linalg.eigh(r.T @ r / (len(r) - 1))
        bases[word] = _signed_axes(vectors.flip(1).T)
    return bases.float().numpy()


def fit_pca_rotation(vectors: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """PCA of ``(N, D)`` vectors: their mean ``(D,)`` and the ``(r, D)`` principal axes (rows, by
    decreasing variance), ``r`` the number of axes with non-zero variance (at most
    ``min(D, N - 1)``)."""
    v = _as_float32(vectors).double()
    if len(v) < 2:
        raise ValueError(f"fit_pca_rotation: {len(v)} vectors, at least 2 are needed")
    mean = v.mean(dim=0)
    _, singular, axes = torch.linalg.svd(v - mean, full_matrices=False)
    keep = int((singular > singular[0] * 1e-6).sum()) if singular[0] > 0 else 0
    if keep == 0:
        raise ValueError("fit_pca_rotation: the vectors are all equal")
    return mean.float().numpy(), _signed_axes(axes[:keep]).float().numpy()


def vlad(features: Tensor, image_index: Tensor, num_images: int, codebook: Tensor, power: float = 0.5,
         intra: bool = True, residual_normalisation: bool = False, lcs: Optional[Tensor] = None,
         pca: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """VLAD vectors ``(num_images, k * D)`` (``(num_images, r)`` with ``pca``) of the region
    ``features`` ``(N, D)`` owned by ``image_index`` ``(N,)``.

    Per word ``k``, the sum of the residuals ``x - c_k`` of the features assigned to it, each
    l2-normalised first with ``residual_normalisation``; each block rotated by ``lcs[k]`` (the
    ``(k, D, D)`` local coordinate systems, rows the axes: ``lcs[k] @ v_k``); the signed power law
    ``sign(v) |v|^power`` (``power=1``: none); intra-normalisation of each word's block
    (``intra``); a global l2; then, with ``pca = (mean, axes)``, ``axes @ (v - mean)`` and l2.
    The defaults are VLAD with intra-normalisation (:data:`VLAD_INTRA_NORMALISATION`); VLAD* is
    ``residual_normalisation=True, intra=False`` with ``lcs`` and ``pca`` from
    :func:`fit_vocabulary` (:class:`DASRVLAD`'s defaults). An image without regions gets the zero
    vector.
    """
    k, dim = codebook.shape
    codebook = codebook.to(features)
    words, residuals = _residuals(features, codebook, residual_normalisation)
    sums = features.new_zeros(num_images * k, dim)
    sums.index_add_(0, image_index.long() * k + words, residuals)
    v = sums.view(num_images, k, dim)
    if lcs is not None:
        if tuple(lcs.shape) != (k, dim, dim):
            raise ValueError(f"lcs must be ({k}, {dim}, {dim}), got {tuple(lcs.shape)}")
        v = torch.einsum("ked,nkd->nke", lcs.to(v), v)
    if power != 1.0:
        v = v.sign() * v.abs().pow(power)
    if intra:
        v = F.normalize(v, dim=2)
    v = F.normalize(v.reshape(num_images, k * dim), dim=1)
    if pca is not None:
        mean, axes = (t.to(v) for t in pca)
        empty = torch.bincount(image_index.long(), minlength=num_images)[:num_images] == 0
        v = F.normalize((v - mean) @ axes.T, dim=1).masked_fill(empty.to(v.device)[:, None], 0.0)
    return v


@dataclass
class VladVocabulary:
    """The learnt parts of a VLAD descriptor, fitted on an independent image set.

    ``codebook`` ``(k, D)``; ``lcs`` ``(k, D, D)`` per-word rotations or ``None``; ``pca_mean``
    ``(k * D,)`` and ``pca_axes`` ``(r, k * D)`` or ``None``; ``fitted_with``: the options under
    which the LCS (``residual_normalisation``) and the PCA (all of them) were fitted, which the
    encoding must use for them to apply.
    """

    codebook: np.ndarray
    lcs: Optional[np.ndarray] = None
    pca_mean: Optional[np.ndarray] = None
    pca_axes: Optional[np.ndarray] = None
    fitted_with: dict = field(default_factory=dict)

    def save(self, path: Union[str, Path]) -> Path:
        """One ``.npz`` file (the suffix is added when missing)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = dict(codebook=self.codebook, fitted_with=np.array(json.dumps(self.fitted_with)))
        for name in ("lcs", "pca_mean", "pca_axes"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "VladVocabulary":
        """A ``.npz`` written by :meth:`save`, or a vocabulary-only ``(k, D)`` ``.npy``."""
        path = Path(path)
        if path.suffix == ".npy":
            return cls(codebook=np.load(path))
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            if "codebook" not in names:
                raise ValueError(f"{path}: not a VLAD vocabulary (no 'codebook' array)")
            return cls(codebook=data["codebook"], lcs=data["lcs"] if "lcs" in names else None,
                       pca_mean=data["pca_mean"] if "pca_mean" in names else None,
                       pca_axes=data["pca_axes"] if "pca_axes" in names else None,
                       fitted_with=json.loads(str(data["fitted_with"])) if "fitted_with" in names else {})


def load_vocabulary(source: Union[str, Path, ArrayLike, VladVocabulary]) -> VladVocabulary:
    """A :class:`VladVocabulary` from a file, an instance, or a bare ``(k, D)`` codebook array."""
    if isinstance(source, VladVocabulary):
        return source
    if isinstance(source, (str, Path)):
        return VladVocabulary.load(source)
    return VladVocabulary(codebook=np.asarray(source.cpu() if isinstance(source, Tensor) else source))


def fit_vocabulary(features: ArrayLike, image_index: ArrayLike, num_images: Optional[int] = None, k: int = 4,
                   niter: int = 25, seed: int = 0, residual_normalisation: bool = True,
                   local_coordinate_system: bool = True, power: float = 0.5, intra: bool = False,
                   pca_rotation: bool = True) -> VladVocabulary:
    """Every learnt part of a VLAD descriptor, on the region ``features`` ``(N, D)`` of an
    independent image set (``image_index`` ``(N,)`` their image): the ``k``-word vocabulary
    (:func:`fit_codebook`), the per-word local coordinate systems (:func:`fit_local_coordinate_systems`,
    with ``local_coordinate_system``) and the PCA of the set's VLAD vectors computed with the same
    options (:func:`fit_pca_rotation`, with ``pca_rotation``; images without regions left out).
    Features are l2-normalised first, as :func:`fit_codebook`."""
    x = F.normalize(_as_float32(features), dim=1)
    owner = torch.as_tensor(np.asarray(image_index) if not isinstance(image_index, Tensor) else image_index).long()
    if len(owner) != len(x):
        raise ValueError(f"fit_vocabulary: {len(x)} features but {len(owner)} image indices")
    num_images = int(owner.max()) + 1 if num_images is None else int(num_images)
    codebook = fit_codebook(x, k=k, niter=niter, seed=seed)
    lcs = fit_local_coordinate_systems(x, codebook, residual_normalisation) if local_coordinate_system else None
    vocabulary = VladVocabulary(codebook=codebook, lcs=lcs, fitted_with=dict(
        residual_normalisation=bool(residual_normalisation), local_coordinate_system=bool(local_coordinate_system),
        power=float(power), intra=bool(intra)))
    if pca_rotation:
        vectors = vlad(x, owner, num_images, torch.from_numpy(codebook), power=power, intra=intra,
                       residual_normalisation=residual_normalisation,
                       lcs=None if lcs is None else torch.from_numpy(lcs))
        present = torch.bincount(owner, minlength=num_images)[:num_images] > 0
        vocabulary.pca_mean, vocabulary.pca_axes = fit_pca_rotation(vectors[present])
    return vocabulary


class DASRVLAD(ClassAgnostic, nn.Module):
    """The image-level DASR descriptor as a :class:`~instsearch.structures.RegionSearchModel`: each
    image is one whole-frame region described by the VLAD of its DASR (or DASR*) region features;
    a query box is described by the VLAD of the regions found in its crop.

    Args:
        dasr: the region network (its regions' features are encoded).
        codebook: the vocabulary file fitted on another image set's region features, as the paper:
            a ``.npz`` written by :func:`fit_vocabulary` (vocabulary, LCS rotations, PCA) or a
            vocabulary-only ``(k, D)`` ``.npy`` (:func:`fit_codebook`); or the array itself.
        power / intra / residual_normalisation: the normalisations of :func:`vlad` (defaults: VLAD*).
        local_coordinate_system / pca_rotation: apply the file's LCS rotations / PCA rotation;
            ``None`` (default): whenever the file holds them; ``True``: required.
        pca_dim: keep the first ``pca_dim`` PCA axes (``None``: all the file holds).

    ``VLAD_INTRA_NORMALISATION`` is ``residual_normalisation=False, local_coordinate_system=False,
    intra=True, pca_rotation=False``.
    """

    def __init__(self, dasr: DASR, codebook: Union[str, Path, np.ndarray, Tensor, VladVocabulary],
                 power: float = 0.5, intra: bool = False, residual_normalisation: bool = True,
                 local_coordinate_system: Optional[bool] = None, pca_rotation: Optional[bool] = None,
                 pca_dim: Optional[int] = None) -> None:
        super().__init__()
        self.dasr = dasr
        vocabulary = load_vocabulary(codebook)
        words = torch.as_tensor(np.asarray(vocabulary.codebook), dtype=torch.float32)
        if words.ndim != 2 or words.shape[1] != dasr.feature_dim:
            raise ValueError(f"codebook must be (k, {dasr.feature_dim}) for this DASR network, got "
                             f"{tuple(words.shape)}")
        self.register_buffer("codebook", words)
        self.power, self.intra = float(power), bool(intra)
        self.residual_normalisation = bool(residual_normalisation)
        where = f" in {codebook}" if isinstance(codebook, (str, Path)) else ""
        fitted = vocabulary.fitted_with

        use_lcs = vocabulary.lcs is not None if local_coordinate_system is None else bool(local_coordinate_system)
        if use_lcs:
            if vocabulary.lcs is None:
                raise ValueError(f"local_coordinate_system: no LCS rotations{where}; fit the file with "
                                 "fit_vocabulary (instsearch vlad-vocabulary --benchmark B.json --out FILE.npz)")
            if fitted.get("residual_normalisation", self.residual_normalisation) != self.residual_normalisation:
                raise ValueError(f"the LCS rotations{where} were fitted with residual_normalisation="
                                 f"{fitted['residual_normalisation']}, not {self.residual_normalisation}")
        self.register_buffer("lcs", torch.as_tensor(vocabulary.lcs, dtype=torch.float32) if use_lcs else None)

        use_pca = vocabulary.pca_axes is not None if pca_rotation is None else bool(pca_rotation)
        if use_pca:
            if vocabulary.pca_axes is None:
                raise ValueError(f"pca_rotation: no PCA rotation{where}; fit the file with fit_vocabulary "
                                 "(instsearch vlad-vocabulary --benchmark B.json --out FILE.npz)")
            used = dict(residual_normalisation=self.residual_normalisation, local_coordinate_system=use_lcs,
                        power=self.power, intra=self.intra)
            differ = {name: (fitted[name], value) for name, value in used.items()
                      if name in fitted and fitted[name] != value}
            if differ:
                raise ValueError(f"the PCA rotation{where} was fitted on VLAD vectors computed with other "
                                 "options: " + ", ".join(f"{n}={a} there, {b} here" for n, (a, b) in differ.items()))
            axes = torch.as_tensor(vocabulary.pca_axes, dtype=torch.float32)
            if pca_dim is not None:
                if not 1 <= int(pca_dim) <= len(axes):
                    raise ValueError(f"pca_dim must be in [1, {len(axes)}] (the PCA axes{where}), got {pca_dim}")
                axes = axes[: int(pca_dim)]
            self.register_buffer("pca_mean", torch.as_tensor(vocabulary.pca_mean, dtype=torch.float32))
            self.register_buffer("pca_axes", axes)
        else:
            self.register_buffer("pca_mean", None)
            self.register_buffer("pca_axes", None)

    @property
    def feature_dim(self) -> int:
        return int(self.codebook.numel()) if self.pca_axes is None else int(self.pca_axes.shape[0])

    def encode(self, images: list[Tensor]) -> Tensor:
        """``(B, feature_dim)``: VLAD of each image's DASR region features."""
        regions = self.dasr.detect_regions(images)
        counts = torch.tensor([len(r) for r in regions])
        features = torch.cat([r.features for r in regions]).to(self.codebook)
        owner = torch.repeat_interleave(torch.arange(len(regions)), counts).to(self.codebook.device)
        pca = None if self.pca_axes is None else (self.pca_mean, self.pca_axes)
        return vlad(features, owner, len(regions), self.codebook, self.power, self.intra,
                    self.residual_normalisation, self.lcs, pca)

    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: each image's whole frame, described by its VLAD."""
        require_eval_mode(self, "detect_regions")
        check_images(images)
        return Regions.whole_frames(images, self.encode(images))

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: the VLAD of the DASR regions of each box's crop."""
        require_eval_mode(self, "describe_boxes")
        boxes = check_box_lists(images, boxes)
        crops = crop_boxes(images, boxes)
        features = self.encode(crops) if crops else self.codebook.new_zeros(0, self.feature_dim)
        return list(features.split([len(b) for b in boxes]))
