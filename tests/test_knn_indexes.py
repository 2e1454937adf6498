"""FAISS index factory (dist_fair.knn.indexes): parameters, every kind, vector access, recall on clustered data."""
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


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
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
