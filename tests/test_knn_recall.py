"""Recall of an approximate kNN graph (dist_fair.knn.recall) against plain-Python set arithmetic."""
from __future__ import annotations

import numpy as np
import pytest

from dist_fair.errors import DataError
from dist_fair.knn.recall import recall_at_k, same_identity_recall, sample_query_ids


def test_sample_query_ids():
    ids = sample_query_ids(1000, 50, seed=1)
    assert ids.size == 50 and np.unique(ids).size == 50 and (np.diff(ids) > 0).all() and ids.max() < 1000
    np.testing.assert_array_equal(ids, sample_query_ids(1000, 50, seed=1))
    np.testing.assert_array_equal(sample_query_ids(7, 50), np.arange(7))
    assert sample_query_ids(10, 0).size == 0


def test_recall_at_k_matches_sets():
    rng = np.random.default_rng(0)
    exact = np.stack([rng.choice(100, 8, replace=False) for _ in range(20)])
    approx = exact.copy()
    approx[:, 5:] = rng.integers(100, 200, size=(20, 3))
    approx[3] = exact[3][::-1]  # order does not matter
    expected = np.mean([len(set(a) & set(e)) / 8 for a, e in zip(approx, exact)])
    assert recall_at_k(approx, exact) == pytest.approx(expected)
    assert recall_at_k(exact, exact) == 1.0
    with pytest.raises(DataError):
        recall_at_k(approx[:, :4], exact)


def test_same_identity_recall_pools_over_queries():
    identity = np.array([0, 0, 0, 1, 1, 2, -1, 0])
    query_ids = np.array([0, 3, 6])
    exact = np.array([[0, 1, 2, 7], [3, 4, 0, 1], [6, 0, 1, 2]])
    approx = np.array([[0, 1, 5, 4], [3, 4, 1, 2], [6, 0, 1, 2]])
    # query 0: same-identity exact neighbours {1, 2, 7}, found {1}; query 3: {4}, found {4};
    # query 6: unknown identity, left out
    assert same_identity_recall(approx, exact, query_ids, identity) == pytest.approx(2 / 4)
    assert same_identity_recall(approx, exact, query_ids, np.full(8, -1)) is None
