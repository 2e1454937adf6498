"""Confidence-peak decoding (METHODS.md §4, "Decoding to clusters").

Every node gets a *confidence*, the mean edge score to its neighbours,

    c_i = (1 / |J_i|) sum_{j in J_i} s_ij,   J_i = {j >= 1 : nbrs[i, j] >= 0}   (0 if J_i is empty)

with ``s_ij`` the predicted edge probability ``p_ij`` (or, without a model, the cosine similarity):
a node deep inside a dense identity cluster has a high confidence, a node on a border a low one.
Nodes are totally ordered by ``(c_i, -i)`` (ties broken towards the lower id). Each node links to
its **most similar neighbour of higher confidence whose edge score is at least the floor**: the
first position j >= 1 of its row (rows are in decreasing similarity) with
``(c_{n_ij}, -n_ij) > (c_i, -i)`` and ``s_ij >= floor``; a node without one is a peak.
Every node has at most one outgoing link pointing strictly up the order, so the links form a
forest; clusters are its connected components (one per peak). The floor is chosen on the
labelled validation identities by pairwise F, like the threshold (never on test labels).
"""
from __future__ import annotations

import logging

import numpy as np

from dist_fair.cluster.components import UnionFind
from dist_fair.cluster.threshold import ThresholdChoice
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

BLOCK = 262144


def _check(nbrs: np.ndarray, scores: np.ndarray) -> None:
    if nbrs.ndim != 2 or scores.ndim != 2 or nbrs.shape[0] != scores.shape[0] or scores.shape[1] > nbrs.shape[1]:
        raise DataError(f"nbrs {nbrs.shape} and scores {scores.shape} must be 2-D with the same rows and at most "
                        "as many columns as nbrs (scores[i, j] belongs to the edge (i, nbrs[i, j]))")


def neighbour_confidence(nbrs: np.ndarray, scores: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """``c_i``: mean score over node i's existing neighbours, excluding position 0 (the node itself)."""
    _check(nbrs, scores)
    width = scores.shape[1]
    out = np.zeros(nbrs.shape[0], dtype=np.float64)
    for start in range(0, nbrs.shape[0], block):
        nb = np.asarray(nbrs[start:start + block, 1:width])
        sc = np.asarray(scores[start:start + block, 1:width], dtype=np.float64)
        valid = nb >= 0
        count = valid.sum(axis=1)
        out[start:start + nb.shape[0]] = np.where(count > 0, (sc * valid).sum(axis=1) / np.maximum(count, 1), 0.0)
    return out


def peak_edges(nbrs: np.ndarray, scores: np.ndarray, confidence: np.ndarray, floor: float,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The links ``(i, target_i)`` of the nodes ``rows`` (default all) that have one."""
    _check(nbrs, scores)
    width = scores.shape[1]
    anchors = np.arange(nbrs.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    nb = np.asarray(nbrs[anchors, :width], dtype=np.int64)
    sc = np.asarray(scores[anchors])
    valid = nb >= 0
    safe = np.where(valid, nb, 0)
    mine = confidence[anchors][:, None]
    theirs = confidence[safe]
    higher = (theirs > mine) | ((theirs == mine) & (safe < anchors[:, None]))
    candidate = valid & higher & (sc >= floor)
    candidate[:, 0] = False
    has = candidate.any(axis=1)
    first = candidate.argmax(axis=1)
    u = anchors[has]
    v = nb[has, first[has]]
    return u, v


def peak_clusters(nbrs: np.ndarray, scores: np.ndarray, confidence: np.ndarray, floor: float,
                  block: int = BLOCK) -> np.ndarray:
    """Cluster labels of all N nodes (0..C-1) by the confidence-peak rule with ``floor``."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if confidence.shape != (nbrs.shape[0],):
        raise DataError(f"confidence has shape {confidence.shape}, expected ({nbrs.shape[0]},): one per node")
    uf = UnionFind(nbrs.shape[0])
    for start in range(0, nbrs.shape[0], block):
        u, v = peak_edges(nbrs, scores, confidence, floor, rows=np.arange(start, min(start + block, nbrs.shape[0])))
        uf.add_edges(u, v)
    return uf.labels()


def choose_peak_floor(nbrs: np.ndarray, scores: np.ndarray, confidence: np.ndarray, identity: np.ndarray,
                      val_mask: np.ndarray, grid: list[float]) -> ThresholdChoice:
    """The floor from ``grid`` maximising pairwise F on the validation samples, decoded with only
    the links among themselves (confidences come from the whole graph: they need no label)."""
    from dist_fair.eval.metrics import pairwise_fscore

    val_rows = np.nonzero(val_mask)[0]
    if val_rows.size == 0:
        raise DataError("the validation split is empty; raise cluster.val_fraction")
    width = scores.shape[1]
    local = np.full(nbrs.shape[0], -1, np.int64)
    local[val_rows] = np.arange(val_rows.size)
    nb = np.asarray(nbrs[val_rows, :width])
    inside = (nb >= 0) & val_mask[np.clip(nb, 0, None)]
    sub_nbrs = np.where(inside, local[np.clip(nb, 0, None)], -1)
    sub_scores = np.asarray(scores[val_rows])
    sub_conf = np.asarray(confidence, dtype=np.float64)[val_rows]
    truth = identity[val_rows]
    results = []
    for floor in grid:
        labels = peak_clusters(sub_nbrs, sub_scores, sub_conf, floor)
        _, _, f = pairwise_fscore(truth, labels)
        results.append({"tau": float(floor), "val_pairwise_f": float(f)})
    best = max(results, key=lambda r: (r["val_pairwise_f"], -r["tau"]))
    LOG.info("peak floor %.3f chosen on %d validation samples (pairwise F %.4f)", best["tau"], val_rows.size,
             best["val_pairwise_f"])
    return ThresholdChoice(tau=best["tau"], val_fscore=best["val_pairwise_f"], grid=results)


__all__ = ["neighbour_confidence", "peak_edges", "peak_clusters", "choose_peak_floor"]
