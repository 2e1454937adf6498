"""dist_fair.cluster.library_baselines: each wrapper equals the direct library call (same partition,
compared through canonical labels), noise handling, and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from dist_fair.cluster import library_baselines as lb
from dist_fair.errors import ConfigError, DataError


def blobs(n_per: int = 8, centres: int = 6, dim: int = 16, spread: float = 0.25, seed: int = 0,
          noise_points: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around random unit centres (plus uniform noise points), and their labels."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.repeat(c, n_per, axis=0) + spread * rng.normal(size=(centres * n_per, dim)) / np.sqrt(dim)
    y = np.repeat(np.arange(centres), n_per)
    if noise_points:
        x = np.vstack([x, rng.normal(size=(noise_points, dim))])
        y = np.concatenate([y, centres + np.arange(noise_points)])
    order = rng.permutation(len(y))
    return (x[order] * rng.uniform(0.5, 2.0, size=(len(y), 1))).astype(np.float32), y[order]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(lb.canonical_labels(a), lb.canonical_labels(b))


def brute_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    nbrs = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return nbrs.astype(np.int64), np.take_along_axis(s, nbrs, axis=1)


# ----------------------------------------------------------------------------- canonical labels

def test_canonical_labels_first_appearance_and_noise_singletons():
    got = lb.canonical_labels([7, 7, -1, 3, 7, -1, 3, 9])
    assert got.tolist() == [0, 0, 1, 2, 0, 3, 2, 4]
    assert lb.canonical_labels([-1, -1, -1]).tolist() == [0, 1, 2]
    # a permutation of cluster names is the same partition
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=50)
    perm = rng.permutation(5) + 100
    assert same_partition(labels, perm[labels])
    assert not same_partition(labels, np.where(labels == 0, 1, labels))


# ----------------------------------------------------------------------------- Chinese whispers

@pytest.mark.parametrize("threshold", [0.35, 0.6, 0.9])
def test_chinese_whispers_equals_dlib_call(threshold):
    import dlib

    x, _ = blobs(seed=2)
    direct = dlib.chinese_whispers_clustering([dlib.vector(r.astype(np.float64).tolist()) for r in x], threshold)
    assert same_partition(lb.chinese_whispers(x, threshold), np.asarray(direct))


def test_chinese_whispers_recovers_separated_blobs():
    x, y = blobs(spread=0.1, seed=3)
    assert same_partition(lb.chinese_whispers(x, 0.5, normalise=True), y)


def test_chinese_whispers_normalise_equals_dlib_on_unit_vectors():
    import dlib

    x, _ = blobs(seed=4)
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    direct = dlib.chinese_whispers_clustering([dlib.vector(r.tolist()) for r in u], 0.55)
    assert same_partition(lb.chinese_whispers(x, 0.55, normalise=True), np.asarray(direct))


def test_chinese_whispers_knn_full_graph_equals_all_pairs():
    """With every sample's full neighbour list the kNN edge set is dlib's all-pairs edge set."""
    x, _ = blobs(seed=5)
    nbrs, sims = brute_knn(x, x.shape[0])
    for threshold in (0.3, 0.55, 0.8):
        assert same_partition(lb.chinese_whispers_knn(nbrs, sims, threshold),
                              lb.chinese_whispers(x, threshold, normalise=True))


def test_knn_edges_brute_force_and_isolated_samples_are_singletons():
    x, _ = blobs(seed=6)
    nbrs, sims = brute_knn(x, 5)
    nbrs[0, 1:] = -1  # a missing neighbour is no edge
    pairs = lb.knn_unit_distance_edges(nbrs, sims, 0.5)
    expected = set()
    for i in range(nbrs.shape[0]):
        for j, s in zip(nbrs[i], sims[i]):
            if j >= 0 and j != i and np.sqrt(max(0.0, 2 - 2 * s)) < 0.5:
                expected.add((min(i, j), max(i, j)))
    assert {tuple(p) for p in pairs.tolist()} == expected
    # a tiny threshold: no edge at all -> every sample its own cluster (the last sample included)
    labels = lb.chinese_whispers_knn(nbrs, sims, 1e-9)
    assert labels.tolist() == list(range(x.shape[0]))


# ----------------------------------------------------------------------------- HDBSCAN

@pytest.mark.parametrize("params", [
    {"min_cluster_size": 2},
    {"min_cluster_size": 3, "min_samples": 2, "cluster_selection_method": "leaf"},
    {"min_cluster_size": 2, "min_samples": 1, "cluster_selection_epsilon": 0.05},
])
def test_hdbscan_equals_sklearn_call_with_noise_as_singletons(params):
    from sklearn.cluster import HDBSCAN

    x, _ = blobs(seed=8, spread=0.4, noise_points=10)
    direct = HDBSCAN(metric="cosine", algorithm="brute", copy=True, **params).fit_predict(x)
    got = lb.hdbscan(x, **params)
    assert same_partition(got, direct)  # canonical_labels turns every -1 into its own singleton
    noise = direct == -1
    assert noise.any(), "the fixture should produce noise"
    sizes = np.bincount(got)
    assert (sizes[got[noise]] == 1).all()
    assert np.unique(got[noise]).size == noise.sum()


def test_hdbscan_unit_euclidean_equals_sklearn_on_normalised_rows():
    from sklearn.cluster import HDBSCAN

    x, _ = blobs(seed=8, noise_points=5)
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    direct = HDBSCAN(min_cluster_size=2, metric="euclidean", copy=True).fit_predict(u)
    assert same_partition(lb.hdbscan(x, min_cluster_size=2, metric="unit_euclidean"), direct)


def test_hdbscan_epsilon_on_tied_distances_names_the_sklearn_bug():
    """Duplicated rows (tied distances) with cluster_selection_epsilon > 0: where scikit-learn's own
    call crashes (issue #33219, NumPy 2) the wrapper raises a DataError saying what to do; where
    it works, the wrapper equals it."""
    from sklearn.cluster import HDBSCAN

    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(5, 8)), 6, axis=0) + 0.05 * rng.normal(size=(30, 8))
    x = np.vstack([x, x[:8]])
    params = {"min_cluster_size": 2, "min_samples": 1, "cluster_selection_epsilon": 0.05}
    try:
        direct = HDBSCAN(metric="cosine", algorithm="brute", copy=True, **params).fit_predict(x)
    except TypeError:
        with pytest.raises(DataError, match="33219"):
            lb.hdbscan(x, **params)
    else:
        assert same_partition(lb.hdbscan(x, **params), direct)


def test_hdbscan_noise_is_never_one_cluster():
    """Scored as clusters, raw -1 labels would form one big false cluster; the wrapper's noise
    samples are singletons, so they add no pair (brute-force pair count)."""
    from sklearn.cluster import HDBSCAN

    x, y = blobs(seed=9, spread=0.1, noise_points=12)
    direct = HDBSCAN(min_cluster_size=3, metric="cosine", copy=True).fit_predict(x)
    noise = direct == -1
    assert noise.sum() >= 5
    labels = lb.hdbscan(x, min_cluster_size=3)
    same_pred = labels[:, None] == labels[None, :]
    raw_pred = direct[:, None] == direct[None, :]
    off = ~np.eye(len(y), dtype=bool)
    assert not (same_pred & off)[noise].any()  # a noise sample shares its cluster with nobody
    assert (raw_pred & off).sum() - (same_pred & off).sum() == noise.sum() * (noise.sum() - 1)


# ----------------------------------------------------------------------------- agglomerative

@pytest.mark.parametrize("threshold", [0.05, 0.2, 0.5, 1.0])
def test_agglomerative_equals_sklearn_call(threshold):
    from sklearn.cluster import AgglomerativeClustering

    x, _ = blobs(seed=10)
    direct = AgglomerativeClustering(metric="cosine", linkage="average", distance_threshold=threshold,
                                     n_clusters=None).fit_predict(x)
    assert same_partition(lb.agglomerative_cosine(x, threshold), direct)


def test_agglomerative_cuts_equal_sklearn_for_every_threshold():
    x, _ = blobs(seed=11, centres=8)
    thresholds = [0.02, 0.1, 0.2, 0.35, 0.6, 0.9, 1.2]
    cuts = lb.agglomerative_cosine_cuts(x, thresholds)
    for t, labels in zip(thresholds, cuts):
        assert same_partition(labels, lb.agglomerative_cosine(x, t)), t
    assert [np.unique(c).size for c in cuts] == sorted((np.unique(c).size for c in cuts), reverse=True)


def test_agglomerative_cut_against_brute_force_average_linkage():
    """An independent reference: naive average linkage merging while the closest pair of clusters
    has average cosine distance < t."""
    x, _ = blobs(n_per=4, centres=4, dim=6, seed=12)
    u = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    d = 1.0 - u @ u.T
    for t in (0.1, 0.3, 0.7):
        clusters = [[i] for i in range(len(u))]
        while len(clusters) > 1:
            best, pair = np.inf, None
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    avg = d[np.ix_(clusters[a], clusters[b])].mean()
                    if avg < best:
                        best, pair = avg, (a, b)
            if best >= t:
                break
            a, b = pair
            clusters[a] += clusters.pop(b)
        brute = np.empty(len(u), np.int64)
        for c, members in enumerate(clusters):
            brute[members] = c
        assert same_partition(lb.agglomerative_cosine(x, t), brute), t


# ----------------------------------------------------------------------------- choosing parameters

def test_choose_params_picks_best_validation_f():
    from dist_fair.eval.metrics import pairwise_fscore

    x, y = blobs(seed=13)
    candidates = [{"distance_threshold": t} for t in (0.01, 0.1, 0.3, 0.6, 1.5)]
    params, f, trials = lb.choose_params(lb.agglomerative_cosine, x, y, candidates)
    scores = [pairwise_fscore(y, lb.agglomerative_cosine(x, **c))[2] for c in candidates]
    assert f == pytest.approx(max(scores))
    assert params == candidates[int(np.argmax(scores))]
    assert [t["pairwise_f"] for t in trials] == pytest.approx(scores)
    with pytest.raises(ConfigError):
        lb.choose_params(lb.agglomerative_cosine, x, y, [])


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("method", [
    lambda x: lb.chinese_whispers(x, 0.6),
    lambda x: lb.hdbscan(x),
    lambda x: lb.agglomerative_cosine(x, 0.5),
    lambda x: lb.agglomerative_cosine_cuts(x, [0.5]),
])
def test_bad_embeddings_are_refused_with_the_rows(method):
    x, _ = blobs(seed=14)
    bad = x.copy()
    bad[3, 2] = np.nan
    bad[7, 0] = np.inf
    with pytest.raises(DataError, match=r"2 rows hold NaN or Inf \(first rows \[3, 7\]\)"):
        method(bad)
    with pytest.raises(DataError, match="2-D"):
        method(x[0])
    with pytest.raises(DataError, match="2-D"):
        method(x[None])
    with pytest.raises(DataError, match="no samples or no dimensions"):
        method(np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match="numbers"):
        method(np.array([["a", "b"]]))


@pytest.mark.parametrize("method", [lb.hdbscan, lambda x: lb.agglomerative_cosine(x, 0.5),
                                    lambda x: lb.chinese_whispers(x, 0.5, normalise=True)])
def test_zero_rows_refused_where_a_direction_is_needed(method):
    x, _ = blobs(seed=15)
    x[4] = 0.0
    with pytest.raises(DataError, match=r"all zeros \(first rows \[4\]\)"):
        method(x)


def test_bad_parameters_and_graphs():
    x, _ = blobs(seed=16)
    with pytest.raises(ConfigError, match="threshold"):
        lb.chinese_whispers(x, 0.0)
    with pytest.raises(ConfigError, match="metric"):
        lb.hdbscan(x, metric="manhattan")
    with pytest.raises(ConfigError, match="min_cluster_size"):
        lb.hdbscan(x, min_cluster_size=1)
    with pytest.raises(ConfigError, match="cluster_selection_method"):
        lb.hdbscan(x, cluster_selection_method="best")
    with pytest.raises(ConfigError, match="distance_threshold"):
        lb.agglomerative_cosine(x, float("nan"))
    nbrs, sims = brute_knn(x, 4)
    with pytest.raises(DataError, match="equal 2-D"):
        lb.chinese_whispers_knn(nbrs[:, :3], sims, 0.5)
    bad = sims.copy()
    bad[2, 1] = np.nan
    with pytest.raises(DataError, match=r"rows \[2\]"):
        lb.chinese_whispers_knn(nbrs, bad, 0.5)
    with pytest.raises(DataError, match="ids >= N"):
        lb.chinese_whispers_knn(nbrs + x.shape[0], sims, 0.5)
    with pytest.raises(DataError, match="integer"):
        lb.chinese_whispers_knn(nbrs.astype(np.float32), sims, 0.5)


def test_one_sample_is_one_cluster():
    x = np.ones((1, 3), np.float32)
    assert lb.hdbscan(x).tolist() == [0]
    assert lb.agglomerative_cosine(x, 0.5).tolist() == [0]
    assert lb.chinese_whispers(x, 0.5).tolist() == [0]
