"""The fair assignment as one linear program solved by HiGHS (the dissertation's approach, §6.4).

Variables ``x_ij >= 0`` for every candidate arc (all K clusters when dense, the top-m otherwise);
cost ``1 - y_ij`` (dissertation eq 6.8: ``sum_i (1 - y_i . y_hat_i)``). Constraints:

- eq 6.11: ``sum_j x_ij = 1`` for every sample i;
- fixed targets (eps = 0 or explicit targets; ``lower == upper == n``):
  ``sum_{i in G_t} x_ij = n_tj`` for every (t, j) — the column sums ``|C_j|`` (eq 6.10) follow;
- flexible targets (eps > 0): ``sum_i x_ij = |C_j|`` (eq 6.10) and
  ``lower_tj <= sum_{i in G_t} x_ij <= upper_tj``.

The constraint matrix is totally unimodular (dissertation Theorem 6.4.2), so a simplex vertex is
integral. This is the reference every solver in :mod:`dist_fair.fair` is tested against, on the
same targets (:mod:`dist_fair.fair.targets`) and the same candidate arcs. Memory is O(N m); use it
for up to ~10^5 samples x 10 clusters.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from dist_fair.errors import DistFairError, InfeasibleError
from dist_fair.fair.candidates import Candidates
from dist_fair.fair.targets import FairTargets

LOG = logging.getLogger(__name__)


@dataclass
class LPSolution:
    labels: np.ndarray
    objective: float
    seconds: float
    max_fraction: float  # largest distance of an x_ij from an integer (0 for a vertex)


def build_lp(cands: Candidates, groups: np.ndarray, targets: FairTargets):
    """Return ``(c, A_eq, b_eq, A_ub, b_ub)`` of the fair-assignment LP (scipy sparse matrices).

    Variable ``i * m + col`` is the arc from sample i to its candidate column ``col``.
    """
    import scipy.sparse as sp

    n, m = cands.num_samples, cands.width
    t_count, k = targets.n_groups, targets.n_clusters
    clusters = np.asarray(cands.clusters(), dtype=np.int64).ravel()
    var = np.arange(n * m)
    rows = np.repeat(np.arange(n), m)
    cell = groups[rows] * k + clusters
    cost = 1.0 - cands.value.astype(np.float64).ravel()
    a_samples = sp.csr_matrix((np.ones(n * m), (rows, var)), shape=(n, n * m))
    a_cells = sp.csr_matrix((np.ones(n * m), (cell, var)), shape=(t_count * k, n * m))
    if targets.fixed:
        a_eq = sp.vstack([a_samples, a_cells]).tocsr()
        b_eq = np.concatenate([np.ones(n), targets.lower.ravel().astype(np.float64)])
        return cost, a_eq, b_eq, None, None
    a_clusters = sp.csr_matrix((np.ones(n * m), (clusters, var)), shape=(k, n * m))
    a_eq = sp.vstack([a_samples, a_clusters]).tocsr()
    b_eq = np.concatenate([np.ones(n), targets.cluster_sizes.astype(np.float64)])
    a_ub = sp.vstack([a_cells, -a_cells]).tocsr()
    b_ub = np.concatenate([targets.upper.ravel(), -targets.lower.ravel()]).astype(np.float64)
    return cost, a_eq, b_eq, a_ub, b_ub


def solve_lp(cands: Candidates, groups: np.ndarray, targets: FairTargets, method: str = "highs") -> LPSolution:
    """Solve the fair-assignment LP with ``scipy.optimize.linprog`` and read the labels off x.

    Raises:
        InfeasibleError: no assignment over the candidate arcs meets the targets.
    """
    from scipy.optimize import linprog

    start = time.perf_counter()
    cost, a_eq, b_eq, a_ub, b_ub = build_lp(cands, groups, targets)
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method=method)
    seconds = time.perf_counter() - start
    if res.status == 2:
        raise InfeasibleError("fair assignment LP is infeasible: the candidate arcs (top_m) cannot meet the "
                              "fairness targets; increase top_m (or pass all clusters) or allow a larger eps")
    if res.status != 0:
        raise DistFairError(f"HiGHS did not solve the fair assignment LP: {res.message}")
    x = res.x.reshape(cands.num_samples, cands.width)
    frac = float(np.abs(x - np.round(x)).max())
    if frac > 1e-6:
        LOG.warning("LP solution is not integral (max fractional part %.3g); rounding by argmax", frac)
    col = np.argmax(x, axis=1)
    labels = np.asarray(cands.clusters(), dtype=np.int64)[np.arange(cands.num_samples), col]
    return LPSolution(labels, float(res.fun), seconds, frac)
