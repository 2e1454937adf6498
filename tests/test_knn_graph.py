"""Building the kNN graph on Ray (dist_fair.knn.graph) on the simulated two-node cluster, against
numpy brute force."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dist_fair.config import KNNConfig
from dist_fair.data.shards import write_embedding_shards
from dist_fair.errors import ConfigError, DataError, ShardError
from dist_fair.knn import build_knn_graph, graph_params, is_complete, load_knn_graph, partition_rows
from dist_fair.knn.actors import FaultInjection
from dist_fair.knn.graph import auto_cpus_per_worker, iter_query_blocks

pytestmark = pytest.mark.ray

N, D, K = 360, 16, 10


def brute_force_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 cosine rounded to float32; self first, then decreasing similarity, ties by lower id."""
    x64 = x.astype(np.float64)
    x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    sims = (x64 @ x64.T).astype(np.float32)
    n = x.shape[0]
    key = -sims.astype(np.float64)
    key[np.arange(n), np.arange(n)] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), key), axis=1)[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """360 samples of 40 identities (clustered), with identical embeddings inside and across shards."""
    rng = np.random.default_rng(0)
    identity = np.repeat(np.arange(40), 9)
    centres = rng.standard_normal((40, D))
    x = (centres[identity] + 0.4 * rng.standard_normal((N, D))).astype(np.float32)
    x[100:115] = x[7]      # 16 copies (> k): ties at the k-th neighbour
    x[359] = x[0]          # copies at both ends of the id range
    folder = tmp_path_factory.mktemp("knn") / "shards"
    write_embedding_shards(folder, x, identity=identity, attrs={"race": identity % 4}, shard_rows=100, block_rows=32)
    return folder, x, identity


def config(**kw) -> KNNConfig:
    return KNNConfig(**{"k": K, "cpus_per_worker": 1, "query_block": 128, "recall_sample": 80, **kw})


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_exact_graph_equals_brute_force(ray_cluster, data, tmp_path, workers):
    folder, x, _ = data
    index = "auto" if workers == 1 else "flat"  # auto is exact on small sets
    result = build_knn_graph(folder, tmp_path / "knn", config(index=index, workers=workers), progress=False)
    assert result.index == "flat" and result.info["index_requested"] == index
    nbrs, sims = load_knn_graph(tmp_path / "knn")
    assert isinstance(nbrs, np.memmap) and nbrs.dtype == np.int64 and sims.dtype == np.float32
    ref_nbrs, ref_sims = brute_force_graph(x, K)
    np.testing.assert_array_equal(nbrs, ref_nbrs)
    np.testing.assert_allclose(sims, ref_sims, atol=2e-7)
    assert list(nbrs[7, :4]) == [7, 100, 101, 102] and nbrs[359, 1] == 0
    info = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert info["workers"] == workers and len(info["actors"]) == workers
    assert [a["ids"] for a in info["actors"]] == [list(r) for r in partition_rows(N, workers)]
    # exact by construction, and measured: a sample of queries against an independent numpy brute force
    assert info["recall"]["exact"] is True and info["recall"]["reference"].startswith("numpy")
    sample = np.array(info["recall"]["sample_ids"])
    assert sample.size == 80 == result.recall_sample
    assert result.recall_at_k == pytest.approx(np.mean([len(set(nbrs[i]) & set(ref_nbrs[i])) / K for i in sample]))
    assert result.recall_at_k == 1.0 and result.same_identity_recall == 1.0
    for phase in ("load_s", "build_s", "search_s", "merge_s", "write_s", "total_s"):
        assert phase in info["timings"]
    if workers >= 2:  # SPREAD placement puts the index actors on both simulated nodes
        assert info["num_nodes"] == 2


@pytest.mark.parametrize("kind,extra", [("ivf", {"nprobe": 2}), ("hnsw", {"ef_search": 16, "hnsw_m": 8}),
                                        ("ivfpq", {"pq_m": 4, "nprobe": 3, "rerank": 2})])
def test_approximate_graph_reports_its_recall(ray_cluster, data, tmp_path, kind, extra):
    folder, x, identity = data
    result = build_knn_graph(folder, tmp_path / kind, config(index=kind, workers=2, **extra), progress=False)
    nbrs, sims = result.load()
    assert nbrs.shape == (N, K) and (nbrs >= 0).all() and (nbrs[:, 0] == np.arange(N)).all()
    assert all(len(set(row)) == K for row in nbrs)
    assert np.all(np.diff(sims[:, 1:], axis=1) <= 0)
    # recall recomputed independently on the same sample against brute force
    sample = np.array(result.info["recall"]["sample_ids"]) if "sample_ids" in result.info["recall"] else None
    assert result.recall_sample == 80 and sample is not None and sample.size == 80
    ref_nbrs, _ = brute_force_graph(x, K)
    expected = np.mean([len(set(nbrs[i]) & set(ref_nbrs[i])) / K for i in sample])
    assert result.recall_at_k == pytest.approx(expected)
    assert 0.3 < result.recall_at_k <= 1.0
    same = [(j, i) for i in sample for j in ref_nbrs[i, 1:] if identity[j] == identity[i] and j != i]
    found = sum(j in set(nbrs[i]) for j, i in same)
    assert result.same_identity_recall == pytest.approx(found / len(same))


def test_reverse_edge_refinement_only_raises_recall(ray_cluster, data, tmp_path):
    folder, x, _ = data
    plain = build_knn_graph(folder, tmp_path / "plain", config(index="ivf", workers=2, nprobe=1, symmetrize=False),
                            progress=False)
    refined = build_knn_graph(folder, tmp_path / "sym", config(index="ivf", workers=2, nprobe=1), progress=False)
    ref_nbrs, _ = brute_force_graph(x, K)
    recall = [np.mean([len(set(g[i]) & set(ref_nbrs[i])) / K for i in range(N)])
              for g in (plain.load()[0], refined.load()[0])]
    assert recall[1] > recall[0]
    assert refined.recall_at_k >= plain.recall_at_k
    assert refined.info["params"]["symmetrize"] is True and "symmetrize_s" in refined.info["timings"]
    nbrs, sims = refined.load()
    assert (nbrs[:, 0] == np.arange(N)).all() and np.all(np.diff(sims[:, 1:], axis=1) <= 0)
    assert not list((tmp_path / "sym").glob(".*"))  # no partial files left


def test_failed_actor_is_restarted_and_its_blocks_redone(ray_cluster, data, tmp_path):
    folder, x, _ = data
    marker = tmp_path / "actor0-died"
    result = build_knn_graph(folder, tmp_path / "knn", config(index="flat", workers=2, query_block=64),
                             progress=False, fault=FaultInjection(rank=0, block=2, marker=str(marker)))
    assert marker.exists()  # the first life of actor 0 really died
    assert result.info["actors"][0]["lives"] >= 2 and result.info["actors"][1]["lives"] == 1
    nbrs, sims = result.load()
    ref_nbrs, ref_sims = brute_force_graph(x, K)
    np.testing.assert_array_equal(nbrs, ref_nbrs)
    np.testing.assert_allclose(sims, ref_sims, atol=2e-7)


def test_complete_output_is_reused_and_changed_parameters_rebuild(ray_cluster, data, tmp_path):
    folder, _, _ = data
    cfg = config(index="ivf", workers=2, nprobe=4)
    first = build_knn_graph(folder, tmp_path / "knn", cfg, progress=False)
    from dist_fair.data.shards import read_manifest, shard_set_digest

    params = graph_params(cfg, read_manifest(folder), shard_set_digest(folder))
    assert not first.reused and is_complete(tmp_path / "knn", params)
    again = build_knn_graph(folder, tmp_path / "knn", cfg, progress=False)
    assert again.reused and again.recall_at_k == first.recall_at_k
    other = config(index="ivf", workers=2, nprobe=5)
    assert not is_complete(tmp_path / "knn", graph_params(other, read_manifest(folder), shard_set_digest(folder)))
    assert not build_knn_graph(folder, tmp_path / "knn", other, progress=False).reused
    assert not list((tmp_path / "knn").glob(".*partial"))


def test_clear_errors_for_bad_input(ray_cluster, data, tmp_path):
    folder, x, _ = data
    with pytest.raises(DataError, match="fewer than k=400"):
        build_knn_graph(folder, tmp_path / "a", config(k=400), progress=False)
    with pytest.raises(ConfigError, match="knn.pq_m"):
        build_knn_graph(folder, tmp_path / "b", config(index="ivfpq", pq_m=5), progress=False)
    with pytest.raises(ConfigError, match="do not fit"):  # the simulated nodes have 2 CPUs each
        build_knn_graph(folder, tmp_path / "b", config(workers=2, cpus_per_worker=3), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"kind": "embeddings", "dim": D, "dtype": "float32",
                                                     "attributes": {}, "shards": [], "num_samples": 0,
                                                     "schema_version": 1}))
    with pytest.raises(ShardError, match="no samples"):
        build_knn_graph(empty, tmp_path / "c", config(), progress=False)
    bad = tmp_path / "bad"
    write_embedding_shards(bad, x[:50], shard_rows=25)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["dim"] = 8
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="16 dims, manifest says 8"):
        build_knn_graph(bad, tmp_path / "d", config(workers=2), progress=False)
    assert not (tmp_path / "d" / "knn.json").exists()


def test_partition_query_blocks_and_actor_cpus(data):
    folder, x, identity = data
    assert partition_rows(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert [auto_cpus_per_worker([2.0], w) for w in (1, 2)] == [2.0, 1.0]
    assert auto_cpus_per_worker([2.0], 3) == pytest.approx(2 / 3)  # more actors than CPUs: fractions, all fit
    assert [auto_cpus_per_worker([2.0, 2.0], w) for w in (1, 2, 3)] == [2.0, 2.0, 1.0]
    assert auto_cpus_per_worker([16.0, 4.0], 2) == 8.0
    with pytest.raises(ConfigError):
        partition_rows(3, 4)
    blocks = list(iter_query_blocks(folder, 70))
    assert [b[0].size for b in blocks] == [70] * 5 + [10]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), np.arange(N))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), x)
    np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]), identity)


def _flip_emb_byte(path):
    import tarfile

    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(".emb.npy"))
    data = bytearray(path.read_bytes())
    data[member.offset_data + 300] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_fails_and_the_key_follows_the_input_bytes(ray_cluster, data, tmp_path):
    import shutil

    from dist_fair.data.shards import ShardIntegrityError, read_manifest, shard_set_digest

    source, _, _ = data
    folder = tmp_path / "shards"
    shutil.copytree(source, folder)
    cfg = config(index="flat", workers=2)
    build_knn_graph(folder, tmp_path / "knn", cfg, progress=False)
    victim = folder / read_manifest(folder).shards[1].name
    good = victim.read_bytes()
    _flip_emb_byte(victim)
    before = (tmp_path / "knn" / "nbrs.npy").read_bytes()
    with pytest.raises(ShardIntegrityError, match=f"{victim.name}: sha256 mismatch"):
        build_knn_graph(folder, tmp_path / "knn2", cfg, progress=False)
    assert not (tmp_path / "knn2" / "knn.json").exists()
    # a graph keyed on the changed bytes is not the graph of the good bytes, and the reverse
    manifest = read_manifest(folder)
    changed = graph_params(cfg, manifest, shard_set_digest(folder, verify=False))
    assert not is_complete(tmp_path / "knn", changed)
    victim.write_bytes(good)
    assert is_complete(tmp_path / "knn", graph_params(cfg, manifest, shard_set_digest(folder)))
    again = build_knn_graph(folder, tmp_path / "knn", cfg, progress=False)
    assert again.reused and (tmp_path / "knn" / "nbrs.npy").read_bytes() == before
