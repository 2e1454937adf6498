"""Searching one index shard and merging per-shard top-k lists (METHODS.md §3); pure functions.

Similarity is the cosine ``s(q, x) = <q, x>`` of L2-normalised vectors (:func:`normalize_rows`).

Order of a neighbour list (every function here, and the files written by
:func:`dist_fair.knn.build_knn_graph`): the sample itself first, then decreasing float32
similarity, equal similarities by increasing global id. Padding (fewer vectors than asked) is id
``-1`` with similarity ``-inf`` and always sorts last.

Exact mode (``flat``) is reproducible bit for bit whatever the number of shards or the query
block size: faiss only proposes ``k + margin`` candidates per shard, whose similarities are then
recomputed in float64 (:func:`exact_similarities`, a fixed per-pair reduction, so identical
embeddings get identical scores) and rounded to float32. A row whose k-th recomputed similarity
lies within ``2 eps`` of the lowest candidate faiss returned (``eps = (d + 4) 2^-24``, a bound on
faiss' float32 rounding error for unit vectors) might be missing a tied or nearly tied vector;
such rows are re-searched exhaustively, keeping every vector whose float32 score is within
``2 eps`` of the k-th (:func:`exact_topk`). The result is the exact top-k under the order above.

Approximate modes (``ivf``, ``hnsw``, ``ivfpq``, ``ivfpq_fs``) keep faiss' own float32 scores
(exact inner products of the candidates they visited; ``ivfpq`` and ``ivfpq_fs`` re-rank their PQ
candidates against the raw vectors) and the same
order; they are deterministic for a given configuration and number of shards. A row for which an
approximate index found fewer than ``min(k, n)`` vectors is searched exhaustively instead, so no
row is ever incomplete.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from dist_fair.errors import DataError, DistFairError
from dist_fair.knn.indexes import ShardIndex, search_index

LOG = logging.getLogger(__name__)

#: Extra candidates faiss proposes per shard in exact mode (rows near a tie need fewer re-searches).
DEFAULT_MARGIN = 16
RESCORE_ROWS = 256


def normalize_rows(x: np.ndarray, first_id: int = 0, where: str = "embeddings") -> np.ndarray:
    """``x_i / ||x_i||_2`` in float32.

    Each row is computed on its own (a pairwise sum over its ``d`` squares, then a correctly rounded
    division), so a row gets the same bits whichever block it is read in - the driver's query
    blocks and an actor's shard rows agree exactly.

    Raises:
        DataError: a row with zero norm or a non-finite value (names its global id ``first_id + i``).
    """
    x32 = np.asarray(x, dtype=np.float32)
    if x32.ndim != 2:
        raise DataError(f"{where}: expected a 2-D array (rows x dim), got shape {x32.shape}")
    norms = np.sqrt(np.square(x32).sum(axis=1))
    bad = ~(np.isfinite(norms) & (norms > 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: the embedding of sample id {first_id + row} has zero norm or a non-finite value "
                        "and cannot be L2-normalised for cosine similarity; remove or replace that sample")
    return x32 / norms[:, None]


def error_bound(dim: int) -> float:
    """Bound on |float32 inner product - exact| for unit vectors of ``dim`` dimensions: ``(d + 4) 2^-24``."""
    return float((dim + 4) * 2.0 ** -24)


def exact_similarities(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``s_ij = sum_d q_id c_ijd`` in float64 for queries ``(n, d)`` and candidates ``(n, m, d)``.

    Each pair is reduced over ``d`` by the same code whatever its position, so identical vectors
    always score identically.
    """
    return np.einsum("nd,nmd->nm", np.asarray(queries, np.float64), np.asarray(candidates, np.float64))


def rescore(shard: ShardIndex, queries: np.ndarray, local_ids: np.ndarray) -> np.ndarray:
    """Float32 rounding of :func:`exact_similarities` of each query with its candidate local ids
    (``-1`` gives ``-inf``), computed ``RESCORE_ROWS`` queries at a time."""
    out = np.full(local_ids.shape, -np.inf, dtype=np.float32)
    for start in range(0, local_ids.shape[0], RESCORE_ROWS):
        ids = local_ids[start:start + RESCORE_ROWS]
        valid = ids >= 0
        vecs = shard.gather(np.where(valid, ids, 0))
        sims = exact_similarities(queries[start:start + RESCORE_ROWS], vecs).astype(np.float32)
        out[start:start + RESCORE_ROWS] = np.where(valid, sims, -np.inf)
    return out


def order_rows(ids: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort every row by decreasing similarity, ties by increasing id, padding (``-1``) last.

    Rows already in that order (most rows faiss returns) are left as they are; only the others are
    sorted.
    """
    ids = np.array(ids, dtype=np.int64, copy=True)
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    if ids.shape[1] < 2:
        return ids, sims
    left_s, right_s, left_i, right_i = sims[:, :-1], sims[:, 1:], ids[:, :-1], ids[:, 1:]
    in_order = (left_s > right_s) | ((left_s == right_s) & ((left_i < right_i) | (right_i < 0)))
    rows = np.flatnonzero(~in_order.all(axis=1))
    if rows.size:
        sub_ids, sub_sims = ids[rows], sims[rows]
        order = np.lexsort((np.where(sub_ids >= 0, sub_ids, np.iinfo(np.int64).max), -sub_sims), axis=1)
        ids[rows] = np.take_along_axis(sub_ids, order, axis=1)
        sims[rows] = np.take_along_axis(sub_sims, order, axis=1)
    return ids, sims


def _exhaustive_candidates(shard: ShardIndex, queries: np.ndarray, kf: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 top-``kf`` by exhaustive search over the shard's vectors, chunk by chunk."""
    import faiss

    best_d = np.full((queries.shape[0], 0), -np.inf, np.float32)
    best_i = np.zeros((queries.shape[0], 0), np.int64)
    for start, chunk in shard.chunks():
        d, i = faiss.knn(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(chunk, np.float32),
                         min(kf, chunk.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
        i = np.where(i >= 0, i + start, -1)
        d = np.where(i >= 0, d, -np.inf).astype(np.float32)
        cand_d, cand_i = np.concatenate([best_d, d], axis=1), np.concatenate([best_i, i], axis=1)
        top = np.argsort(-cand_d, axis=1, kind="stable")[:, :kf]
        best_d, best_i = np.take_along_axis(cand_d, top, axis=1), np.take_along_axis(cand_i, top, axis=1)
    return best_d, best_i


def _superset_search(shard: ShardIndex, query: np.ndarray, threshold: float,
                     k_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k_out`` of one query among every vector whose float32 score is >= ``threshold``."""
    found = []
    for start, chunk in shard.chunks():
        scores = chunk @ query
        found.append(np.flatnonzero(scores >= threshold) + start)
    ids = np.concatenate(found) if found else np.zeros(0, np.int64)
    sims = np.full(ids.shape[0], -np.inf, np.float32)
    for start in range(0, ids.shape[0], 65536):
        part = ids[start:start + 65536]
        sims[start:start + 65536] = exact_similarities(query[None, :], shard.gather(part)[None])[0].astype(np.float32)
    order = np.lexsort((ids, -sims))[:k_out]
    out_ids = np.full(k_out, -1, np.int64)
    out_sims = np.full(k_out, -np.inf, np.float32)
    out_ids[:order.size], out_sims[:order.size] = ids[order], sims[order]
    return out_ids, out_sims


def exact_topk(shard: ShardIndex, queries: np.ndarray, k: int, margin: int = DEFAULT_MARGIN,
               candidates: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``min(k, n)`` of each query within one shard, as local ids and float32 similarities.

    Args:
        shard: the shard's index (only its vectors are used unless ``candidates`` come from it).
        queries: L2-normalised float32 ``(nq, d)``.
        k: neighbours wanted; a shard of ``n < k`` rows returns all ``n``.
        margin: extra candidates proposed per query (fewer rows need an exhaustive re-search).
        candidates: ``(sims, local ids)`` of an exhaustive float32 search with ``min(n, k + margin)``
            columns (e.g. from ``IndexFlatIP``); computed here when ``None``.

    Returns:
        ``(local ids int64, sims float32)``, ``(nq, min(k, n))``, each row in the module's order.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = shard.n
    k_out = min(k, n)
    kf = min(n, k_out + max(0, margin))
    if candidates is None:
        faiss_sims, ids = _exhaustive_candidates(shard, queries, kf)
    else:
        faiss_sims, ids = candidates
    sims = rescore(shard, queries, ids)
    ids_sorted, sims_sorted = order_rows(ids, sims)
    out_ids = np.ascontiguousarray(ids_sorted[:, :k_out])
    out_sims = np.ascontiguousarray(sims_sorted[:, :k_out])
    if ids.shape[1] < n:
        eps = error_bound(shard.dim)
        lowest = np.where(ids >= 0, faiss_sims, np.inf).min(axis=1)
        incomplete = (ids < 0).any(axis=1) | (ids.shape[1] < kf)
        flagged = np.flatnonzero(incomplete | (out_sims[:, k_out - 1] <= lowest + 2 * eps))
        if flagged.size:
            LOG.debug("exact search: %d of %d rows re-searched exhaustively (ties at the k-th neighbour)",
                      flagged.size, queries.shape[0])
        for row in flagged:
            threshold = -np.inf if incomplete[row] else float(out_sims[row, k_out - 1]) - 2 * eps
            out_ids[row], out_sims[row] = _superset_search(shard, queries[row], threshold, k_out)
    return out_ids, out_sims


def search_shard(shard: ShardIndex, queries: np.ndarray, k: int, id_offset: int = 0,
                 margin: int = DEFAULT_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Top-``min(k, n)`` of a query block in one index shard, as GLOBAL ids (``local + id_offset``)
    and float32 similarities, rows in the module's order.

    ``flat``: exact (:func:`exact_topk` over ``IndexFlatIP`` candidates). Other kinds: the index's
    own top-k; rows with fewer than ``min(k, n)`` results are searched exhaustively.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k_out = min(k, shard.n)
    if shard.kind == "flat":
        kf = min(shard.n, k_out + max(0, margin))
        faiss_sims, local = search_index(shard, queries, kf)
        ids, sims = exact_topk(shard, queries, k, margin, candidates=(faiss_sims, local))
    else:
        faiss_sims, local = search_index(shard, queries, k_out)
        ids, sims = order_rows(local, faiss_sims)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if short.size:
            LOG.info("%s index returned fewer than %d neighbours for %d queries; searching them exhaustively "
                     "(raise nprobe / efSearch to avoid this)", shard.kind, k_out, short.size)
            ids[short], sims[short] = exact_topk(shard, queries[short], k, margin)
    return np.where(ids >= 0, ids + id_offset, -1), sims


def _prepend_self(query_ids: np.ndarray, self_sims: np.ndarray, part: tuple[np.ndarray, np.ndarray],
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-shard merge: the query first, then the part's sorted row without the query."""
    ids, sims = np.asarray(part[0], np.int64), np.asarray(part[1], np.float32)
    is_self = ids == query_ids[:, None]
    position = np.where(is_self.any(axis=1), is_self.argmax(axis=1), ids.shape[1])
    cols = np.arange(k - 1)[None, :]
    source = cols + (cols >= position[:, None])  # skip the query's own column
    out_ids = np.concatenate([query_ids[:, None], np.take_along_axis(ids, source, axis=1)], axis=1)
    out_sims = np.concatenate([self_sims[:, None], np.take_along_axis(sims, source, axis=1)], axis=1)
    if (out_ids[:, 1:] < 0).any():
        raise DistFairError(f"merging the shards' neighbour lists left fewer than k={k} neighbours for some query; "
                            "every shard must return min(k, its rows) neighbours (internal error, please report)")
    return out_ids, out_sims


def merge_topk(query_ids: np.ndarray, self_sims: np.ndarray, parts: Sequence[tuple[np.ndarray, np.ndarray]],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact merge of per-shard top-k lists into each query's global top-k.

    ``nbrs[i] = [q_i] + the k - 1 best of the union of the parts' rows without q_i``, in the module's
    order. Requirements (met by :func:`search_shard` over id-range shards): ``parts`` are listed in
    increasing order of the (disjoint) id ranges they cover and each row of a part is already
    sorted. A stable sort on similarity then orders ties by id across parts as well.

    Args:
        query_ids: global ids ``(nq,)`` of the queries.
        self_sims: ``(nq,)`` similarity of each query with itself (position 0).
        parts: per shard, ``(global ids int64 (nq, k_s), sims float32 (nq, k_s))``.
        k: neighbours per row, self included.

    Returns:
        ``(nbrs int64 (nq, k), sims float32 (nq, k))``.

    Raises:
        DistFairError: fewer than ``k - 1`` other neighbours in some row (would leave a gap).
    """
    query_ids = np.asarray(query_ids, np.int64)
    if len(parts) == 1 and np.asarray(parts[0][0]).shape[1] >= k:
        return _prepend_self(query_ids, np.asarray(self_sims, np.float32), parts[0], k)
    ids = np.concatenate([query_ids[:, None]] + [np.asarray(p[0], np.int64) for p in parts], axis=1)
    sims = np.concatenate([np.asarray(self_sims, np.float32)[:, None]]
                          + [np.asarray(p[1], np.float32) for p in parts], axis=1)
    key = -sims.astype(np.float64)
    key[:, 0] = -np.inf
    drop = (ids < 0)
    drop[:, 1:] |= ids[:, 1:] == query_ids[:, None]
    key[drop] = np.inf
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    if order.shape[1] < k or np.isinf(np.take_along_axis(key, order[:, 1:], axis=1)).any():
        raise DistFairError(f"merging the shards' neighbour lists left fewer than k={k} neighbours for some query; "
                            "every shard must return min(k, its rows) neighbours (internal error, please report)")
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)
