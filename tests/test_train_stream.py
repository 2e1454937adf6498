"""dist_fair.train.stream: batching, background prefetch, disjoint / exactly-once worker shares."""
from __future__ import annotations

import time

import numpy as np
import pytest

from dist_fair.errors import DataError
from dist_fair.train.stream import InMemoryStreams, Prefetcher, ShardStreams, partition, rebatch


def blocks_of(sizes):
    start = 0
    for n in sizes:
        yield {"ids": np.arange(start, start + n), "x": np.arange(start, start + n, dtype=np.float32)[:, None] * 2}
        start += n


def test_rebatch_cuts_exact_batches_and_keeps_order():
    out = list(rebatch(blocks_of([3, 0, 5, 1, 7]), 4))
    assert [len(b["ids"]) for b in out] == [4, 4, 4, 4]
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in out]), np.arange(16))
    np.testing.assert_array_equal(np.concatenate([b["x"][:, 0] for b in out]), np.arange(16) * 2.0)
    last = list(rebatch(blocks_of([3, 4]), 5))
    assert [len(b["ids"]) for b in last] == [5, 2]
    assert [len(b["ids"]) for b in rebatch(blocks_of([3, 4]), 5, drop_last=True)] == [5]
    with pytest.raises(DataError, match="different numbers of rows"):
        list(rebatch([{"a": np.zeros(2), "b": np.zeros(3)}], 2))


def test_prefetcher_runs_ahead_and_forwards_errors():
    produced = []

    def source():
        for i in range(10):
            produced.append(i)
            yield i
        raise RuntimeError("broken shard")

    with Prefetcher(source(), depth=3) as fetch:
        assert next(fetch) == 0
        deadline = time.time() + 5
        while len(produced) < 4 and time.time() < deadline:  # the thread reads ahead while we wait
            time.sleep(0.01)
        assert len(produced) >= 4
        rest = []
        with pytest.raises(RuntimeError, match="broken shard"):
            for item in fetch:
                rest.append(item)
        assert rest == list(range(1, 10))


def test_prefetcher_close_stops_an_endless_source():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    fetch = Prefetcher(endless(), depth=2)
    assert next(fetch) == 0
    fetch.close()
    assert not fetch._thread.is_alive()


def test_partition_is_disjoint_and_complete():
    for world in (1, 2, 3):
        parts = [partition(10, r, world) for r in range(world)]
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(10))


def test_in_memory_streams_resample_disjoint_shares_and_eval_once():
    arrays = {"ids": np.arange(23), "v": np.arange(23) * 1.0}
    streams = InMemoryStreams(arrays, block_rows=4)
    seen = []
    for rank in range(2):
        evald = np.concatenate([b["ids"] for b in streams.eval(rank, 2)])
        seen.append(evald)
        stream = streams.train(rank, 2, seed=5)
        drawn = np.concatenate([next(stream)["ids"] for _ in range(12)])  # > 1 pass: endless
        assert set(drawn) == set(evald)  # training draws only from this worker's share
        again = streams.train(rank, 2, seed=5)
        np.testing.assert_array_equal(np.concatenate([next(again)["ids"] for _ in range(12)]), drawn)  # seeded
    assert not set(seen[0]) & set(seen[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(23))
    with pytest.raises(DataError, match="no training rows"):
        next(InMemoryStreams({"ids": np.arange(1)}).train(1, 2, 0))


@pytest.mark.parametrize("shard_rows", [10, 40])  # 4 shards (shard split) and 1 shard (row split) for 2 workers
def test_shard_streams_disjoint_and_exactly_once(tmp_path, shard_rows):
    from dist_fair.data.shards import write_embedding_shards

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((40, 6)).astype(np.float32)
    identity = np.arange(40) // 4
    race = rng.integers(0, 3, 40)
    write_embedding_shards(tmp_path, emb, identity, attrs={"race": race}, shard_rows=shard_rows, block_rows=5)
    streams = ShardStreams(str(tmp_path))
    assert streams.num_samples == 40 and streams.dim == 6
    owned = []
    for rank in range(2):
        rows = list(streams.eval(rank, 2))
        ids = np.concatenate([b["ids"] for b in rows])
        owned.append(ids)
        for b in rows:  # rows arrive with their own embedding, identity and attribute
            np.testing.assert_array_equal(b["emb"], emb[b["ids"]])
            np.testing.assert_array_equal(b["identity"], identity[b["ids"]])
            np.testing.assert_array_equal(b["attr_race"], race[b["ids"]])
        train = streams.train(rank, 2, seed=1)
        drawn = np.concatenate([next(train)["ids"] for _ in range(30)])
        assert set(drawn) <= set(ids) and len(set(drawn)) == len(ids)  # resampled from its share only
    assert not set(owned[0]) & set(owned[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(owned)), np.arange(40))
