"""List-major IVF search (dist_fair.knn.ivf_lists) against an independent brute force over the
probed lists and against faiss' own IndexIVFFlat search with the same quantizer and nprobe."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from dist_fair.knn.indexes import IndexSpec, build_shard_index, search_index
from dist_fair.knn.ivf_lists import ListLayout, build_list_layout, search_lists
from dist_fair.knn.search import exact_topk


def unit_rows(n: int, d: int, seed: int, centers: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    x = (c[rng.integers(0, centers, n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def trained_ivf(x: np.ndarray, nlist: int, seed: int = 0):
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(x)
    return index


def brute_force_over_probes(x, queries, quantizer, nprobe, k):
    """For each query: its nprobe nearest centroids, every vector assigned to them, float64 scores,
    top-k by (decreasing score, increasing id); -1 / -inf padding."""
    _, assign = quantizer.search(x, 1)
    _, probes = quantizer.search(queries, nprobe)
    ids = np.full((len(queries), k), -1, np.int64)
    sims = np.full((len(queries), k), -np.inf)
    for row, q in enumerate(queries):
        members = np.flatnonzero(np.isin(assign[:, 0], probes[row]))
        scores = x[members].astype(np.float64) @ q.astype(np.float64)
        order = np.lexsort((members, -scores))[:k]
        ids[row, :order.size], sims[row, :order.size] = members[order], scores[order]
    return ids, sims


@pytest.mark.parametrize("n, d, nlist, nprobe, k, sub_block", [
    (600, 16, 12, 3, 10, 16384), (600, 16, 12, 5, 25, 64), (900, 8, 20, 1, 8, 100), (300, 32, 6, 6, 40, 7),
])
def test_equals_brute_force_over_the_probed_lists(n, d, nlist, nprobe, k, sub_block):
    x = unit_rows(n, d, seed=n + d)
    index = trained_ivf(x, nlist)
    layout = build_list_layout(index.quantizer, x)
    queries = np.concatenate([x[:150], unit_rows(50, d, seed=99)])
    sims, ids = search_lists(layout, queries, k, nprobe, sub_block=sub_block)
    want_ids, want_sims = brute_force_over_probes(x, queries, index.quantizer, nprobe, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert np.all(np.diff(np.where(np.isinf(sims), -9, sims), axis=1) <= 0)


def test_same_neighbours_as_faiss_ivf_search():
    x = unit_rows(2000, 24, seed=5)
    index = trained_ivf(x, 30)
    layout = build_list_layout(index.quantizer, x)
    index.add(x)
    index.nprobe = 4
    f_sims, f_ids = index.search(x[:300], 20)
    sims, ids = search_lists(layout, x[:300], 20, 4)
    for row in range(300):
        assert set(ids[row]) == set(f_ids[row])
    np.testing.assert_allclose(np.sort(sims, 1), np.sort(f_sims, 1), atol=1e-5)


def test_duplicates_tie_by_id_and_short_lists_pad():
    base = unit_rows(200, 8, seed=3)
    x = np.concatenate([base, base[:40], base[:40]])  # ids i, 200 + i, 240 + i are identical
    index = trained_ivf(x, 8)
    layout = build_list_layout(index.quantizer, x)
    sims, ids = search_lists(layout, base[:40], 3, 8)
    np.testing.assert_array_equal(ids, np.stack([np.arange(40), 200 + np.arange(40), 240 + np.arange(40)], 1))
    sims, ids = search_lists(layout, base[:5], 500, 1)  # one list holds fewer than 500 vectors
    assert (ids == -1).any() and np.isinf(sims[ids == -1]).all()
    assert np.array_equal(np.sort(layout.ids), np.arange(len(x)))  # every vector in exactly one list


def test_shard_index_uses_the_layout_and_stays_exact_for_exact_topk():
    x = unit_rows(800, 16, seed=8)
    spec = IndexSpec(kind="ivf", nlist=10, nprobe=10)
    shard = build_shard_index(spec, x)
    assert isinstance(shard.index, ListLayout) and shard.vectors is None
    np.testing.assert_array_equal(shard.gather(np.array([[3, 7], [0, 799]])), x[[[3, 7], [0, 799]]])
    sims, ids = search_index(shard, x[:50], 15)
    exact_ids, exact_sims = exact_topk(shard, x[:50], 15)  # nprobe = nlist: every vector is a candidate
    np.testing.assert_array_equal(ids, exact_ids)
    faiss_shard = build_shard_index(IndexSpec(kind="ivf", nlist=10, nprobe=3, ivf_search="faiss"), x)
    lists_shard = build_shard_index(IndexSpec(kind="ivf", nlist=10, nprobe=3), x)
    f_sims, f_ids = search_index(faiss_shard, x[:50], 15)
    l_sims, l_ids = search_index(lists_shard, x[:50], 15)
    assert all(set(a) == set(b) for a, b in zip(f_ids, l_ids))
