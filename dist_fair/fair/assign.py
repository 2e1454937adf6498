"""``fair_assign``: the fairest assignment closest to a model's predictions (METHODS.md §6).

Problem (dissertation eqs 6.8-6.11). Given soft assignments ``Y`` (N x K), protected groups g and
targets from :mod:`dist_fair.fair.targets`, find labels ``a(i)`` minimising

    sum_i (1 - y_{i, a(i)})

subject to: cluster j keeps its size ``|C_j|`` (argmax of Y) and holds ``n_tj`` members of group t,
with ``n_tj`` fixed (eps = 0) or within ``[lower_tj, upper_tj]`` (eps > 0). With ``top_m`` each
sample may only move among its m most probable clusters (its argmax always included).

Methods (all exact; they differ in speed and memory):

- ``"auction"`` (default, ``"auto"``): eps-scaling auction over (group, cluster) prices
  (:mod:`~dist_fair.fair.auction`) plus an exact finish and duality-gap certificate
  (:mod:`~dist_fair.fair.finish`). O(N m) memory; runs distributed through a
  :class:`~dist_fair.collective.Collective` (:func:`solve_shard`).
- ``"exact"``: network simplex per group (POT ``ot.emd``; :mod:`~dist_fair.fair.exact`), dense.
- ``"lp"``: one HiGHS LP (:mod:`~dist_fair.fair.lp`), the dissertation's approach.

Balance (dissertation eq 6.2, METHODS.md §7): ``min_k N_min(k) / N_max(k)`` over non-empty
clusters (0 when a group is absent); fairness (eq 6.3) likewise; both reported before (argmax) and
after, computed from the global count matrices by :mod:`dist_fair.eval.metrics`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dist_fair.collective import Collective, LocalCollective, agree_on_error, all_reduce_max
from dist_fair.errors import DataError, DistFairError, InfeasibleError
from dist_fair.eval.metrics import balance_from_table, cluster_group_table_from_counts, fairness_from_table
from dist_fair.fair.auction import AuctionOptions, Persons, Shard, make_places, run_auction
from dist_fair.fair.candidates import Candidates, dense_candidates, top_m_candidates
from dist_fair.fair.finish import FinishOptions, exact_finish
from dist_fair.fair.targets import FairTargets, check_groups, compute_targets

LOG = logging.getLogger(__name__)

METHODS = ("auto", "auction", "exact", "lp")

#: a certificate counts as proof of optimality when the duality gap is below this fraction of N
#: (float64 sums of N values; HiGHS tolerances are 1e-10).
CERTIFICATE_TOLERANCE = 1e-9


@dataclass
class FairAssignReport:
    """What a fair assignment did (all counts over all workers).

    Attributes:
        method: solver used ("auction", "exact" or "lp").
        objective: ``sum_i (1 - y_{i, a(i)})``, dissertation eq 6.8.
        lower_bound: ``N - D(p)``, a proven lower bound on the optimum (auction only, else None).
        gap: ``objective - lower_bound`` (>= 0; ~0 proves optimality), None for exact/lp.
        certified: gap <= 1e-9 N (auction), or the solver's own optimality (exact/lp).
        samples_changed: samples whose label differs from argmax.
        balance_before/after, fairness_before/after: eq 6.2 / 6.3 of argmax and of the result.
        rounds, phases: auction rounds and eps phases; finish_iterations, augmented, cycles,
            finish_seconds: exact-finish repair rounds, samples placed by shortest paths, negative
            cycles cancelled, time.
    """

    method: str
    n_samples: int
    n_clusters: int
    n_groups: int
    eps: float
    top_m: int | None
    objective: float
    argmax_objective: float
    lower_bound: float | None
    gap: float | None
    certified: bool
    samples_changed: int
    balance_before: float
    balance_after: float
    fairness_before: float
    fairness_after: float
    seconds: float
    workers: int = 1
    rounds: int = 0
    phases: int = 0
    finish_iterations: int = 0
    augmented: int = 0
    cycles: int = 0
    finish_seconds: float = 0.0
    targets_fixed: bool = True
    counts_after: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FairAssignResult:
    labels: np.ndarray
    report: FairAssignReport


# ----------------------------------------------------------------------------- metrics on counts
def balance_and_fairness(counts: np.ndarray, rho: np.ndarray) -> tuple[float, float]:
    """Balance (dissertation eq 6.2) and fairness (eq 6.3) of a ``(T, K)`` group x cluster count
    matrix, computed by :mod:`dist_fair.eval.metrics` (METHODS.md §7; the one implementation)."""
    table = cluster_group_table_from_counts(np.asarray(counts).T)
    return balance_from_table(table), fairness_from_table(table, rho)


# ----------------------------------------------------------------------------- SPMD core
def _count_matrix(groups: np.ndarray, labels: np.ndarray, t: int, k: int) -> np.ndarray:
    return np.bincount(groups * k + labels, minlength=t * k).astype(np.int64).reshape(t, k)


def solve_shard(shard: Shard, collective: Collective | None = None, *, n_groups: int | None = None,
                rho: Any = None, eps: float = 0.0, targets: np.ndarray | None = None, top_m: int | None = None,
                auction_options: AuctionOptions | None = None, finish_options: FinishOptions | None = None
                ) -> tuple[np.ndarray, FairAssignReport]:
    """Scalable exact fair assignment, SPMD: every worker calls this with its own samples.

    Args:
        shard: this worker's candidates, groups and global sample ids (ids unique across workers).
        collective: collectives between workers (:class:`LocalCollective` when None).
        n_groups: T (default: ``len(rho)``, else the largest group id + 1 over all workers).
        rho, eps, targets: see :func:`dist_fair.fair.targets.compute_targets`.
        top_m: recorded in the report only (the shard's candidates already are top-m).

    Returns:
        This worker's labels (aligned with ``shard``) and the global report (same on every worker).
    """
    start = time.perf_counter()
    collective = collective or LocalCollective()
    cands = shard.cands
    k = cands.n_clusters
    error: Exception | None = None
    if rho is not None:
        t = int(np.asarray(rho).size)
    elif targets is not None:
        t = int(np.asarray(targets).shape[0])
    elif n_groups is not None:
        t = int(n_groups)
    else:
        local_max = int(shard.groups.max()) if shard.groups.size else -1
        t = int(all_reduce_max(collective, np.array([local_max], dtype=np.int64))[0]) + 1
    try:
        groups, _ = check_groups(shard.groups, cands.num_samples, t)
    except DistFairError as err:
        error, groups = err, np.zeros(cands.num_samples, dtype=np.int64)
    agree_on_error(collective, error)
    shard = Shard(cands, groups, np.asarray(shard.ids, dtype=np.int64))
    argmax = cands.argmax()
    sums = collective.all_reduce_sum(np.concatenate([
        [cands.num_samples], _count_matrix(groups, argmax, t, k).ravel()]).astype(np.int64))
    n_total = int(sums[0])
    before = sums[1:].reshape(t, k)
    try:
        fair = compute_targets(before.sum(axis=0), before.sum(axis=1), before, rho=rho, eps=eps, targets=targets)
    except DistFairError as err:
        error, fair = err, None
    agree_on_error(collective, error)
    root = collective.rank == 0
    lower = np.asarray(collective.broadcast(fair.lower.ravel() if root else None), dtype=np.int64).reshape(t, k)
    upper = np.asarray(collective.broadcast(fair.upper.ravel() if root else None), dtype=np.int64).reshape(t, k)
    fair = FairTargets(lower, upper, fair.cluster_sizes, fair.group_sizes, fair.rho, fair.eps, fair.notes)
    places = make_places(fair)
    persons = Persons(shard, places)
    agree_on_error(collective, _unreachable_error(persons, collective))
    state = run_auction(persons, collective, auction_options)
    result = exact_finish(persons, state, collective, finish_options)
    labels = places.cluster_of(result.assign[:cands.num_samples]).astype(np.int64)
    after_local = _count_matrix(groups, labels, t, k).ravel()
    changed_local = int((labels != argmax).sum())
    argmax_value = float(cands.value_of(argmax).sum())
    extra = collective.all_reduce_sum(np.concatenate([after_local, [changed_local]]).astype(np.int64))
    argmax_total = float(collective.all_reduce_sum(np.array([argmax_value]))[0])
    after = extra[:-1].reshape(t, k)
    if not (np.array_equal(after.sum(axis=0), fair.cluster_sizes)
            and (after >= fair.lower).all() and (after <= fair.upper).all()):
        raise DistFairError("internal error: the assignment does not meet the targets")  # pragma: no cover
    balance_before, fairness_before = balance_and_fairness(before, fair.rho)
    balance_after, fairness_after = balance_and_fairness(after, fair.rho)
    objective = n_total - result.primal
    lower_bound = n_total - result.dual
    gap = objective - lower_bound
    report = FairAssignReport(
        method="auction", n_samples=n_total, n_clusters=k, n_groups=t, eps=float(eps), top_m=top_m,
        objective=objective, argmax_objective=n_total - argmax_total, lower_bound=lower_bound, gap=gap,
        certified=bool(gap <= CERTIFICATE_TOLERANCE * max(n_total, 1)),
        samples_changed=int(extra[-1]), balance_before=balance_before, balance_after=balance_after,
        fairness_before=fairness_before, fairness_after=fairness_after, seconds=time.perf_counter() - start,
        workers=collective.world_size, rounds=state.rounds, phases=state.phases,
        finish_iterations=result.iterations, augmented=result.augmented, cycles=result.cycles,
        finish_seconds=result.seconds,
        targets_fixed=fair.fixed, counts_after=after.tolist() if t * k <= 4096 else None,
        notes=list(fair.notes) + state.log)
    return labels, report


def _unreachable_error(persons: Persons, collective: Collective) -> Exception | None:
    reason = persons.unreachable()
    if reason is not None:
        return InfeasibleError(reason)
    listed = collective.all_reduce_sum(persons.listed_counts())
    cap = persons.places.lower
    short = np.flatnonzero(listed < cap)
    if short.size:
        s = int(short[0])
        k = persons.places.n_clusters
        return InfeasibleError(f"group {s // k} needs at least {int(cap[s])} members in cluster {s % k} but only "
                               f"{int(listed[s])} of its samples list that cluster among their candidates; "
                               f"increase top_m or allow a larger eps")
    return None


# ----------------------------------------------------------------------------- public API
def as_candidates(probs: np.ndarray | Candidates, top_m: int | None) -> Candidates:
    """Dense probabilities -> (top-m) candidates; Candidates pass through (top_m must then be None
    or at least their width)."""
    if isinstance(probs, Candidates):
        if top_m is not None and top_m < probs.width:
            raise DataError(f"top_m={top_m} but the candidates already have {probs.width} per sample; "
                            f"pass top_m=None with sparse candidates")
        return probs
    if top_m is None:
        return dense_candidates(probs)
    return top_m_candidates(probs, int(top_m))


def fair_assign(probs: np.ndarray | Candidates, groups: np.ndarray, rho: Any = None, eps: float = 0.0,
                method: str = "auto", top_m: int | None = None, *, targets: np.ndarray | None = None,
                n_groups: int | None = None, auction_options: AuctionOptions | None = None,
                finish_options: FinishOptions | None = None) -> FairAssignResult:
    """Fairest assignment closest to the predictions (module docstring has the problem).

    Args:
        probs: ``(N, K)`` soft assignments (rows of probabilities), or :class:`Candidates`.
        groups: ``(N,)`` protected group per sample, integers ``0..T-1`` (each group non-empty).
        rho: target proportion per group (default: population proportions ``|G_t| / N``).
        eps: fairness tolerance (0 = exact proportions, rounded; see :mod:`~dist_fair.fair.targets`).
        method: "auto" (= "auction"), "auction", "exact" or "lp".
        top_m: keep each sample's m most probable clusters only (None = all). If the sparse problem
            is infeasible and dense ``probs`` were given, top_m is doubled until it is feasible
            (logged; the report's ``top_m`` says which m was used).
        targets: explicit ``(T, K)`` integer counts instead of rho/eps.
        n_groups: T when some groups might be missing from ``groups`` (then an error says so).

    Returns:
        :class:`FairAssignResult` with int64 labels and a :class:`FairAssignReport`.

    Raises:
        DataError: malformed input (shapes, NaN, negative probabilities, empty group, bad rho).
        InfeasibleError: the targets cannot be met (with these candidates).
    """
    if method not in METHODS:
        raise DataError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    while True:
        cands = as_candidates(probs, top_m)
        try:
            return _fair_assign(cands, groups, rho, eps, method, top_m, targets, n_groups,
                                auction_options, finish_options)
        except InfeasibleError as err:
            if isinstance(probs, Candidates) or top_m is None or top_m >= cands.n_clusters:
                raise
            new_m = min(2 * top_m, cands.n_clusters)
            if _dense_infeasible(probs, groups, rho, eps, targets, n_groups):
                raise
            LOG.warning("fair assignment infeasible with top_m=%d (%s); retrying with top_m=%d", top_m, err, new_m)
            top_m = new_m


def _dense_infeasible(probs, groups, rho, eps, targets, n_groups) -> bool:
    """True when the targets themselves (not the candidate restriction) are infeasible."""
    cands = dense_candidates(probs)
    g, t = check_groups(groups, cands.num_samples, len(rho) if rho is not None else n_groups)
    before = _count_matrix(g, cands.argmax(), t, cands.n_clusters)
    try:
        compute_targets(before.sum(0), before.sum(1), before, rho=rho, eps=eps, targets=targets)
    except InfeasibleError:
        return True
    return False


def _fair_assign(cands: Candidates, groups: np.ndarray, rho, eps, method, top_m, targets, n_groups,
                 auction_options, finish_options) -> FairAssignResult:
    n = cands.num_samples
    if method in ("auto", "auction"):
        shard = Shard(cands, np.asarray(groups), np.arange(n, dtype=np.int64))
        labels, report = solve_shard(shard, LocalCollective(), n_groups=n_groups, rho=rho, eps=eps, targets=targets,
                                     top_m=top_m, auction_options=auction_options, finish_options=finish_options)
        return FairAssignResult(labels, report)
    start = time.perf_counter()
    t_given = len(rho) if rho is not None else (np.asarray(targets).shape[0] if targets is not None else n_groups)
    g, t = check_groups(groups, n, t_given)
    k = cands.n_clusters
    argmax = cands.argmax()
    before = _count_matrix(g, argmax, t, k)
    fair = compute_targets(before.sum(0), before.sum(1), before, rho=rho, eps=eps, targets=targets)
    if method == "exact":
        from dist_fair.fair.exact import solve_exact

        labels = solve_exact(cands, g, fair).labels
    else:
        from dist_fair.fair.lp import solve_lp

        labels = solve_lp(cands, g, fair).labels
    after = _count_matrix(g, labels, t, k)
    balance_before, fairness_before = balance_and_fairness(before, fair.rho)
    balance_after, fairness_after = balance_and_fairness(after, fair.rho)
    objective = float((1.0 - cands.value_of(labels)).sum())
    argmax_objective = float((1.0 - cands.value_of(argmax)).sum())
    report = FairAssignReport(
        method=method, n_samples=n, n_clusters=k, n_groups=t, eps=float(eps), top_m=top_m, objective=objective,
        argmax_objective=argmax_objective, lower_bound=None, gap=None, certified=True,
        samples_changed=int((labels != argmax).sum()), balance_before=balance_before, balance_after=balance_after,
        fairness_before=fairness_before, fairness_after=fairness_after, seconds=time.perf_counter() - start,
        targets_fixed=fair.fixed, counts_after=after.tolist() if t * k <= 4096 else None, notes=list(fair.notes))
    return FairAssignResult(labels, report)
