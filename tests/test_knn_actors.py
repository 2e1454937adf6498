"""The index-shard actor (dist_fair.knn.actors), used here as a plain object (the Ray side is in test_knn_graph)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dist_fair.data.shards import write_embedding_shards
from dist_fair.errors import DataError, ShardError
from dist_fair.knn.actors import IndexShardActor, load_rows
from dist_fair.knn.indexes import IndexSpec


@pytest.fixture()
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((230, 12)).astype(np.float32)
    write_embedding_shards(tmp_path / "shards", x, identity=np.arange(230) // 5, shard_rows=70, block_rows=16)
    return tmp_path / "shards", x


def test_load_rows_reads_any_id_range_normalised(shard_dir):
    folder, x = shard_dir
    for start, stop in [(0, 230), (50, 160), (69, 71), (229, 230)]:
        rows = load_rows(folder, start, stop)
        expected = x[start:stop] / np.linalg.norm(x[start:stop], axis=1, keepdims=True)
        np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-7)


def test_load_rows_names_bad_input(shard_dir, tmp_path):
    folder, x = shard_dir
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["dim"] = 10
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="12 dims, manifest says 10"):
        load_rows(folder, 0, 100)
    x = x.copy()
    x[123] = 0
    write_embedding_shards(tmp_path / "zero", x, shard_rows=70)
    with pytest.raises(DataError, match="sample id 123"):
        load_rows(tmp_path / "zero", 100, 200)


def test_actor_searches_its_id_range_with_global_ids(shard_dir):
    folder, x = shard_dir
    actor = IndexShardActor(str(folder), rank=1, start=100, stop=180, spec=IndexSpec("flat"), k=6)
    stats = actor.build()
    assert stats["builds"] == 1 and stats["load_s"] >= 0 and stats["index"]["rows"] == 80
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    queries = xn[:20].astype(np.float32)
    ids, sims = actor.search(queries, block=0)
    sims_ref = queries.astype(np.float64) @ xn[100:180].T.astype(np.float64)
    ref = 100 + np.argsort(-sims_ref, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(ids, ref)
    exact_ids, _ = actor.exact_search(queries)
    np.testing.assert_array_equal(exact_ids, ref)
    assert actor.stats()["blocks"] == 1 and actor.stats()["builds"] == 1
