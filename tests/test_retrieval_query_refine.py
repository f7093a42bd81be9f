"""index/query_refine: prototypes, query expansion, k-reciprocal re-ranking and stream mixing."""

from __future__ import annotations

import numpy as np
import pytest

from sept.index.query_refine import (
    class_prototypes,
    cluster_prototypes,
    expand_queries,
    k_reciprocal_rerank,
    kth_neighbour_similarity,
    mix_streams,
)
from sept.index.strategies import fill, instance_streams


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_class_prototypes_are_normalised_class_means():
    xq = _unit([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1], [0, 0.6, 0.8]])
    protos, classes = class_prototypes(xq, [3, 3, 1, 1])
    assert classes.tolist() == [1, 3]
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(protos[1], _unit([xq[0] + xq[1]])[0], rtol=1e-6)
    np.testing.assert_allclose(protos[0], _unit([xq[2] + xq[3]])[0], rtol=1e-6)
    with pytest.raises(ValueError):
        class_prototypes(xq, [0, 1])


def test_cluster_prototypes_find_separated_groups():
    rng = np.random.default_rng(0)
    a = _unit(np.array([1.0, 0, 0, 0]) + 0.05 * rng.standard_normal((10, 4)))
    b = _unit(np.array([0, 0, 1.0, 0]) + 0.05 * rng.standard_normal((6, 4)))
    centroids = cluster_prototypes(np.concatenate([a, b]), 2, seed=3)
    assert centroids.shape == (2, 4)
    nearest = np.sort((centroids @ np.eye(4)[[0, 2]].T).argmax(axis=0))
    assert nearest.tolist() == [0, 1]  # one centroid per group
    # Never more centroids than distinct queries.
    assert cluster_prototypes(np.concatenate([a[:1], a[:1]]), 5).shape == (1, 4)


def test_expand_queries_moves_towards_weighted_neighbours():
    xq = _unit([[1, 0, 0]])
    neighbours = np.asarray([[[0, 1, 0], [0, 0, 1]]], dtype=np.float32)
    scores = np.asarray([[0.5, -0.2]], dtype=np.float32)  # the negative one must not count
    out = expand_queries(xq, neighbours, scores, alpha=1.0)
    np.testing.assert_allclose(out, _unit([[1, 0.5, 0]]), rtol=1e-6)
    # alpha sharpens: a weaker neighbour counts less at higher alpha.
    weak = expand_queries(xq, neighbours, scores, alpha=3.0)
    assert weak[0, 1] < out[0, 1]
    # alpha 0: plain average of the query and its positive neighbours.
    np.testing.assert_allclose(expand_queries(xq, neighbours, scores, alpha=0.0), _unit([[1, 1, 0]]), rtol=1e-6)
    with pytest.raises(ValueError):
        expand_queries(xq, neighbours, scores[:, :1])


def test_k_reciprocal_rerank_puts_reciprocal_candidates_first():
    # Candidate 7 is a hub: similar to the query, but even more so to its own neighbours.
    D = np.asarray([[0.9, 0.8, 0.5, -1.0]], dtype=np.float32)
    I = np.asarray([[7, 3, 5, -1]])
    kth = np.asarray([[0.95, 0.6, 0.4, 0.0]], dtype=np.float32)
    S, J = k_reciprocal_rerank(D, I, kth)
    assert J.tolist() == [[3, 5, 7, -1]]
    np.testing.assert_allclose(S[0, :3], [0.2, 0.1, -0.05], atol=1e-6)
    assert S[0, 3] == -np.inf
    # weight 0 keeps the original order.
    _, J0 = k_reciprocal_rerank(D, I, kth, weight=0.0)
    assert J0.tolist() == I.tolist()
    with pytest.raises(ValueError):
        k_reciprocal_rerank(D, I, kth[:, :2])


def test_kth_neighbour_similarity_skips_self():
    D_self = np.asarray([[1.0, 0.9, 0.7, 0.2], [1.0, 0.3, 0.2, 0.1]], dtype=np.float32)
    np.testing.assert_allclose(kth_neighbour_similarity(D_self, 2), [0.7, 0.2])
    with pytest.raises(ValueError):
        kth_neighbour_similarity(D_self, 4)


def test_mix_streams_shares_the_budget_by_fraction():
    # Two "strategies" proposing disjoint ids, both with more candidates than the budget.
    S = np.tile(np.linspace(1, 0.5, 20, dtype=np.float32), (2, 1))
    a = instance_streams(S[:1], np.arange(20)[None])
    b = instance_streams(S[1:], 100 + np.arange(20)[None])
    mixed = mix_streams([a, b], [3, 1])
    assert sum(st.weight for st in mixed) == pytest.approx(1.0)
    choice = fill(mixed, 12)
    assert int((choice.ids < 100).sum()) == 9 and int((choice.ids >= 100).sum()) == 3
    # A group that runs out leaves its share to the other; duplicates are kept once.
    short = instance_streams(S[:1, :2], np.asarray([[100, 1]]))
    choice = fill(mix_streams([short, b], [0.5, 0.5]), 10)
    assert len(choice) == 10 and len(set(choice.ids.tolist())) == 10
    with pytest.raises(ValueError):
        mix_streams([a], [0.0])
