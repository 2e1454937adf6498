"""Soft assignments as candidate lists: dense (all K clusters) or sparse (each sample's top-m).

The fair assignment (METHODS.md §6) only ever needs, for every sample i, the clusters it may be
moved to and their probabilities ``y_ij``. :class:`Candidates` holds them as two ``(N, m)``
arrays, ``index`` (cluster ids) and ``value`` (probabilities); with ``index=None`` the value array
is the dense ``(N, K)`` matrix and every cluster is a candidate. A sparse instance never builds an
``N x K`` array (DESIGN.md, "Scale targets"): arcs outside a sample's top-m are absent, so the
problem solved is the fair assignment restricted to those arcs.

Conventions shared by every solver in :mod:`dist_fair.fair`:

- the hard clustering the targets start from is ``argmax_j y_ij`` with ties to the lowest cluster
  id (``np.argmax`` order); for sparse input the candidates must contain that cluster (checked);
- inside a row, sparse candidates are sorted by cluster id, so "first best column" means "lowest
  cluster id" in both representations and every solver breaks ties the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

#: rows handled at once by blockwise passes (bounds temporary memory to a few hundred MB).
BLOCK_ROWS = 1 << 15


@dataclass(frozen=True)
class Candidates:
    """Each sample's candidate clusters and their probabilities.

    Attributes:
        value: ``(N, m)`` probabilities ``y_ij`` (float32 or float64, finite, >= 0); when ``index``
            is None this is the dense ``(N, K)`` matrix.
        index: ``(N, m)`` int32 cluster ids in ``[0, n_clusters)``, strictly increasing along each
            row; None for dense input.
        n_clusters: K.
    """

    value: np.ndarray
    index: np.ndarray | None
    n_clusters: int

    @property
    def num_samples(self) -> int:
        return int(self.value.shape[0])

    @property
    def width(self) -> int:
        """m, the number of candidates per sample (K when dense)."""
        return int(self.value.shape[1])

    @property
    def dense(self) -> bool:
        return self.index is None

    def rows(self, select: np.ndarray | slice) -> "Candidates":
        """The candidates of a subset of samples (a view for slices)."""
        return Candidates(self.value[select], None if self.index is None else self.index[select], self.n_clusters)

    def clusters(self, select: np.ndarray | slice | None = None) -> np.ndarray:
        """``(n, m)`` cluster ids of the selected rows (a broadcast ``arange`` when dense)."""
        if self.index is not None:
            return self.index if select is None else self.index[select]
        n = self.num_samples if select is None else len(np.arange(self.num_samples)[select])
        return np.broadcast_to(np.arange(self.n_clusters, dtype=np.int32), (n, self.n_clusters))

    def argmax(self) -> np.ndarray:
        """Hard clustering ``argmax_j y_ij`` (ties to the lowest cluster id), int64 ``(N,)``."""
        out = np.empty(self.num_samples, dtype=np.int64)
        for start in range(0, self.num_samples, BLOCK_ROWS):
            block = self.value[start:start + BLOCK_ROWS]
            col = np.argmax(block, axis=1)
            out[start:start + BLOCK_ROWS] = col if self.index is None else \
                self.index[start:start + BLOCK_ROWS][np.arange(len(col)), col]
        return out

    def value_of(self, labels: np.ndarray) -> np.ndarray:
        """``y_{i, labels_i}`` for every sample (float64); raises if a label is not a candidate."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.index is None:
            return self.value[np.arange(self.num_samples), labels].astype(np.float64)
        hit = self.index == labels[:, None]
        ok = hit.any(axis=1)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise DataError(f"sample {bad}: cluster {int(labels[bad])} is not among its candidates")
        return self.value[np.arange(self.num_samples), np.argmax(hit, axis=1)].astype(np.float64)


def _check_values(value: np.ndarray, name: str) -> None:
    if value.dtype.kind != "f":
        raise DataError(f"{name}: expected floating-point probabilities, got dtype {value.dtype}; "
                        f"convert with .astype(np.float32)")
    for start in range(0, value.shape[0], BLOCK_ROWS):
        block = value[start:start + BLOCK_ROWS]
        finite = np.isfinite(block)
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            raise DataError(f"{name}: sample {start + int(row)}, column {int(col)} is {block[row, col]} "
                            f"(NaN or infinite); the model's soft assignments must be finite "
                            f"probabilities - check the network output (softmax) for overflow")
        negative = block < 0
        if negative.any():
            row, col = np.argwhere(negative)[0]
            raise DataError(f"{name}: sample {start + int(row)}, column {int(col)} is negative "
                            f"({float(block[row, col])}); probabilities must be >= 0 (apply softmax)")


def row_sum_tolerance(n_clusters: int, dtype: np.dtype) -> float:
    """How far a row of K probabilities may sum from 1: ``1e-3 + 4 K eps(dtype)`` (rounding of a
    float32 softmax over K clusters stays far inside it)."""
    return 1e-3 + 4.0 * n_clusters * float(np.finfo(dtype).eps)


def check_rows_sum_to_one(probs: np.ndarray, name: str = "probs") -> None:
    """Raise ``DataError`` naming the rows whose probabilities do not sum to 1 (within
    :func:`row_sum_tolerance`): scaled rows (x1.7) or all-zero rows would silently change which
    assignment is "closest" (METHODS.md §6 needs rows of probabilities)."""
    tol = row_sum_tolerance(probs.shape[1], probs.dtype)
    bad_rows: list[int] = []
    bad_sums: list[float] = []
    total_bad = 0
    for start in range(0, probs.shape[0], BLOCK_ROWS):
        sums = probs[start:start + BLOCK_ROWS].sum(axis=1, dtype=np.float64)
        bad = np.flatnonzero(np.abs(sums - 1.0) > tol)
        total_bad += int(bad.size)
        if len(bad_rows) < 10:
            take = bad[: 10 - len(bad_rows)]
            bad_rows += (start + take).tolist()
            bad_sums += sums[take].tolist()
    if total_bad:
        listed = ", ".join(f"row {r} sums to {v:.6g}" for r, v in zip(bad_rows, bad_sums))
        zero = " (all-zero rows have no cluster preference at all)" if any(v == 0 for v in bad_sums) else ""
        raise DataError(f"{name}: {total_bad} of {probs.shape[0]} rows do not sum to 1 (tolerance {tol:.2g}): "
                        f"{listed}{'; ...' if total_bad > len(bad_rows) else ''}{zero}. Pass soft assignments "
                        f"(softmax output): normalise with p / p.sum(1, keepdims=True), or use "
                        f"`dist-fair fair-assign --normalize`")


def dense_candidates(probs: np.ndarray) -> Candidates:
    """Validate a dense ``(N, K)`` probability matrix (finite, >= 0, rows summing to 1) and wrap it
    (no copy)."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise DataError(f"probs: expected a non-empty 2-D array (samples x clusters), got shape {probs.shape}")
    _check_values(probs, "probs")
    check_rows_sum_to_one(probs, "probs")
    return Candidates(probs, None, int(probs.shape[1]))


def sparse_candidates(index: np.ndarray, value: np.ndarray, n_clusters: int) -> Candidates:
    """Validate sparse candidates and return them with rows sorted by cluster id.

    Args:
        index: ``(N, m)`` cluster ids; each row distinct, in ``[0, n_clusters)``.
        value: ``(N, m)`` probabilities of those clusters.
        n_clusters: K.

    Raises:
        DataError: shapes differ, ids out of range or repeated in a row, NaN/negative values.
    """
    index = np.asarray(index)
    value = np.asarray(value)
    if index.ndim != 2 or index.shape != value.shape or index.shape[0] == 0 or index.shape[1] == 0:
        raise DataError(f"candidates: index {index.shape} and value {value.shape} must be equal, non-empty "
                        f"(samples x m) arrays")
    if index.dtype.kind not in "iu":
        raise DataError(f"candidates: index must hold integer cluster ids, got dtype {index.dtype}")
    if n_clusters < 1:
        raise DataError(f"candidates: n_clusters must be >= 1, got {n_clusters}")
    _check_values(value, "candidate values")
    if index.min() < 0 or index.max() >= n_clusters:
        bad = int(np.flatnonzero(((index < 0) | (index >= n_clusters)).any(axis=1))[0])
        raise DataError(f"candidates: sample {bad} has cluster ids {index[bad].tolist()} outside "
                        f"[0, {n_clusters}); pass the right n_clusters")
    order = np.argsort(index, axis=1, kind="stable")
    index = np.take_along_axis(index, order, axis=1).astype(np.int32)
    value = np.take_along_axis(value, order, axis=1)
    if index.shape[1] > 1:
        repeated = (index[:, 1:] == index[:, :-1]).any(axis=1)
        if repeated.any():
            bad = int(np.flatnonzero(repeated)[0])
            raise DataError(f"candidates: sample {bad} lists a cluster twice ({index[bad].tolist()}); "
                            f"each candidate cluster may appear once per sample")
    return Candidates(np.ascontiguousarray(value), np.ascontiguousarray(index), int(n_clusters))


def top_m_candidates(probs: np.ndarray, top_m: int) -> Candidates:
    """Each sample's ``top_m`` most probable clusters (all of them when ``top_m >= K``).

    The dense argmax (lowest id on ties) is always kept, so cluster sizes |C_j| are the same as
    for the dense matrix. Rows are sorted by cluster id. Works blockwise; never copies ``probs``.
    """
    cands = dense_candidates(probs)
    k = cands.n_clusters
    if top_m is None or top_m >= k:
        return cands
    if top_m < 1:
        raise DataError(f"top_m must be >= 1 (got {top_m})")
    n = cands.num_samples
    index = np.empty((n, top_m), dtype=np.int32)
    value = np.empty((n, top_m), dtype=probs.dtype)
    rows_all = np.arange(min(n, BLOCK_ROWS))
    for start in range(0, n, BLOCK_ROWS):
        block = probs[start:start + BLOCK_ROWS]
        rows = rows_all[:len(block)]
        part = np.argpartition(-block, top_m - 1, axis=1)[:, :top_m]
        best = np.argmax(block, axis=1)
        missing = ~(part == best[:, None]).any(axis=1)
        if missing.any():  # a tie at the top: keep the lowest-id argmax instead of the weakest pick
            weakest = np.argmin(block[rows[:, None], part], axis=1)
            part[missing, weakest[missing]] = best[missing]
        part.sort(axis=1)
        index[start:start + BLOCK_ROWS] = part
        value[start:start + BLOCK_ROWS] = block[rows[:, None], part]
    return Candidates(value, index, k)
