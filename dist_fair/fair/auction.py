"""Scalable price phase: a forward auction with eps-scaling over (group, cluster) places.

The fair assignment (METHODS.md §6) is a transportation problem with few sinks and many sources:

- sinks ("places"): ``R_tj`` for every (group t, cluster j) with capacity ``lower_tj``, and, when
  the targets are flexible (eps > 0), ``O_tj`` with capacity ``upper_tj - lower_tj``
  (see :mod:`dist_fair.fair.exact` for why this split is exact);
- persons: every sample (unit supply; it may take R_tj or O_tj of its own group t for each of its
  candidate clusters j, value ``y_ij``) and, when eps > 0, ``E_j = sum_t upper_tj - |C_j|`` dummy
  persons per cluster j that fill unused optional places of cluster j (any O_tj, value 0).

Each place s has a price ``p_s``. A person's value for s is ``y - p_s``; the auction keeps every
person within eps of its best value (eps-complementary slackness) and fills every place:

1. every unassigned person i picks its best place s1 (value v1) and second best value v2 and bids
   ``b_i = y_i,s1 - v2 + eps`` (the price at which it would become indifferent, plus eps);
2. every place keeps the ``cap_s`` highest bids among its holders and new bidders (ties: lower
   global id wins) and its price becomes the lowest kept bid; outbid holders become unassigned;
3. eps starts at an eighth of the value range and shrinks by 8x per phase; at the start of a phase
   holders that violate eps-CS for the new eps are unassigned.

All bidders of a round are handled at once (vectorised NumPy, no per-sample Python loop). A phase
stops once at most ``stop_fraction`` of the persons are unassigned (the long tail of a Jacobi
auction moves a handful of persons per round and is left to the exact finish,
:mod:`dist_fair.fair.finish`, which also makes the result exactly optimal: the auction only has to
deliver good prices).

Distributed (SPMD through a :class:`~dist_fair.fair.reducer.Reducer`): every worker holds its own
samples; per round the workers sum the per-place bid counts (S = T K or 2 T K integers) and, for
places that received more bids than free slots, find the exact k-th lowest bid by a radix
selection over (bid, id) keys that exchanges a 257-entry histogram per such place per digit
(typically 2-4 digits). Every decision depends only on exact counts and exact order statistics, so
the result is the same for any number of workers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from dist_fair.fair.candidates import BLOCK_ROWS, Candidates
from dist_fair.fair.reducer import Reducer, allreduce_max
from dist_fair.fair.targets import FairTargets

LOG = logging.getLogger(__name__)

_MAX_ID = np.int64(2**62)
_SIGN = np.uint64(1 << 63)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class AuctionOptions:
    """Tuning of the price phase (defaults work from 10^3 to 10^7 samples).

    Attributes:
        eps_start: first eps as a fraction of the value range ``max y``.
        eps_factor: eps shrinks by this factor per phase.
        eps_end: last eps as a fraction of the value range.
        stop_fraction: a phase ends when at most this fraction of the persons is unassigned.
        max_rounds: rounds per phase at most.
    """

    eps_start: float = 1.0 / 8.0
    eps_factor: float = 8.0
    eps_end: float = 1e-7
    stop_fraction: float = 1e-4
    max_rounds: int = 400


@dataclass
class Shard:
    """The samples one worker holds: candidates, group and global id of each."""

    cands: Candidates
    groups: np.ndarray
    ids: np.ndarray


@dataclass
class Places:
    """The sinks of the transportation problem: ``R_tj = t K + j`` and ``O_tj = T K + t K + j``."""

    n_groups: int
    n_clusters: int
    bounded: bool
    cap: np.ndarray  # (S,) int64

    @property
    def size(self) -> int:
        return int(self.cap.size)

    def cluster_of(self, place: np.ndarray) -> np.ndarray:
        return place % self.n_clusters

    def group_of(self, place: np.ndarray) -> np.ndarray:
        return (place // self.n_clusters) % self.n_groups


def make_places(targets: FairTargets) -> Places:
    """Places and capacities for fixed (R only) or bounded (R and O) targets."""
    reserved = targets.lower.ravel().astype(np.int64)
    if targets.fixed:
        return Places(targets.n_groups, targets.n_clusters, False, reserved)
    optional = (targets.upper - targets.lower).ravel().astype(np.int64)
    return Places(targets.n_groups, targets.n_clusters, True, np.concatenate([reserved, optional]))


def dummy_counts(targets: FairTargets) -> np.ndarray:
    """``E_j = sum_t upper_tj - |C_j|`` dummy persons per cluster (all zero for fixed targets)."""
    if targets.fixed:
        return np.zeros(targets.n_clusters, dtype=np.int64)
    return (targets.upper.sum(axis=0) - targets.cluster_sizes).astype(np.int64)


def float_key(x: np.ndarray) -> np.ndarray:
    """Order-preserving map float64 -> uint64 (for radix selection)."""
    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)
    return bits ^ np.where(bits >> np.uint64(63), _ALL, _SIGN)


def key_float(k: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_key`."""
    k = np.asarray(k, dtype=np.uint64)
    bits = np.where(k >> np.uint64(63), k ^ _SIGN, k ^ _ALL)
    return bits.view(np.float64)


def key_less(bid_a: np.ndarray, id_a: np.ndarray, bid_b: np.ndarray, id_b: np.ndarray) -> np.ndarray:
    """Total order of bids: lower bid first; equal bids: higher id first (it is outbid first)."""
    return (bid_a < bid_b) | ((bid_a == bid_b) & (id_a > id_b))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def select_kth(pos: np.ndarray, bid: np.ndarray, gid: np.ndarray, k: np.ndarray, reducer: Reducer
               ) -> tuple[np.ndarray, np.ndarray]:
    """For every segment q, the key (bid, id) of rank ``k[q]`` (0-based, in :func:`key_less` order)
    among the candidates of all workers with ``pos == q``. Exact; same result for any split."""
    nseg = int(k.size)
    if nseg == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    if reducer.world_size == 1:
        order = np.lexsort((-gid, bid, pos))
        starts = np.searchsorted(pos[order], np.arange(nseg))
        pick = order[starts + k]
        return bid[pick], gid[pick]
    return _radix_select(pos, float_key(bid), (_MAX_ID - gid).astype(np.uint64), k, reducer)


def _radix_select(pos: np.ndarray, hi: np.ndarray, lo: np.ndarray, k: np.ndarray, reducer: Reducer
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Distributed exact selection on 128-bit keys (hi, lo), 8 bits per step."""
    nseg = int(k.size)
    k_rem = k.astype(np.int64).copy()
    pre_hi = np.zeros(nseg, dtype=np.uint64)
    pre_lo = np.zeros(nseg, dtype=np.uint64)
    done = np.zeros(nseg, dtype=bool)
    alive = np.ones(pos.size, dtype=bool)
    for step in range(16):
        word = hi if step < 8 else lo
        shift = np.uint64(8 * (7 - step % 8))
        digit = ((word >> shift) & np.uint64(255)).astype(np.int64)
        live = alive & ~done[pos]
        counts = np.bincount(pos[live] * 256 + digit[live], minlength=nseg * 256).astype(np.int64)
        counts = reducer.allreduce_sum(counts).reshape(nseg, 256)
        cum = np.cumsum(counts, axis=1)
        chosen = np.argmax(cum > k_rem[:, None], axis=1)
        below = np.where(chosen > 0, cum[np.arange(nseg), chosen - 1], 0)
        k_rem = np.where(done, k_rem, k_rem - below)
        inside = counts[np.arange(nseg), chosen]
        value = chosen.astype(np.uint64) << shift
        if step < 8:
            pre_hi = np.where(done, pre_hi, pre_hi | value)
        else:
            pre_lo = np.where(done, pre_lo, pre_lo | value)
        alive &= digit == chosen[pos]
        single = ~done & (inside == 1)
        if single.any() and step < 15:
            mine = alive & single[pos]
            sums = np.zeros((nseg, 2), dtype=np.int64)
            np.add.at(sums, pos[mine], np.stack([hi[mine].view(np.int64), lo[mine].view(np.int64)], axis=1))
            sums = reducer.allreduce_sum(sums)
            pre_hi = np.where(single, sums[:, 0].view(np.uint64), pre_hi)
            pre_lo = np.where(single, sums[:, 1].view(np.uint64), pre_lo)
            done |= single
        if done.all():
            break
    return key_float(pre_hi), (_MAX_ID - pre_lo.astype(np.int64)).astype(np.int64)


class _Holders:
    """This worker's assigned persons, sorted by (place, bid, -id)."""

    def __init__(self, place: np.ndarray, bid: np.ndarray, gid: np.ndarray, loc: np.ndarray) -> None:
        order = np.lexsort((-gid, bid, place))
        self.place, self.bid, self.gid, self.loc = place[order], bid[order], gid[order], loc[order]

    def segments(self, places: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.searchsorted(self.place, places, "left"), np.searchsorted(self.place, places, "right")

    def remove(self, idx: np.ndarray) -> None:
        if idx.size == 0:
            return
        keep = np.ones(self.place.size, dtype=bool)
        keep[idx] = False
        self.place, self.bid, self.gid, self.loc = self.place[keep], self.bid[keep], self.gid[keep], self.loc[keep]

    def insert(self, place: np.ndarray, bid: np.ndarray, gid: np.ndarray, loc: np.ndarray) -> None:
        if place.size == 0:
            return
        order = np.lexsort((-gid, bid, place))
        place, bid, gid, loc = place[order], bid[order], gid[order], loc[order]
        lo, hi = self.segments(place)
        while True:
            active = lo < hi
            if not active.any():
                break
            mid = (lo + hi) // 2
            safe = np.minimum(mid, max(self.place.size - 1, 0))
            go = active & key_less(self.bid[safe], self.gid[safe], bid, gid)
            lo = np.where(go, mid + 1, lo)
            hi = np.where(active & ~go, mid, hi)
        self.place = np.insert(self.place, lo, place)
        self.bid = np.insert(self.bid, lo, bid)
        self.gid = np.insert(self.gid, lo, gid)
        self.loc = np.insert(self.loc, lo, loc)


@dataclass
class AuctionState:
    """Result of the price phase on one worker."""

    prices: np.ndarray          # (S,) global prices (inf for places without capacity)
    assign: np.ndarray          # (n_local_persons,) place or -1
    column: np.ndarray          # (n_local_persons,) candidate column of the place's cluster (group for dummies)
    rounds: int
    phases: int
    unassigned: int
    log: list[str] = field(default_factory=list)


class Persons:
    """One worker's persons: its samples, then (on rank 0) the dummy persons of eps > 0."""

    def __init__(self, shard: Shard, places: Places, dummy_cluster: np.ndarray, dummy_ids: np.ndarray) -> None:
        self.shard = shard
        self.places = places
        self.value = shard.cands.value
        self.index = shard.cands.index
        self.groups = shard.groups
        self.n_samples = shard.cands.num_samples
        self.dummy_cluster = dummy_cluster.astype(np.int64)
        self.gid = np.concatenate([shard.ids.astype(np.int64), dummy_ids.astype(np.int64)])
        self.size = self.gid.size
        t, k = places.n_groups, places.n_clusters
        self.tk = t * k

    # ------------------------------------------------------------------ price views
    def price_views(self, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        t, k = self.places.n_groups, self.places.n_clusters
        pr = prices[:self.tk].reshape(t, k)
        po = prices[self.tk:].reshape(t, k) if self.places.bounded else None
        return pr, po

    def _gather(self, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
        g = self.groups[rows]
        if self.index is None:
            return table[g]
        return table[g[:, None], self.index[rows]]

    def sample_options(self, rows: np.ndarray, prices: np.ndarray):
        """Values of every option of the given sample rows: ``(y, vR, vO)`` with ``vR = y - p_R``,
        ``vO = y - p_O`` (None without optional places), each ``(len(rows), m)`` float64."""
        pr, po = self.price_views(prices)
        y = self.value[rows].astype(np.float64)
        v_r = y - self._gather(pr, rows)
        v_o = None if po is None else y - self._gather(po, rows)
        return y, v_r, v_o

    def sample_best(self, rows: np.ndarray, prices: np.ndarray):
        """Best option of each sample row: (place, column, y at it, v1, v2) with v2 the best value
        among all other options (the other place of the same cluster included)."""
        y, v_r, v_o = self.sample_options(rows, prices)
        b = len(rows)
        r = np.arange(b)
        if v_o is None:
            v = v_r
            use_o = np.zeros(b, dtype=bool)
        else:
            v = np.maximum(v_r, v_o)
        col = np.argmax(v, axis=1)
        v1 = v[r, col]
        if v_o is not None:
            use_o = v_o[r, col] > v_r[r, col]
            other = np.minimum(v_r[r, col], v_o[r, col])
        v[r, col] = -np.inf
        v2 = v.max(axis=1) if v.shape[1] > 1 else np.full(b, -np.inf)
        if v_o is not None:
            v2 = np.maximum(v2, other)
        g = self.groups[rows]
        cluster = col if self.index is None else self.index[rows][r, col].astype(np.int64)
        place = g * self.places.n_clusters + cluster + np.where(use_o, self.tk, 0)
        return place, col, y[r, col], v1, v2

    def dummy_best(self, rows: np.ndarray, prices: np.ndarray):
        """Best option of dummy persons (local rows >= n_samples): their cheapest O_tj."""
        _, po = self.price_views(prices)
        j = self.dummy_cluster[rows - self.n_samples]
        v = -po[:, j].T  # (b, T)
        r = np.arange(len(rows))
        t1 = np.argmax(v, axis=1)
        v1 = v[r, t1]
        v[r, t1] = -np.inf
        v2 = v.max(axis=1) if v.shape[1] > 1 else np.full(len(rows), -np.inf)
        place = self.tk + t1 * self.places.n_clusters + j
        return place, t1, np.zeros(len(rows)), v1, v2

    def best(self, rows: np.ndarray, prices: np.ndarray):
        """(place, column, y, v1, v2) for any local rows (samples and dummies), blockwise."""
        out_place = np.empty(rows.size, dtype=np.int64)
        out_col = np.empty(rows.size, dtype=np.int64)
        out_y, out_v1, out_v2 = (np.empty(rows.size) for _ in range(3))
        is_sample = rows < self.n_samples
        for mask, fn in ((is_sample, self.sample_best), (~is_sample, self.dummy_best)):
            sel = np.flatnonzero(mask)
            for start in range(0, sel.size, BLOCK_ROWS):
                part = sel[start:start + BLOCK_ROWS]
                p, c, y, v1, v2 = fn(rows[part], prices)
                out_place[part], out_col[part], out_y[part], out_v1[part], out_v2[part] = p, c, y, v1, v2
        return out_place, out_col, out_y, out_v1, out_v2

    def current_value(self, rows: np.ndarray, place: np.ndarray, column: np.ndarray,
                      prices: np.ndarray) -> np.ndarray:
        """``y - p`` of each row's current place."""
        out = np.empty(rows.size)
        is_sample = rows < self.n_samples
        s = np.flatnonzero(is_sample)
        out[s] = self.value[rows[s], column[s]].astype(np.float64) - prices[place[s]]
        d = np.flatnonzero(~is_sample)
        out[d] = -prices[place[d]]
        return out

    def unreachable(self) -> str | None:
        """A reason why this worker's samples cannot be placed, or None (cheap necessary
        conditions: every sample has a candidate cluster where its group may go, and every
        reserved place ``R_tj`` is listed by at least ``lower_tj`` samples of group t)."""
        places = self.places
        prices = np.where(places.cap > 0, 0.0, np.inf)
        for start in range(0, self.n_samples, BLOCK_ROWS):
            rows = np.arange(start, min(start + BLOCK_ROWS, self.n_samples))
            _, v_r, v_o = self.sample_options(rows, prices)
            best = v_r.max(axis=1) if v_o is None else np.maximum(v_r, v_o).max(axis=1)
            if not np.isfinite(best).all():
                bad = rows[np.flatnonzero(~np.isfinite(best))[0]]
                return (f"sample {int(self.gid[bad])} (group {int(self.groups[bad])}): none of its candidate "
                        f"clusters may hold a member of its group under the targets; pass more candidates "
                        f"(larger top_m) or allow eps > 0")
        return None

    def listed_counts(self) -> np.ndarray:
        """How many local samples of group t list cluster j among their candidates, ``(T K,)``."""
        out = np.zeros(self.tk, dtype=np.int64)
        k = self.places.n_clusters
        for start in range(0, self.n_samples, BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, self.n_samples)
            g = self.groups[start:stop]
            cl = np.asarray(self.shard.cands.clusters(slice(start, stop)), dtype=np.int64)
            out += np.bincount((g[:, None] * k + cl).ravel(), minlength=self.tk)
        return out


def run_auction(persons: Persons, reducer: Reducer, options: AuctionOptions | None = None) -> AuctionState:
    """The eps-scaling forward auction (module docstring). SPMD: call on every worker."""
    opts = options or AuctionOptions()
    places = persons.places
    cap = places.cap
    n_persons_total = int(reducer.allreduce_sum(np.array([persons.size], dtype=np.int64))[0])
    vmax = persons.value.max() if persons.n_samples else 0.0
    value_range = float(allreduce_max(reducer, np.array([vmax], dtype=np.float64))[0])
    value_range = max(value_range, 1e-12)
    big = value_range + 1.0
    stop = int(opts.stop_fraction * n_persons_total)

    prices = np.where(cap > 0, 0.0, np.inf)
    assign = np.full(persons.size, -1, dtype=np.int64)
    column = np.zeros(persons.size, dtype=np.int64)
    bids = np.zeros(persons.size)
    held = np.zeros(places.size, dtype=np.int64)  # global holders per place
    gid = persons.gid
    eps = opts.eps_start * value_range
    eps_end = opts.eps_end * value_range
    rounds = phases = 0
    log: list[str] = []
    while True:
        phases += 1
        # phase start: unassign holders that violate eps-CS for the new eps
        holders = np.flatnonzero(assign >= 0)
        if holders.size or phases > 1:
            _, _, _, v1, _ = persons.best(holders, prices)
            current = persons.current_value(holders, assign[holders], column[holders], prices)
            violate = holders[current < v1 - eps]
            removed = np.bincount(assign[violate], minlength=places.size).astype(np.int64)
            held -= reducer.allreduce_sum(removed)
            assign[violate] = -1
        keep = np.flatnonzero(assign >= 0)
        book = _Holders(assign[keep], bids[keep], gid[keep], keep)
        phase_rounds = 0
        while phase_rounds < opts.max_rounds:
            bidders = np.flatnonzero(assign < 0)
            waiting = int(reducer.allreduce_sum(np.array([bidders.size], dtype=np.int64))[0])
            if waiting <= stop or waiting == 0:
                break
            phase_rounds += 1
            place, col, y1, v1, v2 = persons.best(bidders, prices)
            v2 = np.maximum(v2, v1 - big)
            bid = (y1 - v2 + eps) + 0.0
            bgid = gid[bidders]
            counts = reducer.allreduce_sum(np.bincount(place, minlength=places.size).astype(np.int64))
            total = held + counts
            full = np.flatnonzero((counts > 0) & (total >= cap))
            k = total[full] - cap[full]
            posmap = np.full(places.size, -1, dtype=np.int64)
            posmap[full] = np.arange(full.size)
            start, end = book.segments(full)
            take = np.minimum(k + 1, end - start)
            hidx = _ranges(start, take)
            bpos = posmap[place]
            to_full = bpos >= 0
            cand_pos = np.concatenate([np.repeat(np.arange(full.size), take), bpos[to_full]])
            cand_bid = np.concatenate([book.bid[hidx], bid[to_full]])
            cand_gid = np.concatenate([book.gid[hidx], bgid[to_full]])
            thr_bid, thr_gid = select_kth(cand_pos, cand_bid, cand_gid, k, reducer)
            hp = posmap[book.place[hidx]]
            evicted = hidx[key_less(book.bid[hidx], book.gid[hidx], thr_bid[hp], thr_gid[hp])]
            accept = np.ones(bidders.size, dtype=bool)
            safe = np.where(to_full, bpos, 0)
            accept[to_full] = ~key_less(bid[to_full], bgid[to_full], thr_bid[safe[to_full]], thr_gid[safe[to_full]])
            assign[book.loc[evicted]] = -1
            book.remove(evicted)
            won = bidders[accept]
            assign[won], column[won], bids[won] = place[accept], col[accept], bid[accept]
            book.insert(place[accept], bid[accept], bgid[accept], won)
            prices[full] = thr_bid
            held = np.where(counts > 0, np.minimum(total, cap), held)
        rounds += phase_rounds
        log.append(f"eps={eps:.3g}: {phase_rounds} rounds, {waiting} unassigned")
        LOG.debug("auction phase %d: %s", phases, log[-1])
        if eps <= eps_end:
            break
        eps = max(eps / opts.eps_factor, eps_end)
    waiting = int(reducer.allreduce_sum(np.array([(assign < 0).sum()], dtype=np.int64))[0])
    return AuctionState(prices, assign, column, rounds, phases, waiting, log)
