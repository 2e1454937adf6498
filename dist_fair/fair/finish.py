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
from dist_fair.fair.auction import AuctionState, Persons, select_kth
from dist_fair.fair.candidates import BLOCK_ROWS
from dist_fair.fair.reducer import Reducer, allgather_concat, allreduce_max, broadcast

LOG = logging.getLogger(__name__)

_HIGHS_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


@dataclass
class FinishOptions:
    """Tuning of the exact finish (thresholds are fractions of the value range ``max y``).

    Attributes:
        delta: samples with a margin below this are free in the residual LP.
        arc_delta: exchange arcs of fixed samples with reduced cost below this are offered; free
            samples are offered their options within this of their best.
        growth: factor applied to the thresholds when the LP needs more room.
        tolerance: complementary-slackness tolerance of the verification.
        max_iterations: LP solves at most (the last one frees every sample and option).
    """

    delta: float = 2e-6
    arc_delta: float = 1e-3
    growth: float = 8.0
    tolerance: float = 1e-9
    max_iterations: int = 16


@dataclass
class FinishResult:
    assign: np.ndarray
    column: np.ndarray
    prices: np.ndarray
    iterations: int
    free: int          # free samples in the last residual LP (all workers)
    lp_seconds: float
    primal: float      # sum_i y_{i, a(i)}
    dual: float        # D(prices)


def _block_values(persons: Persons, rows: np.ndarray, place: np.ndarray, col: np.ndarray, prices: np.ndarray):
    """For assigned rows: (margin = v_cur - best other option, best option value v1)."""
    _, v_r, v_o = persons.sample_options(rows, prices)
    r = np.arange(rows.size)
    v1 = v_r.max(axis=1) if v_o is None else np.maximum(v_r.max(axis=1), v_o.max(axis=1))
    current = persons.current_value(rows, place, col, prices)
    on_o = place >= persons.tk
    v_r[r[~on_o], col[~on_o]] = -np.inf
    best = v_r.max(axis=1)
    if v_o is not None:
        v_o[r[on_o], col[on_o]] = -np.inf
        best = np.maximum(best, v_o.max(axis=1))
    return current - best, v1


def _scan(persons: Persons, rows: np.ndarray, assign: np.ndarray, column: np.ndarray, prices: np.ndarray
          ) -> tuple[np.ndarray, float, float]:
    """Margins of the given rows (-inf when unassigned), and over them ``sum v1`` and ``sum y``."""
    margins = np.full(rows.size, -np.inf)
    best_sum = primal = 0.0
    for start in range(0, rows.size, BLOCK_ROWS):
        part = np.arange(start, min(start + BLOCK_ROWS, rows.size))
        sub = rows[part]
        ok = assign[sub] >= 0
        if ok.any():
            m, v1 = _block_values(persons, sub[ok], assign[sub[ok]], column[sub[ok]], prices)
            margins[part[ok]] = m
            best_sum += float(v1.sum())
            primal += float(persons.value[sub[ok], column[sub[ok]]].astype(np.float64).sum())
    return margins, best_sum, primal


def _options(persons: Persons, rows: np.ndarray, prices: np.ndarray, within: float):
    """Per row: ``(place, raw y, reduced cost vs the row's best)`` of every option, (b, 2m) arrays
    (R then O per column; invalid options have place -1)."""
    y, v_r, v_o = persons.sample_options(rows, prices)
    g = persons.groups[rows]
    cl = persons.clusters(rows)
    base = g[:, None] * persons.places.n_clusters + cl
    v = v_r if v_o is None else np.concatenate([v_r, v_o], axis=1)
    place = base if v_o is None else np.concatenate([base, base + persons.tk], axis=1)
    yy = y if v_o is None else np.concatenate([y, y], axis=1)
    v1 = v.max(axis=1, keepdims=True)
    rc = v1 - v
    place = np.where(np.isfinite(v) & (rc < within), place, -1)
    return place, yy, rc


def _exchange_candidates(persons: Persons, rows: np.ndarray, assign: np.ndarray, column: np.ndarray,
                         prices: np.ndarray, arc_delta: float):
    """Moves of fixed samples with reduced cost < arc_delta: (key = a * S + b, raw cost y_a - y_b, row)."""
    size = persons.places.size
    keys, costs, owners = [], [], []
    for start in range(0, rows.size, BLOCK_ROWS):
        part = rows[start:start + BLOCK_ROWS]
        place, col = assign[part], column[part]
        current = persons.current_value(part, place, col, prices)
        y, v_r, v_o = persons.sample_options(part, prices)
        y_cur = y[np.arange(part.size), col]
        base = persons.groups[part][:, None] * persons.places.n_clusters + persons.clusters(part)
        for v, offset in ((v_r, 0), (v_o, persons.tk)):
            if v is None:
                continue
            target = base + offset
            ok = (current[:, None] - v < arc_delta) & np.isfinite(v) & (target != place[:, None])
            r, c = np.nonzero(ok)
            keys.append(place[r] * size + target[r, c])
            costs.append(y_cur[r] - y[r, c])
            owners.append(part[r])
    if not keys:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(keys), np.concatenate(costs), np.concatenate(owners)


def _min_by_key(keys: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if keys.size == 0:
        return keys.astype(np.int64), costs
    order = np.lexsort((costs, keys))
    keys, costs = keys[order], costs[order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]])
    return keys[first], costs[first]


@dataclass
class _Residual:
    """What rank 0 needs to build the residual LP (sorted canonically)."""

    gid: np.ndarray
    group: np.ndarray
    clusters: np.ndarray   # (F, m), -1 = option not offered
    values: np.ndarray     # (F, m)
    offered_o: np.ndarray  # (F, m) bool: O place offered
    offered_r: np.ndarray  # (F, m) bool: R place offered
    spare: np.ndarray      # (K,) dummy supply E_j
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
    n_s = res.gid.size
    m = res.clusters.shape[1] if n_s else 0
    # free samples, identical rows (group, offered options and values) merged into one source
    if n_s:
        table = np.concatenate([res.group[:, None], res.clusters, res.offered_r.astype(np.int64),
                                res.offered_o.astype(np.int64), res.values.view(np.int64)], axis=1)
        uniq, inverse, supply_s = np.unique(table, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        u_group, u_cl = uniq[:, 0], uniq[:, 1:1 + m]
        u_r, u_o = uniq[:, 1 + m:1 + 2 * m].astype(bool), uniq[:, 1 + 2 * m:1 + 3 * m].astype(bool)
        u_y = np.ascontiguousarray(uniq[:, 1 + 3 * m:]).view(np.float64)
        base = u_group[:, None] * k + u_cl
        o_place = np.stack([base, base + tk], axis=2)
        o_ok = np.stack([u_r, u_o], axis=2)
        o_ok &= cap[np.where(o_ok, o_place, 0)] > 0
        o_col = np.broadcast_to(np.arange(m)[None, :, None], o_place.shape)
        o_y = np.broadcast_to(u_y[:, :, None], o_place.shape)
        o_row = np.broadcast_to(np.arange(uniq.shape[0])[:, None, None], o_place.shape)
        s_row, s_place, s_col, s_cost = o_row[o_ok], o_place[o_ok], o_col[o_ok], -o_y[o_ok]
        n_u = uniq.shape[0]
    else:
        inverse = np.zeros(0, dtype=np.int64)
        supply_s = np.zeros(0, dtype=np.int64)
        s_row = s_place = s_col = np.zeros(0, dtype=np.int64)
        s_cost = np.zeros(0)
        n_u = 0
    # dummy sources: E_j optional places of cluster j stay empty
    spare_j = np.flatnonzero(res.spare > 0)
    if spare_j.size:
        d_place = tk + np.arange(places.n_groups)[None, :] * k + spare_j[:, None]
        d_row = np.broadcast_to(np.arange(spare_j.size)[:, None], d_place.shape) + n_u
        ok = cap[d_place] > 0
        d_row, d_place = d_row[ok], d_place[ok]
    else:
        d_row = d_place = np.zeros(0, dtype=np.int64)
    n_supply = n_u + spare_j.size
    arc_from, arc_to = res.arc_key // size, res.arc_key % size
    person_from = np.concatenate([s_row, d_row])
    person_place = np.concatenate([s_place, d_place])
    n_pv = person_from.size
    places_used = np.unique(np.concatenate([person_place, arc_from, arc_to, np.flatnonzero(res.residual != 0)]))
    row_of_place = np.full(size, -1, dtype=np.int64)
    row_of_place[places_used] = n_supply + np.arange(places_used.size)
    n_rows = n_supply + places_used.size
    n_vars = n_pv + arc_from.size
    empty = {"s_place": np.zeros(0, dtype=np.int64), "s_col": np.zeros(0, dtype=np.int64)}
    if n_vars == 0:
        if np.any(res.residual != 0):
            return {"status": "infeasible", "seconds": 0.0}
        return {"status": "ok", "prices": prices_ref.copy(), "seconds": 0.0, "used_key": np.zeros(0, np.int64),
                "used_flow": np.zeros(0, np.int64), **empty}
    rows = np.concatenate([person_from, row_of_place[person_place], row_of_place[arc_from], row_of_place[arc_to]])
    cols = np.concatenate([np.arange(n_pv), np.arange(n_pv), n_pv + np.arange(arc_from.size),
                           n_pv + np.arange(arc_from.size)])
    vals = np.concatenate([np.ones(2 * n_pv), -np.ones(arc_from.size), np.ones(arc_from.size)])
    a_eq = sp.csr_matrix((vals, (rows, cols)), shape=(n_rows, n_vars))
    b_eq = np.concatenate([supply_s, res.spare[spare_j], res.residual[places_used]]).astype(np.float64)
    cost = np.concatenate([s_cost, np.zeros(d_row.size), res.arc_cost])
    upper = np.concatenate([np.full(n_pv, np.inf), res.movable[arc_from].astype(np.float64)])
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
        raise DistFairError("residual fair-assignment LP returned a fractional vertex (impossible for a "
                            "network matrix)")
    z = x[n_pv:]
    used = np.flatnonzero(z > 0)
    prices = prices_ref.copy()
    prices[places_used] = -lp.eqlin.marginals[n_supply:]
    # duals are unique only up to a constant per connected component: stay close to the old prices
    ea = [row_of_place[arc_from] - n_supply]
    eb = [row_of_place[arc_to] - n_supply]
    if n_pv:
        order = np.lexsort((person_place, person_from))
        f, pl = person_from[order], person_place[order]
        same = f[1:] == f[:-1]
        ea.append(row_of_place[pl[:-1][same]] - n_supply)
        eb.append(row_of_place[pl[1:][same]] - n_supply)
    ea, eb = np.concatenate(ea), np.concatenate(eb)
    graph = sp.csr_matrix((np.ones(ea.size), (ea, eb)), shape=(places_used.size, places_used.size))
    n_comp, comp = connected_components(graph, directed=False)
    shift = prices_ref[places_used] - prices[places_used]
    finite = np.isfinite(shift)
    for c in range(n_comp):
        members = (comp == c) & finite
        if members.any():
            prices[places_used[comp == c]] += np.median(shift[members])
    # members of each merged source (sorted by gid) take its flows in option order
    s_out = np.zeros(n_s, dtype=np.int64)
    c_out = np.zeros(n_s, dtype=np.int64)
    if n_s:
        flow = x[:s_row.size]
        seq = np.repeat(np.arange(s_row.size), flow)  # s_row is sorted by source row
        members = np.argsort(inverse, kind="stable")
        if seq.size != n_s:
            raise DistFairError("residual LP flows do not match the free samples")
        s_out[members] = s_place[seq]
        c_out[members] = s_col[seq]
    return {"status": "ok", "prices": prices, "seconds": seconds, "s_place": s_out, "s_col": c_out,
            "used_key": res.arc_key[used], "used_flow": z[used]}


def exact_finish(persons: Persons, state: AuctionState, spare: np.ndarray, reducer: Reducer,
                 options: FinishOptions | None = None) -> FinishResult:
    """Make the auction's assignment exactly optimal and certify it (module docstring).

    Args:
        persons: this worker's samples.
        state: the auction's result on this worker.
        spare: ``(K,)`` optional places per cluster that stay empty (eps > 0; zeros otherwise).
    """
    opts = options or FinishOptions()
    places = persons.places
    size = places.size
    vmax = float(persons.value.max()) if persons.size else 0.0
    scale = max(float(allreduce_max(reducer, np.array([vmax]))[0]), 1e-12)
    delta, arc_delta, tol = opts.delta * scale, opts.arc_delta * scale, opts.tolerance * scale
    offer = arc_delta
    assign, column = state.assign.copy(), state.column.copy()
    prices_ref = state.prices.copy()
    # margins: exact where the auction's bound (bid - price - eps_bid <= margin) does not settle them
    margins = np.full(persons.size, np.inf)
    assigned = assign >= 0
    bound = np.where(assigned, state.bids - np.where(assigned, prices_ref[np.maximum(assign, 0)], 0) - state.bid_eps,
                     -np.inf)
    known = np.zeros(persons.size, dtype=bool)

    def ensure(threshold: float) -> None:
        rows = np.flatnonzero(~known & (bound < threshold))
        margins[rows] = _scan(persons, rows, assign, column, prices_ref)[0]
        known[rows] = True

    ensure(max(delta, arc_delta))
    free = margins < delta
    lp_seconds = 0.0
    free_total = 0
    for iteration in range(1, opts.max_iterations + 1):
        last = iteration == opts.max_iterations
        if last:
            free[:] = True
            offer = np.inf
        fixed = np.flatnonzero(~free)
        fixed_counts = reducer.allreduce_sum(np.bincount(assign[fixed], minlength=size).astype(np.int64))
        near = fixed[margins[fixed] < arc_delta]
        key, cost, owner = _exchange_candidates(persons, near, assign, column, prices_ref, arc_delta)
        arc_key, arc_cost = _min_by_key(allgather_concat(reducer, key), allgather_concat(reducer, cost))
        rows = np.flatnonzero(free)
        opt_place, opt_y, _ = _options(persons, rows, prices_ref, offer) if rows.size else (
            np.zeros((0, 2 * persons.shard.cands.width), dtype=np.int64), np.zeros((0, 2 * persons.shard.cands.width)),
            None)
        width = persons.shard.cands.width
        offered_r = opt_place[:, :width] >= 0
        offered_o = opt_place[:, width:] >= 0 if places.bounded else np.zeros_like(offered_r)
        cl = np.where(offered_r | offered_o, persons.clusters(rows), -1)
        yv = np.where(cl >= 0, opt_y[:, :width], 0.0)
        gathered = [allgather_concat(reducer, a) for a in (
            persons.gid[rows], persons.groups[rows], cl.reshape(rows.size, width), yv.reshape(rows.size, width),
            offered_r.reshape(rows.size, width), offered_o.reshape(rows.size, width))]
        free_total = int(gathered[0].size)
        if reducer.rank == 0:
            order = np.argsort(gathered[0], kind="stable")
            g_id, g_group, g_cl, g_y, g_r, g_o = (a[order] for a in gathered)
            res = _Residual(gid=g_id, group=g_group, clusters=g_cl, values=g_y, offered_r=g_r, offered_o=g_o, spare=np.asarray(spare, dtype=np.int64),
                            arc_key=arc_key, arc_cost=arc_cost,
                            residual=(places.cap - fixed_counts).astype(np.int64), movable=fixed_counts)
            out = _solve_residual(persons, res, prices_ref)
            status = 0 if out["status"] != "ok" else (1 if out["used_key"].size == 0 else 2)
            head = np.array([status, int(out.get("seconds", 0.0) * 1e6)], dtype=np.int64)
            if status == 1:
                body = np.stack([res.gid, out["s_place"], out["s_col"]], axis=1).ravel()
            elif status == 2:
                body = np.stack([out["used_key"], out["used_flow"]], axis=1).ravel()
            else:
                body = np.zeros(0, dtype=np.int64)
            payload_i = np.concatenate([head, body])
            payload_p = out["prices"] if status == 1 else prices_ref
        else:
            payload_i = payload_p = None
        info = broadcast(reducer, payload_i, np.int64)
        new_prices = broadcast(reducer, payload_p, np.float64)
        status = int(info[0])
        lp_seconds += info[1] / 1e6
        LOG.debug("finish iteration %d: %d free, %s", iteration, free_total,
                  ["infeasible", "solved", "exchange arcs used"][status])
        if status == 0:
            if last:
                raise InfeasibleError("no assignment over the candidate clusters meets the fairness targets "
                                      "(the full LP is infeasible); increase top_m or eps")
            delta, arc_delta, offer = delta * opts.growth, arc_delta * opts.growth, offer * opts.growth
            ensure(max(delta, arc_delta))
            free |= margins < delta
            continue
        if status == 2:  # free the cheapest fixed samples behind every exchange arc the LP used
            used = info[2:].reshape(-1, 2)
            _free_movers(used, key, cost, owner, free, persons, reducer)
            continue
        triples = info[2:].reshape(-1, 3)
        if rows.size:
            at = np.searchsorted(triples[:, 0], persons.gid[rows])
            assign[rows], column[rows] = triples[at, 1], triples[at, 2]
        all_rows = np.arange(persons.size)
        scan_margins, best_sum, primal = _scan(persons, all_rows, assign, column, new_prices)
        bad_fixed = ~free & (scan_margins < -tol)
        bad_free = free & (scan_margins < -tol)
        counts = reducer.allreduce_sum(np.array([bad_fixed.sum(), bad_free.sum()], dtype=np.int64))
        prices_ref = new_prices
        margins, known[:] = scan_margins, True
        bound = margins
        if counts.sum() == 0:
            sums = reducer.allreduce_sum(np.array([primal, best_sum]))
            finite = places.cap > 0
            _, po = persons.price_views(new_prices)
            spare_arr = np.asarray(spare, dtype=np.float64)
            dummy = 0.0
            if places.bounded and spare_arr.any():
                dummy = float(np.sum(spare_arr * np.max(np.where(np.isfinite(po), -po, -np.inf), axis=0)
                                     .clip(min=-1e300)))
            dual = float(sums[1] + np.sum(places.cap[finite] * new_prices[finite]) + dummy)
            return FinishResult(assign, column, new_prices, iteration, free_total, lp_seconds, float(sums[0]), dual)
        LOG.debug("finish iteration %d: %d fixed and %d free samples violate slackness", iteration, *counts)
        free |= bad_fixed
        if counts[1]:
            offer *= opts.growth
    raise DistFairError("exact finish did not converge")  # pragma: no cover - the last iteration frees all


def _free_movers(used: np.ndarray, key: np.ndarray, cost: np.ndarray, owner: np.ndarray, free: np.ndarray,
                 persons: Persons, reducer: Reducer) -> None:
    """For every used exchange arc with flow z, free the 2 z + 2 fixed samples (all workers) that make
    that move cheapest (exact global order by (cost, id), so the choice does not depend on the split)."""
    used_key, flow = used[:, 0], used[:, 1]
    seg_of = np.searchsorted(used_key, key)
    seg_of = np.where((seg_of < used_key.size) & (used_key[np.minimum(seg_of, used_key.size - 1)] == key), seg_of, -1)
    mine = seg_of >= 0
    pos, c, who = seg_of[mine], cost[mine], owner[mine]
    gid = persons.gid[who]
    counts = reducer.allreduce_sum(np.bincount(pos, minlength=used_key.size).astype(np.int64))
    k = np.minimum(2 * flow + 2, counts) - 1
    thr_c, thr_g = select_kth(pos, c, gid, k, reducer)
    take = ~(c > thr_c[pos]) & ~((c == thr_c[pos]) & (gid < thr_g[pos]))
    free[who[take]] = True
