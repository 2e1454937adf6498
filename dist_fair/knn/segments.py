"""Padded per-row neighbour lists from flat ``(row, id, sim)`` triples (METHODS.md §3)."""
from __future__ import annotations

import numpy as np


def padded_rows(rows: np.ndarray, ids: np.ndarray, sims: np.ndarray, n_rows: int, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` entries of every row ``0..n_rows-1`` as ``(ids int64 (n_rows, k), sims
    float32 (n_rows, k))``, ``(-1, -inf)`` where a row has fewer. ``rows`` must be sorted, and the
    entries of one row already in their final order."""
    starts = np.searchsorted(rows, np.arange(n_rows))
    rank = np.arange(rows.size) - starts[rows]
    keep = rank < k
    out_ids = np.full((n_rows, k), -1, dtype=np.int64)
    out_sims = np.full((n_rows, k), -np.inf, dtype=np.float32)
    out_ids[rows[keep], rank[keep]] = ids[keep]
    out_sims[rows[keep], rank[keep]] = sims[keep]
    return out_ids, out_sims
