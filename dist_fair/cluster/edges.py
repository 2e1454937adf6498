"""Decoding edge scores (predicted probabilities or similarities) to clusters, and choosing the
decoding parameter on validation identities (METHODS.md §4, "Decoding to clusters").

``scores[i, j]`` belongs to the edge ``(i, nbrs[i, j])``. Two rules:

- ``threshold``: edges with ``scores > tau``, clusters = connected components (union-find over the
  edges of every anchor; :func:`dist_fair.cluster.threshold.threshold_clusters`);
- ``peak``: the confidence-peak rule with floor ``tau`` (:mod:`dist_fair.cluster.peak`).

The parameter is chosen from a grid by pairwise F on the labelled validation samples, in one of
two contexts; the test labels are never read:

- ``isolated``: the validation samples are decoded with only the edges among themselves (as if
  they were a separate data set; ``choose_threshold`` / ``choose_peak_floor``);
- ``graph``: the WHOLE graph is decoded (it needs no label) and pairwise F is measured on the
  validation samples only. Chaining through samples outside the validation split (one wrong edge
  merges two clusters) then affects the choice exactly as it affects the test samples, which
  are decoded in the same graph. Cost: one decode of the graph per grid value.

``quantiles > 0`` extends the grid by that many quantiles of the validation rows' edge scores
(:mod:`dist_fair.cluster.grid`; scores only, no label), so that the candidates have resolution
where the scores are: a trained model's probabilities crowd into 0.999-0.99995, where an even
probability grid has two or three values.
"""
from __future__ import annotations

import logging

import numpy as np

from dist_fair.cluster.threshold import ThresholdChoice
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

METHODS = ("threshold", "peak")
CONTEXTS = ("isolated", "graph")


def decode_edges(nbrs: np.ndarray, scores: np.ndarray, method: str, tau: float,
                 confidence: np.ndarray | None = None) -> np.ndarray:
    """Cluster labels (0..C-1) of all N nodes by ``method`` with parameter ``tau``.

    ``confidence`` (peak rule) defaults to :func:`~dist_fair.cluster.peak.neighbour_confidence`.
    """
    from dist_fair.cluster.peak import neighbour_confidence, peak_clusters
    from dist_fair.cluster.threshold import threshold_clusters

    if method not in METHODS:
        raise DataError(f"decoding method {method!r} is unknown; choose one of {METHODS}")
    nbrs = nbrs[:, :scores.shape[1]]
    if method == "threshold":
        return threshold_clusters(nbrs, scores, tau)
    if confidence is None:
        confidence = neighbour_confidence(nbrs, scores)
    return peak_clusters(nbrs, scores, confidence, tau)


def choose_decoding(nbrs: np.ndarray, scores: np.ndarray, identity: np.ndarray, val_mask: np.ndarray,
                    grid: list[float], method: str = "threshold", context: str = "isolated",
                    confidence: np.ndarray | None = None, quantiles: int = 0) -> ThresholdChoice:
    """The ``tau`` of ``grid`` (plus ``quantiles`` quantiles of the validation edge scores) maximising
    pairwise F on the validation samples (``val_mask``), decoded by ``method`` in ``context`` (see
    the module docstring); ties go to the smaller tau."""
    from dist_fair.cluster.grid import decoding_grid
    from dist_fair.cluster.peak import choose_peak_floor, neighbour_confidence
    from dist_fair.cluster.threshold import choose_threshold
    from dist_fair.eval.metrics import pairwise_fscore

    if context not in CONTEXTS:
        raise DataError(f"validation context {context!r} is unknown; choose one of {CONTEXTS}")
    if method not in METHODS:
        raise DataError(f"decoding method {method!r} is unknown; choose one of {METHODS}")
    nbrs = nbrs[:, :scores.shape[1]]
    if quantiles > 0:
        grid = decoding_grid(grid, nbrs, scores, val_mask, quantiles)
    if method == "peak" and confidence is None:
        confidence = neighbour_confidence(nbrs, scores)
    if context == "isolated":
        if method == "peak":
            return choose_peak_floor(nbrs, scores, confidence, identity, val_mask, grid)
        return choose_threshold(nbrs, scores, identity, val_mask, grid)
    val_rows = np.nonzero(val_mask)[0]
    if val_rows.size == 0:
        raise DataError("the validation split is empty; raise cluster.val_fraction")
    truth = identity[val_rows]
    results = []
    for tau in grid:
        labels = decode_edges(nbrs, scores, method, tau, confidence)
        _, _, f = pairwise_fscore(truth, labels[val_rows])
        results.append({"tau": float(tau), "val_pairwise_f": float(f)})
    best = max(results, key=lambda r: (r["val_pairwise_f"], -r["tau"]))
    LOG.info("%s %.3f chosen on %d validation samples decoded in the whole graph (pairwise F %.4f)",
             "floor" if method == "peak" else "threshold", best["tau"], val_rows.size, best["val_pairwise_f"])
    return ThresholdChoice(tau=best["tau"], val_fscore=best["val_pairwise_f"], grid=results)


__all__ = ["METHODS", "CONTEXTS", "decode_edges", "choose_decoding"]
