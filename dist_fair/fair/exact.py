"""Exact fair assignment by network simplex (POT's ``ot.emd``), for moderate sizes (METHODS.md §6).

- Fixed targets (eps = 0, or explicit targets): the problem splits into T independent
  transportation problems. Group t: ``|G_t|`` sources of mass 1, K sinks of capacity ``n_tj``, cost
  ``1 - y_ij`` — ``min sum_ij (1 - y_ij) x_ij`` subject to ``sum_j x_ij = 1``,
  ``sum_i x_ij = n_tj``, ``x >= 0``.
- Bounded targets (eps > 0): the min-cost flow with arcs ``(t, j) -> j`` bounded by
  ``[lower_tj, upper_tj]`` is written as one transportation problem. Cluster j's places split into
  "reserved" sinks ``R_tj`` (capacity ``lower_tj``, group t only) and "optional" sinks ``O_tj``
  (capacity ``upper_tj - lower_tj``, group t); the ``E_j = sum_t upper_tj - |C_j|`` optional places
  that stay empty are filled by a dummy source of cluster j (cost 0, any ``O_tj``). A flow of the
  samples then gives group t between ``lower_tj`` and ``upper_tj`` members of cluster j and cluster
  j exactly ``|C_j|``, and every such assignment extends to a flow: the two problems have the same
  optimum.

Arcs outside a sample's candidates (top-m) cost ``BIG > N`` (more than any feasible solution), so
they are used only when the sparse problem is infeasible, which is then reported. The plan is a
dense ``(sources x sinks)`` float64 matrix: memory ``8 N K`` bytes (``16 N K`` when eps > 0).
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

#: network simplex iteration cap (POT's default of 100000 is far too small for 10^5 samples).
NUM_ITER_MAX = 10**9


@dataclass
class ExactSolution:
    labels: np.ndarray
    objective: float
    seconds: float


def _emd(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> np.ndarray:
    import ot

    plan, log = ot.emd(a, b, cost, numItermax=NUM_ITER_MAX, log=True)
    if log.get("warning"):
        raise DistFairError(f"network simplex (ot.emd) did not finish: {log['warning']}")
    return plan


def _sample_costs(cands: Candidates, rows: np.ndarray, big: float) -> np.ndarray:
    """Dense ``(len(rows), K)`` costs ``1 - y`` with ``big`` on non-candidate arcs."""
    k = cands.n_clusters
    if cands.dense:
        return 1.0 - cands.value[rows].astype(np.float64)
    cost = np.full((len(rows), k), big)
    np.put_along_axis(cost, cands.index[rows].astype(np.int64), 1.0 - cands.value[rows].astype(np.float64), axis=1)
    return cost


def solve_exact(cands: Candidates, groups: np.ndarray, targets: FairTargets) -> ExactSolution:
    """Optimal integral fair assignment by network simplex (see the module docstring).

    Raises:
        InfeasibleError: the candidate arcs cannot meet the targets.
    """
    start = time.perf_counter()
    n, k, t_count = cands.num_samples, targets.n_clusters, targets.n_groups
    big = 2.0 * (n + 1)
    labels = np.full(n, -1, dtype=np.int64)
    if targets.fixed:
        for t in range(t_count):
            rows = np.flatnonzero(groups == t)
            sinks = np.flatnonzero(targets.lower[t] > 0)
            cost = np.ascontiguousarray(_sample_costs(cands, rows, big)[:, sinks])
            plan = _emd(np.ones(len(rows)), targets.lower[t, sinks].astype(np.float64), cost)
            pick = np.argmax(plan, axis=1)
            if (cost[np.arange(len(rows)), pick] >= big).any():
                raise InfeasibleError(f"group {t}: its samples' candidate clusters (top_m) cannot meet the "
                                      f"targets; increase top_m or allow eps > 0")
            labels[rows] = sinks[pick]
    else:
        lower, upper = targets.lower, targets.upper
        reserved = np.flatnonzero(lower.ravel() > 0)
        optional = np.flatnonzero((upper - lower).ravel() > 0)
        sink_cell = np.concatenate([reserved, optional])
        sink_cap = np.concatenate([lower.ravel()[reserved], (upper - lower).ravel()[optional]]).astype(np.float64)
        is_optional = np.concatenate([np.zeros(len(reserved), bool), np.ones(len(optional), bool)])
        spare = upper.sum(axis=0) - targets.cluster_sizes  # E_j, >= 0 for feasible bounds
        dummy_clusters = np.flatnonzero(spare > 0)
        cost = np.full((n + len(dummy_clusters), len(sink_cell)), big)
        sink_group, sink_cluster = sink_cell // k, sink_cell % k
        sample_cost = _sample_costs(cands, np.arange(n), big)
        for s in range(len(sink_cell)):
            members = groups == sink_group[s]
            cost[:n, s] = np.where(members, sample_cost[:, sink_cluster[s]], big)
        for d, j in enumerate(dummy_clusters):
            cost[n + d, is_optional & (sink_cluster == j)] = 0.0
        supply = np.concatenate([np.ones(n), spare[dummy_clusters].astype(np.float64)])
        plan = _emd(supply, sink_cap, cost)
        pick = np.argmax(plan[:n], axis=1)
        used = plan > 1e-9
        if (cost[used] >= big).any():
            raise InfeasibleError("the candidate clusters (top_m) cannot meet the flexible fairness bounds; "
                                  "increase top_m or eps")
        labels = sink_cluster[pick].astype(np.int64)
    objective = float((1.0 - cands.value_of(labels)).sum())
    return ExactSolution(labels, objective, time.perf_counter() - start)
