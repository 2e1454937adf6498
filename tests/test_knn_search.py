"""Searching an index shard and merging per-shard top-k (dist_fair.knn.search) against numpy brute force."""
from __future__ import annotations

import numpy as np
import pytest

from dist_fair.errors import DataError, DistFairError
from dist_fair.knn.indexes import IndexSpec, build_shard_index
from dist_fair.knn.search import (
    error_bound,
    exact_similarities,
    exact_topk,
    merge_topk,
    normalize_rows,
    order_rows,
    search_shard,
)


def brute_force_graph(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: float64 cosine, rounded to float32; self first, then decreasing
    similarity, ties by lower id."""
    x64 = x.astype(np.float64)
    x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    sims = (x64 @ x64.T).astype(np.float32)
    n = x.shape[0]
    key = -sims.astype(np.float64)
    key[np.arange(n), np.arange(n)] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), key), axis=1)[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def with_duplicates(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[40:65] = x[3]          # 26 identical copies (more than k + margin below): the tie fallback is needed
    x[200] = x[199] * 4.0    # same direction, norm x4 (exact in binary): identical after normalisation
    x[n - 1] = x[0]          # duplicates at both ends of the id range (different shards)
    return x


def merged_graph(x: np.ndarray, k: int, shards: int, kind: str = "flat", margin: int = 4) -> tuple:
    xn = normalize_rows(x)
    n = x.shape[0]
    bounds = [round(w * n / shards) for w in range(shards + 1)]
    parts = []
    for start, stop in zip(bounds, bounds[1:]):
        index = build_shard_index(IndexSpec(kind), xn[start:stop])
        parts.append(search_shard(index, xn, k, id_offset=start, margin=margin))
    self_sims = exact_similarities(xn, xn[:, None, :])[:, 0].astype(np.float32)
    return merge_topk(np.arange(n), self_sims, parts, k)


def test_normalize_rows_matches_numpy_and_rejects_zero_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 7)).astype(np.float32) * 5
    out = normalize_rows(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    x[17] = 0
    with pytest.raises(DataError, match="sample id 117"):
        normalize_rows(x, first_id=100)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_exact_search_equals_brute_force_with_duplicates(shards):
    x = with_duplicates(400, 24)
    k = 12
    ref_nbrs, ref_sims = brute_force_graph(x, k)
    nbrs, sims = merged_graph(x, k, shards)
    assert nbrs.dtype == np.int64 and sims.dtype == np.float32
    np.testing.assert_array_equal(nbrs, ref_nbrs)
    np.testing.assert_allclose(sims, ref_sims, atol=2e-7)
    assert (nbrs[:, 0] == np.arange(400)).all()
    # duplicates of sample 3: after itself, the other copies in increasing id order
    assert list(nbrs[3, 1:k]) == list(range(40, 40 + k - 1))
    assert list(nbrs[45, :4]) == [45, 3, 40, 41]
    assert nbrs[199, 1] == 200 and nbrs[200, 1] == 199
    assert nbrs[0, 1] == 399 and nbrs[399, 1] == 0


def test_exact_search_is_independent_of_shards_and_block_size():
    x = with_duplicates(300, 16, seed=3)
    k = 9
    one = merged_graph(x, k, 1)
    three = merged_graph(x, k, 3)
    np.testing.assert_array_equal(one[0], three[0])
    np.testing.assert_array_equal(one[1], three[1])  # bit for bit
    xn = normalize_rows(x)
    index = build_shard_index(IndexSpec("flat"), xn)
    whole = search_shard(index, xn, k)
    blocks = [search_shard(index, xn[s:s + 7], k) for s in range(0, 300, 7)]  # tiny blocks take faiss' other kernel
    np.testing.assert_array_equal(whole[0], np.concatenate([b[0] for b in blocks]))
    np.testing.assert_array_equal(whole[1], np.concatenate([b[1] for b in blocks]))


def test_exact_topk_without_candidates_and_small_shard():
    x = with_duplicates(300, 8, seed=5)
    xn = normalize_rows(x)
    ref_nbrs, _ = brute_force_graph(x, 300)
    small = build_shard_index(IndexSpec("ivf", nlist=2), xn[:5])  # vectors read back through the direct map
    ids, sims = exact_topk(small, xn, k=10)
    assert ids.shape == (300, 5)  # a shard with fewer rows than k returns all of them
    for row in range(300):
        expected = [j for j in ref_nbrs[row] if j < 5]
        if row >= 5:
            assert list(ids[row]) == expected
        else:
            assert set(ids[row]) == set(range(5))
    assert np.all(np.diff(sims, axis=1) <= 0)
    # a whole shard, exhaustive candidates computed chunk-wise, tiny margin: many rows need the tie fallback
    whole = build_shard_index(IndexSpec("hnsw"), xn)
    ids, sims = exact_topk(whole, xn, k=10, margin=1)
    x64 = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    ref_sims = (x64 @ x64.T).astype(np.float32)
    ref = np.lexsort((np.broadcast_to(np.arange(300), (300, 300)), -ref_sims), axis=1)[:, :10]  # self not forced
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(ref_sims, ref, axis=1), atol=2e-7)


def test_order_rows_puts_padding_last_and_ties_by_id():
    ids = np.array([[5, -1, 2, 9], [1, 2, 3, 4]])
    sims = np.array([[0.5, 0.9, 0.5, 0.7], [0.1, 0.3, 0.3, 0.2]], np.float32)
    out_ids, out_sims = order_rows(ids, sims)
    assert out_ids.tolist() == [[9, 2, 5, -1], [2, 3, 4, 1]]
    assert np.isneginf(out_sims[0, 3])


def test_merge_matches_sorting_the_union():
    rng = np.random.default_rng(7)
    nq, k = 30, 6
    # three shards with id ranges [0,100), [100,200), [200,300); similarities from a coarse grid -> many ties
    query_ids = rng.integers(0, 200, size=nq)
    parts = []
    for shard in range(3):
        ids = np.stack([rng.choice(100, size=k, replace=False) + 100 * shard for _ in range(nq)])
        if shard == 0:  # the query itself is among shard 0's neighbours in every other row
            for row in range(0, nq, 2):
                query_ids[row] = ids[row, row % k]
        sims = rng.integers(0, 5, size=(nq, k)).astype(np.float32) / 4
        parts.append(order_rows(ids, sims))
    for used in (parts, parts[:1]):  # several shards, and the single-shard fast path
        nbrs, sims = merge_topk(query_ids, np.ones(nq, np.float32), used, k)
        for row in range(nq):
            pairs = [(float(s), int(i)) for p in used for i, s in zip(p[0][row], p[1][row]) if i != query_ids[row]]
            ordered = sorted(pairs, key=lambda t: (-t[0], t[1]))[:k - 1]
            assert nbrs[row].tolist() == [query_ids[row]] + [i for _, i in ordered]
            assert sims[row].tolist() == [1.0] + [s for s, _ in ordered]


def test_merge_refuses_rows_with_too_few_neighbours():
    ids = np.array([[0, -1, -1]])
    sims = np.array([[1.0, -np.inf, -np.inf]], np.float32)
    with pytest.raises(DistFairError, match="fewer than k=3"):
        merge_topk(np.array([0]), np.ones(1, np.float32), [(ids, sims)], 3)


def test_approximate_search_fills_every_row_and_starts_with_self():
    x = with_duplicates(500, 16, seed=2)
    nbrs, sims = merged_graph(x, 10, 2, kind="ivf")
    assert (nbrs >= 0).all() and (nbrs[:, 0] == np.arange(500)).all()
    assert all(len(set(row)) == 10 for row in nbrs)
    assert np.all(np.diff(sims[:, 1:], axis=1) <= 0)


def test_error_bound_covers_float32_inner_products():
    rng = np.random.default_rng(11)
    x = normalize_rows(rng.standard_normal((200, 512)))
    exact = x.astype(np.float64) @ x.T.astype(np.float64)
    assert np.abs((x @ x.T) - exact).max() < error_bound(512)
