"""Exact finish of the scalable solver, and the optimality certificate (METHODS.md §6).

The auction (:mod:`dist_fair.fair.auction`) leaves prices ``p_s`` per place and an assignment in
which almost every person sits on its best place by a clear margin. The finish turns this into a
provably optimal integral assignment:

1. Free persons: those unassigned by the auction, or whose margin ``v_cur - max_other v`` (values
   ``v = y - p``) is below ``delta``. All others are fixed where they are.
2. Residual LP (HiGHS dual simplex), gathered in a canonical order (sorted by global id): the free
   persons (identical rows merged into one source with a supply) over all their options, places
   with residual capacity ``cap_s - fixed_s``, plus *exchange arcs* ``a -> b`` that let fixed
   persons move, each priced at the cheapest such move ``min_i (y_ia - y_ib)`` over fixed persons i
   at a (only moves with reduced cost below ``arc_delta``). Exchange arcs make the LP a relaxation of
   the full problem; if its optimum uses none of them, its solution is feasible for the full problem
   and the LP's duals price every fixed person's constraints. It is a network matrix, so the simplex
   vertex is integral.
3. Verification: with the LP's duals as new prices (shifted per connected component to stay close
   to the old ones; duals are defined up to such a shift), every fixed person must still be on a
   best place (complementary slackness, tolerance ``tolerance``). Violators are freed and step 2
   repeats; if the LP was infeasible or used an exchange arc, ``delta`` grows (finally every person
   is free, which is the full LP).
4. Certificate: for any prices ``p`` the transportation dual
   ``D(p) = sum_i max_s (y_is - p_s) + sum_s cap_s p_s`` bounds ``sum_i y_{i,a(i)}`` from above
   (weak duality), so ``objective - (N - D(p)) = D(p) - sum_i y_{i,a(i)} >= 0`` is a duality gap
   that proves how far from optimal the returned labels can be; it is computed over all samples
   with one O(S) reduction. At scale, where no reference LP can run, this gap is the evidence.

The finish runs SPMD like the auction: counts are all-reduced, the free persons and exchange arcs
are gathered once per iteration (their number is small: the boundary of the assignment), rank 0
solves the LP and broadcasts the result.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from dist_fair.errors import DistFairError, InfeasibleError
from dist_fair.fair.auction import AuctionState, Persons
from dist_fair.fair.candidates import BLOCK_ROWS
from dist_fair.fair.reducer import Reducer, allgather_concat, allreduce_max, broadcast

LOG = logging.getLogger(__name__)

_HIGHS_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


@dataclass
class FinishOptions:
    """Tuning of the exact finish (all thresholds are fractions of the value range ``max y``).

    Attributes:
        delta: persons with a margin below this are free in the residual LP.
        arc_delta: exchange arcs of fixed persons with reduced cost below this are offered.
        growth: factor applied to both when the LP needs more freedom.
        tolerance: complementary-slackness tolerance of the verification.
        max_iterations: LP solves at most (the last ones free every person).
    """

    delta: float = 2e-6
    arc_delta: float = 1e-4
    growth: float = 8.0
    tolerance: float = 1e-9
    max_iterations: int = 12


@dataclass
class FinishResult:
    assign: np.ndarray
    column: np.ndarray
    prices: np.ndarray
    iterations: int
    free: int          # free persons in the last residual LP (all workers)
    lp_seconds: float
    primal: float      # sum_i y_{i, a(i)} over samples
    dual: float        # D(prices)


def _margins(persons: Persons, assign: np.ndarray, column: np.ndarray, prices: np.ndarray
             ) -> np.ndarray:
    """``v_cur - max_{other options} v`` per local person (-inf when unassigned)."""
    out = np.full(persons.size, -np.inf)
    rows_all = np.flatnonzero(assign >= 0)
    for start in range(0, rows_all.size, BLOCK_ROWS):
        rows = rows_all[start:start + BLOCK_ROWS]
        out[rows] = _block_margins(persons, rows, assign[rows], column[rows], prices)
    return out


def _block_margins(persons: Persons, rows: np.ndarray, place: np.ndarray, col: np.ndarray,
                   prices: np.ndarray) -> np.ndarray:
    out = np.empty(rows.size)
    current = persons.current_value(rows, place, col, prices)
    sample = rows < persons.n_samples
    s = np.flatnonzero(sample)
    if s.size:
        _, v_r, v_o = persons.sample_options(rows[s], prices)
        r = np.arange(s.size)
        on_o = place[s] >= persons.tk
        v_r[r[~on_o], col[s][~on_o]] = -np.inf
        best = v_r.max(axis=1)
        if v_o is not None:
            v_o[r[on_o], col[s][on_o]] = -np.inf
            best = np.maximum(best, v_o.max(axis=1))
        out[s] = current[s] - best
    d = np.flatnonzero(~sample)
    if d.size:
        _, po = persons.price_views(prices)
        v = -po[:, persons.dummy_cluster[rows[d] - persons.n_samples]].T
        v[np.arange(d.size), col[d]] = -np.inf
        best = v.max(axis=1) if v.shape[1] > 1 else np.full(d.size, -np.inf)
        out[d] = current[d] - best
    return out


def _exchange_arcs(persons: Persons, rows: np.ndarray, assign: np.ndarray, column: np.ndarray,
                   prices: np.ndarray, arc_delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest moves of fixed persons: (key = a * S + b, raw cost y_a - y_b), min per key."""
    size = persons.places.size
    keys, costs = [], []
    for start in range(0, rows.size, BLOCK_ROWS):
        part = rows[start:start + BLOCK_ROWS]
        place, col = assign[part], column[part]
        current = persons.current_value(part, place, col, prices)
        sample = part < persons.n_samples
        s = np.flatnonzero(sample)
        if s.size:
            y, v_r, v_o = persons.sample_options(part[s], prices)
            y_cur = y[np.arange(s.size), col[s]]
            g = persons.groups[part[s]]
            cl = np.asarray(persons.shard.cands.clusters(part[s]), dtype=np.int64)
            base = g[:, None] * persons.places.n_clusters + cl
            for v, offset in ((v_r, 0), (v_o, persons.tk)):
                if v is None:
                    continue
                target = base + offset
                ok = (current[s][:, None] - v < arc_delta) & np.isfinite(v) & (target != place[s][:, None])
                r, c = np.nonzero(ok)
                keys.append(place[s][r] * size + target[r, c])
                costs.append(y_cur[r] - y[r, c])
        d = np.flatnonzero(~sample)
        if d.size:
            _, po = persons.price_views(prices)
            j = persons.dummy_cluster[part[d] - persons.n_samples]
            v = -po[:, j].T
            target = persons.tk + np.arange(persons.places.n_groups)[None, :] * persons.places.n_clusters + j[:, None]
            ok = (current[d][:, None] - v < arc_delta) & np.isfinite(v) & (target != place[d][:, None])
            r, c = np.nonzero(ok)
            keys.append(place[d][r] * size + target[r, c])
            costs.append(np.zeros(r.size))
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return _min_by_key(np.concatenate(keys), np.concatenate(costs))


def _min_by_key(keys: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if keys.size == 0:
        return keys.astype(np.int64), costs
    order = np.lexsort((costs, keys))
    keys, costs = keys[order], costs[order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]])
    return keys[first], costs[first]


@dataclass
class _Residual:
    """What rank 0 needs to build the residual LP (all arrays sorted canonically)."""

    s_gid: np.ndarray
    s_group: np.ndarray
    s_clusters: np.ndarray
    s_values: np.ndarray
    d_gid: np.ndarray
    d_cluster: np.ndarray
    arc_key: np.ndarray
    arc_cost: np.ndarray
    residual: np.ndarray
    movable: np.ndarray


def _solve_residual(persons: Persons, res: _Residual, prices_ref: np.ndarray) -> dict:
    """Build and solve the residual LP on rank 0 (module docstring, step 2)."""
    import scipy.sparse as sp
    from scipy.optimize import linprog
    from scipy.sparse.csgraph import connected_components

    places = persons.places
    size, k, tk = places.size, places.n_clusters, persons.tk
    cap = places.cap
    var_from, var_place, var_cost, var_upper = [], [], [], []  # var_from: supply row index
    # --- free samples, identical rows merged
    n_s = res.s_gid.size
    if n_s:
        table = np.concatenate([res.s_group[:, None], res.s_clusters, res.s_values.view(np.int64)], axis=1)
        uniq, inverse, supply_s = np.unique(table, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        u_group = uniq[:, 0]
        m = res.s_clusters.shape[1]
        u_cl = uniq[:, 1:1 + m]
        u_y = np.ascontiguousarray(uniq[:, 1 + m:]).view(np.float64)
        option_place = [u_group[:, None] * k + u_cl]
        option_col = [np.broadcast_to(np.arange(m), u_cl.shape)]
        option_y = [u_y]
        if places.bounded:
            option_place.append(option_place[0] + tk)
            option_col.append(option_col[0])
            option_y.append(u_y)
        o_place = np.stack(option_place, axis=2)  # (U, m, 1 or 2): R then O
        o_col = np.stack(option_col, axis=2)
        o_y = np.stack(option_y, axis=2)
        o_row = np.broadcast_to(np.arange(uniq.shape[0])[:, None, None], o_place.shape)
        # options ordered per row by (column, R before O)
        valid = cap[o_place] > 0
        s_vars = (o_row[valid], o_place[valid], o_col[valid], o_y[valid])
        var_from.append(s_vars[0])
        var_place.append(s_vars[1])
        var_cost.append(-s_vars[3])
        var_upper.append(np.full(s_vars[0].size, np.inf))
        n_u = uniq.shape[0]
    else:
        inverse = np.zeros(0, dtype=np.int64)
        supply_s = np.zeros(0, dtype=np.int64)
        s_vars = (np.zeros(0, dtype=np.int64),) * 3 + (np.zeros(0),)
        n_u = 0
    # --- free dummies, merged per cluster
    if res.d_gid.size:
        d_uniq, d_inverse, supply_d = np.unique(res.d_cluster, return_inverse=True, return_counts=True)
        t_idx = np.arange(places.n_groups)
        d_place = tk + t_idx[None, :] * k + d_uniq[:, None]
        d_row = np.broadcast_to(np.arange(d_uniq.size)[:, None], d_place.shape)
        d_col = np.broadcast_to(t_idx[None, :], d_place.shape)
        valid = cap[d_place] > 0
        d_vars = (d_row[valid] + n_u, d_place[valid], d_col[valid])
        var_from.append(d_vars[0])
        var_place.append(d_vars[1])
        var_cost.append(np.zeros(d_vars[0].size))
        var_upper.append(np.full(d_vars[0].size, np.inf))
        n_d = d_uniq.size
    else:
        d_inverse = np.zeros(0, dtype=np.int64)
        supply_d = np.zeros(0, dtype=np.int64)
        d_vars = (np.zeros(0, dtype=np.int64),) * 3
        n_d = 0
    n_supply = n_u + n_d
    n_person_vars = sum(v.size for v in var_from)
    # --- exchange arcs
    arc_from, arc_to = res.arc_key // size, res.arc_key % size
    places_used = np.unique(np.concatenate([*var_place, arc_from, arc_to, np.flatnonzero(res.residual != 0)]))
    row_of_place = np.full(size, -1, dtype=np.int64)
    row_of_place[places_used] = n_supply + np.arange(places_used.size)
    n_rows = n_supply + places_used.size
    n_vars = n_person_vars + arc_from.size
    if n_vars == 0:
        if np.any(res.residual != 0):
            return {"status": "infeasible"}
        return {"status": "ok", "exchange_used": False, "prices": prices_ref.copy(), "seconds": 0.0,
                "s_place": np.zeros(0, dtype=np.int64), "s_col": np.zeros(0, dtype=np.int64),
                "d_place": np.zeros(0, dtype=np.int64), "d_col": np.zeros(0, dtype=np.int64), "vars": 0}
    p_from = np.concatenate(var_from) if var_from else np.zeros(0, dtype=np.int64)
    p_place = np.concatenate(var_place) if var_place else np.zeros(0, dtype=np.int64)
    rows = np.concatenate([p_from, row_of_place[p_place], row_of_place[arc_from], row_of_place[arc_to]])
    cols = np.concatenate([np.arange(n_person_vars), np.arange(n_person_vars),
                           n_person_vars + np.arange(arc_from.size), n_person_vars + np.arange(arc_from.size)])
    vals = np.concatenate([np.ones(2 * n_person_vars), -np.ones(arc_from.size), np.ones(arc_from.size)])
    a_eq = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, n_vars))
    b_eq = np.concatenate([supply_s, supply_d, res.residual[places_used]]).astype(np.float64)
    cost = np.concatenate([*var_cost, res.arc_cost]) if var_cost else res.arc_cost
    upper = np.concatenate([*var_upper, res.movable[arc_from].astype(np.float64)])
    start = time.perf_counter()
    lp = linprog(cost, A_eq=a_eq, b_eq=b_eq, bounds=np.stack([np.zeros(n_vars), upper], axis=1),
                 method="highs-ds", options=_HIGHS_OPTIONS)
    seconds = time.perf_counter() - start
    if lp.status == 2:
        return {"status": "infeasible", "seconds": seconds}
    if lp.status != 0:
        raise DistFairError(f"HiGHS failed on the residual fair-assignment LP: {lp.message}")
    x = np.round(lp.x).astype(np.int64)
    if np.abs(lp.x - x).max() > 1e-6:
        raise DistFairError("residual fair-assignment LP returned a fractional vertex (should be impossible: "
                            "the matrix is a network matrix)")
    exchange_used = bool(x[n_person_vars:].any())
    prices = prices_ref.copy()
    prices[places_used] = -lp.eqlin.marginals[n_supply:]
    # duals are unique up to a constant per connected component: stay close to the old prices
    edges_a, edges_b = [row_of_place[arc_from] - n_supply], [row_of_place[arc_to] - n_supply]
    if n_person_vars:
        order = np.lexsort((p_place, p_from))
        f, pl = p_from[order], p_place[order]
        same = f[1:] == f[:-1]
        edges_a.append(row_of_place[pl[:-1][same]] - n_supply)
        edges_b.append(row_of_place[pl[1:][same]] - n_supply)
    ea, eb = np.concatenate(edges_a), np.concatenate(edges_b)
    graph = sp.csr_matrix((np.ones(ea.size), (ea, eb)), shape=(places_used.size, places_used.size))
    n_comp, comp = connected_components(graph, directed=False)
    shift = prices_ref[places_used] - prices[places_used]
    for c in range(n_comp):
        members = comp == c
        prices[places_used[members]] += np.median(shift[members])
    # disaggregate merged rows: members of each unique row (sorted by gid) take its flows in order
    flow = x[:n_person_vars]
    s_place = np.zeros(n_s, dtype=np.int64)
    s_col = np.zeros(n_s, dtype=np.int64)
    if n_s:
        f_s = flow[:s_vars[0].size]
        order = np.lexsort((np.arange(s_vars[0].size), s_vars[0]))
        seq = np.repeat(order, f_s[order])
        members = np.argsort(inverse, kind="stable")
        if seq.size != n_s:
            raise DistFairError("residual LP flows do not match the free samples")
        s_place[members] = s_vars[1][seq]
        s_col[members] = s_vars[2][seq]
    d_place = np.zeros(res.d_gid.size, dtype=np.int64)
    d_col = np.zeros(res.d_gid.size, dtype=np.int64)
    if res.d_gid.size:
        f_d = flow[s_vars[0].size:]
        order = np.lexsort((np.arange(d_vars[0].size), d_vars[0]))
        seq = np.repeat(order, f_d[order])
        members = np.argsort(d_inverse.ravel(), kind="stable")
        d_place[members] = d_vars[1][seq]
        d_col[members] = d_vars[2][seq]
    return {"status": "ok", "exchange_used": exchange_used, "prices": prices, "seconds": seconds,
            "s_place": s_place, "s_col": s_col, "d_place": d_place, "d_col": d_col, "vars": n_vars}


def dual_certificate(persons: Persons, assign: np.ndarray, column: np.ndarray, prices: np.ndarray,
                     reducer: Reducer) -> tuple[float, float]:
    """``(sum_i y_{i,a(i)}, D(prices))`` over all workers (module docstring, step 4)."""
    primal = 0.0
    best_sum = 0.0
    rows_all = np.arange(persons.size)
    for start in range(0, persons.size, BLOCK_ROWS):
        rows = rows_all[start:start + BLOCK_ROWS]
        _, _, _, v1, _ = persons.best(rows, prices)
        best_sum += float(np.sum(v1))
        s = rows[rows < persons.n_samples]
        primal += float(persons.value[s, column[s]].astype(np.float64).sum())
    finite = persons.places.cap > 0
    sums = reducer.allreduce_sum(np.array([primal, best_sum]))
    dual = float(sums[1] + np.sum(persons.places.cap[finite] * prices[finite]))
    return float(sums[0]), dual


def exact_finish(persons: Persons, state: AuctionState, reducer: Reducer,
                 options: FinishOptions | None = None) -> FinishResult:
    """Make the auction's assignment exactly optimal and certify it (module docstring)."""
    opts = options or FinishOptions()
    places = persons.places
    size = places.size
    vmax = persons.value.max() if persons.n_samples else 0.0
    scale = max(float(allreduce_max(reducer, np.array([vmax], dtype=np.float64))[0]), 1e-12)
    delta, arc_delta, tol = opts.delta * scale, opts.arc_delta * scale, opts.tolerance * scale
    assign, column = state.assign.copy(), state.column.copy()
    prices_ref = state.prices.copy()
    margins = _margins(persons, assign, column, prices_ref)
    free = margins < delta
    lp_seconds = 0.0
    free_total = 0
    for iteration in range(1, opts.max_iterations + 1):
        if iteration == opts.max_iterations:
            free[:] = True
        fixed = np.flatnonzero(~free)
        fixed_counts = reducer.allreduce_sum(np.bincount(assign[fixed], minlength=size).astype(np.int64))
        near = fixed[margins[fixed] < arc_delta]
        key, cost = _exchange_arcs(persons, near, assign, column, prices_ref, arc_delta)
        key, cost = _min_by_key(allgather_concat(reducer, key), allgather_concat(reducer, cost))
        rows = np.flatnonzero(free)
        srow = rows[rows < persons.n_samples]
        drow = rows[rows >= persons.n_samples]
        cl = np.asarray(persons.shard.cands.clusters(srow), dtype=np.int64)
        gathered = [allgather_concat(reducer, a) for a in (
            persons.gid[srow], persons.groups[srow], cl.reshape(srow.size, -1),
            persons.value[srow].astype(np.float64).reshape(srow.size, -1),
            persons.gid[drow], persons.dummy_cluster[drow - persons.n_samples])]
        free_total = int(gathered[0].size + gathered[4].size)
        if reducer.rank == 0:
            s_order = np.argsort(gathered[0], kind="stable")
            d_order = np.argsort(gathered[4], kind="stable")
            residual = (places.cap - fixed_counts).astype(np.int64)
            res = _Residual(gathered[0][s_order], gathered[1][s_order], gathered[2][s_order],
                            gathered[3][s_order], gathered[4][d_order], gathered[5][d_order],
                            key, cost, residual, fixed_counts)
            out = _solve_residual(persons, res, prices_ref)
            ok = out["status"] == "ok" and not out["exchange_used"]
            flags = np.array([1 if ok else 0, out.get("seconds", 0.0) * 1e6], dtype=np.int64)
            payload_i = np.concatenate([flags, np.stack([res.s_gid, out["s_place"], out["s_col"]], 1).ravel(),
                                        np.stack([res.d_gid, out["d_place"], out["d_col"]], 1).ravel()]) \
                if ok else flags
            payload_p = out["prices"] if ok else prices_ref
            LOG.debug("finish iteration %d: %d free, %s", iteration, free_total,
                      "ok" if ok else out["status"] + (" (exchange arcs used)" if out.get("exchange_used") else ""))
        else:
            payload_i, payload_p = None, None
        info = broadcast(reducer, payload_i, np.int64)
        new_prices = broadcast(reducer, payload_p, np.float64)
        lp_seconds += info[1] / 1e6
        if not info[0]:
            if iteration == opts.max_iterations:
                raise InfeasibleError("no assignment over the candidate clusters meets the fairness targets "
                                      "(the full LP is infeasible); increase top_m or eps")
            delta *= opts.growth
            arc_delta *= opts.growth
            free |= margins < delta
            continue
        body = info[2:]
        n_sg = gathered[0].size
        s_triples = body[:3 * n_sg].reshape(n_sg, 3)
        d_triples = body[3 * n_sg:].reshape(-1, 3)
        if srow.size:
            at = np.searchsorted(s_triples[:, 0], persons.gid[srow])
            assign[srow], column[srow] = s_triples[at, 1], s_triples[at, 2]
        if drow.size:
            at = np.searchsorted(d_triples[:, 0], persons.gid[drow])
            assign[drow], column[drow] = d_triples[at, 1], d_triples[at, 2]
        margins = _margins(persons, assign, column, new_prices)
        violators = ~free & (margins < -tol)
        n_viol = int(reducer.allreduce_sum(np.array([violators.sum()], dtype=np.int64))[0])
        prices_ref = new_prices
        if n_viol == 0:
            primal, dual = dual_certificate(persons, assign, column, new_prices, reducer)
            return FinishResult(assign, column, new_prices, iteration, free_total, lp_seconds, primal, dual)
        LOG.debug("finish iteration %d: %d fixed persons violate slackness; freeing them", iteration, n_viol)
        free |= violators
    raise DistFairError("exact finish did not converge")  # pragma: no cover - the last iteration frees all
