"""The distributed fair assignment: W workers return exactly the single-process labels.

Two implementations of the collective protocol (dist_fair.collective) are exercised: threads sharing memory (quick, W = 3,
also checks the radix selection against a sort) and Ray actors on the simulated two-node cluster
(the ``ray_cluster`` fixture, W = 2).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dist_fair.fair import Candidates, Shard, fair_assign, solve_shard, top_m_candidates
from dist_fair.fair.auction import select_kth
from dist_fair.collective import Collective, LocalCollective

from test_fair_assign import instance


class ThreadCollective:
    """The collective protocol between threads of one process (a barrier per collective)."""

    def __init__(self, rank: int, world_size: int, shared: dict) -> None:
        self.rank, self.world_size, self.shared = rank, world_size, shared

    def _exchange(self, part):
        self.shared["parts"][self.rank] = part
        self.shared["barrier"].wait()
        parts = list(self.shared["parts"])
        self.shared["barrier"].wait()
        return parts

    def all_gather(self, x):
        return [np.array(p, copy=True) for p in self._exchange(np.array(x, copy=True))]

    def all_reduce_sum(self, x):
        parts = self.all_gather(x)
        total = parts[0].copy()
        for part in parts[1:]:
            total = total + part
        return total

    def broadcast(self, x, src=0):
        return np.array(self._exchange(None if x is None else np.array(x, copy=True))[src], copy=True)

    def barrier(self):
        self._exchange(None)


def run_threads(world_size: int, fn):
    shared = {"parts": [None] * world_size, "barrier": threading.Barrier(world_size)}
    out, errors = [None] * world_size, []

    def target(rank):
        try:
            collective = ThreadCollective(rank, world_size, shared)
            assert isinstance(collective, Collective)  # the protocol's members are all there
            out[rank] = fn(rank, collective)
        except Exception as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            shared["barrier"].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world_size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("gather_limit", [0, 10**9])  # radix selection / one allgather
def test_distributed_selection_equals_sorting(gather_limit):
    rng = np.random.default_rng(0)
    n, nseg = 3000, 7
    pos = rng.integers(0, nseg, n)
    bid = np.round(rng.normal(size=n), 2)  # many equal bids: ties broken by id
    bid[:50] = -0.0
    gid = rng.permutation(n).astype(np.int64)
    counts = np.bincount(pos, minlength=nseg)
    k = np.array([rng.integers(0, c + 2) for c in counts])  # includes k >= count (-> +inf)
    want = select_kth(pos, bid, gid, k, LocalCollective())
    split = np.array_split(np.arange(n), 3)
    got = run_threads(3, lambda r, coll: select_kth(pos[split[r]], bid[split[r]], gid[split[r]], k, coll,
                                                    gather_limit=gather_limit))
    for b, g in got:
        assert np.array_equal(b, want[0]) and np.array_equal(g, want[1])


@pytest.mark.parametrize("eps, top_m, ties, radix", [(0.0, None, True, False), (0.15, None, False, False),
                                                     (0.0, 4, False, False), (0.2, None, True, False),
                                                     (0.0, None, True, True), (0.15, None, False, True)])
def test_three_thread_workers_equal_one_process(eps, top_m, ties, radix, monkeypatch):
    if radix:  # every distributed selection by radix steps instead of one allgather
        monkeypatch.setattr("dist_fair.fair.auction.GATHER_LIMIT", 0)
    probs, groups = instance(300, 8, 3, seed=17, ties=ties)
    single = fair_assign(probs, groups, eps=eps, top_m=top_m)
    cands = top_m_candidates(probs, top_m) if top_m else Candidates(probs, None, 8)
    split = np.array_split(np.random.default_rng(1).permutation(300), 3)  # non-contiguous shares

    def solve(rank, collective):
        rows = np.sort(split[rank])
        return rows, solve_shard(Shard(cands.rows(rows), groups[rows], rows), collective, eps=eps, top_m=top_m)

    labels = np.full(300, -1)
    for rows, (part, report) in run_threads(3, solve):
        labels[rows] = part
        assert report.objective == pytest.approx(single.report.objective, rel=1e-12)
        assert report.workers == 3
    assert np.array_equal(labels, single.labels)


@pytest.mark.ray
@pytest.mark.parametrize("eps, top_m, ties", [(0.0, None, True), (0.1, 3, False)])
def test_two_ray_workers_equal_one_process(ray_cluster, eps, top_m, ties):
    from dist_fair.fair import fair_assign_ray

    probs, groups = instance(160, 6, 3, seed=23, ties=ties)
    single = fair_assign(probs, groups, eps=eps, top_m=top_m)
    distributed = fair_assign_ray(probs, groups, eps=eps, top_m=top_m, num_workers=2)
    assert np.array_equal(distributed.labels, single.labels)
    assert distributed.report.workers == 2
    assert distributed.report.objective == pytest.approx(single.report.objective, rel=1e-12)
    assert distributed.report.certified


@pytest.mark.ray
def test_ray_errors_reach_the_driver(ray_cluster):
    from dist_fair.errors import InfeasibleError
    from dist_fair.fair import fair_assign_ray

    probs, groups = instance(80, 6, 3, seed=2)
    with pytest.raises(InfeasibleError):
        fair_assign_ray(top_m_candidates(probs, 1), groups, num_workers=2)
