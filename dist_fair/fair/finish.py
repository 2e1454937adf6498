"""Exact finish of the scalable solver, and the optimality certificate (METHODS.md §6).

The auction (:mod:`dist_fair.fair.auction`) leaves cell prices ``p_tj``, pool prices ``q_j`` and
an assignment in which every assigned sample is within eps of its best cell, with a few samples
possibly unassigned. The finish makes it exactly optimal with successive shortest paths on the
small *exchange graph*, whose nodes are the T K cells and the K clusters:

- exchange edge ``a -> b`` (a sample of cell a moves to cell b of the same group), weight
  ``min_i (y_ia - y_ib)`` over the members i of a, reduced weight ``w + p_b - p_a``;
- count edges ``c -> j`` when cell c may grow (``n_c < upper_c``), reduced weight ``q_j - p_c``,
  and ``j -> c`` when it may shrink (``n_c > lower_c``), reduced weight ``p_c - q_j``.

An assignment meeting the targets is optimal iff this graph (with all edges) has no negative
cycle, and prices with non-negative reduced weights on every edge are an optimality certificate.

1. Price repair: the least potentials above the auction's prices with no negative reduced weight
   (vectorised Bellman-Ford). A negative cycle means the assignment can be improved: the
   cheapest sample behind every exchange edge of the cycle moves along it, and the repair repeats.
2. Augmentation: each sample left unassigned by the auction is placed along a shortest path
   (Dijkstra, non-negative reduced weights) from its candidate cells to a cell below its lower
   bound or a cluster with a free place (after its cells' deficits),
   moving one sample per exchange edge on the path; prices drop by the distances (the Hungarian
   update), which keeps every edge non-negative. No path at all proves the targets cannot be met
   with these candidates (max-flow/min-cut), which is reported.
3. Verification over every sample and every option: any reduced weight below ``-tolerance`` means
   an edge that was left out (only edges with reduced weight below ``arc_delta`` are built) - the
   threshold grows and the repair repeats.
4. Certificate: for any prices, weak duality gives
   ``D(p, q) = sum_i max_j (y_ij - p_tj) + sum_tj max((p_tj - q_j) lower_tj, (p_tj - q_j) upper_tj)
   + sum_j q_j |C_j| >= sum_i y_{i, a(i)}``, so ``gap = D - sum_i y_{i,a(i)} >= 0`` proves how far the
   labels can be from optimal (objective minus ``N - D``). After step 3 it is zero up to rounding;
   at scale, where no reference LP can run, it is the evidence of exactness.

SPMD like the auction: edges are aggregated per (cell, cell) pair on every worker and gathered
(O(edges), a small multiple of T K), the shortest paths run on rank 0 and are broadcast, and the
sample moved along an edge is the global cheapest one (exact order by (cost, id)), so W workers
return what one returns.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from dist_fair.errors import DistFairError, InfeasibleError
from dist_fair.fair.auction import AuctionState, Persons, Places, select_kth
from dist_fair.fair.candidates import BLOCK_ROWS
from dist_fair.collective import Collective, all_gather_concat, all_reduce_max

LOG = logging.getLogger(__name__)

@dataclass
class FinishOptions:
    """Tuning of the exact finish (thresholds are fractions of the value range ``max y``).

    Attributes:
        arc_delta: exchange edges are built when their reduced weight is below this.
        growth: factor applied to arc_delta when an edge was missing.
        tolerance: complementary-slackness tolerance of the verification.
        max_iterations: repair/verify rounds at most (arc_delta becomes infinite in the last).
    """

    arc_delta: float = 1e-3
    growth: float = 4.0
    tolerance: float = 1e-9
    max_iterations: int = 40


@dataclass
class FinishResult:
    assign: np.ndarray
    column: np.ndarray
    prices: np.ndarray
    cluster_prices: np.ndarray
    iterations: int
    augmented: int     # samples placed by shortest paths (all workers)
    cycles: int        # negative cycles cancelled
    seconds: float
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
    """Unique keys (sorted) and the smallest cost of each."""
    if keys.size == 0:
        return keys.astype(np.int64), costs
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    return keys[starts], np.minimum.reduceat(costs[order], starts)


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
    for iteration in range(n_nodes + 2):
        cand = phi[src_s] - w_s
        best = np.maximum.reduceat(cand, starts)
        improve = best > phi[heads] + slack
        if not improve.any():
            return phi, None
        arg = np.minimum.reduceat(np.where(cand >= np.repeat(best, lengths), positions, dst_s.size), starts)
        pred[heads[improve]] = order[arg[improve]]
        phi[heads[improve]] = best[improve]
        if iteration % 16 == 15 or iteration == n_nodes + 1:
            node = _on_pred_cycle(pred, src, heads[improve], n_nodes)
            if node is not None:
                return None, _cycle_from(pred, src, node, n_nodes)
    raise DistFairError("Bellman-Ford did not settle")  # pragma: no cover - a cycle is found above


def _on_pred_cycle(pred: np.ndarray, src: np.ndarray, nodes: np.ndarray, n_nodes: int) -> int | None:
    """A node on a cycle of the predecessor graph reachable from ``nodes``, or None (pointer jumping:
    a walk still alive after more than n_nodes steps must have entered a cycle)."""
    nxt = np.where(pred >= 0, src[np.maximum(pred, 0)], -1)
    cur = nodes.copy()
    steps = 1
    jump = nxt.copy()
    while steps <= n_nodes:
        alive = cur >= 0
        cur[alive] = jump[cur[alive]]
        ok = jump >= 0
        jump = np.where(ok, jump[np.maximum(jump, 0)], -1)
        steps *= 2
    alive = np.flatnonzero(cur >= 0)
    return int(cur[alive[0]]) if alive.size else None


def _cycle_from(pred: np.ndarray, src: np.ndarray, node: int, n_nodes: int) -> np.ndarray:
    cycle, start = [], node
    while True:
        edge = pred[node]
        cycle.append(edge)
        node = src[edge]
        if node == start or len(cycle) > n_nodes:
            break
    return np.array(cycle[::-1], dtype=np.int64)


def _cell_violations(places: Places, counts: np.ndarray, p: np.ndarray, q: np.ndarray, tol: float) -> np.ndarray:
    """Cells whose count disagrees with ``p - q`` (complementary slackness of n_tj)."""
    if not places.bounded:
        return np.zeros(places.size, dtype=bool)
    live = places.upper > 0
    d = np.where(live, p - np.tile(q, places.n_groups), 0.0)
    term = np.maximum(d * places.lower, d * places.upper) - d * counts
    return live & (term > tol * np.maximum(1, counts))


def _column_of(persons: Persons, rows: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Candidate column holding each row's given cluster."""
    if persons.index is None:
        return clusters.astype(np.int64)
    return np.argmax(persons.index[rows] == clusters[:, None], axis=1).astype(np.int64)


class _Exchange:
    """Exchange edges ``a -> b`` (key ``a * S + b``) with the cheapest raw move cost, identical on every
    worker, rebuilt per source cell when its members change."""

    def __init__(self, persons: Persons, collective: Collective) -> None:
        self.persons, self.collective = persons, collective
        self.size = persons.places.size
        self.key = np.zeros(0, dtype=np.int64)
        self.raw = np.zeros(0)

    def rebuild(self, rows: np.ndarray, assign, column, prices, threshold: float, cells: np.ndarray | None) -> None:
        """Recompute the edges out of ``cells`` (all cells when None) from the local ``rows``."""
        key, raw, _ = _exchange_candidates(self.persons, rows, assign, column, prices, threshold)
        key, raw = _min_by_key(all_gather_concat(self.collective, key), all_gather_concat(self.collective, raw))
        if cells is None:
            self.key, self.raw = key, raw
            return
        keep = ~np.isin(self.key // self.size, cells)
        merged_key = np.concatenate([self.key[keep], key])
        merged_raw = np.concatenate([self.raw[keep], raw])
        order = np.argsort(merged_key, kind="stable")
        self.key, self.raw = merged_key[order], merged_raw[order]


def _cheapest_movers(persons: Persons, edges: np.ndarray, assign: np.ndarray, column: np.ndarray,
                     collective: Collective) -> tuple[np.ndarray, np.ndarray]:
    """For each exchange edge (a, b): the member of a (over all workers) with the smallest raw cost
    ``y_a - y_b`` (then the largest id first, the :func:`key_less` order). Returns the local rows that
    must move and their target cells."""
    size = persons.places.size
    if edges.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    src, dst = edges // size, edges % size
    members = np.flatnonzero(np.isin(assign, src))
    pos_all, cost_all, row_all = [], [], []
    if members.size:
        y, _ = persons.options(members, np.zeros(size))
        cl = persons.clusters(members)
        target = persons.groups[members][:, None] * persons.places.n_clusters + cl
        for e in range(edges.size):
            mine = assign[members] == src[e]
            hit = mine[:, None] & (target == dst[e])
            r, c = np.nonzero(hit)
            pos_all.append(np.full(r.size, e))
            cost_all.append(y[r, column[members[r]]] - y[r, c])
            row_all.append(members[r])
    pos = np.concatenate(pos_all) if pos_all else np.zeros(0, dtype=np.int64)
    cost = np.concatenate(cost_all) if cost_all else np.zeros(0)
    rows = np.concatenate(row_all) if row_all else np.zeros(0, dtype=np.int64)
    thr_c, thr_g = select_kth(pos, cost, persons.gid[rows], np.zeros(edges.size, dtype=np.int64), collective)
    pick = (cost == thr_c[pos]) & (persons.gid[rows] == thr_g[pos])
    return rows[pick], dst[pos[pick]]


def _move(persons: Persons, rows: np.ndarray, cells: np.ndarray, assign: np.ndarray, column: np.ndarray) -> None:
    assign[rows] = cells
    column[rows] = _column_of(persons, rows, persons.places.cluster_of(cells))


def _shortest_path(places: Places, ex: _Exchange, p: np.ndarray, q: np.ndarray, counts: np.ndarray,
                   src_cell: np.ndarray, src_w: np.ndarray, limit: float):
    """Dijkstra from the unassigned samples (source edges ``src_cell`` with weights ``src_w``) to a
    cluster with a free place. Returns (distances over cells+clusters, path as node list) or None."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import dijkstra

    size, k = places.size, places.n_clusters
    n_nodes = size + k + 1
    source = size + k
    a, b = ex.key // size, ex.key % size
    w_ex = np.maximum(ex.raw + p[b] - p[a], 0.0)
    live = np.flatnonzero(places.upper > 0)
    up = live[counts[live] < places.upper[live]]
    down = live[counts[live] > places.lower[live]]
    src = np.concatenate([a, up, size + down % k, np.full(src_cell.size, source)])
    dst = np.concatenate([b, size + up % k, down, src_cell])
    w = np.concatenate([w_ex, np.maximum(q[up % k] - p[up], 0.0), np.maximum(p[down] - q[down % k], 0.0),
                        np.maximum(src_w, 0.0)])
    ok = np.isfinite(w)
    graph = sp.csr_matrix((w[ok] + 1e-300, (src[ok], dst[ok])), shape=(n_nodes, n_nodes))
    dist, pred = dijkstra(graph, indices=source, return_predecessors=True, limit=limit)
    # sinks: cells below their lower bound, and clusters with a place left once those are filled
    deficit = np.maximum(places.lower - counts, 0).reshape(places.n_groups, k).sum(axis=0)
    spare = places.cluster_sizes - counts.reshape(places.n_groups, k).sum(axis=0) - deficit
    sinks = np.concatenate([np.flatnonzero(counts < places.lower), size + np.flatnonzero(spare > 0)])
    reach = dist[sinks]
    if not np.isfinite(reach).any():
        return None
    target = int(sinks[int(np.argmin(reach))])
    path = [target]
    while path[-1] != source:
        path.append(int(pred[path[-1]]))
    return dist[:size + k], path[::-1]


def exact_finish(persons: Persons, state: AuctionState, collective: Collective,
                 options: FinishOptions | None = None) -> FinishResult:
    """Make the auction's assignment exactly optimal and certify it (module docstring)."""
    start_time = time.perf_counter()
    opts = options or FinishOptions()
    places = persons.places
    size, k = places.size, places.n_clusters
    vmax = float(persons.value.max()) if persons.size else 0.0
    scale = max(float(all_reduce_max(collective, np.array([vmax]))[0]), 1e-12)
    arc_delta, tol = opts.arc_delta * scale, opts.tolerance * scale
    assign, column = state.assign.copy(), state.column.copy()
    p, q = state.prices.copy(), state.cluster_prices.copy()
    # margins are needed only where the auction's bound (bid - price - eps_bid <= margin) is small
    assigned = assign >= 0
    bound = np.where(assigned, state.bids - p[np.maximum(assign, 0)] - state.bid_eps, -np.inf)
    ex = _Exchange(persons, collective)
    augmented = cycles = 0
    n_nodes = size + k
    for iteration in range(1, opts.max_iterations + 1):
        if iteration == opts.max_iterations:
            arc_delta = np.inf
        # ---- 1. price repair on the exchange graph of the assigned samples (cancelling negative cycles)
        while True:
            near = np.flatnonzero((assign >= 0) & (bound < arc_delta))
            ex.rebuild(near, assign, column, p, arc_delta, None)
            counts = collective.all_reduce_sum(np.bincount(assign[assign >= 0], minlength=size).astype(np.int64))
            if collective.rank == 0:
                src, dst, w = ex.key // size, ex.key % size, ex.raw
                live = np.flatnonzero(places.upper > 0)
                up, down = live[counts[live] < places.upper[live]], live[counts[live] > places.lower[live]]
                src = np.concatenate([src, up, size + down % k])
                dst = np.concatenate([dst, size + up % k, down])
                w = np.concatenate([w, np.zeros(up.size + down.size)])
                phi, cycle = _potentials(n_nodes, src, dst, w, np.concatenate([p, q]), slack=1e-13 * scale)
                payload_p = phi if cycle is None else np.zeros(0)
                payload_c = np.zeros(0, dtype=np.int64) if cycle is None else np.unique(ex.key[cycle[cycle < ex.key.size]])
            else:
                payload_p = payload_c = None
            phi = np.asarray(collective.broadcast(payload_p), dtype=np.float64)
            cycle_keys = np.asarray(collective.broadcast(payload_c), dtype=np.int64)
            if cycle_keys.size == 0:
                p, q = phi[:size], phi[size:]
                break
            rows, cells = _cheapest_movers(persons, cycle_keys, assign, column, collective)
            _move(persons, rows, cells, assign, column)
            cycles += 1
            LOG.debug("finish: cancelled a negative cycle of %d moves", cycle_keys.size)
            bound[rows] = -np.inf
        # ---- 2. shortest augmenting paths for the unassigned samples
        waiting = np.flatnonzero(assign < 0)
        n_wait = int(collective.all_reduce_sum(np.array([waiting.size], dtype=np.int64))[0])
        limit = arc_delta
        drop = 0.0
        rebuild = False
        while n_wait:
            if rebuild:  # price drops may have eroded edges left out of the graph: build it afresh
                assigned_rows = np.flatnonzero(assign >= 0)
                bound[assigned_rows] = _scan(persons, assigned_rows, assign, column, p)[0]
                ex.rebuild(np.flatnonzero((assign >= 0) & (bound < limit)), assign, column, p, limit, None)
                drop, rebuild = 0.0, False
            y, v = persons.options(waiting, p) if waiting.size else (np.zeros((0, 1)), np.zeros((0, 1)))
            cl = persons.clusters(waiting) if waiting.size else np.zeros((0, 1), dtype=np.int64)
            rc = v.max(axis=1, keepdims=True) - v if waiting.size else v
            cells = persons.groups[waiting][:, None] * k + cl
            ok = np.isfinite(rc)
            s_cell = all_gather_concat(collective, cells[ok])
            s_w = all_gather_concat(collective, rc[ok])
            s_gid = all_gather_concat(collective, np.broadcast_to(persons.gid[waiting][:, None], cells.shape)[ok])
            if collective.rank == 0:
                order = np.lexsort((s_gid, s_w, s_cell))
                s_cell, s_w, s_gid = s_cell[order], s_w[order], s_gid[order]
                first = np.concatenate([[True], s_cell[1:] != s_cell[:-1]]) if s_cell.size else np.zeros(0, bool)
                found = _shortest_path(places, ex, p, q, counts, s_cell[first], s_w[first], limit)
                if found is None:
                    payload_i, payload_p = np.zeros(0, dtype=np.int64), np.zeros(0)
                else:
                    dist, path = found
                    dmax = dist[path[-1]]
                    payload_p = np.concatenate([p, q]) - np.minimum(dist, dmax)
                    who = s_gid[first][np.searchsorted(s_cell[first], path[1])]
                    payload_i = np.concatenate([[who], path[1:]])
            else:
                payload_i = payload_p = None
            found_i = np.asarray(collective.broadcast(payload_i), dtype=np.int64)
            new_pq = np.asarray(collective.broadcast(payload_p), dtype=np.float64)
            if found_i.size == 0:
                if np.isfinite(limit):
                    limit = limit * opts.growth if limit * opts.growth < 1e6 * scale else np.inf
                    rebuild = True
                    continue
                raise InfeasibleError(
                    f"no assignment over the candidate clusters meets the fairness targets: {n_wait} samples "
                    f"have no augmenting path to a free place (max-flow certificate); increase top_m or eps")
            who, nodes = int(found_i[0]), found_i[1:]
            drop += float(np.max(np.concatenate([p, q]) - new_pq, initial=0.0, where=np.isfinite(new_pq)))
            rebuild = drop > limit / 2
            p, q = new_pq[:size], new_pq[size:]
            # exchange edges along the path: consecutive cell nodes (cluster nodes are count edges)
            hops = [(int(nodes[i]), int(nodes[i + 1])) for i in range(len(nodes) - 1)
                    if nodes[i] < size and nodes[i + 1] < size]
            edge_keys = np.array([a * size + b for a, b in hops], dtype=np.int64)
            rows, targets = _cheapest_movers(persons, edge_keys, assign, column, collective)
            mine = np.flatnonzero(persons.gid[waiting] == who)
            _move(persons, rows, targets, assign, column)
            if mine.size:
                _move(persons, waiting[mine], np.array([int(nodes[0])]), assign, column)
            bound[rows] = -np.inf
            bound[waiting[mine]] = -np.inf
            changed = np.unique(np.concatenate([[int(nodes[0])], edge_keys // size, edge_keys % size]))
            changed = changed[changed < size]
            members = np.flatnonzero(np.isin(assign, changed))
            ex.rebuild(members, assign, column, p, limit, changed)
            counts = collective.all_reduce_sum(np.bincount(assign[assign >= 0], minlength=size).astype(np.int64))
            waiting = np.flatnonzero(assign < 0)
            n_wait -= 1
            augmented += 1
        # ---- 3. verification over every sample and option, 4. certificate
        margins, best_sum, primal = _scan(persons, np.arange(persons.size), assign, column, p)
        counts = collective.all_reduce_sum(np.bincount(assign, minlength=size).astype(np.int64))
        bad_cells = _cell_violations(places, counts, p, q, tol)
        n_bad = int(collective.all_reduce_sum(np.array([(margins < -tol).sum()], dtype=np.int64))[0])
        if n_bad == 0 and not bad_cells.any():
            sums = collective.all_reduce_sum(np.array([primal, best_sum]))
            live = places.upper > 0
            d = np.where(live, p - np.tile(q, places.n_groups), 0.0)
            dual = float(sums[1] + np.sum(np.maximum(d * places.lower, d * places.upper))
                         + np.sum(q * places.cluster_sizes))
            return FinishResult(assign, column, p, q, iteration, augmented, cycles,
                                time.perf_counter() - start_time, float(sums[0]), dual)
        LOG.debug("finish iteration %d: %d samples and %d cells violate slackness; widening the exchange graph",
                  iteration, n_bad, int(bad_cells.sum()))
        bound = margins
        arc_delta *= opts.growth
    raise DistFairError("exact finish did not converge")  # pragma: no cover - arc_delta is infinite at the end
