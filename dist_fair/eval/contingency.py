"""Sparse contingency tables of two labelings, and the input checks every metric shares.

The contingency of labelings ``a`` (rows) and ``b`` (columns) holds ``n_ij = |{s : a_s = i, b_s = j}|``
for the non-zero cells only (METHODS.md §7: "sparse contingency, no N x N"). It is built from the
pair code ``i * C + j`` of every sample: a ``bincount`` when ``R * C`` is small, otherwise one sort
(``np.unique``). Memory is O(N + nnz); time is O(N) for the bincount path and O(N log N) for the
sort path (the sort is the only super-linear step in :mod:`dist_fair.eval`).

Labels may be any integers (negative, huge, unsigned): they are first mapped to ``0..K-1`` in
sorted order of their values (what ``np.unique(return_inverse=True)`` gives; a ``bincount`` lookup
table replaces the sort when the value range is at most a few times ``N``).

Predicted labels have one more rule (METHODS.md §7, last bullet): a negative predicted label (-1,
the noise label of DBSCAN / HDBSCAN) means "unclustered", so :func:`noise_as_singletons` gives each
such sample its own fresh cluster id before any metric sees it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

#: a value range up to ``_DENSE_RANGE_FACTOR * N + _DENSE_RANGE_SLACK`` is relabelled by bincount.
_DENSE_RANGE_FACTOR = 4
_DENSE_RANGE_SLACK = 1 << 16


def check_labels(values: Any, name: str) -> np.ndarray:
    """Return ``values`` as a non-empty 1-D integer array, or raise :class:`DataError`.

    Args:
        values: array-like of integer labels (any integer dtype; Python lists of ints are fine).
        name: the argument's name, quoted in the error message.

    Raises:
        DataError: not 1-D, empty, NaN present, or not an integer dtype (the message says how to
            convert).
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name}: expected a 1-D array of integer labels, got shape {arr.shape}; "
                        f"flatten it (np.ravel) or pass one label per sample")
    if arr.size == 0:
        raise DataError(f"{name}: no samples (empty array); pass at least one label")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        bad = int(np.flatnonzero(np.isnan(arr))[0])
        raise DataError(f"{name}: contains NaN (first at index {bad}); every sample needs an integer "
                        f"label - give unassigned samples their own cluster id, not NaN")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{name}: labels must have an integer dtype, got {arr.dtype}; convert with "
                        f"np.asarray({name}).astype(np.int64) if the values are whole numbers")
    return arr


def noise_as_singletons(pred: np.ndarray) -> np.ndarray:
    """Predicted labels with every negative entry replaced by a fresh cluster id of its own.

    Non-negative labels keep their values; the k-th negative entry (in sample order) becomes
    ``max(non-negative labels, -1) + 1 + k`` (METHODS.md §7: noise samples are singletons, never
    one cluster together). Returns the input unchanged when nothing is negative.
    """
    pred = np.asarray(pred)
    if pred.dtype.kind == "u" or pred.size == 0:
        return pred
    noise = pred < 0
    count = int(noise.sum())
    if not count:
        return pred
    out = pred.astype(np.int64, copy=True)
    clustered = out[~noise]
    base = int(clustered.max()) + 1 if clustered.size else 0
    if base > np.iinfo(np.int64).max - count:  # no room above the largest id: renumber everything
        codes, values = relabel(clustered)
        out[~noise] = codes
        base = int(values.size)
    out[noise] = base + np.arange(count, dtype=np.int64)
    LOG.debug("%d samples with a negative (noise) predicted label are singleton clusters", count)
    return out


def check_same_length(**arrays: np.ndarray) -> int:
    """Raise :class:`DataError` unless all arrays have the same length; return it."""
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise DataError(f"label arrays differ in length ({described}); pass one label per sample, "
                        f"all in the same sample order")
    return next(iter(lengths.values()))


def relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map integer labels to ``0..K-1`` in sorted order of their values.

    Returns:
        ``(codes, values)``: ``codes`` int64[N] with ``values[codes] == labels``, ``values`` the K
        distinct labels in increasing order (the input's dtype). Same result as
        ``np.unique(labels, return_inverse=True)`` (reversed), computed with ``bincount`` in O(N)
        when the value range is small.
    """
    labels = np.asarray(labels)
    n = labels.size
    lo, hi = labels.min(), labels.max()
    span = int(hi) - int(lo)
    if span <= _DENSE_RANGE_FACTOR * n + _DENSE_RANGE_SLACK:
        if labels.dtype.kind == "u":
            shifted = (labels - lo).astype(np.int64)
        else:
            shifted = labels.astype(np.int64) - int(lo)
        present = np.bincount(shifted, minlength=span + 1) > 0
        lookup = np.cumsum(present, dtype=np.int64) - 1
        codes = lookup[shifted]
        offsets = np.flatnonzero(present)
        if labels.dtype.kind == "u":
            values = offsets.astype(labels.dtype) + lo
        else:
            values = (offsets + int(lo)).astype(labels.dtype)
        return codes, values
    values, codes = np.unique(labels, return_inverse=True)
    return codes.astype(np.int64, copy=False).reshape(-1), values


@dataclass(frozen=True)
class Contingency:
    """Non-zero cells of the contingency table of two labelings.

    Attributes:
        rows: int64[nnz] row index (0..R-1) of each non-zero cell.
        cols: int64[nnz] column index (0..C-1) of each non-zero cell.
        counts: int64[nnz] ``n_ij`` of each cell (all > 0).
        row_sums: int64[R] ``|G_i|``, samples per row label.
        col_sums: int64[C] ``|C_j|``, samples per column label.
        row_values: the R distinct row labels (sorted), so ``rows`` map back to original ids.
        col_values: the C distinct column labels (sorted).
    """

    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    row_sums: np.ndarray
    col_sums: np.ndarray
    row_values: np.ndarray
    col_values: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(self.row_sums.sum())

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.row_sums.size), int(self.col_sums.size)

    @property
    def nnz(self) -> int:
        return int(self.counts.size)


def contingency_from_codes(row_codes: np.ndarray, num_rows: int, col_codes: np.ndarray,
                           num_cols: int, row_values: np.ndarray | None = None,
                           col_values: np.ndarray | None = None) -> Contingency:
    """Build the sparse contingency of two labelings already coded ``0..R-1`` and ``0..C-1``."""
    n = row_codes.size
    pair = row_codes.astype(np.int64, copy=False) * np.int64(num_cols) + col_codes
    cells = num_rows * num_cols
    if cells <= _DENSE_RANGE_FACTOR * n + _DENSE_RANGE_SLACK:
        dense = np.bincount(pair, minlength=cells)
        nz = np.flatnonzero(dense)
        keys, counts = nz.astype(np.int64), dense[nz].astype(np.int64)
    else:
        keys, counts = np.unique(pair, return_counts=True)
        counts = counts.astype(np.int64, copy=False)
    del pair
    rows, cols = np.divmod(keys, np.int64(num_cols))
    return Contingency(
        rows=rows, cols=cols, counts=counts,
        row_sums=np.bincount(row_codes, minlength=num_rows).astype(np.int64),
        col_sums=np.bincount(col_codes, minlength=num_cols).astype(np.int64),
        row_values=np.arange(num_rows) if row_values is None else row_values,
        col_values=np.arange(num_cols) if col_values is None else col_values,
    )


def contingency_table(row_labels: Any, col_labels: Any, row_name: str = "true",
                      col_name: str = "pred") -> Contingency:
    """Sparse contingency of two integer labelings of the same samples.

    Args:
        row_labels: labels giving the rows (e.g. true identities).
        col_labels: labels giving the columns (e.g. predicted clusters).
        row_name: argument name used in error messages.
        col_name: argument name used in error messages.
    """
    rows = check_labels(row_labels, row_name)
    cols = check_labels(col_labels, col_name)
    check_same_length(**{row_name: rows, col_name: cols})
    row_codes, row_values = relabel(rows)
    col_codes, col_values = relabel(cols)
    return contingency_from_codes(row_codes, row_values.size, col_codes, col_values.size,
                                  row_values, col_values)
