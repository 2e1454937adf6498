"""Exact finish of the scalable solver, and the optimality certificate (METHODS.md §6).

The auction (:mod:`dist_fair.fair.auction`) leaves cell prices ``p_tj`` (and pool prices ``q_j``)
and an assignment in which almost every sample sits on its best cell by a clear margin. The finish
turns this into a provably optimal integral assignment:

1. Free samples: those unassigned by the auction, or whose margin ``v_cur - max_other v`` (values
   ``v = y - p``, other = other clusters) is below ``delta``. All others are fixed where they are.
2. Residual LP (HiGHS dual simplex) on rank 0, with inputs gathered in a canonical order (sorted
   by global id): free samples (identical rows merged into one source with a supply) over their
   options within ``offer`` of their best; cell count variables ``n_tj`` in ``[lower, upper]``
   (``n_tj`` = fixed members + inflow - outflow) and cluster rows ``sum_t n_tj = |C_j|``; plus
   *exchange arcs* ``a -> b`` that let fixed samples move, priced at the cheapest such move
   ``min_i (y_ia - y_ib)`` and bounded by the fixed count of a (moves with reduced cost below
   ``arc_delta`` only). Exchange arcs make the LP a relaxation of the full problem: if its optimum
   uses none, its solution is feasible for the full problem. The matrix is a network matrix, so
   the simplex vertex is integral. If the LP uses exchange arcs, the cheapest samples behind them
   are freed; if it is infeasible, the thresholds grow (the last iteration frees everything: the
   full LP).
3. Verification: new prices come from the LP's optimal flow itself - the least potentials above
   the old prices with no negative reduced cost on the LP's residual graph (Bellman-Ford; exact,
   no solver tolerances, and as close to the old prices as the new flow allows). Every sample must
   then be on a best cell and every cell count must agree with ``p_tj - q_j`` (at ``lower`` if
   negative, at ``upper`` if
   positive). Violating samples are freed, violating cells enter the LP, and step 2 repeats.
4. Certificate: for any prices, weak duality gives the bound
   ``D(p, q) = sum_i max_j (y_ij - p_tj) + sum_tj max((p_tj - q_j) lower_tj, (p_tj - q_j) upper_tj)
   + sum_j q_j |C_j| >= sum_i y_{i, a(i)}``, so ``gap = D - sum_i y_{i,a(i)} >= 0`` proves how far the
   labels can be from optimal (objective - (N - D)). It is the sum of the verification violations,
   computed over all samples with one O(T K) reduction; at scale, where no reference LP can run,
   it is the evidence of exactness.

SPMD like the auction: counts are all-reduced, the free samples and exchange arcs (the boundary of
the assignment, a small set) are gathered once per iteration, rank 0 solves and broadcasts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from dist_fair.errors import DistFairError, InfeasibleError
from dist_fair.fair.auction import AuctionState, Persons, Places, key_less, select_kth
from dist_fair.fair.candidates import BLOCK_ROWS
from dist_fair.fair.reducer import Reducer, allgather_concat, allreduce_max, broadcast

LOG = logging.getLogger(__name__)

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
    cluster_prices: np.ndarray
    iterations: int
    free: int          # free samples in the last residual LP (all workers)
    lp_seconds: float
    primal: float      # sum_i y_{i, a(i)}
    dual: float        # D(p, q)


def _scan(persons: Persons, rows: np.ndarray, assign: np.ndarray, column: np.ndarray, prices: np.ndarray
          ) -> tuple[np.ndarray, float, float]:
    """Margins ``v_cur - max over other clusters`` of the rows (-inf when unassigned), and over them
    ``sum_i max_j v_ij`` and ``sum_i y_{i,a(i)}``."""
    margins = np.full(rows.size, -np.inf)
    best_sum = primal = 0.0
    for start in range(0, rows.size, BLOCK_ROWS):
        part = np.arange(start, min(start + BLOCK_ROWS, rows.size))
        sub = rows[part]
        ok = assign[sub] >= 0
        if not ok.any():
            continue
        sub, part = sub[ok], part[ok]
        _, v = persons.options(sub, prices)
        r = np.arange(sub.size)
        best_sum += float(v.max(axis=1).sum())
        current = v[r, column[sub]].copy()
        primal += float(persons.value[sub, column[sub]].astype(np.float64).sum())
        v[r, column[sub]] = -np.inf
        other = v.max(axis=1) if v.shape[1] > 1 else np.full(sub.size, -np.inf)
        margins[part] = current - other
    return margins, best_sum, primal


def _exchange_candidates(persons: Persons, rows: np.ndarray, assign: np.ndarray, column: np.ndarray,
                         prices: np.ndarray, arc_delta: float):
    """Moves of fixed samples with reduced cost < arc_delta: (key = a * S + b, raw cost y_a - y_b, row)."""
    size = persons.places.size
    keys, costs, owners = [], [], []
    for start in range(0, rows.size, BLOCK_ROWS):
        part = rows[start:start + BLOCK_ROWS]
        place, col = assign[part], column[part]
        y, v = persons.options(part, prices)
        r = np.arange(part.size)
        current, y_cur = v[r, col], y[r, col]
        target = persons.groups[part][:, None] * persons.places.n_clusters + persons.clusters(part)
        ok = (current[:, None] - v < arc_delta) & np.isfinite(v) & (target != place[:, None])
        rr, cc = np.nonzero(ok)
        keys.append(place[rr] * size + target[rr, cc])
        costs.append(y_cur[rr] - y[rr, cc])
        owners.append(part[rr])
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
    clusters: np.ndarray   # (F, m) candidate clusters, -1 = option not offered
    values: np.ndarray     # (F, m)
    arc_key: np.ndarray
    arc_cost: np.ndarray
    fixed: np.ndarray      # (T K,) fixed members per cell
    forced: np.ndarray     # (T K,) bool: cells that must be LP variables


def _solve_residual(places: Places, res: _Residual) -> dict:
    """Build and solve the residual LP on rank 0 (module docstring, step 2)."""
    import scipy.sparse as sp
    from scipy.optimize import linprog

    size, k = places.size, places.n_clusters
    n_s = res.gid.size
    m = res.clusters.shape[1] if n_s else 0
    if n_s:
        table = np.concatenate([res.group[:, None], res.clusters, res.values.view(np.int64)], axis=1)
        uniq, inverse, supply = np.unique(table, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.ravel()
        u_cl = uniq[:, 1:1 + m]
        u_y = np.ascontiguousarray(uniq[:, 1 + m:]).view(np.float64)
        ok = (u_cl >= 0)
        cell = uniq[:, :1] * k + u_cl
        ok &= places.upper[np.where(ok, cell, 0)] > 0
        s_row = np.broadcast_to(np.arange(uniq.shape[0])[:, None], u_cl.shape)[ok]
        s_cell, s_col, s_cost = cell[ok], np.broadcast_to(np.arange(m), u_cl.shape)[ok], -u_y[ok]
        n_u = uniq.shape[0]
    else:
        inverse = supply = np.zeros(0, dtype=np.int64)
        s_row = s_cell = s_col = np.zeros(0, dtype=np.int64)
        s_cost = np.zeros(0)
        n_u = 0
    arc_from, arc_to = res.arc_key // size, res.arc_key % size
    out_of_bounds = (res.fixed < places.lower) | (res.fixed > places.upper)
    cells = np.unique(np.concatenate([s_cell, arc_from, arc_to, np.flatnonzero(out_of_bounds | res.forced)]))
    cell_row = np.full(size, -1, dtype=np.int64)
    cell_row[cells] = n_u + np.arange(cells.size)
    if places.bounded:
        clusters = np.unique(cells % k)
        cluster_row = np.full(k, -1, dtype=np.int64)
        cluster_row[clusters] = n_u + cells.size + np.arange(clusters.size)
        outside = np.ones(size, dtype=bool)
        outside[cells] = False
        rest = np.bincount(np.flatnonzero(outside) % k, weights=res.fixed[outside], minlength=k)
        b_cluster = (places.cluster_sizes - rest)[clusters]
    else:
        clusters = np.zeros(0, dtype=np.int64)
        b_cluster = np.zeros(0)
    n_rows = n_u + cells.size + clusters.size
    n_sv, n_arc = s_row.size, arc_from.size
    n_cellv = cells.size if places.bounded else 0
    n_vars = n_sv + n_arc + n_cellv
    if n_vars == 0:
        if out_of_bounds.any():
            return {"status": "infeasible", "seconds": 0.0}
        return {"status": "ok", "seconds": 0.0, "s_cell": np.zeros(0, dtype=np.int64), "s_col": np.zeros(0, dtype=np.int64),
                "used_key": np.zeros(0, dtype=np.int64), "used_flow": np.zeros(0, dtype=np.int64)}
    v_arc = n_sv + np.arange(n_arc)
    v_cell = n_sv + n_arc + np.arange(n_cellv)
    rows = [s_row, cell_row[s_cell], cell_row[arc_from], cell_row[arc_to]]
    cols = [np.arange(n_sv), np.arange(n_sv), v_arc, v_arc]
    vals = [np.ones(n_sv), np.ones(n_sv), -np.ones(n_arc), np.ones(n_arc)]
    lo = np.zeros(n_vars)
    hi = np.concatenate([np.full(n_sv, np.inf), res.fixed[arc_from].astype(np.float64), np.zeros(n_cellv)])
    if places.bounded:
        rows += [cell_row[cells], cluster_row[cells % k]]
        cols += [v_cell, v_cell]
        vals += [-np.ones(n_cellv), np.ones(n_cellv)]
        lo[v_cell] = places.lower[cells]
        hi[v_cell] = places.upper[cells]
        b_cells = -res.fixed[cells].astype(np.float64)
    else:
        b_cells = (places.lower[cells] - res.fixed[cells]).astype(np.float64)
    a_eq = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_rows, n_vars))
    b_eq = np.concatenate([supply.astype(np.float64), b_cells, b_cluster.astype(np.float64)])
    cost = np.concatenate([s_cost, res.arc_cost, np.zeros(n_cellv)])
    start = time.perf_counter()
    lp = linprog(cost, A_eq=a_eq, b_eq=b_eq, bounds=np.stack([lo, hi], axis=1), method="highs-ds")
    seconds = time.perf_counter() - start
    if lp.status == 2:
        return {"status": "infeasible", "seconds": seconds}
    if lp.status != 0:
        raise DistFairError(f"HiGHS failed on the residual fair-assignment LP: {lp.message}")
    x = np.round(lp.x).astype(np.int64)
    if np.abs(lp.x - x).max() > 1e-6:
        raise DistFairError("residual fair-assignment LP returned a fractional vertex (impossible for a "
                            "network matrix)")
    z = x[n_sv:n_sv + n_arc]
    used = np.flatnonzero(z > 0)
    s_out = np.zeros(n_s, dtype=np.int64)
    c_out = np.zeros(n_s, dtype=np.int64)
    if n_s:  # members of each merged source (sorted by gid) take its flows in option order
        seq = np.repeat(np.arange(n_sv), x[:n_sv])
        members = np.argsort(inverse, kind="stable")
        if seq.size != n_s:
            raise DistFairError("residual LP flows do not match the free samples")
        s_out[members] = s_cell[seq]
        c_out[members] = s_col[seq]
    return {"status": "ok", "seconds": seconds, "s_cell": s_out, "s_col": c_out,
            "used_key": res.arc_key[used], "used_flow": z[used]}


def _cell_violations(places: Places, counts: np.ndarray, p: np.ndarray, q: np.ndarray, tol: float):
    """Cells whose count disagrees with ``p - q`` (complementary slackness of n_tj), and the bound
    term of the gap ``sum max((p-q) lower, (p-q) upper) - (p-q) n``."""
    if not places.bounded:
        return np.zeros(places.size, dtype=bool), 0.0
    live = places.upper > 0
    d = np.where(live, p - np.tile(q, places.n_groups), 0.0)
    term = np.maximum(d * places.lower, d * places.upper) - d * counts
    return live & (term > tol * np.maximum(1, counts)), float(term[live].sum())


def _potentials(n_nodes: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray, init: np.ndarray, slack: float):
    """Least ``phi >= init`` with ``phi[dst] >= phi[src] - w`` on every edge (vectorised Bellman-Ford).

    Returns ``(phi, None)``, or ``(None, cycle)`` with the edge indices of a cycle of negative total
    weight (then no such phi exists: the assignment the edges come from is not optimal)."""
    phi = init.astype(np.float64).copy()
    if src.size == 0:
        return phi, None
    order = np.argsort(dst, kind="stable")
    src_s, dst_s, w_s = src[order], dst[order], w[order]
    starts = np.flatnonzero(np.concatenate([[True], dst_s[1:] != dst_s[:-1]]))
    heads = dst_s[starts]
    lengths = np.diff(np.append(starts, dst_s.size))
    pred = np.full(n_nodes, -1, dtype=np.int64)
    positions = np.arange(dst_s.size)
    last_changed = None
    for _ in range(n_nodes + 2):
        cand = phi[src_s] - w_s
        best = np.maximum.reduceat(cand, starts)
        improve = best > phi[heads] + slack
        if not improve.any():
            return phi, None
        arg = np.minimum.reduceat(np.where(cand >= np.repeat(best, lengths), positions, dst_s.size), starts)
        pred[heads[improve]] = order[arg[improve]]
        phi[heads[improve]] = best[improve]
        last_changed = heads[improve][0]
    node = last_changed
    for _ in range(n_nodes):
        node = src[pred[node]]
    cycle, start = [], node
    while True:
        edge = pred[node]
        cycle.append(edge)
        node = src[edge]
        if node == start or len(cycle) > n_nodes:
            break
    return None, np.array(cycle[::-1], dtype=np.int64)


def _repair_edges(persons: Persons, rows: np.ndarray, assign: np.ndarray, column: np.ndarray,
                  prices: np.ndarray, arc_delta: float, reducer: Reducer):
    """Global exchange edges (min raw cost per (cell a, cell b)) of the given assigned samples, plus
    the local candidates behind them (key, cost, row) for freeing."""
    key, cost, owner = _exchange_candidates(persons, rows, assign, column, prices, arc_delta)
    arc_key, arc_cost = _min_by_key(allgather_concat(reducer, key), allgather_concat(reducer, cost))
    return arc_key, arc_cost, key, cost, owner


def _free_cheapest(wanted: np.ndarray, how_many: np.ndarray, key: np.ndarray, cost: np.ndarray,
                   owner: np.ndarray, free: np.ndarray, persons: Persons, reducer: Reducer) -> None:
    """For every edge key in ``wanted`` (sorted), free the ``how_many`` samples (over all workers) whose
    move along it is cheapest (exact global order by (cost, id): independent of the split)."""
    seg = np.searchsorted(wanted, key)
    seg = np.where((seg < wanted.size) & (wanted[np.minimum(seg, max(wanted.size - 1, 0))] == key), seg, -1)
    mine = seg >= 0
    pos, c, who = seg[mine], cost[mine], owner[mine]
    gid = persons.gid[who]
    thr_c, thr_g = select_kth(pos, c, gid, how_many - 1, reducer)
    take = ~key_less(thr_c[pos], thr_g[pos], c, gid)
    free[who[take]] = True


def exact_finish(persons: Persons, state: AuctionState, reducer: Reducer,
                 options: FinishOptions | None = None) -> FinishResult:
    """Make the auction's assignment exactly optimal and certify it (module docstring)."""
    opts = options or FinishOptions()
    places = persons.places
    size, k = places.size, places.n_clusters
    vmax = float(persons.value.max()) if persons.size else 0.0
    scale = max(float(allreduce_max(reducer, np.array([vmax]))[0]), 1e-12)
    arc_delta, tol = opts.arc_delta * scale, opts.tolerance * scale
    offer = arc_delta
    assign, column = state.assign.copy(), state.column.copy()
    p_ref, q_ref = state.prices.copy(), state.cluster_prices.copy()
    # margins: computed only where the auction's bound (bid - price - eps_bid <= margin) does not settle them
    margins = np.full(persons.size, np.inf)
    assigned = assign >= 0
    bound = np.where(assigned, state.bids - p_ref[np.maximum(assign, 0)] - state.bid_eps, -np.inf)
    known = np.zeros(persons.size, dtype=bool)

    def ensure(threshold: float) -> None:
        rows = np.flatnonzero(~known & (bound < threshold))
        margins[rows] = _scan(persons, rows, assign, column, p_ref)[0]
        known[rows] = True

    ensure(arc_delta)
    free = assign < 0
    lp_seconds = 0.0
    free_total = 0
    width = persons.shard.cands.width
    n_nodes = size + (k if places.bounded else 0)
    for iteration in range(1, opts.max_iterations + 1):
        last = iteration == opts.max_iterations
        if last:
            free[:] = True
            offer = np.inf
        n_free = int(reducer.allreduce_sum(np.array([free.sum()], dtype=np.int64))[0])
        if n_free:
            # ---- residual LP: place the free samples (fixed ones may move along exchange arcs)
            fixed = np.flatnonzero(~free)
            fixed_counts = reducer.allreduce_sum(np.bincount(assign[fixed], minlength=size).astype(np.int64))
            near = fixed[margins[fixed] < arc_delta]
            arc_key, arc_cost, key, cost, owner = _repair_edges(persons, near, assign, column, p_ref, arc_delta,
                                                                reducer)
            rows = np.flatnonzero(free)
            y, v = persons.options(rows, p_ref)
            offered = np.isfinite(v) & (v.max(axis=1, keepdims=True) - v < offer) if rows.size else v > 0
            cl = np.where(offered, persons.clusters(rows), -1).reshape(rows.size, width)
            yv = np.where(offered, y, 0.0).reshape(rows.size, width)
            g_gid, g_group, g_cl, g_y = (allgather_concat(reducer, a) for a in (
                persons.gid[rows], persons.groups[rows], cl, yv))
            free_total = int(g_gid.size)
            if reducer.rank == 0:
                order = np.argsort(g_gid, kind="stable")
                res = _Residual(g_gid[order], g_group[order], g_cl[order], g_y[order], arc_key, arc_cost,
                                fixed_counts, np.zeros(size, dtype=bool))
                out = _solve_residual(places, res)
                status = 0 if out["status"] != "ok" else (1 if out["used_key"].size == 0 else 2)
                head = np.array([status, int(out.get("seconds", 0.0) * 1e6)], dtype=np.int64)
                if status == 1:
                    body = np.stack([res.gid, out["s_cell"], out["s_col"]], axis=1).ravel()
                elif status == 2:
                    body = np.stack([out["used_key"], out["used_flow"]], axis=1).ravel()
                else:
                    body = np.zeros(0, dtype=np.int64)
                payload = np.concatenate([head, body])
            else:
                payload = None
            info = broadcast(reducer, payload, np.int64)
            status = int(info[0])
            lp_seconds += info[1] / 1e6
            LOG.debug("finish iteration %d: LP with %d free samples: %s", iteration, free_total,
                      ["infeasible", "solved", "exchange arcs used"][status])
            if status == 0:
                if last:
                    raise InfeasibleError("no assignment over the candidate clusters meets the fairness "
                                          "targets (the full LP is infeasible); increase top_m or eps")
                arc_delta, offer = arc_delta * opts.growth, offer * opts.growth
                ensure(arc_delta)
                continue
            if status == 2:  # free the cheapest fixed samples behind every exchange arc the LP used
                used = info[2:].reshape(-1, 2)
                _free_cheapest(used[:, 0], 2 * used[:, 1] + 2, key, cost, owner, free, persons, reducer)
                continue
            triples = info[2:].reshape(-1, 3)
            if rows.size:
                at = np.searchsorted(triples[:, 0], persons.gid[rows])
                assign[rows], column[rows] = triples[at, 1], triples[at, 2]
                margins[rows] = _scan(persons, rows, assign, column, p_ref)[0]
                known[rows] = True
            free[:] = False
        # ---- price repair: least potentials above the old prices on the exchange graph of all samples
        near = np.flatnonzero((assign >= 0) & (margins < arc_delta))
        arc_key, arc_cost, key, cost, owner = _repair_edges(persons, near, assign, column, p_ref, arc_delta, reducer)
        counts = reducer.allreduce_sum(np.bincount(assign, minlength=size).astype(np.int64))
        if reducer.rank == 0:
            src, dst, w = arc_key // size, arc_key % size, arc_cost
            init = np.concatenate([p_ref, q_ref]) if places.bounded else p_ref.copy()
            if places.bounded:
                live = np.flatnonzero(places.upper > 0)
                up, down = live[counts[live] < places.upper[live]], live[counts[live] > places.lower[live]]
                src = np.concatenate([src, up, size + down % k])
                dst = np.concatenate([dst, size + up % k, down])
                w = np.concatenate([w, np.zeros(up.size + down.size)])
            phi, cycle = _potentials(n_nodes, src, dst, w, init, slack=1e-13 * scale)
            if cycle is None:
                payload_p = phi
                payload_c = np.zeros(0, dtype=np.int64)
            else:
                payload_p = np.zeros(0)
                on_cycle = cycle[cycle < arc_key.size]  # sample edges (count edges come after)
                payload_c = np.unique(arc_key[on_cycle])
        else:
            payload_p = payload_c = None
        phi = broadcast(reducer, payload_p, np.float64)
        cycle_keys = broadcast(reducer, payload_c, np.int64)
        if cycle_keys.size:
            LOG.debug("finish iteration %d: negative cycle through %d moves; freeing them", iteration,
                      cycle_keys.size)
            _free_cheapest(cycle_keys, np.ones(cycle_keys.size, dtype=np.int64), key, cost, owner, free, persons,
                           reducer)
            continue
        new_p, new_q = phi[:size], (phi[size:] if places.bounded else q_ref)
        scan_margins, best_sum, primal = _scan(persons, np.arange(persons.size), assign, column, new_p)
        bad_cells, _ = _cell_violations(places, counts, new_p, new_q, tol)
        n_bad = int(reducer.allreduce_sum(np.array([(scan_margins < -tol).sum()], dtype=np.int64))[0])
        if n_bad == 0 and not bad_cells.any():
            sums = reducer.allreduce_sum(np.array([primal, best_sum]))
            live = places.upper > 0
            if places.bounded:
                d = np.where(live, new_p - np.tile(new_q, places.n_groups), 0.0)
                dual = float(sums[1] + np.sum(np.maximum(d * places.lower, d * places.upper))
                             + np.sum(new_q * places.cluster_sizes))
            else:
                dual = float(sums[1] + np.sum(np.where(live, new_p * places.lower, 0.0)))
            return FinishResult(assign, column, new_p, new_q, iteration, free_total, lp_seconds,
                                float(sums[0]), dual)
        LOG.debug("finish iteration %d: %d samples and %d cells violate slackness under the repaired prices; "
                  "widening the exchange graph", iteration, n_bad, int(bad_cells.sum()))
        p_ref, q_ref = new_p, new_q
        margins, known[:] = scan_margins, True
        bound = margins
        arc_delta *= opts.growth
    raise DistFairError("exact finish did not converge")  # pragma: no cover - the last iteration frees all
