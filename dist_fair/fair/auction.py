"""Scalable price phase: a forward auction with eps-scaling over (group, cluster) cells.

The fair assignment (METHODS.md §6) is a transportation problem with few sinks and many sources:
every sample i of group t takes one "cell" (t, j) among its candidate clusters j, value ``y_ij``.
Cell (t, j) holds at most ``upper_tj`` samples, of which ``lower_tj`` are protected; cluster j's
unprotected members (its "pool") number at most ``S_j = |C_j| - sum_t lower_tj``. When every sample
is placed this is exactly "lower_tj <= n_tj <= upper_tj and n_j = |C_j|" (fixed targets: lower =
upper, empty pools).

Each cell has a price ``p_tj``; a sample's value for it is ``y_ij - p_tj``. The auction keeps every
sample within eps of its best value (eps-complementary slackness):

1. every unassigned sample picks its best cell (value v1) and the best value v2 among its other
   clusters and bids ``b = y - v2 + eps`` (the price at which it would be indifferent, plus eps);
2. acceptance is the greedy rule of this nested ("laminar") capacity structure: a cell keeps its
   ``upper`` highest bids (holders and new bidders; equal bids: lower global id wins), its
   ``lower`` highest are protected, and the unprotected members of cluster j keep the ``S_j``
   highest; everyone else is outbid and becomes unassigned. A cell's price is the lowest bid that
   would now be kept: ``min(R, max(G, Q))`` with R the lower-th highest bid of the cell, G its lowest
   bid when full and Q the lowest pool bid of the cluster when the pool is full;
3. eps starts at an eighth of the value range and shrinks 8x per phase; at the start of a phase the
   holders that might violate eps-CS for the new eps are re-checked and unassigned if they do.

All bidders of a round are handled at once (vectorised NumPy); bookkeeping per round is
O(bidders + cells), not O(N). A phase ends when every sample is placed or after ``max_rounds``
rounds (the last one already when at most ``stop_fraction`` is unassigned): the long tail of a
Jacobi auction moves a handful of samples per round and is left to the exact finish
(:mod:`dist_fair.fair.finish`), which places them along shortest augmenting paths and makes the
result exactly optimal - the auction only has to deliver good prices and a nearly complete
assignment.

Distributed (SPMD through a :class:`~dist_fair.collective.Collective`): every worker holds its own
samples; per round the workers sum per-cell bid counts (O(T K) integers) and, for cells or pools
that received more bids than free places, find the exact k-th lowest bid by a radix selection over
(bid, id) keys that exchanges a 256-bin histogram per such cell per digit (typically 2-4 digits).
Every decision rests on exact counts and exact order statistics, so the result is the same for
any number of workers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from dist_fair.collective import Collective, all_reduce_max
from dist_fair.fair.candidates import BLOCK_ROWS, Candidates
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
        stop_fraction: the last phase ends when at most this fraction of the samples is unassigned
            (earlier phases run until every sample is placed); the exact finish places the rest.
        max_rounds: rounds per phase at most (a phase's long tail is left to the exact finish).
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
    """The cells ``(t, j) -> t K + j`` with ``lower`` / ``upper`` bounds and, for flexible targets,
    the pool capacity ``shared[j] = |C_j| - sum_t lower_tj`` of each cluster."""

    n_groups: int
    n_clusters: int
    bounded: bool
    lower: np.ndarray                    # (T K,) int64
    upper: np.ndarray                    # (T K,) int64
    shared: np.ndarray                   # (K,) int64 (zeros when fixed)
    cluster_sizes: np.ndarray            # (K,) int64

    @property
    def size(self) -> int:
        return int(self.upper.size)

    @property
    def tk(self) -> int:
        return self.n_groups * self.n_clusters

    def cluster_of(self, cell: np.ndarray) -> np.ndarray:
        return cell % self.n_clusters

    def group_of(self, cell: np.ndarray) -> np.ndarray:
        return cell // self.n_clusters


def make_places(targets: FairTargets) -> Places:
    """Cells and capacities of the targets."""
    lower = targets.lower.ravel().astype(np.int64)
    upper = targets.upper.ravel().astype(np.int64)
    shared = (targets.cluster_sizes - targets.lower.sum(axis=0)).astype(np.int64)
    return Places(targets.n_groups, targets.n_clusters, not targets.fixed, lower, upper, shared,
                  targets.cluster_sizes.astype(np.int64))


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


#: distributed selection: when all workers together hold at most this many candidates, they are
#: gathered once (ids < 2^53 travel exactly as float64) instead of a radix selection's 16 rounds.
GATHER_LIMIT = 65536


def select_kth(pos: np.ndarray, bid: np.ndarray, gid: np.ndarray, k: np.ndarray, collective: Collective,
               gather_limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For every segment q, the key (bid, id) of rank ``k[q]`` (0-based, in :func:`key_less` order)
    among the candidates of all workers with ``pos == q``; ``(+inf, -1)`` when ``k[q]`` is not smaller
    than the number of candidates (everything lies below). Exact; the same for any split."""
    nseg = int(k.size)
    if nseg == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    counts = collective.all_reduce_sum(np.bincount(pos, minlength=nseg).astype(np.int64))
    beyond = k >= counts
    k = np.where(beyond, 0, k)
    limit = GATHER_LIMIT if gather_limit is None else gather_limit
    gathered = collective.world_size > 1 and int(counts.sum()) <= limit
    if gathered:  # few candidates in all (the auction's long tail): one allgather, not 16 radix steps
        parts = collective.all_gather(np.stack([pos.astype(np.float64), bid, gid.astype(np.float64)], axis=1))
        every = np.concatenate(parts, axis=0)
        pos, bid, gid = every[:, 0].astype(np.int64), every[:, 1], every[:, 2].astype(np.int64)
    if collective.world_size == 1 or gathered:
        if pos.size:
            order = np.lexsort((-gid, bid, pos))
            starts = np.searchsorted(pos[order], np.arange(nseg))
            pick = order[np.minimum(starts + k, pos.size - 1)]
            out_bid, out_gid = bid[pick], gid[pick]
        else:  # no candidate anywhere (e.g. eps >= 1: no cell has a protected lower bound): all beyond
            out_bid, out_gid = np.zeros(nseg), np.zeros(nseg, dtype=np.int64)
    else:
        out_bid, out_gid = _radix_select(pos, float_key(bid), (_MAX_ID - gid).astype(np.uint64), k, collective)
    return np.where(beyond, np.inf, out_bid), np.where(beyond, -1, out_gid)


def _radix_select(pos: np.ndarray, hi: np.ndarray, lo: np.ndarray, k: np.ndarray, collective: Collective
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
        counts = collective.all_reduce_sum(counts).reshape(nseg, 256)
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
            sums = collective.all_reduce_sum(sums)
            pre_hi = np.where(single, sums[:, 0].view(np.uint64), pre_hi)
            pre_lo = np.where(single, sums[:, 1].view(np.uint64), pre_lo)
            done |= single
        if done.all():
            break
    return key_float(pre_hi), (_MAX_ID - pre_lo.astype(np.int64)).astype(np.int64)


class _Book:
    """This worker's holders: a part sorted by (place, bid, -id) with a head pointer per place
    (outbids always remove a place's lowest keys, so everything before the head is gone) and an
    unsorted part of holders accepted since the last rebuild. O(bidders) work per round."""

    def __init__(self, n_places: int, place: np.ndarray, bid: np.ndarray, gid: np.ndarray, loc: np.ndarray) -> None:
        self.n_places = n_places
        order = np.lexsort((-gid, bid, place))
        self.place, self.bid, self.gid, self.loc = place[order], bid[order], gid[order], loc[order]
        bounds = np.searchsorted(self.place, np.arange(n_places + 1))
        self.head, self.end = bounds[:-1].copy(), bounds[1:]
        self.d_place = np.zeros(0, dtype=np.int64)
        self.d_bid = np.zeros(0)
        self.d_gid = np.zeros(0, dtype=np.int64)
        self.d_loc = np.zeros(0, dtype=np.int64)

    def lowest(self, places: np.ndarray, counts: np.ndarray):
        """Candidates for the lowest ``counts`` holders of each place: (place, bid, id, src) with
        src >= 0 a sorted-part index and src < 0 an unsorted-part index ``-src - 1``."""
        live = self.end[places] - self.head[places]
        take = np.minimum(counts, live)
        idx = _ranges(self.head[places], take)
        didx = np.zeros(0, dtype=np.int64)
        if self.d_place.size:
            # an unsorted holder can only be among the lowest `counts` of its place if it lies below
            # the counts-th lowest sorted one (all of them when the sorted part has fewer; none when
            # counts == 0): the result stays a superset of the lowest `counts` at O(d) cost, without
            # sorting the whole unsorted part every round.
            bound_bid = np.full(self.n_places, -np.inf)
            bound_gid = np.full(self.n_places, np.iinfo(np.int64).max)
            short = counts > live
            bound_bid[places[short]] = np.inf
            bound_gid[places[short]] = -1
            enough = ~short & (counts > 0)
            at = self.head[places[enough]] + counts[enough] - 1
            bound_bid[places[enough]] = self.bid[at]
            bound_gid[places[enough]] = self.gid[at]
            didx = np.flatnonzero(key_less(self.d_bid, self.d_gid, bound_bid[self.d_place], bound_gid[self.d_place]))
        return (np.concatenate([self.place[idx], self.d_place[didx]]),
                np.concatenate([self.bid[idx], self.d_bid[didx]]),
                np.concatenate([self.gid[idx], self.d_gid[didx]]),
                np.concatenate([idx, -didx - 1]))

    def loc_of(self, src: np.ndarray) -> np.ndarray:
        out = np.empty(src.size, dtype=np.int64)
        book = src >= 0
        out[book] = self.loc[src[book]]
        out[~book] = self.d_loc[-src[~book] - 1]
        return out

    def drop(self, src: np.ndarray) -> None:
        book = src[src >= 0]
        if book.size:
            self.head += np.bincount(self.place[book], minlength=self.n_places)
        delta = -src[src < 0] - 1
        if delta.size:
            keep = np.ones(self.d_place.size, dtype=bool)
            keep[delta] = False
            self.d_place, self.d_bid, self.d_gid, self.d_loc = (
                self.d_place[keep], self.d_bid[keep], self.d_gid[keep], self.d_loc[keep])

    def add(self, place: np.ndarray, bid: np.ndarray, gid: np.ndarray, loc: np.ndarray) -> None:
        self.d_place = np.concatenate([self.d_place, place])
        self.d_bid = np.concatenate([self.d_bid, bid])
        self.d_gid = np.concatenate([self.d_gid, gid])
        self.d_loc = np.concatenate([self.d_loc, loc])
        if self.d_place.size > max(4096, self.place.size // 4):
            live = np.arange(self.place.size) >= self.head[self.place]
            self.__init__(self.n_places, np.concatenate([self.place[live], self.d_place]),
                          np.concatenate([self.bid[live], self.d_bid]),
                          np.concatenate([self.gid[live], self.d_gid]),
                          np.concatenate([self.loc[live], self.d_loc]))


def _stage(book: _Book, seg_of_place: np.ndarray, k: np.ndarray, bid_place: np.ndarray, bid: np.ndarray,
           bid_gid: np.ndarray, active: np.ndarray, collective: Collective, take: np.ndarray | None = None,
           below: tuple[np.ndarray, np.ndarray] | None = None):
    """One acceptance step: in every segment (a set of cells) find the key of rank ``k`` among its
    holders and active bids; everything below it is outbid. ``take`` (per cell) limits the holders
    considered to the lowest ones; ``below`` (per-cell key bounds) keeps only candidates under them.
    Returns (threshold bid, threshold id) per segment, evicted holder sources, rejected bids (mask)."""
    cells = np.flatnonzero(seg_of_place >= 0)
    want = k[seg_of_place[cells]] + 1 if take is None else np.minimum(k[seg_of_place[cells]] + 1, take[cells])
    hp, hb, hg, hsrc = book.lowest(cells, want)
    bpos = np.where(active, seg_of_place[bid_place], -1)
    if below is not None:
        hok = key_less(hb, hg, below[0][hp], below[1][hp])
        hp, hb, hg, hsrc = hp[hok], hb[hok], hg[hok], hsrc[hok]
        bok = key_less(bid, bid_gid, below[0][bid_place], below[1][bid_place])
        bpos = np.where(bok, bpos, -1)
    mine = bpos >= 0
    pos = np.concatenate([seg_of_place[hp], bpos[mine]])
    thr_bid, thr_gid = select_kth(pos, np.concatenate([hb, bid[mine]]), np.concatenate([hg, bid_gid[mine]]), k,
                                  collective)
    hseg = seg_of_place[hp]
    evicted = hsrc[key_less(hb, hg, thr_bid[hseg], thr_gid[hseg])]
    rejected = np.zeros(bid.size, dtype=bool)
    safe = np.where(mine, bpos, 0)
    rejected[mine] = key_less(bid[mine], bid_gid[mine], thr_bid[safe[mine]], thr_gid[safe[mine]])
    return thr_bid, thr_gid, evicted, rejected


@dataclass
class AuctionState:
    """Result of the price phase on one worker."""

    prices: np.ndarray          # (T K,) cell prices p_tj (inf for cells without capacity)
    cluster_prices: np.ndarray  # (K,) pool prices q_j (0 when fixed)
    assign: np.ndarray          # (n,) cell or -1
    column: np.ndarray          # (n,) candidate column of the cell's cluster
    bids: np.ndarray            # (n,) bid of each holder
    bid_eps: np.ndarray         # (n,) eps of the phase in which it bid
    rounds: int
    phases: int
    unassigned: int
    log: list[str] = field(default_factory=list)


class Persons:
    """One worker's samples seen as bidders for cells."""

    def __init__(self, shard: Shard, places: Places) -> None:
        self.shard = shard
        self.places = places
        self.value = shard.cands.value
        self.index = shard.cands.index
        self.groups = shard.groups
        self.n_samples = shard.cands.num_samples
        self.size = self.n_samples
        self.gid = shard.ids.astype(np.int64)
        self.tk = places.tk

    def clusters(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.shard.cands.clusters(rows), dtype=np.int64)

    def options(self, rows: np.ndarray, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(y, v)``: values and ``v = y - p`` of every candidate cell, ``(len(rows), m)`` float64."""
        table = prices.reshape(self.places.n_groups, self.places.n_clusters)
        y = self.value[rows].astype(np.float64)
        g = self.groups[rows]
        p = table[g] if self.index is None else table[g[:, None], self.index[rows]]
        return y, y - p

    def sample_best(self, rows: np.ndarray, prices: np.ndarray):
        """(cell, column, y there, v1, v2) of the best cell, v2 the best among the other clusters."""
        y, v = self.options(rows, prices)
        r = np.arange(len(rows))
        col = np.argmax(v, axis=1)
        v1 = v[r, col]
        v[r, col] = -np.inf
        v2 = v.max(axis=1) if v.shape[1] > 1 else np.full(len(rows), -np.inf)
        cluster = col if self.index is None else self.index[rows][r, col].astype(np.int64)
        return self.groups[rows] * self.places.n_clusters + cluster, col, y[r, col], v1, v2

    def best(self, rows: np.ndarray, prices: np.ndarray):
        """:meth:`sample_best` blockwise."""
        out_place = np.empty(rows.size, dtype=np.int64)
        out_col = np.empty(rows.size, dtype=np.int64)
        out_y, out_v1, out_v2 = (np.empty(rows.size) for _ in range(3))
        for start in range(0, rows.size, BLOCK_ROWS):
            part = slice(start, start + BLOCK_ROWS)
            out_place[part], out_col[part], out_y[part], out_v1[part], out_v2[part] = \
                self.sample_best(rows[part], prices)
        return out_place, out_col, out_y, out_v1, out_v2

    def current_value(self, rows: np.ndarray, place: np.ndarray, column: np.ndarray,
                      prices: np.ndarray) -> np.ndarray:
        """``y - p`` at each row's current cell."""
        return self.value[rows, column].astype(np.float64) - prices[place]

    def unreachable(self) -> str | None:
        """A reason why a local sample cannot be placed at all (no candidate cluster where its
        group may go), or None."""
        places = self.places
        if self.index is None and not places.bounded:
            return None  # dense and fixed: every group has some cluster with n_tj > 0
        prices = np.where(places.upper > 0, 0.0, np.inf)
        for start in range(0, self.n_samples, BLOCK_ROWS):
            rows = np.arange(start, min(start + BLOCK_ROWS, self.n_samples))
            best = self.options(rows, prices)[1].max(axis=1)
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


class _Prices:
    """Cell prices ``min(R, max(G, Q))`` from the three thresholds (see the module docstring)."""

    def __init__(self, places: Places) -> None:
        self.places = places
        self.full = np.where(places.upper > 0, 0.0, np.inf)                # G
        self.protected = np.where(places.lower > 0, 0.0, np.inf)           # R
        self.pool = np.where(places.shared > 0, 0.0, np.inf)               # Q
        # key of the lower-th highest member; the pool lies below it. A cell with lower = 0 (always
        # when eps >= 1) protects nobody: all its members are pool members, the boundary is +inf.
        unprotected = places.lower == 0
        self.boundary_bid = np.where(unprotected, np.inf, -np.inf)
        self.boundary_gid = np.where(unprotected, -1, np.iinfo(np.int64).max).astype(np.int64)

    def cells(self) -> np.ndarray:
        if not self.places.bounded:
            return self.full
        pool = np.tile(self.pool, self.places.n_groups)
        return np.minimum(self.protected, np.maximum(self.full, pool))


def _update_boundary(prices: _Prices, book: _Book, held: np.ndarray, cells: np.ndarray, bid_place: np.ndarray,
                     bid: np.ndarray, bid_gid: np.ndarray, active: np.ndarray, collective: Collective) -> None:
    """Key of the lower-th highest member of each given cell (the pool lies below it)."""
    places = prices.places
    cells = cells[(places.lower[cells] > 0) & (held[cells] >= places.lower[cells])]
    seg = np.full(places.size, -1, dtype=np.int64)
    seg[cells] = np.arange(cells.size)
    thr_bid, thr_gid, _, _ = _stage(book, seg, held[cells] - places.lower[cells], bid_place, bid, bid_gid, active,
                                    collective)
    prices.boundary_bid[cells], prices.boundary_gid[cells] = thr_bid, thr_gid
    prices.protected[cells] = np.maximum(prices.protected[cells], thr_bid)
    low = (held < places.lower)
    prices.boundary_bid[low], prices.boundary_gid[low] = -np.inf, np.iinfo(np.int64).max


def run_auction(persons: Persons, collective: Collective, options: AuctionOptions | None = None) -> AuctionState:
    """The eps-scaling forward auction (module docstring). SPMD: call on every worker."""
    opts = options or AuctionOptions()
    places = persons.places
    size, k_count, t_count = places.size, places.n_clusters, places.n_groups
    lower, upper, shared = places.lower, places.upper, places.shared
    n_total = int(collective.all_reduce_sum(np.array([persons.size], dtype=np.int64))[0])
    vmax = float(persons.value.max()) if persons.size else 0.0
    value_range = max(float(all_reduce_max(collective, np.array([vmax]))[0]), 1e-12)
    big = value_range + 1.0
    stop = int(opts.stop_fraction * n_total)
    prices = _Prices(places)
    assign = np.full(persons.size, -1, dtype=np.int64)
    column = np.zeros(persons.size, dtype=np.int64)
    bids = np.zeros(persons.size)
    bid_eps = np.zeros(persons.size)
    held = np.zeros(size, dtype=np.int64)
    gid = persons.gid
    eps = opts.eps_start * value_range
    eps_end = opts.eps_end * value_range
    unassigned = np.arange(persons.size)
    rounds = phases = 0
    log: list[str] = []
    waiting = n_total
    no_bids = np.zeros(0, dtype=np.int64)
    while True:
        phases += 1
        if phases > 1:  # holders that might now violate eps-CS are re-checked (the rest provably do not)
            cell_prices = prices.cells()
            hold = np.flatnonzero(assign >= 0)
            suspect = hold[bids[hold] - cell_prices[assign[hold]] < bid_eps[hold] - eps]
            _, _, _, v1, _ = persons.best(suspect, cell_prices)
            current = persons.current_value(suspect, assign[suspect], column[suspect], cell_prices)
            violate = suspect[current < v1 - eps]
            held -= collective.all_reduce_sum(np.bincount(assign[violate], minlength=size).astype(np.int64))
            assign[violate] = -1
            unassigned = np.flatnonzero(assign < 0)
        keep = np.flatnonzero(assign >= 0)
        book = _Book(size, assign[keep], bids[keep], gid[keep], keep)
        if places.bounded and phases > 1:
            _update_boundary(prices, book, held, np.arange(size), no_bids, np.zeros(0), no_bids,
                             np.zeros(0, dtype=bool), collective)
        phase_rounds = 0
        while phase_rounds < opts.max_rounds:
            waiting = int(collective.all_reduce_sum(np.array([unassigned.size], dtype=np.int64))[0])
            if waiting == 0 or (eps <= eps_end and waiting <= stop):
                break
            phase_rounds += 1
            bidders = unassigned
            place, col, y1, v1, v2 = persons.best(bidders, prices.cells())
            bid = (y1 - np.maximum(v2, v1 - big) + eps) + 0.0
            bgid = gid[bidders]
            counts = collective.all_reduce_sum(np.bincount(place, minlength=size).astype(np.int64))
            total = held + counts
            # a cell keeps its `upper` best
            full = np.flatnonzero((counts > 0) & (total >= upper))
            seg = np.full(size, -1, dtype=np.int64)
            seg[full] = np.arange(full.size)
            thr, _, evicted, rejected = _stage(book, seg, total[full] - upper[full], place, bid, bgid,
                                               np.ones(bidders.size, dtype=bool), collective)
            lost = [book.loc_of(evicted)]
            book.drop(evicted)
            prices.full[full] = np.maximum(prices.full[full], thr)
            held = np.where(counts > 0, np.minimum(total, upper), held)
            if places.bounded:  # the lower-th best are protected; cluster pools keep their `shared` best
                touched = np.flatnonzero(counts > 0)
                _update_boundary(prices, book, held, touched, place, bid, bgid, ~rejected, collective)
                pool_cells = np.maximum(held - lower, 0)
                pool = pool_cells.reshape(t_count, k_count).sum(axis=0)
                hit = np.zeros(k_count, dtype=bool)
                hit[touched % k_count] = True
                full_c = np.flatnonzero(hit & (pool >= shared) & ((pool > 0) | (shared > 0)))
                seg = np.full(size, -1, dtype=np.int64)
                for t in range(t_count):
                    seg[t * k_count + full_c] = np.arange(full_c.size)
                thr_c, _, evicted_c, rejected_c = _stage(
                    book, seg, pool[full_c] - shared[full_c], place, bid, bgid, ~rejected, collective,
                    take=pool_cells, below=(prices.boundary_bid, prices.boundary_gid))
                rejected_c &= ~rejected
                out_cells = np.concatenate([assign[book.loc_of(evicted_c)], place[rejected_c]])
                held -= collective.all_reduce_sum(np.bincount(out_cells, minlength=size).astype(np.int64))
                lost.append(book.loc_of(evicted_c))
                book.drop(evicted_c)
                rejected |= rejected_c
                prices.pool[full_c] = np.maximum(prices.pool[full_c], np.where(shared[full_c] > 0, thr_c, np.inf))
            accept = ~rejected
            won = bidders[accept]
            lost_all = np.concatenate(lost)
            assign[lost_all] = -1
            assign[won], column[won], bids[won], bid_eps[won] = place[accept], col[accept], bid[accept], eps
            book.add(place[accept], bid[accept], bgid[accept], won)
            unassigned = np.concatenate([bidders[rejected], lost_all])
        rounds += phase_rounds
        log.append(f"eps={eps:.3g}: {phase_rounds} rounds, {waiting} unassigned")
        LOG.debug("auction phase %d: %s", phases, log[-1])
        if eps <= eps_end:
            break
        eps = max(eps / opts.eps_factor, eps_end)
    waiting = int(collective.all_reduce_sum(np.array([unassigned.size], dtype=np.int64))[0])
    q = np.where(np.isfinite(prices.pool), prices.pool, 0.0) if places.bounded else np.zeros(k_count)
    return AuctionState(prices.cells(), q, assign, column, bids, bid_eps, rounds, phases, waiting, log)
