"""The clustering methods face users run today, behind one signature (baselines for METHODS.md §9).

Every wrapper takes the embeddings first and its hyper-parameters as keywords, and returns one
cluster label per sample (int64, ``0..C-1`` in order of first appearance, every sample labelled):

- :func:`chinese_whispers`: dlib's ``chinese_whispers_clustering(descriptors, threshold)`` on
  ``dlib.vector`` descriptors, exactly as face_recognition users call it: an edge joins samples
  ``i <= j`` with Euclidean distance ``||x_i - x_j|| < threshold`` (self-edges included), then
  Chinese whispers label propagation (dlib's fixed random seed, so it is deterministic).
  :func:`chinese_whispers_knn` is the same on a kNN graph (METHODS.md §3) instead of all pairs:
  ``dlib.chinese_whispers(edges)`` with the unordered pairs ``{i, nbrs[i, j]}`` whose unit-vector
  distance ``sqrt(2 - 2 s_ij) < threshold`` (plus every self-edge), O(N k) instead of O(N^2); with
  every sample's full neighbour list it is the same edge set as :func:`chinese_whispers` on the
  L2-normalised vectors, hence the same partition.
- :func:`hdbscan`: scikit-learn's ``HDBSCAN``. ``metric="cosine"`` (default) runs it on the cosine
  distance ``d = 1 - x_i.x_j / (|x_i| |x_j|)`` (brute force, O(N^2) memory);
  ``metric="unit_euclidean"`` on the Euclidean distance of the L2-normalised rows,
  ``sqrt(2 d)``: a monotone transform of the cosine distance, so the minimum spanning tree of the
  mutual reachability distances and the merge order are the same, but the density levels
  ``lambda = 1 / d`` differ, so the excess-of-mass selection (and ``cluster_selection_epsilon``,
  in the metric's units) may pick other clusters; it uses trees and scales further. HDBSCAN's
  noise label ``-1`` becomes one singleton cluster per noise sample (METHODS.md §7), never one
  cluster of all noise. scikit-learn 1.9 with NumPy 2 fails with ``cluster_selection_epsilon > 0``
  when the condensed tree has tied distances (scikit-learn issue #33219, fixed upstream by indexing
  a size-1 array); the wrapper turns that crash into a :class:`DataError` saying so.
- :func:`agglomerative_cosine`: scikit-learn's ``AgglomerativeClustering(metric="cosine",
  linkage="average", distance_threshold=t, n_clusters=None)``: clusters merged while their average
  cosine distance is below ``t``. :func:`agglomerative_cosine_cuts` gives the same partitions for
  many thresholds from one SciPy average-linkage tree (average linkage has no inversions, so the
  cut at ``t`` keeps exactly the merges at distance ``< t``), for choosing ``t`` on validation.

:func:`choose_params` picks the hyper-parameters of any of these by pairwise F (METHODS.md §7) on
labelled validation samples. dlib, scikit-learn and SciPy are imported only when used.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from dist_fair.errors import ConfigError, DataError

LOG = logging.getLogger(__name__)

HDBSCAN_METRICS = ("cosine", "unit_euclidean")
HDBSCAN_SELECTION = ("eom", "leaf")


# ----------------------------------------------------------------------------- input checks and labels

def check_embeddings(emb: Any, name: str = "emb") -> np.ndarray:
    """``emb`` as a float64 (N x d) array, N >= 1, d >= 1, every value finite; else :class:`DataError`
    naming the first bad row."""
    arr = np.asarray(emb)
    if arr.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array (samples x dims), got shape {arr.shape}; pass one "
                        "embedding row per sample (reshape a single vector with x[None, :])")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DataError(f"{name}: shape {arr.shape} has no samples or no dimensions; pass at least one row "
                        "with at least one value")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{name}: embeddings must be numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{name}: {bad.size} rows hold NaN or Inf (first rows {bad[:5].tolist()}); drop or "
                        "re-embed those samples before clustering")
    return arr


def l2_normalise(emb: np.ndarray, name: str = "emb") -> np.ndarray:
    """Rows divided by their L2 norm; a zero row raises :class:`DataError` (it has no direction)."""
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    zero = norms[:, 0] <= 0
    if zero.any():
        bad = np.flatnonzero(zero)
        raise DataError(f"{name}: {bad.size} rows are all zeros (first rows {bad[:5].tolist()}); a cosine "
                        "distance needs a direction - drop those samples")
    return emb / norms


def canonical_labels(labels: Any) -> np.ndarray:
    """Relabel to ``0..C-1`` in order of first appearance; every negative label (a noise label such
    as HDBSCAN's ``-1``) becomes its own singleton cluster, numbered in the same order.

    Two labellings are the same partition iff their canonical labels are equal.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    noise = labels < 0
    # every noise sample gets a value that no other sample has: above the largest real label
    top = int(labels[~noise].max()) + 1 if (~noise).any() else 0
    keyed = labels.copy()
    keyed[noise] = top + np.arange(int(noise.sum()), dtype=np.int64)
    _, first, inverse = np.unique(keyed, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size, dtype=np.int64)
    return rank[inverse.ravel()]


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value}")
    return value


# ----------------------------------------------------------------------------- dlib: Chinese whispers

def _dlib() -> Any:
    try:
        import dlib
    except ImportError as err:  # pragma: no cover - dlib-bin is in requirements.txt
        raise ConfigError("Chinese whispers needs dlib: pip install dlib-bin (the 'faces' extra)") from err
    return dlib


def chinese_whispers(emb: Any, threshold: float = 0.6, *, normalise: bool = False) -> np.ndarray:
    """dlib's ``chinese_whispers_clustering`` (see the module docstring).

    Args:
        emb: N x d descriptors (dlib's 128-d face descriptors, or any embedding).
        threshold: Euclidean distance below which two samples are joined (dlib's face model: 0.6 on
            its raw descriptors; on L2-normalised vectors ``sqrt(2 - 2 cos)``).
        normalise: L2-normalise the rows first (then ``threshold`` is a unit-vector distance).

    Returns:
        Canonical labels (N,), int64.
    """
    x = check_embeddings(emb)
    threshold = _positive(threshold, "chinese_whispers threshold")
    if normalise:
        x = l2_normalise(x)
    dlib = _dlib()
    descriptors = [dlib.vector(row) for row in x.tolist()]
    return canonical_labels(dlib.chinese_whispers_clustering(descriptors, threshold))


def knn_unit_distance_edges(nbrs: np.ndarray, sims: np.ndarray, threshold: float) -> np.ndarray:
    """The unordered kNN-graph pairs ``(u, v)``, ``u < v``, with ``sqrt(max(0, 2 - 2 s)) < threshold``
    (unit-vector distance from the cosine similarity ``s``), each once, as an (E x 2) int64 array.
    Missing neighbours (-1) and self-pairs are dropped."""
    nbrs = np.asarray(nbrs)
    sims = np.asarray(sims)
    if nbrs.ndim != 2 or nbrs.shape != sims.shape:
        raise DataError(f"nbrs {nbrs.shape} and sims {sims.shape} must be equal 2-D arrays (N x k)")
    if nbrs.dtype.kind not in "iu":
        raise DataError(f"nbrs must hold integer sample ids, got dtype {nbrs.dtype}")
    if not np.isfinite(sims).all():
        bad = np.flatnonzero(~np.isfinite(sims).all(axis=1))
        raise DataError(f"sims: rows {bad[:5].tolist()} hold NaN or Inf; rebuild the kNN graph")
    n = nbrs.shape[0]
    if (nbrs >= n).any():
        raise DataError(f"nbrs holds ids >= N = {n}; the graph and the samples do not match")
    anchors = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], nbrs.shape)
    dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * sims.astype(np.float64)))
    keep = (nbrs >= 0) & (nbrs != anchors) & (dist < threshold)
    u, v = anchors[keep], nbrs[keep].astype(np.int64)
    pairs = np.stack([np.minimum(u, v), np.maximum(u, v)], axis=1)
    return np.unique(pairs, axis=0) if pairs.size else pairs.reshape(0, 2)


def chinese_whispers_knn(nbrs: np.ndarray, sims: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    """Chinese whispers over a kNN graph: ``dlib.chinese_whispers`` on the pairs of
    :func:`knn_unit_distance_edges` plus a self-edge per sample (as ``chinese_whispers_clustering``
    adds them), so isolated samples are singletons.

    Args:
        nbrs, sims: the kNN graph (N x k ids, -1 = missing, and cosine similarities; METHODS.md §3).
        threshold: unit-vector Euclidean distance below which a graph edge is kept.
    """
    threshold = _positive(threshold, "chinese_whispers_knn threshold")
    pairs = knn_unit_distance_edges(nbrs, sims, threshold)
    n = np.asarray(nbrs).shape[0]
    edges = [(i, i) for i in range(n)] + [(int(a), int(b)) for a, b in pairs]
    labels = _dlib().chinese_whispers(edges)
    if len(labels) != n:  # pragma: no cover - every node has its self-edge
        raise DataError(f"dlib returned {len(labels)} labels for {n} samples")
    return canonical_labels(labels)


# ----------------------------------------------------------------------------- scikit-learn: HDBSCAN

def hdbscan(emb: Any, *, min_cluster_size: int = 2, min_samples: int | None = None,
            cluster_selection_epsilon: float = 0.0, cluster_selection_method: str = "eom",
            metric: str = "cosine") -> np.ndarray:
    """scikit-learn HDBSCAN on cosine distance (see the module docstring for ``metric``); noise
    samples (-1) become singletons.

    Args:
        emb: N x d embeddings.
        min_cluster_size: smallest cluster HDBSCAN reports (>= 2).
        min_samples: neighbours in the core distance (default: ``min_cluster_size``).
        cluster_selection_epsilon: clusters closer than this (metric units) are not split.
        cluster_selection_method: ``eom`` (excess of mass) or ``leaf``.
        metric: ``cosine`` or ``unit_euclidean``.
    """
    from sklearn.cluster import HDBSCAN

    x = check_embeddings(emb)
    if metric not in HDBSCAN_METRICS:
        raise ConfigError(f"hdbscan metric {metric!r} is unknown; choose one of {HDBSCAN_METRICS}")
    if cluster_selection_method not in HDBSCAN_SELECTION:
        raise ConfigError(f"hdbscan cluster_selection_method {cluster_selection_method!r} is unknown; choose one of "
                          f"{HDBSCAN_SELECTION}")
    if int(min_cluster_size) < 2:
        raise ConfigError(f"hdbscan min_cluster_size must be >= 2, got {min_cluster_size}")
    if min_samples is not None and int(min_samples) < 1:
        raise ConfigError(f"hdbscan min_samples must be >= 1 or None, got {min_samples}")
    if not cluster_selection_epsilon >= 0:
        raise ConfigError(f"hdbscan cluster_selection_epsilon must be >= 0, got {cluster_selection_epsilon}")
    x = l2_normalise(x)
    if x.shape[0] < 2:
        return np.zeros(x.shape[0], dtype=np.int64)
    model = HDBSCAN(min_cluster_size=int(min_cluster_size),
                    min_samples=None if min_samples is None else int(min_samples),
                    cluster_selection_epsilon=float(cluster_selection_epsilon),
                    cluster_selection_method=cluster_selection_method,
                    metric="cosine" if metric == "cosine" else "euclidean",
                    algorithm="brute" if metric == "cosine" else "auto", copy=True)
    try:
        labels = model.fit_predict(x)
    except TypeError as err:
        if cluster_selection_epsilon > 0 and "0-dimensional" in str(err):
            raise DataError("hdbscan: scikit-learn's epsilon search failed on tied distances in these embeddings "
                            "(scikit-learn issue #33219 with NumPy 2); use cluster_selection_epsilon=0 or "
                            "metric='unit_euclidean', or a scikit-learn release with the fix") from err
        raise
    return canonical_labels(labels)


# ----------------------------------------------------------------------------- average-linkage agglomerative

def agglomerative_cosine(emb: Any, distance_threshold: float = 0.5) -> np.ndarray:
    """scikit-learn average-linkage agglomerative clustering on cosine distance, cut at
    ``distance_threshold`` (merges with average cosine distance ``< distance_threshold``)."""
    from sklearn.cluster import AgglomerativeClustering

    x = l2_normalise(check_embeddings(emb))
    distance_threshold = _positive(distance_threshold, "agglomerative distance_threshold")
    if x.shape[0] < 2:
        return np.zeros(x.shape[0], dtype=np.int64)
    model = AgglomerativeClustering(metric="cosine", linkage="average", distance_threshold=distance_threshold,
                                    n_clusters=None)
    return canonical_labels(model.fit_predict(x))


def agglomerative_cosine_cuts(emb: Any, thresholds: Sequence[float]) -> list[np.ndarray]:
    """The :func:`agglomerative_cosine` partitions for every threshold of ``thresholds``, from one
    SciPy average-linkage tree on cosine distance: the cut at ``t`` keeps the merges with distance
    ``< t`` (``fcluster`` at the largest float below ``t``), as scikit-learn's
    ``distance_threshold`` does."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    x = l2_normalise(check_embeddings(emb))
    cuts = [_positive(t, "agglomerative distance_threshold") for t in thresholds]
    if x.shape[0] < 2:
        return [np.zeros(x.shape[0], dtype=np.int64) for _ in cuts]
    distances = np.maximum(pdist(x, metric="cosine"), 0.0)
    tree = linkage(distances, method="average")
    return [canonical_labels(fcluster(tree, np.nextafter(t, -np.inf), criterion="distance")) for t in cuts]


# ----------------------------------------------------------------------------- choosing hyper-parameters

def choose_params(method: Callable[..., np.ndarray], emb: Any, identity: Any,
                  candidates: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], float, list[dict[str, Any]]]:
    """The candidate keyword set of ``method`` with the best pairwise F (METHODS.md §7) of
    ``method(emb, **params)`` against ``identity`` (validation samples only; ties: the first).

    Returns:
        ``(params, pairwise_f, trials)``, trials = every candidate with its F.
    """
    from dist_fair.eval.metrics import pairwise_fscore

    identity = np.asarray(identity)
    trials: list[dict[str, Any]] = []
    for params in candidates:
        labels = method(emb, **params)
        if labels.shape != identity.shape:
            raise DataError(f"{getattr(method, '__name__', method)} returned {labels.shape[0]} labels for "
                            f"{identity.shape[0]} identities")
        trials.append({"params": dict(params), "pairwise_f": float(pairwise_fscore(identity, labels)[2])})
    if not trials:
        raise ConfigError("choose_params: no candidate parameters given")
    best = max(range(len(trials)), key=lambda i: (trials[i]["pairwise_f"], -i))
    LOG.info("%s: %s chosen (validation pairwise F %.4f of %d candidates)", getattr(method, "__name__", method),
             trials[best]["params"], trials[best]["pairwise_f"], len(trials))
    return trials[best]["params"], trials[best]["pairwise_f"], trials


LIBRARY_CLUSTERERS: dict[str, Callable[..., np.ndarray]] = {
    "chinese_whispers": chinese_whispers,
    "hdbscan": hdbscan,
    "agglomerative": agglomerative_cosine,
}

__all__ = ["HDBSCAN_METRICS", "HDBSCAN_SELECTION", "LIBRARY_CLUSTERERS", "check_embeddings", "l2_normalise",
           "canonical_labels", "chinese_whispers", "knn_unit_distance_edges", "chinese_whispers_knn", "hdbscan",
           "agglomerative_cosine", "agglomerative_cosine_cuts", "choose_params"]
