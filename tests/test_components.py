"""Union-find connected components against scipy's csgraph."""
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components as scipy_components

from dist_fair.cluster.components import UnionFind, connected_components
from dist_fair.errors import DataError


def _same_partition(a, b):
    pairs = np.unique(np.stack([a, b]), axis=1).shape[1]
    return pairs == np.unique(a).size == np.unique(b).size


@pytest.mark.parametrize("n, e, seed", [(1, 0, 0), (10, 0, 0), (10, 5, 1), (500, 400, 2), (5000, 6000, 3),
                                        (20000, 5000, 4)])
def test_matches_scipy(n, e, seed):
    rng = np.random.default_rng(seed)
    u, v = rng.integers(0, n, e), rng.integers(0, n, e)
    ours = connected_components(n, u, v)
    count, theirs = scipy_components(sp.coo_matrix((np.ones(e), (u, v)), shape=(n, n)), directed=False)
    assert ours.max() + 1 == count
    assert _same_partition(ours, theirs)


def test_blocks_equal_one_batch_and_labels_by_smallest_node():
    rng = np.random.default_rng(5)
    u, v = rng.integers(0, 3000, 2500), rng.integers(0, 3000, 2500)
    uf = UnionFind(3000)
    for start in range(0, 2500, 300):
        uf.add_edges(u[start:start + 300], v[start:start + 300])
    assert np.array_equal(uf.labels(), connected_components(3000, u, v))
    chain = connected_components(6, np.array([5, 4, 1]), np.array([4, 3, 0]))
    assert chain.tolist() == [0, 0, 1, 2, 2, 2]


def test_long_path_worst_order():
    n = 5000
    u = np.arange(n - 1)[::-1]
    assert np.all(connected_components(n, u, u + 1) == 0)


def test_bad_edges():
    with pytest.raises(DataError, match="0..9"):
        connected_components(10, np.array([0]), np.array([10]))
    with pytest.raises(DataError, match="length"):
        connected_components(10, np.array([0, 1]), np.array([1]))
