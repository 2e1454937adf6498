"""List-major IVF search for query blocks (METHODS.md §3): the same candidates as faiss'
``IndexIVFFlat`` with the same coarse quantizer and ``nprobe``, searched with matrix products.

faiss searches an IVF index query by query: each query streams the vectors of its ``nprobe`` lists
from memory, so on a CPU the search is memory-bound (about 3 GFLOP/s per core on 512-d vectors
here). Building a kNN graph searches a whole block of queries at once, so the work can be turned
around: for every inverted list ``l``, the queries that probe it, ``Q_l``, are scored against the
list's vectors ``X_l`` with one matrix product ``S = Q_l X_l^T`` (BLAS, compute-bound), and each
list is read once per block instead of once per query.

Result: for query ``q`` with probed lists ``P(q)`` (its ``nprobe`` nearest centroids by inner
product, as faiss computes them), the top-``k`` of ``{ (s(q, x), x) : x in X_l, l in P(q) }`` by
decreasing similarity, ties by increasing local id - the candidate set of faiss' IVF search, so the
recall is the same (up to float32 rounding of equal-looking scores).

Merging without a per-list top-k: a first pass scores every query against its ``THRESHOLD_PROBES``
nearest lists only; the ``k``-th best score there, ``t_q``, is a lower bound on its final ``k``-th
best (and close to it: most neighbours lie in the nearest lists). The second pass
scores all probed lists and keeps only the scores ``>= t_q`` (one comparison per score), and one
segmented sort per sub-block orders the survivors. Every score that can be in the top-k survives,
so the result does not depend on the order the lists are visited in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from dist_fair.knn.segments import padded_rows

LOG = logging.getLogger(__name__)

#: nearest lists per query whose k-th best score is the pass-2 threshold.
THRESHOLD_PROBES = 4
#: queries searched together (bounds the survivors' memory, about 16 bytes x survivors).
SUB_BLOCK = 16384


@dataclass
class ListLayout:
    """An IVF index as contiguous lists: ``vectors[offsets[l]:offsets[l + 1]]`` are the vectors of
    list ``l`` whose local ids are ``ids[offsets[l]:offsets[l + 1]]``; ``position[i]`` is the row of
    local id ``i`` in ``vectors``. ``quantizer`` is the faiss index over the ``nlist`` centroids."""

    quantizer: Any
    vectors: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray
    position: np.ndarray

    @property
    def nlist(self) -> int:
        return int(self.offsets.size - 1)

    def gather(self, local_ids: np.ndarray) -> np.ndarray:
        return self.vectors[self.position[np.asarray(local_ids, dtype=np.int64)]]


def build_list_layout(quantizer: Any, vectors: np.ndarray, block: int = 65536) -> ListLayout:
    """Assign every vector to its nearest centroid (``argmax_c <x, c>``, faiss' IVF assignment) and
    lay the vectors out list by list (stable: local ids increase inside a list). The layout keeps
    its own copy of the centroids (an IVF index's quantizer dies with the index)."""
    import faiss

    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(centroids)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = vectors.shape[0]
    assign = np.empty(n, dtype=np.int64)
    for start in range(0, n, block):
        _, nearest = quantizer.search(vectors[start:start + block], 1)
        assign[start:start + block] = nearest[:, 0]
    order = np.argsort(assign, kind="stable")
    offsets = np.searchsorted(assign[order], np.arange(quantizer.ntotal + 1)).astype(np.int64)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    laid_out = vectors[order]
    laid_out.flags.writeable = False
    return ListLayout(quantizer, laid_out, order.astype(np.int64), offsets, position)


def _list_products(layout: ListLayout, queries: np.ndarray, probes: np.ndarray
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """For every non-empty list probed by some query of the ``(B, p)`` matrix ``probes`` (``-1`` =
    no list): ``(first row of the list in the layout, query rows, their probe ranks, scores
    queries[rows] @ X_l^T)`` - one matrix product per list."""
    b, p = probes.shape
    lists = probes.ravel()
    valid = lists >= 0
    order = np.argsort(lists[valid], kind="stable")
    rows_sorted = np.repeat(np.arange(b, dtype=np.int64), p)[valid][order]
    ranks_sorted = np.tile(np.arange(p, dtype=np.int64), b)[valid][order]
    bounds = np.searchsorted(lists[valid][order], np.arange(layout.nlist + 1))
    offsets = layout.offsets
    for lst in np.flatnonzero(np.diff(bounds)):
        lo, hi = offsets[lst], offsets[lst + 1]
        if lo == hi:
            continue
        sel = slice(bounds[lst], bounds[lst + 1])
        rows = rows_sorted[sel]
        # float64 products rounded to float32: a float32 GEMM may round the same dot product
        # differently in different output columns (OpenBLAS edge tiles), which would break the
        # tie order between identical vectors; float64 rounding errors vanish in the cast.
        scores = queries[rows].astype(np.float64) @ layout.vectors[lo:hi].T.astype(np.float64)
        yield int(lo), rows, ranks_sorted[sel], scores.astype(np.float32)


def _thresholds(layout: ListLayout, queries: np.ndarray, probes: np.ndarray, k: int) -> np.ndarray:
    """``t_q``: the k-th best score of query q over the lists in its row of ``probes`` (its nearest
    few; ``-inf`` if they hold fewer than k vectors) - a lower bound on its k-th best score over all
    its probed lists. Each list contributes its k best scores per query to a ``(B, p, k)`` buffer."""
    b, p = probes.shape
    buffer = np.full((b, p, k), -np.inf, dtype=np.float32)
    for _, rows, ranks, scores in _list_products(layout, queries, probes):
        size = scores.shape[1]
        if size > k:
            scores = np.partition(scores, size - k, axis=1)[:, size - k:]
        buffer[rows, ranks, :scores.shape[1]] = scores
    buffer = buffer.reshape(b, p * k)
    return np.partition(buffer, p * k - k, axis=1)[:, p * k - k]


def _scan(layout: ListLayout, queries: np.ndarray, probes: np.ndarray, threshold: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every score ``s(q, x) >= threshold[q]`` of a query with a vector of its probed lists, as
    ``(row, local id, sim)`` triples."""
    out_rows, out_ids, out_sims = [], [], []
    for lo, rows, _, scores in _list_products(layout, queries, probes):
        r, c = np.nonzero(scores >= threshold[rows][:, None])
        out_rows.append(rows[r])
        out_ids.append(layout.ids[lo + c])
        out_sims.append(scores[r, c])
    if not out_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_rows), np.concatenate(out_ids), np.concatenate(out_sims).astype(np.float32)


def _top_k_per_row(rows: np.ndarray, ids: np.ndarray, sims: np.ndarray, n_rows: int, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Segmented top-k: for every row its ``k`` best by decreasing sim (ties by increasing id);
    ``(-1, -inf)`` padding where a row has fewer. One sort on a float64 key ``row * 4 + (1 - sim)``
    (exact: float32 sims in [-1, 1] keep their order at this magnitude), ids sorted first so that
    the stable sort breaks ties by id."""
    by_id = np.argsort(ids, kind="stable")
    key = rows[by_id] * 4.0 + (1.0 - sims[by_id].astype(np.float64))
    order = by_id[np.argsort(key, kind="stable")]
    return padded_rows(rows[order], ids[order], sims[order], n_rows, k)


def search_lists(layout: ListLayout, queries: np.ndarray, k: int, nprobe: int,
                 sub_block: int = SUB_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """IVF search of a query block (module docstring): ``(sims float32 (B, k), local ids int64
    (B, k))``, rows sorted by decreasing similarity, ties by increasing id; ``-1`` / ``-inf`` where
    the probed lists hold fewer than ``k`` vectors."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nprobe = int(min(nprobe, layout.nlist))
    out_ids = np.empty((queries.shape[0], k), dtype=np.int64)
    out_sims = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], sub_block):
        q = queries[start:start + sub_block]
        _, probes = layout.quantizer.search(q, nprobe)
        threshold = _thresholds(layout, q, probes[:, :min(THRESHOLD_PROBES, nprobe)], k)
        rows, ids, sims = _scan(layout, q, probes, threshold)
        out_ids[start:start + q.shape[0]], out_sims[start:start + q.shape[0]] = _top_k_per_row(
            rows, ids, sims, q.shape[0], k)
    return out_sims, out_ids
