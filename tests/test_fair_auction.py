"""The auction's holder book (dist_fair.fair.auction._Book) against a brute-force sort."""
from __future__ import annotations

import numpy as np
import pytest

from dist_fair.fair.auction import _Book


def brute_lowest(place, bid, gid, p, count):
    """Ids of the ``count`` lowest holders of place p in key_less order (lower bid, then higher id)."""
    mine = np.flatnonzero(place == p)
    order = np.lexsort((-gid[mine], bid[mine]))
    return gid[mine][order][:count]


@pytest.mark.parametrize("seed", range(6))
def test_lowest_is_a_superset_of_the_lowest_holders_through_adds_and_outbids(seed):
    rng = np.random.default_rng(seed)
    n_places, n = 12, 600
    place = rng.integers(0, n_places, n)
    bid = np.round(rng.normal(size=n), 1) + 0.0  # many equal bids: ties are broken by id
    gid = rng.permutation(10 * n)[:n].astype(np.int64)
    book = _Book(n_places, place[:200], bid[:200], gid[:200], np.arange(200))
    alive = np.zeros(n, dtype=bool)
    alive[:200] = True
    for start in range(200, n, 100):  # new holders arrive in the unsorted part, then outbids
        new = np.arange(start, start + 100)
        book.add(place[new], bid[new], gid[new], new)
        alive[new] = True
        places = np.sort(rng.choice(n_places, 6, replace=False))
        counts = rng.integers(0, 30, places.size)
        hp, hb, hg, src = book.lowest(places, counts)
        assert np.array_equal(gid[book.loc_of(src)], hg) and np.array_equal(place[book.loc_of(src)], hp)
        assert alive[book.loc_of(src)].all()
        outbid = []
        for p, c in zip(places, counts):
            want = brute_lowest(place[alive], bid[alive], gid[alive], p, int(c))
            got = hg[hp == p]
            assert set(want.tolist()) <= set(got.tolist()), (start, p, c)
            outbid.append(want[: int(c) // 2])  # the auction always removes a place's lowest keys
        outbid = np.concatenate(outbid)
        book.drop(src[np.isin(hg, outbid)])
        alive[np.isin(gid, outbid)] = False


# --------------------------------------------------------------------------- eps >= 1 (issue 16)
@pytest.mark.parametrize("method", ["auction", "exact", "lp"])
@pytest.mark.parametrize("eps", [0.99, 1.0, 1.5, 2.0, 5.0])
@pytest.mark.parametrize("top_m", [None, 3])
def test_eps_of_one_and_more_agrees_with_highs(method, eps, top_m):
    """eps >= 1 makes every lower bound 0; the auction used to end in an IndexError in select_kth."""
    from dist_fair.fair import Candidates, fair_assign, top_m_candidates

    from test_fair_assign import check_feasible, instance, reference_objective, targets_of

    for seed in range(2):
        probs, groups = instance(240, 6, 3, seed=seed + 31)
        result = fair_assign(probs, groups, eps=eps, method=method, top_m=top_m)
        cands = top_m_candidates(probs, top_m) if top_m else Candidates(probs, None, 6)
        fair = targets_of(cands, groups, 3, eps)
        if eps >= 1:
            assert (fair.lower == 0).all()
        objective = check_feasible(result.labels, cands, groups, fair)
        assert objective == pytest.approx(reference_objective(cands, groups, fair), rel=1e-6, abs=1e-9)
        if method == "auction":
            assert result.report.certified and result.report.gap == pytest.approx(0.0, abs=1e-7)


def test_eps_above_one_lets_a_cluster_lose_a_group():
    """Lower bound 0: a cluster whose soft assignments exclude a group may end without it."""
    from dist_fair.eval.metrics import balance
    from dist_fair.fair import fair_assign

    rng = np.random.default_rng(4)
    groups = np.repeat([0, 1], 60)
    probs = np.full((120, 3), 0.05)
    probs[:40, 0] = 0.9  # cluster 0: group 0 only
    probs[40:60, 1] = 0.9
    probs[60:, rng.integers(1, 3, 60)] = 0.9
    probs /= probs.sum(1, keepdims=True)
    loose = fair_assign(probs, groups, eps=5.0)
    assert np.array_equal(loose.labels, probs.argmax(1))  # upper bounds loose, lower 0: argmax is optimal
    assert balance(loose.labels, groups) == 0.0
    assert balance(fair_assign(probs, groups, eps=0.0).labels, groups) > 0.5


@pytest.mark.parametrize("radix", [False, True])
def test_eps_five_three_thread_workers_equal_one_process(radix, monkeypatch):
    from dist_fair.fair import Candidates, Shard, fair_assign, solve_shard

    from test_fair_assign import instance
    from test_fair_distributed import run_threads

    if radix:
        monkeypatch.setattr("dist_fair.fair.auction.GATHER_LIMIT", 0)
    probs, groups = instance(300, 8, 3, seed=17)
    single = fair_assign(probs, groups, eps=5.0)
    cands = Candidates(probs, None, 8)
    split = np.array_split(np.random.default_rng(1).permutation(300), 3)

    def solve(rank, collective):
        rows = np.sort(split[rank])
        return rows, solve_shard(Shard(cands.rows(rows), groups[rows], rows), collective, eps=5.0)

    labels = np.full(300, -1)
    for rows, (part, report) in run_threads(3, solve):
        labels[rows] = part
        assert report.objective == pytest.approx(single.report.objective, rel=1e-12)
    assert np.array_equal(labels, single.labels)


def test_select_kth_without_candidates():
    from dist_fair.collective import LocalCollective
    from dist_fair.fair.auction import select_kth

    bid, gid = select_kth(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.array([0, 2]),
                          LocalCollective())
    assert np.all(np.isinf(bid)) and np.array_equal(gid, [-1, -1])
