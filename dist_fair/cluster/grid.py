"""Candidate decoding parameters with resolution where the edge scores are (METHODS.md §4,
"Decoding to clusters": thresholds chosen on a labelled validation split).

A trained clusterer saturates its sigmoid: positive edges score 0.999-0.99995 and the tail of
negative edges that merges clusters sits in the same narrow band, so a grid that is even in
probability (0.05, 0.10, ...) has almost all of its values where nothing happens and two or three
values where the choice is made. Two grids with resolution where it matters:

- the logit grid: ``tau_m = sigmoid(z_m)``, ``z_m = lo + m * step`` (even in the logit
  ``z = log(p / (1 - p))``, so 0.99, 0.997, 0.999, 0.9997, ... are as far apart as 0.5, 0.62, ...);
- the quantile grid: ``q`` quantiles of the VALIDATION edge scores themselves at the levels
  ``(m + 1/2) / q``, ``m = 0..q-1`` (values taken from the scores, method ``nearest``): as many
  candidates in a score band as there are validation edges in it, whatever the score scale (edge
  probabilities or cosine similarities). Only scores are read, never a label; the threshold is
  then chosen among the candidates by pairwise F on the validation labels
  (:func:`dist_fair.cluster.edges.choose_decoding`).

Edges counted: ``(i, nbrs[i, j])`` for the validation rows i, positions ``j >= 1`` (not the node
itself), neighbours that exist (``nbrs >= 0``).
"""
from __future__ import annotations

import numpy as np

from dist_fair.errors import DataError


def logit_grid(lo: float = -6.0, hi: float = 14.0, step: float = 0.25) -> list[float]:
    """``sigmoid(z)`` for ``z = lo, lo + step, ..., hi``: probabilities evenly spaced in the logit."""
    if not (step > 0 and hi >= lo):
        raise DataError(f"logit grid: need step > 0 and hi >= lo, got lo={lo}, hi={hi}, step={step}")
    z = lo + step * np.arange(int(np.floor((hi - lo) / step + 1e-9)) + 1)
    return [float(v) for v in 1.0 / (1.0 + np.exp(-z))]


def validation_edge_scores(nbrs: np.ndarray, scores: np.ndarray, val_mask: np.ndarray) -> np.ndarray:
    """The scores of the validation rows' edges (positions j >= 1 with an existing neighbour), flat."""
    if scores.ndim != 2 or nbrs.shape[0] != scores.shape[0] or nbrs.shape[1] < scores.shape[1]:
        raise DataError(f"nbrs {nbrs.shape} and scores {scores.shape} must be 2-D with the same rows and at least "
                        "as many neighbour columns as score columns")
    rows = np.nonzero(np.asarray(val_mask, bool))[0]
    nb = np.asarray(nbrs[rows, 1:scores.shape[1]])
    sc = np.asarray(scores[rows, 1:])
    return sc[nb >= 0]


def quantile_grid(values: np.ndarray, count: int) -> list[float]:
    """``count`` quantiles of ``values`` at levels ``(m + 1/2) / count`` (each an actual value),
    sorted and without duplicates; empty when there are no values or ``count`` is 0."""
    values = np.asarray(values).ravel()
    if count <= 0 or values.size == 0:
        return []
    levels = (np.arange(count) + 0.5) / count
    return [float(v) for v in np.unique(np.quantile(values, levels, method="nearest"))]


def decoding_grid(base: list[float], nbrs: np.ndarray, scores: np.ndarray, val_mask: np.ndarray,
                  quantiles: int = 0) -> list[float]:
    """``base`` extended by ``quantiles`` quantiles of the validation edge scores: sorted, unique."""
    extra = quantile_grid(validation_edge_scores(nbrs, scores, val_mask), quantiles) if quantiles > 0 else []
    return sorted({float(v) for v in base} | set(extra))


__all__ = ["logit_grid", "validation_edge_scores", "quantile_grid", "decoding_grid"]
