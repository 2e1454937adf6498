"""Connected components by a vectorised union-find (hook and pointer-jump).

``parent`` starts as the identity. Each round, every edge (u, v) whose endpoints have different
roots hooks the larger root under the smaller one (``parent[hi] = min(parent[hi], lo)``, applied
with ``np.minimum.at``), then pointers are jumped until every node points at its root. Roots only
ever decrease, so no cycle can form, and the loop stops when no edge joins two roots. Edges
already inside one component are dropped between rounds. Memory is O(N + E); edges can be fed in
blocks (``add_edges``) so that edges produced by many workers never need to sit in one array.
"""
from __future__ import annotations

import numpy as np

from dist_fair.errors import DataError


class UnionFind:
    """Union-find over ``n`` nodes with vectorised batch unions."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise DataError(f"number of nodes must be >= 0, got {n}")
        self.parent = np.arange(n, dtype=np.int64)

    def _compress(self) -> None:
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        self.parent = parent

    def add_edges(self, u: np.ndarray, v: np.ndarray) -> None:
        """Union the endpoints of every edge (u[i], v[i])."""
        u = np.asarray(u, dtype=np.int64).ravel()
        v = np.asarray(v, dtype=np.int64).ravel()
        n = self.parent.shape[0]
        if u.shape != v.shape:
            raise DataError(f"edge endpoint arrays differ in length ({u.shape[0]} vs {v.shape[0]})")
        if u.size and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= n):
            raise DataError(f"edge endpoints must be node ids in 0..{n - 1}")
        while u.size:
            ru, rv = self.parent[u], self.parent[v]
            differ = ru != rv
            if not differ.any():
                break
            u, v, ru, rv = u[differ], v[differ], ru[differ], rv[differ]
            lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
            np.minimum.at(self.parent, hi, lo)
            self._compress()

    def labels(self) -> np.ndarray:
        """Component label of every node: 0..C-1, numbered by each component's smallest node."""
        self._compress()
        _, labels = np.unique(self.parent, return_inverse=True)
        return labels.astype(np.int64)


def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Labels of the connected components of the undirected graph with edges (u[i], v[i])."""
    uf = UnionFind(n)
    uf.add_edges(u, v)
    return uf.labels()
