"""Quality of an approximate kNN graph against exact search (METHODS.md §3); pure functions.

- ``recall@k = (1 / m) sum_i |A_i ∩ E_i| / k`` over ``m`` sampled queries, with ``A_i`` the
  approximate and ``E_i`` the exact top-k of query ``i`` (both include the query itself at
  position 0, as the graph does).
- same-identity recall: ``sum_i |A_i ∩ S_i| / sum_i |S_i|`` with ``S_i = {j in E_i, j != i,
  identity_j = identity_i}`` (queries and neighbours of unknown identity, ``-1``, are left out):
  of the neighbours in a sample's exact top-k that share its identity, the fraction the
  approximate graph found, pooled over the sampled queries.
"""
from __future__ import annotations

import numpy as np

from dist_fair.errors import DataError


def sample_query_ids(num_samples: int, sample: int, seed: int = 0) -> np.ndarray:
    """``min(sample, N)`` distinct ids drawn uniformly without replacement, sorted."""
    m = int(min(max(sample, 0), num_samples))
    if m == num_samples:
        return np.arange(num_samples, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_samples, size=m, replace=False)).astype(np.int64)


def _check(approx: np.ndarray, exact: np.ndarray) -> None:
    if approx.shape != exact.shape or approx.ndim != 2:
        raise DataError(f"approximate neighbours {approx.shape} and exact neighbours {exact.shape} must both be "
                        "(queries, k) arrays of the same shape")


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact top-k found in the approximate top-k (ids ``< 0`` ignored)."""
    approx, exact = np.asarray(approx), np.asarray(exact)
    _check(approx, exact)
    if approx.shape[0] == 0:
        return float("nan")
    k = exact.shape[1]
    found = [np.intersect1d(a[a >= 0], e[e >= 0]).size for a, e in zip(approx, exact)]
    return float(np.mean(found) / k)


def same_identity_recall(approx: np.ndarray, exact: np.ndarray, query_ids: np.ndarray,
                         identity: np.ndarray) -> float | None:
    """Pooled fraction of same-identity exact neighbours (self excluded) found by the approximate
    graph; ``None`` when no sampled query has a same-identity exact neighbour (or identities are
    unknown). ``identity`` is indexed by global id."""
    approx, exact = np.asarray(approx), np.asarray(exact)
    _check(approx, exact)
    identity = np.asarray(identity)
    total = found = 0
    for a, e, q in zip(approx, exact, np.asarray(query_ids)):
        own = identity[q]
        if own < 0:
            continue
        e = e[(e >= 0) & (e != q)]
        same = e[identity[e] == own]
        total += same.size
        found += np.intersect1d(same, a[a >= 0]).size
    return None if total == 0 else float(found / total)
