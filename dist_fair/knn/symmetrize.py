"""Reverse-edge refinement of an approximate kNN graph (METHODS.md §3).

Cosine similarity is symmetric: if an approximate search found ``j`` among ``i``'s neighbours with
similarity ``s``, then ``i`` is a candidate for ``j`` with the same ``s`` - one that ``j``'s own
search may have missed (an IVF query visits only its own ``nprobe`` lists; ``i`` lies in a list
that ``j`` did not probe). The refined list of ``j`` is the top-k of

    C(j) = N(j)  U  { i : j in N(i) }

by decreasing similarity (ties by id), the sample itself kept at position 0. No new similarity is
computed, so the cost is one pass over the graph per row block plus a sort; every candidate is a
real pair with its real score, so the refined top-k is never worse than the original
(recall@k can only rise). A pair found from both sides keeps the larger of its two float32 scores
(they can differ in the last bit: different matrix products).
"""
from __future__ import annotations

import numpy as np

from dist_fair.knn.segments import padded_rows

#: target rows refined at once (memory about 40 bytes x rows x k).
BLOCK_ROWS = 131072
#: rows of the graph scanned at once for reverse edges.
SCAN_ROWS = 262144


def symmetrize_block(nbrs: np.ndarray, sims: np.ndarray, start: int, stop: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Refined rows ``start..stop-1`` of the graph ``(nbrs, sims)`` (``(N, k)``, self at column 0,
    ``-1`` for missing neighbours; memory-mapped arrays are read in chunks)."""
    n, k = nbrs.shape
    rows_l, ids_l, sims_l = [], [], []
    own = np.asarray(nbrs[start:stop])
    own_s = np.asarray(sims[start:stop], dtype=np.float32)
    r = np.repeat(np.arange(start, stop, dtype=np.int64), k)
    rows_l.append(r)
    ids_l.append(own.ravel())
    sims_l.append(own_s.ravel())
    for lo in range(0, n, SCAN_ROWS):
        chunk = np.asarray(nbrs[lo:lo + SCAN_ROWS, 1:])
        hit = (chunk >= start) & (chunk < stop)
        src, col = np.nonzero(hit)
        if src.size:
            rows_l.append(chunk[src, col])
            ids_l.append(src.astype(np.int64) + lo)
            sims_l.append(np.asarray(sims[lo:lo + SCAN_ROWS, 1:])[src, col].astype(np.float32))
    rows, ids, scores = np.concatenate(rows_l), np.concatenate(ids_l), np.concatenate(sims_l)
    valid = ids >= 0
    rows, ids, scores = rows[valid], ids[valid], scores[valid]
    # one entry per (row, id): the larger score
    order = np.lexsort((-scores, ids, rows))
    rows, ids, scores = rows[order], ids[order], scores[order]
    first = np.ones(rows.size, dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (ids[1:] != ids[:-1])
    rows, ids, scores = rows[first], ids[first], scores[first]
    # per row: itself first, then decreasing score, ties by id
    key = np.where(ids == rows, -np.inf, -scores.astype(np.float64))
    order = np.lexsort((ids, key, rows))
    rows, ids, scores = rows[order], ids[order], scores[order]
    return padded_rows(rows - start, ids, scores, stop - start, k)


def symmetrize_graph(nbrs: np.ndarray, sims: np.ndarray, out_nbrs: np.ndarray, out_sims: np.ndarray,
                     block_rows: int = BLOCK_ROWS) -> int:
    """Write the refined graph of ``(nbrs, sims)`` into ``(out_nbrs, out_sims)`` block by block;
    returns how many neighbour entries changed."""
    changed = 0
    for start in range(0, nbrs.shape[0], block_rows):
        stop = min(nbrs.shape[0], start + block_rows)
        ids, scores = symmetrize_block(nbrs, sims, start, stop)
        changed += int((ids != np.asarray(nbrs[start:stop])).sum())
        out_nbrs[start:stop] = ids
        out_sims[start:stop] = scores
    return changed
