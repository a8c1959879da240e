"""VLAD over an image's region features: the DASR paper's image-level descriptor.

"DASR descriptors that are extracted from each image are embedded into one vector with VLAD"
(Jégou et al.), with a tiny vocabulary -- 4 words, since an image has only about ten regions --
and the VLAD* post-processing (Delhumeau et al.): power-law normalisation with exponent 0.5 and
intra-normalisation (each word's residual sum l2-normalised on its own, Arandjelovic & Zisserman),
then a global l2. The vocabulary is trained beforehand by k-means (faiss) on region features of an
independent image set (:func:`fit_codebook`) and saved as a ``(k, D)`` ``.npy`` file.

Everything is batched: the regions of every image are assigned and accumulated with one
``index_add_``, no loop over images or regions. :class:`DASRVLAD` serves the descriptor as a
search network (one whole-frame region per image), for image retrieval benchmarks (Holidays,
Oxford, Paris).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instsearch.networks.dasr import DASR
from instsearch.networks.region_search import require_eval_mode
from instsearch.networks.transform import check_box_lists, check_images, crop_boxes
from instsearch.structures import Regions

__all__ = ["fit_codebook", "assign_words", "vlad", "DASRVLAD"]


def fit_codebook(features: Union[np.ndarray, Tensor], k: int = 4, niter: int = 25, seed: int = 0) -> np.ndarray:
    """``(k, D)`` float32 k-means centroids of ``(N, D)`` features (faiss, deterministic for a
    ``seed``); features are l2-normalised first, as the descriptors they will encode."""
    import faiss

    x = torch.as_tensor(features, dtype=torch.float32)
    x = np.ascontiguousarray(F.normalize(x, dim=1).numpy())
    if len(x) < k:
        raise ValueError(f"fit_codebook: {len(x)} features for {k} words")
    kmeans = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), seed=int(seed), verbose=False)
    kmeans.train(x)
    return kmeans.centroids.astype(np.float32)


def assign_words(features: Tensor, codebook: Tensor) -> Tensor:
    """Index ``(N,)`` of each feature's nearest word (Euclidean)."""
    return torch.cdist(features, codebook).argmin(dim=1)


def vlad(features: Tensor, image_index: Tensor, num_images: int, codebook: Tensor, power: float = 0.5,
         intra: bool = True) -> Tensor:
    """``(num_images, k * D)`` VLAD vectors of the region ``features`` ``(N, D)`` owned by
    ``image_index`` ``(N,)``.

    Per word, the sum of the residuals ``x - c`` of the features assigned to it; then the signed
    power law ``sign(v) |v|^power`` (``power=1``: none), intra-normalisation of each word's block
    (``intra``), and a global l2. An image without regions gets the zero vector.
    """
    k, dim = codebook.shape
    codebook = codebook.to(features)
    words = assign_words(features, codebook)
    sums = features.new_zeros(num_images * k, dim)
    sums.index_add_(0, image_index.long() * k + words, features - codebook[words])
    v = sums.view(num_images, k, dim)
    if power != 1.0:
        v = v.sign() * v.abs().pow(power)
    if intra:
        v = F.normalize(v, dim=2)
    return F.normalize(v.reshape(num_images, k * dim), dim=1)


class DASRVLAD(nn.Module):
    """The image-level DASR descriptor as a :class:`~instsearch.structures.RegionSearchModel`: each
    image is one whole-frame region described by the VLAD of its DASR (or DASR*) region features;
    a query box is described by the VLAD of the regions found in its crop.

    Args:
        dasr: the region network (its regions' features are encoded).
        codebook: the ``(k, D)`` ``.npy`` vocabulary written by :func:`fit_codebook` (k-means on
            another image set's region features, as the paper).
        power / intra: the VLAD* normalisation (:func:`vlad`).
    """

    predicts_labels = False

    def __init__(self, dasr: DASR, codebook: Union[str, Path, np.ndarray, Tensor], power: float = 0.5,
                 intra: bool = True) -> None:
        super().__init__()
        self.dasr = dasr
        words = np.load(codebook) if isinstance(codebook, (str, Path)) else codebook
        words = torch.as_tensor(np.asarray(words), dtype=torch.float32)
        if words.ndim != 2 or words.shape[1] != dasr.feature_dim:
            raise ValueError(f"codebook must be (k, {dasr.feature_dim}) for this DASR network, got "
                             f"{tuple(words.shape)}")
        self.register_buffer("codebook", words)
        self.power, self.intra = float(power), bool(intra)

    @property
    def feature_dim(self) -> int:
        return int(self.codebook.numel())

    def encode(self, images: list[Tensor]) -> Tensor:
        """``(B, k * D)``: VLAD of each image's DASR region features."""
        regions = self.dasr.detect_regions(images)
        counts = torch.tensor([len(r) for r in regions])
        features = torch.cat([r.features for r in regions]).to(self.codebook)
        owner = torch.repeat_interleave(torch.arange(len(regions)), counts).to(self.codebook.device)
        return vlad(features, owner, len(regions), self.codebook, self.power, self.intra)

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

    def classify_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """VLAD predicts no category (``predicts_labels`` is ``False``)."""
        raise TypeError(f"{type(self).__name__} predicts no categories (predicts_labels is False)")


def codebook_from_images(dasr: DASR, images: list[Tensor], k: int = 4, seed: int = 0,
                         batch_size: int = 8) -> np.ndarray:
    """A vocabulary fitted on the DASR region features of ``images`` (another set than the one
    searched), for :class:`DASRVLAD`'s ``codebook``."""
    dasr.eval()
    with torch.no_grad():
        feats = [r.features for s in range(0, len(images), batch_size)
                 for r in dasr.detect_regions(images[s:s + batch_size])]
    return fit_codebook(torch.cat(feats).cpu(), k=k, seed=seed)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m instsearch.networks.vlad --benchmark B.json --out codebook.npy``: fit a DASR VLAD
    vocabulary on the database images of a benchmark (an independent one from the one searched)."""
    import argparse

    from instsearch.datamodules.image_io import load_rgb
    from instsearch.datamodules.transforms import to_float_tensor
    from instsearch.formats import Benchmark

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--benchmark", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default=None)
    p.add_argument("--star", action="store_true")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-images", type=int, default=1000)
    a = p.parse_args(argv)
    bench = Benchmark.load(a.benchmark)
    images = [to_float_tensor(load_rgb(bench.image_path(i))) for i in bench.database[: a.max_images]]
    codebook = codebook_from_images(DASR(a.backbone, weights=a.weights, star=a.star), images, k=a.k)
    np.save(a.out, codebook)
    print(f"codebook {codebook.shape} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
