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
