"""Fairness targets: how many members of group t cluster j must (or may) hold (METHODS.md §6).

Inputs are the hard cluster sizes ``|C_j|`` (argmax of the soft assignments Y), the group sizes
``|G_t|``, target proportions ``rho_t`` (default ``|G_t| / N``; user-given allowed) and a
tolerance ``eps``. Let ``x_tj = rho_t |C_j|``.

- ``eps = 0`` (dissertation eq 6.9 made integral): fixed integer targets ``n_tj`` in
  ``{floor(x_tj), ceil(x_tj)}`` with every row summing to ``|G_t|`` and every column to ``|C_j|``.
  Such a rounding always exists for the default rho (matrix rounding); among all of them we take
  the one closest to the current counts ``a_tj`` of the argmax clustering (minimum
  ``sum |n_tj - a_tj|``), found as a small bounded transportation LP over the T x K cells
  (integral because the constraint matrix is totally unimodular). ``lower = upper = n``.
- ``eps > 0`` (flexible fairness, dissertation §6.5): ``n_tj`` free within
  ``[lower_tj, upper_tj]`` with ``lower_tj = min(ceil(x_tj (1 - eps)), floor(x_tj))`` and
  ``upper_tj = max(floor(x_tj (1 + eps)), ceil(x_tj))``, clipped to ``[0, min(|C_j|, |G_t|)]``.
  The eps interval is rounded inwards but never made tighter than the eps = 0 rounding, so an
  interval is never empty (small clusters keep ``[floor, ceil]``) and any eps >= 0 is feasible
  whenever eps = 0 is. Column sums stay exactly ``|C_j|``; row sums are ``|G_t|`` by construction.
- explicit ``targets`` (a T x K integer matrix): ``lower = upper = targets``; rows must sum to
  ``|G_t|`` and columns to ``|C_j|``.

Everything that cannot be met raises :class:`~dist_fair.errors.InfeasibleError` naming the group or
cluster and what to change.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from dist_fair.errors import DataError, InfeasibleError

LOG = logging.getLogger(__name__)

#: tolerance for "rho sums to 1" and for rounding x_tj near an integer.
RHO_TOL = 1e-6
_ROUND_TOL = 1e-9


@dataclass(frozen=True)
class FairTargets:
    """Bounds on the per-(group, cluster) counts of a fair assignment.

    Attributes:
        lower, upper: ``(T, K)`` int64 bounds on ``n_tj`` (equal when the targets are fixed).
        cluster_sizes: ``(K,)`` |C_j|, kept exactly.
        group_sizes: ``(T,)`` |G_t|.
        rho: ``(T,)`` target proportions.
        eps: the tolerance the bounds came from (0 for fixed targets).
    """

    lower: np.ndarray
    upper: np.ndarray
    cluster_sizes: np.ndarray
    group_sizes: np.ndarray
    rho: np.ndarray
    eps: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return int(self.lower.shape[0])

    @property
    def n_clusters(self) -> int:
        return int(self.lower.shape[1])

    @property
    def fixed(self) -> bool:
        """True when every ``n_tj`` is fixed (``lower == upper``)."""
        return bool(np.array_equal(self.lower, self.upper))


def check_groups(groups: np.ndarray, num_samples: int, n_groups: int | None) -> tuple[np.ndarray, int]:
    """Validate protected-group labels; return them as int64 and the number of groups T.

    Groups are integers ``0..T-1`` (T = ``n_groups`` if given, else ``max + 1``); every group must
    have members.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.shape[0] != num_samples:
        raise DataError(f"groups: expected shape ({num_samples},) (one group per sample), got {groups.shape}")
    if groups.dtype.kind == "f":
        if not np.all(np.isfinite(groups)) or not np.all(groups == np.round(groups)):
            bad = int(np.flatnonzero(~np.isfinite(groups) | (groups != np.round(groups)))[0])
            raise DataError(f"groups: sample {bad} has group {groups[bad]!r}; groups must be integers 0..T-1")
    elif groups.dtype.kind not in "iub":
        raise DataError(f"groups: expected integer group ids 0..T-1, got dtype {groups.dtype}")
    groups = groups.astype(np.int64)
    if groups.size == 0:  # a worker without samples
        return groups, int(n_groups or 0)
    if groups.min() < 0:
        bad = int(np.flatnonzero(groups < 0)[0])
        raise DataError(f"groups: sample {bad} has group {int(groups[bad])} (unknown); every sample needs a "
                        f"group 0..T-1 - drop or impute samples with a missing protected attribute")
    t = int(groups.max()) + 1 if n_groups is None else int(n_groups)
    if groups.max() >= t:
        bad = int(np.flatnonzero(groups >= t)[0])
        raise DataError(f"groups: sample {bad} has group {int(groups[bad])} but rho lists only {t} groups")
    return groups, t


def check_group_sizes(group_sizes: np.ndarray) -> None:
    empty = np.flatnonzero(group_sizes == 0)
    if empty.size:
        raise DataError(f"group {int(empty[0])} has no members (group sizes {group_sizes.tolist()}); groups "
                        f"must be numbered 0..T-1 without gaps - relabel them, or give rho only for the "
                        f"groups present")


def check_rho(rho: np.ndarray | list[float] | None, group_sizes: np.ndarray) -> np.ndarray:
    """Target proportions: ``|G_t| / N`` by default, else validated user values (positive, sum 1)."""
    if rho is None:
        return group_sizes / group_sizes.sum()
    r = np.asarray(rho, dtype=np.float64).reshape(-1)
    if r.size != group_sizes.size:
        raise DataError(f"rho: {r.size} proportions for {group_sizes.size} groups; give one per group 0..T-1")
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise DataError(f"rho: every proportion must be a finite number > 0, got {r.tolist()}")
    if abs(r.sum() - 1.0) > RHO_TOL:
        raise DataError(f"rho: proportions must sum to 1, they sum to {r.sum():.8f}; normalise them "
                        f"(rho / rho.sum())")
    return r


def _floor_ceil(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    near = np.abs(x - np.round(x)) <= _ROUND_TOL * np.maximum(1.0, np.abs(x))
    x = np.where(near, np.round(x), x)
    return np.floor(x).astype(np.int64), np.ceil(x).astype(np.int64)


def _solve_cells(lower: np.ndarray, upper: np.ndarray, row_sums: np.ndarray, col_sums: np.ndarray,
                 cost: np.ndarray) -> np.ndarray | None:
    """Integer ``n`` in ``[lower, upper]`` with the given row/column sums minimising ``cost . n``
    (a bounded transportation LP; its vertices are integral). None when infeasible."""
    import scipy.sparse as sp
    from scipy.optimize import linprog

    t, k = lower.shape
    if lower.sum() > col_sums.sum() or upper.sum() < col_sums.sum() or row_sums.sum() != col_sums.sum():
        return None
    cells = np.arange(t * k)
    a_rows = sp.csr_matrix((np.ones(t * k), (np.repeat(np.arange(t), k), cells)), shape=(t, t * k))
    a_cols = sp.csr_matrix((np.ones(t * k), (np.tile(np.arange(k), t), cells)), shape=(k, t * k))
    res = linprog(cost.ravel().astype(np.float64), A_eq=sp.vstack([a_rows, a_cols]).tocsr(),
                  b_eq=np.concatenate([row_sums, col_sums]).astype(np.float64),
                  bounds=np.stack([lower.ravel(), upper.ravel()], axis=1).astype(np.float64),
                  method="highs-ds")
    if res.status != 0:
        return None
    n = np.round(res.x).astype(np.int64).reshape(t, k)
    if (n < lower).any() or (n > upper).any() or not np.array_equal(n.sum(1), row_sums) \
            or not np.array_equal(n.sum(0), col_sums):
        return None
    return n


def _diagnose(lower: np.ndarray, upper: np.ndarray, group_sizes: np.ndarray, cluster_sizes: np.ndarray,
              what: str) -> str:
    for t in range(lower.shape[0]):
        lo, hi = int(lower[t].sum()), int(upper[t].sum())
        if not lo <= group_sizes[t] <= hi:
            return (f"group {t} has {int(group_sizes[t])} members but {what} allow between {lo} and {hi} "
                    f"of them in total")
    for j in range(lower.shape[1]):
        lo, hi = int(lower[:, j].sum()), int(upper[:, j].sum())
        if not lo <= cluster_sizes[j] <= hi:
            return f"cluster {j} has {int(cluster_sizes[j])} members but {what} allow between {lo} and {hi}"
    return f"no count matrix satisfies the {what} together with the group and cluster sizes"


def compute_targets(cluster_sizes: np.ndarray, group_sizes: np.ndarray, current_counts: np.ndarray,
                    rho: np.ndarray | list[float] | None = None, eps: float = 0.0,
                    targets: np.ndarray | None = None) -> FairTargets:
    """Bounds ``lower <= n_tj <= upper`` for the fair assignment (module docstring has the rules).

    Args:
        cluster_sizes: ``(K,)`` |C_j| of the argmax clustering.
        group_sizes: ``(T,)`` |G_t| (all > 0).
        current_counts: ``(T, K)`` counts ``a_tj`` of the argmax clustering (decides the eps = 0
            rounding: the one closest to them).
        rho: target proportions or None for ``|G_t| / N``.
        eps: flexibility, >= 0.
        targets: optional explicit ``(T, K)`` integer targets (then rho and eps are ignored).

    Raises:
        InfeasibleError: the targets cannot be met (message names the group/cluster and the fix).
        DataError: malformed rho, eps or targets.
    """
    cluster_sizes = np.asarray(cluster_sizes, dtype=np.int64)
    group_sizes = np.asarray(group_sizes, dtype=np.int64)
    check_group_sizes(group_sizes)
    t, k = group_sizes.size, cluster_sizes.size
    if targets is not None:
        n = np.asarray(targets)
        if n.shape != (t, k) or n.dtype.kind not in "iu" and not np.all(n == np.round(n)):
            raise DataError(f"targets: expected a ({t}, {k}) integer matrix (groups x clusters), got {n.shape}")
        n = np.round(n).astype(np.int64)
        if (n < 0).any():
            raise DataError("targets: counts must be >= 0")
        if not np.array_equal(n.sum(1), group_sizes):
            raise InfeasibleError(f"targets: rows sum to {n.sum(1).tolist()} but the groups have "
                                  f"{group_sizes.tolist()} members; every sample must be assigned")
        if not np.array_equal(n.sum(0), cluster_sizes):
            raise InfeasibleError(f"targets: columns sum to {n.sum(0).tolist()} but the cluster sizes are "
                                  f"{cluster_sizes.tolist()} (argmax of probs)")
        return FairTargets(n, n.copy(), cluster_sizes, group_sizes, group_sizes / group_sizes.sum(), 0.0,
                           ["explicit targets"])
    if not np.isfinite(eps) or eps < 0:
        raise DataError(f"eps must be a finite number >= 0, got {eps}")
    r = check_rho(rho, group_sizes)
    x = np.outer(r, cluster_sizes.astype(np.float64))
    floor, ceil = _floor_ceil(x)
    cap = np.minimum(cluster_sizes[None, :], group_sizes[:, None])
    if eps == 0:
        # prefer ceil where the argmax clustering already has at least ceil, floor where at most floor
        counts = np.asarray(current_counts, dtype=np.int64)
        cost = (np.abs(ceil - counts) - np.abs(floor - counts)).astype(np.float64)
        base = floor
        extra = _solve_cells(np.zeros_like(floor), ceil - floor, group_sizes - floor.sum(1),
                             cluster_sizes - floor.sum(0), cost)
        if extra is None:
            raise InfeasibleError(
                "fair targets cannot be met with eps=0: " + _diagnose(floor, ceil, group_sizes, cluster_sizes,
                                                                      "the roundings of rho_t * |C_j|")
                + "; use rho=None (population proportions) or allow eps > 0")
        n = base + extra
        return FairTargets(n, n.copy(), cluster_sizes, group_sizes, r, 0.0)
    _, lo_c = _floor_ceil(x * (1.0 - eps))
    hi_f, _ = _floor_ceil(x * (1.0 + eps))
    lower = np.clip(np.minimum(lo_c, floor), 0, cap)
    upper = np.clip(np.maximum(hi_f, ceil), 0, cap)
    notes = []
    widened = int(((lo_c > hi_f)).sum())
    if widened:
        notes.append(f"{widened} (group, cluster) cells had no integer in the eps interval and use "
                     f"[floor, ceil] of rho_t |C_j|")
    if _solve_cells(lower, upper, group_sizes, cluster_sizes, np.zeros((t, k))) is None:
        raise InfeasibleError(
            f"fair targets cannot be met with eps={eps}: "
            + _diagnose(lower, upper, group_sizes, cluster_sizes, "the eps bounds")
            + "; use rho=None (population proportions) or a larger eps")
    return FairTargets(lower, upper, cluster_sizes, group_sizes, r, float(eps), notes)
