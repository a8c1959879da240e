"""VLAD* (Delhumeau et al., "Revisiting the VLAD image representation") as the DASR paper uses it:
residual normalisation, local coordinate system, power law, l2, PCA rotation, l2 -- each checked
against the equations computed here with plain numpy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instsearch.networks.vlad import (VLAD_INTRA_NORMALISATION, VLAD_STAR, DASRVLAD, VladVocabulary, fit_codebook,
                                      fit_local_coordinate_systems, fit_pca_rotation, fit_vocabulary, vlad)

# ---------------------------------------------------------------- a hand-made example
# 2 words, 3-D features, 2 images (and a third without regions)
CODEBOOK = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
FEATURES = np.array([[0.9, 0.1, 0.2],    # image 0, word 0
                     [0.8, -0.3, 0.1],   # image 0, word 0
                     [0.1, 0.7, 0.4],    # image 0, word 1
                     [0.2, 0.9, -0.1],   # image 1, word 1
                     [0.3, 1.1, 0.5],    # image 1, word 1
                     [1.2, 0.2, -0.4]])  # image 1, word 0
OWNER = np.array([0, 0, 0, 1, 1, 1])


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' rotation matrix."""
    a = axis / np.linalg.norm(axis)
    cross = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


# per-word LCS bases, rows the axes: word k's residual r becomes LCS[k] @ r
LCS = np.stack([_rotation(np.array([0.0, 0.0, 1.0]), np.pi / 6), _rotation(np.array([1.0, 2.0, -1.0]), 1.1)])
# a PCA of the 6-D VLAD vectors: a mean and 4 orthonormal axes (rows)
PCA_MEAN = np.array([0.3, -0.1, 0.2, 0.1, 0.4, -0.2])
PCA_AXES = np.linalg.qr(np.arange(1.0, 37.0).reshape(6, 6) ** 0.5 + np.eye(6))[0].T[:4]


def numpy_vlad_star(features, owner, num_images, codebook, lcs, pca_mean, pca_axes, power=0.5):
    """The VLAD* equations, one region at a time."""
    k, dim = codebook.shape
    out = []
    for image in range(num_images):
        blocks = np.zeros((k, dim))
        rows = [i for i in range(len(features)) if owner[i] == image]
        for i in rows:
            word = int(np.argmin(np.linalg.norm(codebook - features[i], axis=1)))  # assign
            residual = features[i] - codebook[word]                                 # residual
            residual = residual / np.linalg.norm(residual)                          # residual normalisation
            blocks[word] += lcs[word] @ residual                                    # LCS rotation, sum
        v = blocks.reshape(-1)
        v = np.sign(v) * np.abs(v) ** power                                         # power law
        v = v / np.linalg.norm(v) if rows else v                                    # l2
        if not rows:
            out.append(np.zeros(len(pca_axes)))
            continue
        y = pca_axes @ (v - pca_mean)                                               # PCA rotation
        out.append(y / np.linalg.norm(y))                                           # l2
    return np.stack(out)


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def star(**changes) -> torch.Tensor:
    """vlad() of the hand-made example with the VLAD* options, some of them changed."""
    options = dict(power=0.5, intra=False, residual_normalisation=True, lcs=t(LCS), pca=(t(PCA_MEAN), t(PCA_AXES)))
    options.update(changes)
    return vlad(t(FEATURES), torch.as_tensor(OWNER), 3, t(CODEBOOK), **options)


def test_vlad_star_equals_the_step_by_step_equations():
    expected = numpy_vlad_star(FEATURES, OWNER, 3, CODEBOOK, LCS, PCA_MEAN, PCA_AXES)
    got = star()
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    assert got[2].abs().sum() == 0  # the image without regions


def test_each_vlad_star_step_changes_the_vector():
    full = star()
    changed = {
        "residual_normalisation": star(residual_normalisation=False),
        "local_coordinate_system": star(lcs=None),
        "power_law": star(power=1.0),
        "intra_normalisation": star(intra=True),
        "pca_rotation": star(pca=None)[:, :4],
    }
    for step, other in changed.items():
        assert not torch.allclose(other[:2], full[:2], atol=1e-6), step
    # without the PCA, the vector is the power-law-normalised rotated residual sums, l2-normalised
    v = star(pca=None)
    assert v.shape == (3, 6)
    np.testing.assert_allclose(v[:2].norm(dim=1).numpy(), 1.0)


def test_each_step_alone_against_its_equation():
    f, c = FEATURES, CODEBOOK
    words = np.argmin(((f[:, None] - c[None]) ** 2).sum(2), axis=1)
    residuals = f - c[words]
    unit = residuals / np.linalg.norm(residuals, axis=1, keepdims=True)

    def summed(r):
        v = np.zeros((2, 2, 3))
        np.add.at(v, (OWNER, words), r)
        return v

    def l2(v):
        v = v.reshape(len(v), -1)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    off = dict(power=1.0, intra=False, residual_normalisation=False, lcs=None, pca=None)
    owner = torch.as_tensor(OWNER)
    run = lambda **on: vlad(t(f), owner, 2, t(c), **{**off, **on}).numpy()  # noqa: E731
    np.testing.assert_allclose(run(), l2(summed(residuals)), atol=1e-12)                  # plain VLAD
    np.testing.assert_allclose(run(residual_normalisation=True), l2(summed(unit)), atol=1e-12)
    rotated = np.einsum("nij,nj->ni", LCS[words], residuals)
    np.testing.assert_allclose(run(lcs=t(LCS)), l2(summed(rotated)), atol=1e-12)
    s = summed(residuals)
    np.testing.assert_allclose(run(power=0.5), l2(np.sign(s) * np.sqrt(np.abs(s))), atol=1e-12)
    intra = s / np.linalg.norm(s, axis=2, keepdims=True)
    np.testing.assert_allclose(run(intra=True), l2(intra), atol=1e-12)
    y = (l2(s) - PCA_MEAN) @ PCA_AXES.T
    np.testing.assert_allclose(run(pca=(t(PCA_MEAN), t(PCA_AXES))), l2(y), atol=1e-12)


def test_the_named_variants():
    assert VLAD_STAR == dict(residual_normalisation=True, local_coordinate_system=True, power=0.5, intra=False,
                             pca_rotation=True)
    assert VLAD_INTRA_NORMALISATION == dict(residual_normalisation=False, local_coordinate_system=False, power=0.5,
                                            intra=True, pca_rotation=False)


def test_vlad_defaults_are_power_law_and_intra_normalisation_by_hand():
    """Words (1, 0) and (-1, 0); two features of one image with residuals (0.64, 0.36) and
    (0, 0.01): square root -> (0.8, 0.6), (0, 0.1); each word's block to unit length -> (0.8, 0.6),
    (0, 1); the whole vector to unit length -> [0.8, 0.6, 0, 1] / sqrt(2). Every option left out."""
    from instsearch.networks.vlad import vlad

    codebook = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    features = torch.tensor([[1.64, 0.36], [-1.0, 0.01]])
    out = vlad(features, torch.tensor([0, 0]), 1, codebook)
    expected = torch.tensor([[0.8, 0.6, 0.0, 1.0]]) / 2 ** 0.5
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    named = {k: v for k, v in VLAD_INTRA_NORMALISATION.items() if k not in ("local_coordinate_system", "pca_rotation")}
    torch.testing.assert_close(vlad(features, torch.tensor([0, 0]), 1, codebook, **named), expected, atol=1e-6,
                               rtol=1e-6)


# ---------------------------------------------------------------- the learnt parts
def _training_set(n=60, dim=3, images=12, seed=1):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim)) + np.where(rng.random((n, 1)) < 0.5, 2.0, -2.0)
    return features, rng.integers(0, images, size=n)


@pytest.mark.parametrize("residual_normalisation", [True, False])
def test_lcs_basis_is_the_eigendecomposition_of_each_word_residual_covariance(residual_normalisation):
    features, _ = _training_set()
    codebook = np.array([[2.0, 2.0, 2.0], [-2.0, -2.0, -2.0]])
    bases = fit_local_coordinate_systems(features, codebook, residual_normalisation)
    assert bases.shape == (2, 3, 3)
    words = np.argmin(((features[:, None] - codebook[None]) ** 2).sum(2), axis=1)
    for word in range(2):
        r = features[words == word] - codebook[word]
        if residual_normalisation:
            r = r / np.linalg.norm(r, axis=1, keepdims=True)
        values, vectors = np.linalg.eigh(np.cov(r.T))
        expected = vectors[:, ::-1].T  # rows, by decreasing variance
        # the same axes (an eigenvector's sign is free)
        np.testing.assert_allclose(np.abs(bases[word] @ expected.T), np.eye(3), atol=1e-5)
        np.testing.assert_allclose(bases[word] @ bases[word].T, np.eye(3), atol=1e-5)


def test_pca_rotation_is_the_eigendecomposition_of_the_vectors_covariance():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(5, 8)) * np.arange(8, 0, -1)  # fewer vectors than dimensions
    mean, axes = fit_pca_rotation(vectors)
    np.testing.assert_allclose(mean, vectors.mean(0), atol=1e-6)
    assert axes.shape == (4, 8)  # the rank of 5 centred vectors
    values, eigenvectors = np.linalg.eigh(np.cov(vectors.T))
    np.testing.assert_allclose(np.abs(axes @ eigenvectors[:, ::-1][:, :4]), np.eye(4), atol=1e-5)


def test_fit_vocabulary_fits_the_pca_on_the_training_vlad_vectors():
    features, owner = _training_set()
    vocabulary = fit_vocabulary(features, owner, 12, k=2)
    x = F.normalize(t(features), dim=1)
    np.testing.assert_allclose(vocabulary.codebook, fit_codebook(features, k=2), atol=1e-6)
    np.testing.assert_allclose(vocabulary.lcs, fit_local_coordinate_systems(x, vocabulary.codebook), atol=1e-5)
    training = vlad(x, torch.as_tensor(owner), 12, t(vocabulary.codebook), power=0.5, intra=False,
                    residual_normalisation=True, lcs=t(vocabulary.lcs))
    mean, axes = fit_pca_rotation(training[np.bincount(owner, minlength=12) > 0])
    np.testing.assert_allclose(vocabulary.pca_mean, mean, atol=1e-5)
    np.testing.assert_allclose(np.abs(vocabulary.pca_axes @ axes.T), np.eye(len(axes)), atol=1e-4)
    assert vocabulary.fitted_with == dict(residual_normalisation=True, local_coordinate_system=True, power=0.5,
                                          intra=False)


def test_vocabulary_save_load_round_trip_and_the_old_codebook_file(tmp_path):
    features, owner = _training_set()
    vocabulary = fit_vocabulary(features, owner, k=2)
    path = vocabulary.save(tmp_path / "vocabulary")
    assert path.name == "vocabulary.npz"
    loaded = VladVocabulary.load(path)
    for name in ("codebook", "lcs", "pca_mean", "pca_axes"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(vocabulary, name))
    assert loaded.fitted_with == vocabulary.fitted_with
    bare = fit_vocabulary(features, owner, k=2, local_coordinate_system=False, pca_rotation=False)
    reloaded = VladVocabulary.load(bare.save(tmp_path / "bare.npz"))
    assert reloaded.lcs is None and reloaded.pca_axes is None
    np.save(tmp_path / "codebook.npy", vocabulary.codebook)  # a vocabulary-only file, as before
    old = VladVocabulary.load(tmp_path / "codebook.npy")
    np.testing.assert_array_equal(old.codebook, vocabulary.codebook)
    assert old.lcs is None and old.pca_axes is None and old.fitted_with == {}


# ---------------------------------------------------------------- the network
def _dasr():
    from instsearch.networks.dasr import DASR

    torch.manual_seed(0)
    return DASR(backbone="small", long_side=96, describe_layer="conv5.0").eval()


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, 72, 96, generator=g) * 0.2
    image[:, 20:50, 30:70] += 0.7
    return image.clamp(0, 1)


def test_dasr_vlad_uses_the_vocabulary_file_and_checks_its_options(tmp_path):
    dasr = _dasr()
    rng = np.random.default_rng(3)
    features = rng.normal(size=(200, dasr.feature_dim)) + np.repeat(rng.normal(size=(4, dasr.feature_dim)) * 3, 50, 0)
    path = fit_vocabulary(features, np.arange(200) % 40, k=4).save(tmp_path / "v.npz")
    net = DASRVLAD(dasr, str(path)).eval()
    assert net.lcs.shape == (4, dasr.feature_dim, dasr.feature_dim)
    assert net.feature_dim == len(VladVocabulary.load(path).pca_axes) <= 39
    images = [_image(0), _image(1)]
    with torch.no_grad():
        together = [r.features for r in net.detect_regions(images)]
        apart = [net.detect_regions([im])[0].features for im in images]
        (query,) = net.describe_boxes([images[0]], [torch.tensor([[0.0, 0.0, 96.0, 72.0]])])
    for a, b in zip(together, apart):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # one batch = image by image
    torch.testing.assert_close(query, together[0], rtol=1e-4, atol=1e-5)
    assert DASRVLAD(dasr, str(path), pca_dim=5).feature_dim == 5
    plain = DASRVLAD(dasr, str(path), local_coordinate_system=False, pca_rotation=False)
    assert plain.feature_dim == 4 * dasr.feature_dim
    with pytest.raises(ValueError, match="intra=False there, True here"):
        DASRVLAD(dasr, str(path), intra=True)
    with pytest.raises(ValueError, match="residual_normalisation"):
        DASRVLAD(dasr, str(path), residual_normalisation=False, pca_rotation=False)
    with pytest.raises(ValueError, match="pca_dim"):
        DASRVLAD(dasr, str(path), pca_dim=10_000)
    # a vocabulary-only .npy: no LCS nor PCA unless asked for (then refused by name)
    np.save(tmp_path / "words.npy", VladVocabulary.load(path).codebook)
    old = DASRVLAD(dasr, str(tmp_path / "words.npy"), **{k: v for k, v in VLAD_INTRA_NORMALISATION.items()
                                                         if k not in ("local_coordinate_system", "pca_rotation")})
    assert old.lcs is None and old.pca_axes is None and old.feature_dim == 4 * dasr.feature_dim
    with pytest.raises(ValueError, match="no LCS rotations in .*words.npy"):
        DASRVLAD(dasr, str(tmp_path / "words.npy"), local_coordinate_system=True)


# ---------------------------------------------------------------- the command line and the config
def test_the_command_line_fits_a_vocabulary_the_holidays_config_searches_with(tmp_path, small_benchmark, capsys):
    from config_runs import CONFIGS, load_config, run_shipped_config
    from instsearch.vlad_vocabulary import main

    shipped = load_config(CONFIGS / "dasr_holidays.yaml")
    net = shipped["model"]["init_args"]["net"]["init_args"]
    assert shipped["model"]["init_args"]["retrieval"]["whitening"] is False
    assert {k: net[k] for k in VLAD_STAR} == VLAD_STAR
    out = tmp_path / "vlad_star.npz"
    assert main(["--benchmark", str(small_benchmark), "--out", str(out), "--backbone", "small",
                 "--long-side", "96", "--max-images", "8"]) == 0
    vocabulary = VladVocabulary.load(out)
    assert vocabulary.lcs.shape[0] == 4 and vocabulary.pca_axes.shape[0] <= 7
    capsys.readouterr()
    dasr = dict(net["dasr"], init_args=dict(net["dasr"]["init_args"], backbone="small", long_side=96,
                                            strategy="sequential", chunk_size=None))
    metrics, run = run_shipped_config("dasr_holidays", tmp_path, small_benchmark, capsys,
                                      dict(dasr=dasr, codebook=str(out)))
    assert metrics["num_queries"] == 4 and 0.0 <= metrics["mAP@all"] <= 1.0
    assert set(run["rankings"]) == {q["id"] for q in json.loads(small_benchmark.read_text())["queries"]}
