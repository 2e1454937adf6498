"""kNN + threshold baseline: edges, clusters against a brute-force reference, validation-only choice."""
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components as scipy_components

from dist_fair.cluster.threshold import choose_threshold, threshold_clusters, threshold_edges
from dist_fair.data.splits import split_identities
from dist_fair.data.synthetic import SyntheticSpec, synthetic_arrays
from dist_fair.errors import DataError


def _knn(X, k):
    sims = X @ X.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_threshold_clusters_match_scipy_on_dense_graph():
    X, ident, _, _ = synthetic_arrays(SyntheticSpec(identities=30, images_per_identity=8, dim=32, seed=0))
    nbrs, sims = _knn(X, 10)
    for tau in (0.3, 0.5, 0.7):
        ours = threshold_clusters(nbrs, sims, tau)
        rows = np.repeat(np.arange(X.shape[0]), 10)
        keep = sims.ravel() > tau
        graph = sp.coo_matrix((np.ones(keep.sum()), (rows[keep], nbrs.ravel()[keep])), shape=(X.shape[0],) * 2)
        count, theirs = scipy_components(graph, directed=False)
        assert ours.max() + 1 == count
        assert np.unique(np.stack([ours, theirs]), axis=1).shape[1] == count


def test_edges_drop_self_and_missing():
    nbrs = np.array([[0, 1, -1], [1, 0, 2], [2, 1, 0]])
    sims = np.array([[1.0, 0.9, 0.95], [1.0, 0.9, 0.2], [1.0, 0.5, 0.1]])
    u, v = threshold_edges(nbrs, sims, 0.4)
    assert sorted(zip(u.tolist(), v.tolist())) == [(0, 1), (1, 0), (2, 1)]
    with pytest.raises(DataError):
        threshold_edges(nbrs, sims[:, :2], 0.4)


def test_choice_uses_only_validation_labels():
    X, ident, _, _ = synthetic_arrays(SyntheticSpec(identities=60, images_per_identity=10, dim=64, seed=1))
    nbrs, sims = _knn(X, 15)
    val = split_identities(ident, 0.3, seed=0)
    assert set(np.unique(ident[val])).isdisjoint(np.unique(ident[~val]))
    grid = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    choice = choose_threshold(nbrs, sims, ident, val, grid)
    scrambled = ident.copy()
    scrambled[~val] = np.random.default_rng(0).permutation(scrambled[~val])  # test labels must not matter
    again = choose_threshold(nbrs, sims, scrambled, val, grid)
    assert choice.tau == again.tau and choice.val_fscore == again.val_fscore
    assert choice.val_fscore > 0.5 and choice.tau in grid


def test_split_needs_identities():
    with pytest.raises(DataError, match="identities"):
        split_identities(np.full(10, -1), 0.2)
