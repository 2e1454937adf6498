"""FAISS index factory (dist_fair.knn.indexes): parameters, every kind, vector access, recall on clustered data;
the IVF-PQ fast-scan kind (ivfpq_fs) against single-process faiss, on 1 and 2 Ray index actors."""
from __future__ import annotations

import numpy as np
import pytest

from dist_fair.config import KNNConfig
from dist_fair.errors import ConfigError
from dist_fair.knn.indexes import (
    IndexSpec,
    build_shard_index,
    default_nlist,
    resolve_kind,
    resolve_params,
    wants_gpu,
)
from dist_fair.knn.search import normalize_rows, search_shard


def clustered(n_clusters: int = 40, per: int = 25, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), per)
    x = centres[labels] + 0.35 * rng.standard_normal((labels.size, dim))
    return normalize_rows(x), labels


def brute_topk(x: np.ndarray, k: int) -> np.ndarray:
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_default_nlist_is_four_sqrt_n_bounded():
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(10_000) == 256  # 10000 // 39
    assert default_nlist(40) == 1
    assert default_nlist(100_000_000) == 40000


def test_auto_kind_is_exact_for_small_sets_only():
    assert resolve_kind("auto", 8000, 128) == "flat"
    assert resolve_kind("auto", 62_000, 512) == "flat"
    assert resolve_kind("auto", 200_000, 512) == "hnsw"
    assert resolve_kind("ivf", 10, 2) == "ivf"


def test_resolve_params_rejects_impossible_settings():
    with pytest.raises(ConfigError, match="knn.pq_m.*divide.*100"):
        resolve_params(IndexSpec("ivfpq", pq_m=32), 5000, 100)
    with pytest.raises(ConfigError, match="knn.nlist"):
        resolve_params(IndexSpec("ivf", nlist=500), 300, 16)
    params = resolve_params(IndexSpec("ivfpq", pq_m=8), 50_000, 64)
    assert params["nlist"] == 894 and params["train_size"] == 40 * 894 and params["nbits"] == 8
    assert resolve_params(IndexSpec("ivfpq", nlist=50, pq_m=8), 50_000, 64)["train_size"] == 40 * 256  # PQ: 40 * 2^8
    assert resolve_params(IndexSpec("ivfpq", pq_m=8), 300, 64)["nbits"] == 2  # tiny shard: fewer bits, no failure
    assert resolve_params(IndexSpec("ivf", nprobe=99), 10_000, 16)["nprobe"] == 99
    assert resolve_params(IndexSpec("ivf", nlist=10, nprobe=99), 10_000, 16)["nprobe"] == 10


def test_spec_from_config_and_gpu_choice():
    spec = IndexSpec.from_config(KNNConfig(index="hnsw", hnsw_m=12, ef_search=40, gpu="no"))
    assert (spec.kind, spec.hnsw_m, spec.ef_search) == ("hnsw", 12, 40)
    assert not wants_gpu(IndexSpec("flat", gpu="auto"))  # faiss-cpu here: no GPU, no error
    with pytest.raises(ConfigError, match="knn.gpu"):
        wants_gpu(IndexSpec("hnsw", gpu="yes"))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq", "ivfpq_fs"])
def test_every_kind_builds_holds_the_vectors_and_finds_neighbours(kind):
    x, _ = clustered()
    shard = build_shard_index(IndexSpec(kind, nprobe=8, pq_m=8, rerank=8), x)
    assert shard.n == x.shape[0] and shard.dim == x.shape[1] and not shard.on_gpu
    if kind != "ivf":
        assert shard.vectors is not None and not shard.vectors.flags.writeable  # a view, held once
    some = np.array([[0, 7], [999, 3]])
    np.testing.assert_array_equal(shard.gather(some), x[some])
    np.testing.assert_array_equal(np.concatenate([c for _, c in shard.chunks(rows=300)]), x)
    ids, sims = search_shard(shard, x, 10)
    ref = brute_topk(x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
    assert recall >= (1.0 if kind == "flat" else 0.9), recall
    np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", x, x[ids]), atol=1e-5)  # scores are true cosines


def test_ivf_training_is_deterministic():
    x, _ = clustered(seed=4)
    a = search_shard(build_shard_index(IndexSpec("ivf", nprobe=2, seed=3), x), x, 8)
    b = search_shard(build_shard_index(IndexSpec("ivf", nprobe=2, seed=3), x), x, 8)
    np.testing.assert_array_equal(a[0], b[0])


# --------------------------------------------------------------------------- ivfpq_fs: FAISS 4-bit fast-scan + refine

def test_kind_defaults_resolve_per_kind():
    fs = resolve_params(IndexSpec("ivfpq_fs"), 500_000, 512)  # one of the two 1M x 512 shards
    assert (fs["nlist"], fs["nprobe"], fs["pq_m"], fs["nbits"], fs["rerank"]) == (2828, 256, 256, 4, 8)
    assert fs["train_size"] == 40 * 2828
    assert resolve_params(IndexSpec("ivfpq_fs"), 10_000, 33)["pq_m"] == 33  # odd dim: one dimension per sub-quantizer
    assert resolve_params(IndexSpec("ivfpq_fs"), 2_000, 16)["nprobe"] == 51  # capped at nlist = 2000 // 39
    explicit = resolve_params(IndexSpec("ivfpq_fs", nprobe=7, pq_m=4, rerank=3), 2_000, 16)
    assert (explicit["nprobe"], explicit["pq_m"], explicit["rerank"]) == (7, 4, 3)
    ivfpq = resolve_params(IndexSpec("ivfpq"), 50_000, 64)
    assert (ivfpq["nprobe"], ivfpq["pq_m"], ivfpq["rerank"]) == (16, 32, 4)
    assert resolve_params(IndexSpec("ivf"), 50_000, 64)["nprobe"] == 16
    spec = IndexSpec.from_config(KNNConfig(index="ivfpq_fs", rerank=5))
    assert (spec.kind, spec.rerank, spec.nprobe, spec.pq_m) == ("ivfpq_fs", 5, None, None)


def test_ivfpq_fs_rejects_impossible_settings():
    with pytest.raises(ConfigError, match="knn.pq_m.*divide.*100"):
        resolve_params(IndexSpec("ivfpq_fs", pq_m=48), 5000, 100)
    with pytest.raises(ConfigError, match="knn.index.*ivfpq_fs.*16 centroids.*10 training rows"):
        resolve_params(IndexSpec("ivfpq_fs", nlist=1), 10, 8)
    with pytest.raises(ConfigError, match="knn.nlist"):
        resolve_params(IndexSpec("ivfpq_fs", nlist=500), 300, 16)
    for field in ("nprobe", "pq_m", "rerank"):
        with pytest.raises(ConfigError, match=f"knn.{field}"):
            IndexSpec("ivfpq_fs", **{field: 0})
        with pytest.raises(ConfigError, match=f"knn.{field}"):
            KNNConfig(index="ivfpq_fs", **{field: 0})
    with pytest.raises(ConfigError, match="knn.gpu"):
        wants_gpu(IndexSpec("ivfpq_fs", gpu="yes"))
    with pytest.raises(ConfigError, match="knn.index"):
        KNNConfig(index="ivfpq_fastscan")


def test_ivfpq_fs_is_faiss_fast_scan_with_exact_refinement():
    import faiss

    x, _ = clustered(n_clusters=30, per=40, dim=32, seed=2)
    shard = build_shard_index(IndexSpec("ivfpq_fs", rerank=6), x)
    assert isinstance(shard.index, faiss.IndexRefineFlat)
    fast = faiss.downcast_index(shard.index.base_index)
    assert isinstance(fast, faiss.IndexIVFPQFastScan) and fast.pq.M == 16 and fast.pq.nbits == 4
    assert shard.index.k_factor == 6 and fast.nprobe == min(256, shard.params["nlist"])
    assert fast.metric_type == faiss.METRIC_INNER_PRODUCT


def test_ivfpq_fs_recall_on_clustered_data_above_floor():
    """Few probes and little re-ranking: approximate, but well above chance; scores stay exact."""
    x, _ = clustered(n_clusters=60, per=30, dim=64, seed=5)
    k = 20
    shard = build_shard_index(IndexSpec("ivfpq_fs", nlist=40, nprobe=4, pq_m=16, rerank=2), x)
    ids, sims = search_shard(shard, x, k)
    ref = brute_topk(x, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, ref)])
    assert 0.85 <= recall, recall
    np.testing.assert_allclose(sims, np.einsum("nd,nkd->nk", x, x[ids]), atol=1e-5)
    # the defaults (dim/2 sub-quantizers, 256 probes = every list here, 8 k re-ranked) are near exact
    full = build_shard_index(IndexSpec("ivfpq_fs", nlist=40), x)
    ids_full, _ = search_shard(full, x, k)
    assert np.mean([len(set(a) & set(b)) / k for a, b in zip(ids_full, ref)]) >= 0.99


def _faiss_reference_shard(x: np.ndarray, queries: np.ndarray, nlist: int, nprobe: int, pq_m: int, rerank: int,
                           train: int, seed: int, rank: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain faiss, one process: IndexRefineFlat(IndexIVFPQFastScan) over one shard ``x``, trained on
    the shard's rows drawn with seed + rank (as dist_fair documents), all queries searched at once."""
    import faiss

    d = x.shape[1]
    index = faiss.IndexRefineFlat(faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, nlist, pq_m, 4,
                                                           faiss.METRIC_INNER_PRODUCT))
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed, ivf.cp.niter = seed + 1234 + rank, 20
    rows = x if train >= x.shape[0] else x[np.sort(np.random.default_rng(seed + rank).choice(
        x.shape[0], size=train, replace=False))]
    index.train(np.ascontiguousarray(rows))
    index.add(x)
    ivf.nprobe = nprobe
    index.k_factor = float(rerank)
    return index.search(queries, k)


@pytest.mark.ray
@pytest.mark.parametrize("workers", [1, 2])
def test_ivfpq_fs_graph_on_actors_equals_single_process_faiss(ray_cluster, tmp_path, workers):
    """dist_fair's merged graph (1 or 2 index actors, no reverse-edge refinement) is exactly the
    top-k of single-process faiss indexes of the same kind over the same id ranges, merged here
    by sorting (self first, then decreasing score, ties by id)."""
    from dist_fair.data.shards import load_embeddings, write_embedding_shards
    from dist_fair.knn import build_knn_graph, load_knn_graph, partition_rows

    x_raw, labels = clustered(n_clusters=50, per=24, dim=32, seed=9)
    folder = tmp_path / "shards"
    write_embedding_shards(folder, x_raw.astype(np.float32), identity=labels, attrs={"race": labels % 4},
                           shard_rows=500, block_rows=128, dtype="float32")
    x = normalize_rows(load_embeddings(folder))
    n, k = x.shape[0], 12
    cfg = KNNConfig(index="ivfpq_fs", k=k, workers=workers, nlist=12, nprobe=3, pq_m=8, rerank=3,
                    symmetrize=False, cpus_per_worker=1, query_block=n, recall_sample=0, gpu="no")
    result = build_knn_graph(folder, tmp_path / "knn", cfg, progress=False)
    nbrs, sims = load_knn_graph(tmp_path / "knn", mmap_mode=None)
    assert result.index == "ivfpq_fs" and result.workers == workers
    cand_ids, cand_sims = [], []
    for rank, (start, stop) in enumerate(partition_rows(n, workers)):
        train = resolve_params(IndexSpec.from_config(cfg), stop - start, x.shape[1])["train_size"]
        d_, i_ = _faiss_reference_shard(np.ascontiguousarray(x[start:stop]), x, 12, 3, 8, 3, train, 0, rank, k)
        cand_ids.append(np.where(i_ >= 0, i_ + start, -1))
        cand_sims.append(d_)
    cand_ids, cand_sims = np.concatenate(cand_ids, axis=1), np.concatenate(cand_sims, axis=1)
    for q in range(n):
        keep = (cand_ids[q] >= 0) & (cand_ids[q] != q)
        order = np.lexsort((cand_ids[q][keep], -cand_sims[q][keep].astype(np.float64)))[:k - 1]
        assert nbrs[q, 0] == q
        np.testing.assert_array_equal(nbrs[q, 1:], cand_ids[q][keep][order], err_msg=f"query {q}")
        np.testing.assert_array_equal(sims[q, 1:], cand_sims[q][keep][order], err_msg=f"query {q}")
