"""Re-rankers over a shortlist, each against a hand computation on a 2-D case.

Query q = (1, 0); three images, best first: b0 = (1, 0), b1 = (0.6, 0.8), b2 = (0, 1), scores
1, 0.6, 0. Image 1 also holds a weaker region (0, -1), which must never be its best."""
from __future__ import annotations

import numpy as np
import pytest

from instsearch.eval.rerank import (AlphaQueryExpansion, AverageQueryExpansion, DatabaseAugmentation, Diffusion,
                                    Reranker, Shortlist, build_reranker, rerank_order)


@pytest.fixture
def shortlist() -> Shortlist:
    features = np.array([[1, 0], [0.6, 0.8], [0, -1], [0, 1]], np.float32)
    return Shortlist(query=np.array([1, 0], np.float32), scores=np.array([1, 0.6, 0], np.float32),
                     features=features, owner=np.array([0, 1, 1, 2]))


def test_best_regions_are_the_ones_that_ranked_each_image(shortlist):
    np.testing.assert_allclose(shortlist.best_regions(), [[1, 0], [0.6, 0.8], [0, 1]])
    np.testing.assert_allclose(shortlist.image_scores(np.array([0, 1], np.float32)), [0, 0.8, 1])


def test_average_query_expansion_by_hand(shortlist):
    # k = 2: q' = unit(q + b0 + b1) = unit(2.6, 0.8) = (0.95578, 0.29409)
    got = AverageQueryExpansion(k=2).rerank(shortlist)
    np.testing.assert_allclose(got, [0.95578, 0.6 * 0.95578 + 0.8 * 0.29409, 0.29409], atol=1e-4)
    # k = 1 adds b0 = q: nothing moves
    np.testing.assert_allclose(AverageQueryExpansion(k=1).rerank(shortlist), [1, 0.6, 0], atol=1e-6)


def test_alpha_query_expansion_by_hand(shortlist):
    # weights 1^3, 0.6^3 = 0.216: q' = unit(2.1296, 0.1728) = (0.99672, 0.08088)
    got = AlphaQueryExpansion(k=2, alpha=3).rerank(shortlist)
    np.testing.assert_allclose(got, [0.99672, 0.66273, 0.08088], atol=1e-4)


def test_database_augmentation_by_hand(shortlist):
    # k = 1, alpha = 1: nearest of b0 is b1 (0.6), of b1 is b2 (0.8), of b2 is b1 (0.8)
    # b0' = unit(1.36, 0.48) = (0.94299, .), b1' = unit(0.6, 1.6) = (0.35112, .), b2' = unit(0.48, 1.64) = (0.28090, .)
    got = DatabaseAugmentation(k=1, alpha=1).rerank(shortlist)
    np.testing.assert_allclose(got, [0.94299, 0.35112, 0.28090], atol=1e-4)


def test_diffusion_by_hand(shortlist):
    """k = 2 (every pair mutual), gamma = 1, alpha = 0.5: W = [[0, .6, 0], [.6, 0, .8], [0, .8, 0]],
    degrees (.6, 1.4, .8), S01 = .6 / sqrt(.84) = .654654, S12 = .8 / sqrt(1.12) = .755929;
    y = (1, .6, 0); (I - S/2) f = y gives f1 = .927327 / .75 = 1.236436, f0 = 1 + .327327 f1,
    f2 = .377964 f1."""
    got = Diffusion(k=2, alpha=0.5, gamma=1).rerank(shortlist)
    np.testing.assert_allclose(got, [1.404721, 1.236436, 0.467329], atol=1e-5)
    # k = 1: only images 1 and 2 are mutual neighbours, and the walk starts at image 0 alone
    np.testing.assert_allclose(Diffusion(k=1, alpha=0.5, gamma=1).rerank(shortlist), [1, 0, 0], atol=1e-6)


def test_order_breaks_ties_by_the_first_search(shortlist):
    class Flat:
        name = "flat"

        def rerank(self, s):
            return np.array([0.5, 0.9, 0.5], np.float32)

    order, scores = rerank_order(shortlist, Flat())
    assert order.tolist() == [1, 0, 2] and scores.tolist() == pytest.approx([0.9, 0.5, 0.5])
    assert isinstance(Flat(), Reranker)


def test_rerankers_are_built_from_specs():
    assert build_reranker({"type": "alpha_qe", "k": 3, "alpha": 2}) == AlphaQueryExpansion(k=3, alpha=2)
    assert build_reranker({"type": "diffusion", "name": "diff10", "k": 10}).name == "diff10"
    with pytest.raises(ValueError, match="reranker type must be one of aqe, alpha_qe, dba, diffusion"):
        build_reranker({"type": "magic"})
