"""dist_fair.cluster.peak and dist_fair.cluster.edges: the confidence-peak rule and threshold decoding
of edge probabilities against brute-force edge lists and scipy's connected components."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dist_fair.cluster.edges import choose_decoding, decode_edges
from dist_fair.cluster.peak import choose_peak_floor, neighbour_confidence, peak_clusters, peak_edges
from dist_fair.errors import DataError


def random_graph(n: int = 60, k: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    nbrs = np.stack([np.concatenate([[i], rng.choice(np.delete(np.arange(n), i), k - 1, replace=False)])
                     for i in range(n)]).astype(np.int64)
    nbrs[rng.random((n, k)) < 0.1] = -1
    nbrs[:, 0] = np.arange(n)
    probs = rng.random((n, k)).astype(np.float32)
    probs[nbrs < 0] = 0.0
    probs[[4, 9], 1:] = 0.5  # equal confidences: ties broken by id
    return nbrs, probs


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming: a bijection between the labels."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def scipy_labels(n: int, u: list[int], v: list[int]) -> np.ndarray:
    graph = coo_matrix((np.ones(len(u)), (np.array(u, dtype=int), np.array(v, dtype=int))), shape=(n, n))
    return connected_components(graph, directed=True, connection="weak")[1]


def brute_confidence(nbrs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    out = np.zeros(len(nbrs))
    for i in range(len(nbrs)):
        values = [probs[i, j] for j in range(1, nbrs.shape[1]) if nbrs[i, j] >= 0]
        out[i] = np.mean(values) if values else 0.0
    return out


def brute_peak_edges(nbrs, probs, conf, floor):
    u, v = [], []
    for i in range(len(nbrs)):
        for j in range(1, nbrs.shape[1]):
            n = nbrs[i, j]
            if n < 0 or probs[i, j] < floor:
                continue
            if (conf[n], -n) > (conf[i], -i):
                u.append(i)
                v.append(n)
                break
    return u, v


def test_confidence_is_the_mean_over_existing_neighbours():
    nbrs, probs = random_graph()
    assert np.allclose(neighbour_confidence(nbrs, probs, block=7), brute_confidence(nbrs, probs))


@pytest.mark.parametrize("floor", [0.0, 0.3, 0.7, 1.1])
def test_peak_rule_matches_brute_force_and_scipy_components(floor):
    nbrs, probs = random_graph(seed=1)
    conf = neighbour_confidence(nbrs, probs)
    u, v = peak_edges(nbrs, probs, conf, floor)
    bu, bv = brute_peak_edges(nbrs, probs, conf, floor)
    assert sorted(zip(u.tolist(), v.tolist())) == sorted(zip(bu, bv))
    assert len(set(u.tolist())) == len(u)  # at most one link per node
    assert all((conf[b], -b) > (conf[a], -a) for a, b in zip(u, v))  # always up the order: a forest
    labels = peak_clusters(nbrs, probs, conf, floor, block=9)
    assert same_partition(labels, scipy_labels(len(nbrs), bu, bv))
    assert labels.max() + 1 == len(nbrs) - len(bu)  # a forest: one cluster per peak


@pytest.mark.parametrize("tau", [0.2, 0.5, 0.9])
def test_threshold_decoding_of_probabilities_matches_scipy(tau):
    nbrs, probs = random_graph(seed=2)
    labels = decode_edges(nbrs, probs, "threshold", tau)
    u = [i for i in range(len(nbrs)) for j in range(1, nbrs.shape[1]) if nbrs[i, j] >= 0 and probs[i, j] > tau]
    v = [nbrs[i, j] for i in range(len(nbrs)) for j in range(1, nbrs.shape[1]) if nbrs[i, j] >= 0 and probs[i, j] > tau]
    assert same_partition(labels, scipy_labels(len(nbrs), u, v))
    peak = decode_edges(nbrs, probs, "peak", tau)
    assert same_partition(peak, peak_clusters(nbrs, probs, neighbour_confidence(nbrs, probs), tau))


def two_blobs_with_a_bridge():
    """Identities 0 (nodes 0..4) and 1 (5..9): strong edges inside; one strong wrong edge 4 -> 5."""
    n, k = 10, 5
    nbrs = np.full((n, k), -1, np.int64)
    probs = np.zeros((n, k), np.float32)
    for i in range(n):
        group = range(0, 5) if i < 5 else range(5, 10)
        others = [j for j in group if j != i]
        nbrs[i, 0], probs[i, 0] = i, 1.0
        nbrs[i, 1:5] = others
        probs[i, 1:5] = 0.9
    nbrs[4, 4], probs[4, 4] = 5, 0.95  # the bridge
    identity = np.repeat([0, 1], 5)
    return nbrs, probs, identity


def test_choices_use_only_the_validation_samples():
    nbrs, probs, identity = two_blobs_with_a_bridge()
    val = np.zeros(10, bool)
    val[[0, 1, 2, 5, 6, 7]] = True
    poisoned = identity.copy()
    poisoned[~val] = 99  # test labels changed: the choices must not move
    for context in ("isolated", "graph"):
        for method in ("threshold", "peak"):
            a = choose_decoding(nbrs, probs, identity, val, [0.5, 0.92, 0.97], method, context)
            b = choose_decoding(nbrs, probs, poisoned, val, [0.5, 0.92, 0.97], method, context)
            assert a.tau == b.tau and a.val_fscore == b.val_fscore
    # isolated: the validation samples never see the bridge (nodes 4, 5 are not both validation)
    isolated = choose_decoding(nbrs, probs, identity, val, [0.5, 0.92, 0.97], "threshold", "isolated")
    assert isolated.tau == 0.5 and isolated.val_fscore == 1.0
    # whole graph: at 0.5 the bridge 4 -> 5 (outside the validation samples) merges both identities
    graph = choose_decoding(nbrs, probs, identity, val, [0.5, 0.92, 0.97], "threshold", "graph")
    assert graph.grid[0]["val_pairwise_f"] < 1.0
    assert choose_peak_floor(nbrs, probs, neighbour_confidence(nbrs, probs), identity, val, [0.5]).tau == 0.5


def test_bad_inputs_are_named():
    nbrs, probs = random_graph()
    with pytest.raises(DataError, match="confidence"):
        peak_clusters(nbrs, probs, np.zeros(3), 0.5)
    with pytest.raises(DataError, match="decoding method"):
        decode_edges(nbrs, probs, "spectral", 0.5)
    with pytest.raises(DataError, match="validation context"):
        choose_decoding(nbrs, probs, np.zeros(len(nbrs), int), np.ones(len(nbrs), bool), [0.5], context="test")
