"""The kNN + threshold baseline (METHODS.md §4, "Decoding to clusters").

Edges (i, nbrs[i, j]) with score ``sims[i, j] > tau`` (cosine similarity, or a predicted edge
probability) are joined by union-find; clusters are the connected components. ``tau`` is chosen on
a labelled validation split of *identities* (:func:`dist_fair.data.splits.split_identities`) - the
validation samples clustered with only the edges among themselves - by pairwise F (METHODS.md §7);
the test identities' labels are never looked at.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from dist_fair.cluster.components import UnionFind
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)


def threshold_edges(nbrs: np.ndarray, sims: np.ndarray, tau: float, rows: np.ndarray | None = None,
                    block: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    """Edges (u, v) with ``sims > tau`` (self-loops and missing neighbours, id -1, dropped).

    ``rows`` restricts to these anchors (ids into nbrs' rows); works block by block on memory maps.
    """
    if nbrs.shape != sims.shape or nbrs.ndim != 2:
        raise DataError(f"nbrs {nbrs.shape} and sims {sims.shape} must be equal 2-D arrays (N x k)")
    anchors = np.arange(nbrs.shape[0]) if rows is None else np.asarray(rows, np.int64)
    us, vs = [], []
    for start in range(0, anchors.shape[0], block):
        idx = anchors[start:start + block]
        nb, sm = np.asarray(nbrs[idx]), np.asarray(sims[idx])
        keep = (sm > tau) & (nb >= 0) & (nb != idx[:, None])
        us.append(np.broadcast_to(idx[:, None], nb.shape)[keep])
        vs.append(nb[keep])
    if not us:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(us).astype(np.int64), np.concatenate(vs).astype(np.int64)


def threshold_clusters(nbrs: np.ndarray, sims: np.ndarray, tau: float) -> np.ndarray:
    """Cluster labels of all N samples: components of the edges with score > tau."""
    uf = UnionFind(nbrs.shape[0])
    block = 262144
    for start in range(0, nbrs.shape[0], block):
        rows = np.arange(start, min(start + block, nbrs.shape[0]))
        u, v = threshold_edges(nbrs, sims, tau, rows=rows)
        uf.add_edges(u, v)
    return uf.labels()


@dataclass
class ThresholdChoice:
    tau: float
    val_fscore: float
    grid: list[dict] = field(default_factory=list)


def choose_threshold(nbrs: np.ndarray, sims: np.ndarray, identity: np.ndarray, val_mask: np.ndarray,
                     grid: list[float]) -> ThresholdChoice:
    """Pick tau from ``grid`` maximising pairwise F on the validation samples, clustered with only
    the edges among themselves (the validation split behaves as a held-out labelled set)."""
    from dist_fair.eval.metrics import pairwise_fscore

    val_rows = np.nonzero(val_mask)[0]
    if val_rows.size == 0:
        raise DataError("the validation split is empty; raise cluster.val_fraction")
    local = np.full(nbrs.shape[0], -1, np.int64)
    local[val_rows] = np.arange(val_rows.size)
    nb = np.asarray(nbrs[val_rows])
    sm = np.asarray(sims[val_rows])
    inside = (nb >= 0) & val_mask[np.clip(nb, 0, None)]
    sub_nbrs = np.where(inside, local[np.clip(nb, 0, None)], -1)
    truth = identity[val_rows]
    results = []
    for tau in grid:
        u, v = threshold_edges(sub_nbrs, sm, tau)
        uf = UnionFind(val_rows.size)
        uf.add_edges(u, v)
        _, _, f = pairwise_fscore(truth, uf.labels())
        results.append({"tau": float(tau), "val_pairwise_f": float(f)})
    best = max(results, key=lambda r: (r["val_pairwise_f"], -r["tau"]))
    LOG.info("threshold %.3f chosen on %d validation samples (pairwise F %.4f)", best["tau"], val_rows.size,
             best["val_pairwise_f"])
    return ThresholdChoice(tau=best["tau"], val_fscore=best["val_pairwise_f"], grid=results)
