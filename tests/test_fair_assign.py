"""fair_assign (dist_fair.fair.assign) and its solvers against scipy.optimize.linprog(method="highs").

Every solver must return integral labels that meet every constraint exactly, with the objective of
an independently built LP on the same targets and the same candidate arcs (within 1e-6 relative).
The LP reference (METHODS.md §6, decided in dist_fair.fair.targets/lp):
  eps = 0: sum_j x_ij = 1, sum_{i in G_t} x_ij = n_tj (fixed rounded targets);
  eps > 0: sum_j x_ij = 1, sum_i x_ij = |C_j|, lower_tj <= sum_{i in G_t} x_ij <= upper_tj;
over the candidate arcs only (all clusters when dense, the top-m with top_m).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog

from dist_fair.errors import DataError, InfeasibleError
from dist_fair.eval.metrics import balance, fairness
from dist_fair.fair import Candidates, fair_assign, sparse_candidates, top_m_candidates
from dist_fair.fair.assign import _count_matrix
from dist_fair.fair.targets import compute_targets

METHODS = ["auction", "exact", "lp"]


def instance(n: int, k: int, t: int, seed: int, ties: bool = False, dtype=np.float64):
    """Soft assignments whose argmax clusters are dominated by one group each (unfair)."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, k, n)
    groups = np.where(rng.random(n) < 0.6, z % t, rng.integers(0, t, n))
    groups[:t] = np.arange(t)
    if ties:  # many identical rows: one-hot and two-way splits (degenerate LPs)
        probs = np.zeros((n, k))
        probs[np.arange(n), z] = 1.0
        half = rng.random(n) < 0.3
        probs[half] = 0.0
        probs[half, z[half]] = 0.5
        probs[half, (z[half] + 1) % k] = 0.5
    else:
        logits = rng.normal(size=(n, k)) * rng.uniform(0.5, 2.0, (n, 1))
        logits[np.arange(n), z] += rng.uniform(0.0, 4.0, n)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
    return probs.astype(dtype), groups


def targets_of(cands: Candidates, groups: np.ndarray, t: int, eps: float, rho=None):
    before = _count_matrix(groups, cands.argmax(), t, cands.n_clusters)
    return compute_targets(before.sum(0), before.sum(1), before, rho=rho, eps=eps)


def reference_objective(cands: Candidates, groups: np.ndarray, fair) -> float:
    """scipy.optimize.linprog(method="highs") on the fair-assignment LP, built here independently."""
    n, m, k, t = cands.num_samples, cands.width, cands.n_clusters, fair.n_groups
    clusters = np.arange(k)[None, :].repeat(n, 0) if cands.index is None else cands.index.astype(np.int64)
    var = np.arange(n * m)
    row = np.repeat(np.arange(n), m)
    col = clusters.ravel()
    cell = groups[row] * k + col
    ones = np.ones(n * m)
    assign_rows = sp.coo_matrix((ones, (row, var)), shape=(n, n * m))
    cell_rows = sp.coo_matrix((ones, (cell, var)), shape=(t * k, n * m))
    cost = 1.0 - cands.value.astype(np.float64).ravel()
    if fair.fixed:
        res = linprog(cost, A_eq=sp.vstack([assign_rows, cell_rows]),
                      b_eq=np.concatenate([np.ones(n), fair.lower.ravel()]), bounds=(0, None), method="highs")
    else:
        cluster_rows = sp.coo_matrix((ones, (col, var)), shape=(k, n * m))
        res = linprog(cost, A_ub=sp.vstack([cell_rows, -cell_rows]),
                      b_ub=np.concatenate([fair.upper.ravel(), -fair.lower.ravel()]),
                      A_eq=sp.vstack([assign_rows, cluster_rows]),
                      b_eq=np.concatenate([np.ones(n), fair.cluster_sizes]), bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


def check_feasible(labels: np.ndarray, cands: Candidates, groups: np.ndarray, fair) -> float:
    """Integral labels meeting every constraint exactly; returns the objective."""
    assert labels.dtype.kind == "i" and labels.shape == (cands.num_samples,)
    assert labels.min() >= 0 and labels.max() < cands.n_clusters
    counts = _count_matrix(groups, labels, fair.n_groups, fair.n_clusters)
    assert np.array_equal(counts.sum(0), fair.cluster_sizes)
    assert np.all(counts >= fair.lower) and np.all(counts <= fair.upper)
    return float((1.0 - cands.value_of(labels)).sum())


CASES = [  # n, k, t, eps, top_m, ties
    (60, 3, 2, 0.0, None, False),
    (240, 6, 3, 0.0, None, False),
    (240, 6, 3, 0.0, None, True),
    (300, 8, 4, 0.1, None, False),
    (300, 8, 4, 0.25, None, True),
    (400, 12, 3, 0.0, 4, False),
    (400, 12, 3, 0.05, 5, False),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n, k, t, eps, top_m, ties", CASES)
def test_solvers_match_highs_and_meet_every_constraint(method, n, k, t, eps, top_m, ties):
    for seed in range(2):
        probs, groups = instance(n, k, t, seed=seed * 101 + n + k, ties=ties)
        result = fair_assign(probs, groups, eps=eps, method=method, top_m=top_m)
        cands = top_m_candidates(probs, top_m) if top_m else Candidates(probs, None, k)
        fair = targets_of(cands, groups, t, eps)
        objective = check_feasible(result.labels, cands, groups, fair)
        reference = reference_objective(cands, groups, fair)
        assert objective == pytest.approx(reference, rel=1e-6, abs=1e-9)
        assert result.report.objective == pytest.approx(objective, rel=1e-9, abs=1e-9)
        assert result.report.method == method
        if method == "auction":
            assert result.report.certified
            assert result.report.gap == pytest.approx(0.0, abs=1e-7)
            assert result.report.lower_bound <= objective + 1e-7


#: The N = 5,000 x K = 50 cases spend 1-6 minutes each in HiGHS (about 21 minutes together on the
#: 2-core machine): they are marked ``bench`` and run by ``make test-bench``, outside CI's time budget.
LARGE = pytest.mark.bench


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n, k, t, eps, top_m, ties", [
    pytest.param(5000, 50, 6, 0.0, None, False, marks=LARGE), pytest.param(5000, 50, 6, 0.05, None, False, marks=LARGE),
    pytest.param(5000, 50, 6, 0.0, None, True, marks=LARGE),
    (3000, 30, 5, 0.1, 8, False), (2000, 20, 4, 0.0, 6, True),
])
def test_solvers_match_highs_large(method, n, k, t, eps, top_m, ties):
    probs, groups = instance(n, k, t, seed=n + k + t, ties=ties)
    result = fair_assign(probs, groups, eps=eps, method=method, top_m=top_m)
    used = result.report.top_m  # widened when the top_m candidates cannot meet the targets
    cands = top_m_candidates(probs, used) if used and used < k else Candidates(probs, None, k)
    fair = targets_of(cands, groups, t, eps)
    objective = check_feasible(result.labels, cands, groups, fair)
    assert objective == pytest.approx(reference_objective(cands, groups, fair), rel=1e-6)


def test_sparse_candidates_input_and_float32():
    probs, groups = instance(300, 10, 3, seed=7, dtype=np.float32)
    dense = top_m_candidates(probs, 4)
    shuffled = np.random.default_rng(0).permuted(np.arange(4)[None, :].repeat(300, 0), axis=1)
    cands = sparse_candidates(np.take_along_axis(dense.index, shuffled, 1),
                              np.take_along_axis(dense.value, shuffled, 1), 10)
    a = fair_assign(cands, groups)
    b = fair_assign(probs, groups, top_m=4)
    assert np.array_equal(a.labels, b.labels)
    fair = targets_of(cands, groups, 3, 0.0)
    assert check_feasible(a.labels, cands, groups, fair) == pytest.approx(
        reference_objective(cands, groups, fair), rel=1e-6)


def brute_force_balance_fairness(counts: np.ndarray, rho: np.ndarray) -> tuple[float, float]:
    """Eq 6.2 / 6.3 (METHODS.md §7) by loops over a (T, K) group x cluster count matrix."""
    n_groups, n_clusters = counts.shape
    best_balance, best_fairness = np.inf, np.inf
    for k in range(n_clusters):
        size = sum(int(counts[t, k]) for t in range(n_groups))
        if size == 0:
            continue
        members = [int(counts[t, k]) for t in range(n_groups)]
        best_balance = min(best_balance, min(members) / max(members))
        for t in range(n_groups):
            share = members[t] / size
            best_fairness = min(best_fairness, 0.0 if share == 0 else min(rho[t] / share, share / rho[t]))
    return best_balance, best_fairness


@pytest.mark.parametrize("seed", range(6))
def test_balance_and_fairness_of_counts_equal_brute_force(seed):
    """The report's balance/fairness (one implementation, dist_fair.eval.metrics, called from
    fair.assign on count matrices) against loops, and against the label-based metrics."""
    from dist_fair.fair.assign import balance_and_fairness

    rng = np.random.default_rng(seed)
    n_groups, n_clusters = int(rng.integers(2, 5)), int(rng.integers(1, 7))
    counts = rng.integers(0, 6, (n_groups, n_clusters)) * (rng.random((n_groups, n_clusters)) < 0.8)
    if n_clusters > 1:
        counts[:, rng.integers(0, n_clusters)] = 0  # an empty cluster counts nowhere
    if seed % 2:
        counts[:, -1] = 3  # a perfectly balanced cluster
    counts[:, 0] += 1  # every group non-empty
    rho = rng.random(n_groups) + 0.1
    rho /= rho.sum()
    got = balance_and_fairness(counts, rho)
    assert got == pytest.approx(brute_force_balance_fairness(counts, rho), rel=1e-12)
    population = counts.sum(axis=1) / counts.sum()
    labels = np.concatenate([np.full(int(counts[t, k]), k) for t in range(n_groups) for k in range(n_clusters)])
    groups = np.concatenate([np.full(int(counts[t, k]), t) for t in range(n_groups) for k in range(n_clusters)])
    assert got[0] == pytest.approx(balance(labels, groups), rel=1e-12)
    assert balance_and_fairness(counts, population)[1] == pytest.approx(fairness(labels, groups), rel=1e-12)
    assert got[1] == pytest.approx(fairness(labels, groups, rho), rel=1e-12)


def test_count_matrix_table_refuses_bad_counts():
    from dist_fair.eval.metrics import cluster_group_table_from_counts

    with pytest.raises(DataError, match="hold no sample"):
        cluster_group_table_from_counts(np.array([[1, 0], [2, 0]]))  # group 1 has no sample
    with pytest.raises(DataError, match="no sample"):
        cluster_group_table_from_counts(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(DataError, match=">= 0"):
        cluster_group_table_from_counts(np.array([[1, -1], [2, 3]]))
    with pytest.raises(DataError, match="2-D integer"):
        cluster_group_table_from_counts(np.array([0.5, 1.0]))


def test_report_balance_and_changes_match_eval_metrics():
    probs, groups = instance(400, 8, 4, seed=3)
    result = fair_assign(probs, groups, eps=0.1)
    r = result.report
    argmax = probs.argmax(1)
    assert r.balance_before == pytest.approx(balance(argmax, groups))
    assert r.balance_after == pytest.approx(balance(result.labels, groups))
    assert r.fairness_after == pytest.approx(fairness(result.labels, groups))
    assert r.balance_after > r.balance_before
    assert r.samples_changed == int((result.labels != argmax).sum())
    assert r.argmax_objective == pytest.approx((1 - probs.max(1)).sum())
    assert r.objective >= r.argmax_objective
    assert set(r.to_dict()) >= {"objective", "lower_bound", "gap", "samples_changed", "balance_before",
                                "balance_after", "rounds", "seconds", "method"}


def test_user_rho_with_eps():
    probs, groups = instance(300, 6, 2, seed=11)
    result = fair_assign(probs, groups, rho=[0.45, 0.55], eps=0.3)
    cands = Candidates(probs, None, 6)
    fair = targets_of(cands, groups, 2, 0.3, rho=[0.45, 0.55])
    assert check_feasible(result.labels, cands, groups, fair) == pytest.approx(
        reference_objective(cands, groups, fair), rel=1e-6)


def test_top_m_falls_back_to_more_candidates_with_dense_input():
    probs, groups = instance(200, 8, 4, seed=5)
    result = fair_assign(probs, groups, top_m=1)  # argmax only: cannot change anything
    assert result.report.top_m > 1
    cands = Candidates(probs, None, 8)
    check_feasible(result.labels, cands, groups, targets_of(cands, groups, 4, 0.0))


def test_infeasible_sparse_candidates_are_reported():
    probs, groups = instance(200, 8, 4, seed=5)
    with pytest.raises(InfeasibleError, match="top_m|candidate"):
        fair_assign(top_m_candidates(probs, 1), groups)


@pytest.mark.parametrize("bad, error", [
    ("nan", "NaN"), ("negative", "negative"), ("shape", "groups"), ("gap_group", "no members"),
    ("rho", "sum to 1"), ("method", "method"),
])
def test_bad_input_is_a_clear_error(bad, error):
    probs, groups = instance(50, 4, 3, seed=1)
    kwargs = {}
    if bad == "nan":
        probs[3, 1] = np.nan
    elif bad == "negative":
        probs[4, 2] = -0.1
    elif bad == "shape":
        groups = groups[:-1]
    elif bad == "gap_group":
        groups = np.where(groups == 1, 2, groups)
    elif bad == "rho":
        kwargs["rho"] = [0.3, 0.3, 0.3]
    elif bad == "method":
        kwargs["method"] = "simplex"
    with pytest.raises(DataError, match=error):
        fair_assign(probs, groups, **kwargs)


def test_targets_that_cannot_be_met():
    probs, groups = instance(100, 4, 2, seed=2)
    with pytest.raises(InfeasibleError):
        fair_assign(probs, groups, rho=[0.05, 0.95])
