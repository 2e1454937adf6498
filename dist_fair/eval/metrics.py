"""Clustering quality and fairness metrics (METHODS.md §7), as pure functions over label arrays.

Every function takes 1-D integer label arrays (one entry per sample, all in the same sample
order). Labels may be any integers - huge, unsigned, with gaps - and every distinct value is one
class / group. Predicted clusters follow METHODS.md §7's last bullet: a *negative* predicted label
(-1, the noise label of DBSCAN / HDBSCAN) means unclustered, and each such sample is its own
singleton cluster (:func:`~dist_fair.eval.contingency.noise_as_singletons`), never one cluster
together. Drop samples with unknown ground truth before calling
(:func:`dist_fair.eval.report.evaluate_labels` does that for ``-1``).

Cost: everything goes through a sparse contingency table (:mod:`dist_fair.eval.contingency`), so
memory is O(N + nnz) with nnz the number of non-zero cells ``n_ij``; there is no N x N and no dense
N x K array. Time is O(N log N) for the one sort that builds the table (O(N) when the label ranges
are small) plus O(nnz) for the formulas; :func:`accuracy` adds a sparse assignment problem (see
there). Counts are int64 (``sum n_ij^2 <= N^2`` fits for N up to 3e9), ratios float64.

Conventions for degenerate inputs (the face-clustering reference code divides 0/0 and returns NaN
there; we return defined values instead):

- pairwise precision is 1 when there is no predicted pair (``pk = 0``, every cluster a singleton:
  no predicted link can be wrong); recall is 1 when there is no true pair (``qk = 0``). A single
  sample therefore scores P = R = F = 1.
- any F-score is 0 when ``P + R = 0``.
- NMI follows sklearn exactly: 1 when both labelings have a single class, 0 when the mutual
  information is 0 otherwise.
- fairness metrics consider the groups present in ``groups`` (T = number of distinct values); a
  group absent from a cluster makes that cluster's balance and fairness 0.
Empty inputs raise :class:`~dist_fair.errors.DataError`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from dist_fair.errors import DataError
from dist_fair.eval.contingency import (
    Contingency,
    check_labels,
    check_same_length,
    contingency_from_codes,
    contingency_table,
    noise_as_singletons,
    relabel,
)

LOG = logging.getLogger(__name__)

__all__ = [
    "pairwise_fscore", "bcubed_fscore", "nmi", "accuracy", "balance", "fairness", "fwd",
    "per_group_scores", "pairwise_from_contingency", "bcubed_from_contingency",
    "nmi_from_contingency", "accuracy_from_contingency", "cluster_group_table",
    "cluster_group_table_from_counts", "balance_from_table", "fairness_from_table", "fwd_from_table", "harmonic_f",
]


def harmonic_f(precision: float, recall: float) -> float:
    """``F = 2 P R / (P + R)``, and 0 when ``P + R = 0``."""
    total = precision + recall
    return 0.0 if total <= 0 else 2.0 * precision * recall / total


# --------------------------------------------------------------------------- identity quality
def _true_pred_table(true: Any, pred: Any) -> Contingency:
    """(true x pred) contingency, negative predicted labels as singleton clusters."""
    return contingency_table(true, noise_as_singletons(check_labels(pred, "pred")), "true", "pred")


def pairwise_from_contingency(table: Contingency) -> tuple[float, float, float]:
    """Pairwise precision, recall and F from a (true x pred) contingency; see :func:`pairwise_fscore`."""
    n = table.num_samples
    tk = int(np.dot(table.counts, table.counts)) - n
    pk = int(np.dot(table.col_sums, table.col_sums)) - n
    qk = int(np.dot(table.row_sums, table.row_sums)) - n
    precision = tk / pk if pk > 0 else 1.0
    recall = tk / qk if qk > 0 else 1.0
    return precision, recall, harmonic_f(precision, recall)


def pairwise_fscore(true: Any, pred: Any) -> tuple[float, float, float]:
    """Pairwise precision, recall and F-score (METHODS.md §7, the face-clustering convention).

    With ``n_ij`` the overlap of true class i and predicted cluster j:
    ``tk = sum_ij n_ij^2 - N`` (ordered same-class pairs put together),
    ``pk = sum_j |C_j|^2 - N`` (ordered predicted pairs), ``qk = sum_i |G_i|^2 - N`` (true pairs);
    ``P = tk / pk``, ``R = tk / qk``, ``F = 2PR / (P + R)``. This is not the geometric
    Fowlkes-Mallows index sqrt(P R). ``P = 1`` when ``pk = 0`` and ``R = 1`` when ``qk = 0``.

    Args:
        true: ground-truth class per sample (1-D integers).
        pred: predicted cluster per sample (1-D integers, same length; negative = noise, each a
            singleton).

    Returns:
        ``(precision, recall, f)`` as floats.
    """
    return pairwise_from_contingency(_true_pred_table(true, pred))


def bcubed_from_contingency(table: Contingency) -> tuple[float, float, float]:
    """BCubed precision, recall and F from a (true x pred) contingency; see :func:`bcubed_fscore`."""
    n = table.num_samples
    squares = table.counts.astype(np.float64) ** 2
    precision = float(np.sum(squares / table.col_sums[table.cols])) / n
    recall = float(np.sum(squares / table.row_sums[table.rows])) / n
    return precision, recall, harmonic_f(precision, recall)


def bcubed_fscore(true: Any, pred: Any) -> tuple[float, float, float]:
    """BCubed precision, recall and F-score (METHODS.md §7).

    Per sample s in class G and cluster C: precision_s = |G ∩ C| / |C|, recall_s = |G ∩ C| / |G|;
    averaged over samples this is ``P = (1/N) sum_ij n_ij^2 / |C_j|``,
    ``R = (1/N) sum_ij n_ij^2 / |G_i|``; ``F = 2PR / (P + R)``.

    Returns:
        ``(precision, recall, f)`` as floats.
    """
    return bcubed_from_contingency(_true_pred_table(true, pred))


def _entropy(sizes: np.ndarray, n: int) -> float:
    """Shannon entropy (nats) of a partition with the given non-zero part sizes (sklearn's)."""
    if sizes.size <= 1:
        return 0.0
    sizes = sizes.astype(np.float64)
    return float(-np.sum((sizes / n) * (np.log(sizes) - math.log(n))))


def nmi_from_contingency(table: Contingency) -> float:
    """Normalised mutual information from a (true x pred) contingency; see :func:`nmi`."""
    num_rows, num_cols = table.shape
    n = table.num_samples
    if num_rows == num_cols == 1:
        return 1.0
    if num_rows == 1 or num_cols == 1:
        return 0.0
    counts = table.counts.astype(np.float64)
    outer = table.row_sums[table.rows] * table.col_sums[table.cols]  # int64: <= N^2
    terms = (counts / n) * (np.log(counts) - math.log(n) - np.log(outer.astype(np.float64))
                            + 2.0 * math.log(n))
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
    mutual_info = max(float(terms.sum()), 0.0)
    if mutual_info == 0.0:
        return 0.0
    h_true = _entropy(table.row_sums, n)
    h_pred = _entropy(table.col_sums, n)
    return float(mutual_info / ((h_true + h_pred) / 2.0))


def nmi(true: Any, pred: Any) -> float:
    """Normalised mutual information, sklearn's ``normalized_mutual_info_score`` (arithmetic mean).

    ``MI = sum_ij (n_ij/N) log(N n_ij / (|G_i| |C_j|))``, ``H(U) = -sum_i (|G_i|/N) log(|G_i|/N)``,
    ``NMI = MI / ((H(true) + H(pred)) / 2)``; 1 when both labelings have one class, 0 when
    ``MI = 0`` otherwise (METHODS.md §7).
    """
    return nmi_from_contingency(_true_pred_table(true, pred))


def _top_two(keys: np.ndarray, counts: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per key (row or column): the cell index of its largest count, that count, and the largest
    count among its other cells (0 when it has one cell). Ties are broken by cell index."""
    order = np.lexsort((-counts, keys))
    sorted_keys = keys[order]
    first = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    best_cell = np.full(num_keys, -1, dtype=np.int64)
    best = np.zeros(num_keys, dtype=np.int64)
    second = np.zeros(num_keys, dtype=np.int64)
    owner = sorted_keys[first]
    best_cell[owner] = order[first]
    best[owner] = counts[order[first]]
    has_second = np.concatenate([first[1:], [sorted_keys.size]]) - first > 1
    second[owner[has_second]] = counts[order[first[has_second] + 1]]
    return best_cell, best, second


def _fix_dominant_cells(rows: np.ndarray, cols: np.ndarray, counts: np.ndarray, num_rows: int,
                        num_cols: int) -> np.ndarray:
    """Cells that belong to some maximum-weight matching, found without solving it; returns a
    boolean mask over cells (the chosen cells form a matching).

    A cell (i, j) is *dominant* when it is the largest of row i and of column j and
    ``n_ij >= (largest other cell of row i) + (largest other cell of column j)``. Exchange
    argument: in an optimal matching that pairs i with k and l with j, swapping to (i, j) (and
    (l, k) when it exists) loses at most ``n_ik + n_lj <= n_ij``. Fixing a dominant cell only removes
    cells from the rest of the problem, so the remaining dominant cells stay dominant and a whole
    matching of them can be fixed at once. Realistic face clusterings (most identities mostly in
    one cluster) reduce to a small residual problem this way.
    """
    row_best, _, row_second = _top_two(rows, counts, num_rows)
    col_best, _, col_second = _top_two(cols, counts, num_cols)
    cells = row_best[row_best >= 0]
    cells = cells[col_best[cols[cells]] == cells]  # the largest of its row and of its column
    cells = cells[counts[cells] >= row_second[rows[cells]] + col_second[cols[cells]]]
    fixed = np.zeros(counts.size, dtype=bool)
    fixed[cells] = True  # one per row (row_best) and one per column (col_best): a matching
    return fixed


def accuracy_from_contingency(table: Contingency) -> float:
    """Clustering accuracy from a (true x pred) contingency; see :func:`accuracy`."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows, cols, counts = table.rows, table.cols, table.counts
    num_rows, num_cols = table.shape
    matched_total = 0
    while counts.size:  # fix dominant cells, drop their rows and columns, repeat
        fixed = _fix_dominant_cells(rows, cols, counts, num_rows, num_cols)
        if not fixed.any():
            break
        matched_total += int(counts[fixed].sum())
        row_done = np.zeros(num_rows, dtype=bool)
        col_done = np.zeros(num_cols, dtype=bool)
        row_done[rows[fixed]] = True
        col_done[cols[fixed]] = True
        keep = ~(row_done[rows] | col_done[cols])
        rows, cols, counts = rows[keep], cols[keep], counts[keep]
    if counts.size:
        rows, row_ids = relabel(rows)
        cols, col_ids = relabel(cols)
        num_rows, num_cols = row_ids.size, col_ids.size
        if num_rows > num_cols:  # the side that gets dummies is the smaller one
            rows, cols, num_rows, num_cols = cols, rows, num_cols, num_rows
        offset = float(counts.max() + 1)
        weights = np.concatenate([offset - counts.astype(np.float64), np.full(num_rows, offset)])
        own = np.arange(num_rows, dtype=np.int64)
        graph = csr_matrix(
            (weights, (np.concatenate([rows, own]), np.concatenate([cols, num_cols + own]))),
            shape=(num_rows, num_cols + num_rows),
        )
        LOG.debug("accuracy: residual matching %d x %d with %d cells", num_rows, num_cols, counts.size)
        matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
        total_weight = float(np.asarray(graph[matched_rows, matched_cols]).sum())
        matched_total += round(num_rows * offset - total_weight)
    return matched_total / table.num_samples


def accuracy(true: Any, pred: Any) -> float:
    """Clustering accuracy: the best one-to-one map of clusters to classes (Hungarian matching).

    ``ACC = max_m sum_j n_{m(j), j} / N`` over injective maps m from clusters to classes (METHODS.md
    §7); the same value as ``scipy.optimize.linear_sum_assignment`` on the dense R x C contingency
    (maximise), with unmatched clusters counting as errors.

    Scale: the dense R x C table is never built. The matching runs on the sparse contingency only
    (a zero cell adds nothing to the objective, so only non-zero cells can matter), solved by
    ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp). To guarantee that a full
    matching exists, each vertex on the smaller side gets a private dummy partner with weight
    ``w0 = max n_ij + 1``; real edges weigh ``w0 - n_ij >= 1``. Every vertex of the smaller side is
    matched once, so the minimum total weight is ``R w0 - (best matched overlap)``. Memory
    O(nnz + min(R, C)).
    """
    return accuracy_from_contingency(_true_pred_table(true, pred))


# --------------------------------------------------------------------------- group fairness
def cluster_group_table(pred: Any, groups: Any) -> Contingency:
    """Sparse (cluster x group) contingency: rows are clusters (negative labels: one singleton
    cluster each), columns the T groups present."""
    return contingency_table(noise_as_singletons(check_labels(pred, "pred")), groups, "pred", "groups")


def cluster_group_table_from_counts(counts: Any) -> Contingency:
    """Sparse (cluster x group) contingency from a dense count matrix ``counts[k, t] = |C_k ∩ G_t|``
    (K clusters x T groups, e.g. counts all-reduced over workers): clusters without a sample are
    dropped, exactly as if the table had been built from labels; every group must have a sample.

    Raises:
        DataError: not a 2-D matrix of non-negative integers, no sample at all, or an empty group.
    """
    table = np.asarray(counts)
    if table.ndim != 2 or not (table.dtype.kind in "iub" or np.array_equal(table, np.round(table))):
        raise DataError(f"counts: expected a 2-D integer (clusters x groups) count matrix, got shape {table.shape} "
                        f"dtype {table.dtype}")
    table = table.astype(np.int64)
    if (table < 0).any():
        raise DataError("counts: every (cluster, group) count must be >= 0")
    group_sizes = table.sum(axis=0)
    if group_sizes.sum() == 0:
        raise DataError("counts: the count matrix holds no sample")
    if (group_sizes == 0).any():
        empty = np.flatnonzero(group_sizes == 0).tolist()
        raise DataError(f"counts: group column(s) {empty} hold no sample; balance and fairness consider the groups "
                        "present - drop those columns (and their target proportions)")
    clusters = np.flatnonzero(table.sum(axis=1) > 0)
    used = table[clusters]
    rows, cols = np.nonzero(used)
    return Contingency(rows=rows.astype(np.int64), cols=cols.astype(np.int64), counts=used[rows, cols],
                       row_sums=used.sum(axis=1), col_sums=group_sizes, row_values=clusters,
                       col_values=np.arange(table.shape[1]))


def _row_starts(table: Contingency) -> np.ndarray:
    """Index of each row's first cell (cells are sorted by row; every row is non-empty)."""
    rows = table.rows
    return np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))


def balance_from_table(table: Contingency) -> float:
    """Balance from a (cluster x group) contingency; see :func:`balance`."""
    num_groups = table.shape[1]
    starts = _row_starts(table)
    present = np.diff(np.append(starts, table.nnz))
    smallest = np.minimum.reduceat(table.counts, starts).astype(np.float64)
    largest = np.maximum.reduceat(table.counts, starts).astype(np.float64)
    per_cluster = np.where(present == num_groups, smallest / largest, 0.0)
    return float(per_cluster.min())


def balance(pred: Any, groups: Any) -> float:
    """Multi-state balance (dissertation eq 6.2; METHODS.md §7), larger is fairer.

    ``balance(C_k) = N_min(k) / N_max(k)`` with ``N_t(k) = |C_k ∩ G_t|`` over the T groups present
    in ``groups``; ``N_min(k) = 0`` (balance 0) when a group is absent from cluster k. The overall
    balance is the minimum over clusters, in [0, 1].
    """
    return balance_from_table(cluster_group_table(pred, groups))


def _check_proportions(rho: Any, table: Contingency) -> np.ndarray:
    """Target proportions aligned with the table's groups (sorted group values)."""
    values = table.col_values
    if isinstance(rho, Mapping):
        missing = [v for v in values.tolist() if v not in rho]
        if missing:
            raise DataError(f"rho: no target proportion for group(s) {missing}; give one for every "
                            f"group value present ({values.tolist()})")
        target = np.array([float(rho[v]) for v in values.tolist()])
    else:
        target = np.asarray(rho, dtype=np.float64).reshape(-1)
        if target.size != values.size:
            raise DataError(f"rho: {target.size} proportions for {values.size} groups present "
                            f"({values.tolist()}); give one per group in sorted group order, or a "
                            f"dict group value -> proportion")
    if not np.all(np.isfinite(target)) or np.any(target <= 0):
        raise DataError(f"rho: every target proportion must be a finite number > 0, got {target.tolist()}")
    if abs(target.sum() - 1.0) > 1e-6:
        raise DataError(f"rho: target proportions must sum to 1 (they sum to {target.sum():.6f}); "
                        f"normalise them")
    return target


def fairness_from_table(table: Contingency, rho: Any = None) -> float:
    """Fairness from a (cluster x group) contingency; see :func:`fairness`."""
    num_groups = table.shape[1]
    if rho is None:
        target = table.col_sums / table.num_samples
    else:
        target = _check_proportions(rho, table)
    starts = _row_starts(table)
    present = np.diff(np.append(starts, table.nnz))
    ratio = (table.counts / table.row_sums[table.rows]) / target[table.cols]
    per_cell = np.minimum(ratio, 1.0 / ratio)
    per_cluster = np.where(present == num_groups, np.minimum.reduceat(per_cell, starts), 0.0)
    return float(per_cluster.min())


def fairness(pred: Any, groups: Any, rho: Any = None) -> float:
    """Proportional fairness (dissertation eq 6.3; METHODS.md §7), larger is fairer.

    With ``rho_t`` the target share of group t (default ``|G_t| / N``) and
    ``rho_t(k) = |C_k ∩ G_t| / |C_k|``: ``fairness(C_k) = min_t min(rho_t / rho_t(k),
    rho_t(k) / rho_t)`` (0 when group t is absent from C_k); overall = min over clusters, in [0, 1].

    Args:
        pred: cluster per sample.
        groups: protected group per sample (the T distinct values present are the groups).
        rho: optional targets: a sequence of T proportions in sorted order of the group values,
            or a mapping group value -> proportion; positive, summing to 1.
    """
    return fairness_from_table(cluster_group_table(pred, groups), rho)


def fwd_from_table(table: Contingency) -> float:
    """FWD from a (cluster x group) contingency; see :func:`fwd`."""
    num_groups = table.shape[1]
    starts = _row_starts(table)
    present = np.diff(np.append(starts, table.nnz))
    share = table.counts / table.row_sums[table.rows]
    gap = np.add.reduceat(np.abs(share - 1.0 / num_groups), starts)
    gap = gap + (num_groups - present) / num_groups  # absent groups: |0 - 1/T| each
    return float(np.mean(gap / 2.0))


def fwd(pred: Any, groups: Any) -> float:
    """Fairness Wasserstein distance (multi-state seed, Definition 3.2; METHODS.md §7), lower is fairer.

    Per cluster k, the Wasserstein-1 distance between its normalised group histogram
    ``h_t(k) = |C_k ∩ G_t| / |C_k|`` and the uniform histogram ``u_t = 1/T`` under the 0/1 ground
    metric (``d(s, t) = 1`` for ``s != t``), averaged over clusters (unweighted). With the 0/1
    metric the optimal transport cost equals the total-variation distance, so it is computed in
    closed form, ``W(h, u) = (1/2) sum_t |h_t(k) - 1/T|`` (tests check it against POT ``ot.emd2``).
    """
    return fwd_from_table(cluster_group_table(pred, groups))


# --------------------------------------------------------------------------- per-group quality
def _group_name(value: Any, group_names: Any) -> str:
    if group_names is None:
        return str(value)
    if isinstance(group_names, Mapping):
        if value not in group_names:
            raise DataError(f"group_names: no name for group value {value}; add it to the mapping")
        return str(group_names[value])
    if not 0 <= int(value) < len(group_names):
        raise DataError(f"group_names: group value {value} has no name (the list has "
                        f"{len(group_names)} names, for values 0..{len(group_names) - 1}); pass a "
                        f"dict value -> name or drop samples with unknown group")
    return str(group_names[int(value)])


_SCORE_NAMES = ("precision", "recall", "f")


def per_group_scores(true: Any, pred: Any, groups: Any,
                     group_names: Sequence[str] | Mapping[Any, str] | None = None) -> dict[str, Any]:
    """Pairwise and BCubed P/R/F of the clustering restricted to each protected group (METHODS.md §7).

    For group t the metrics are computed on the samples of G_t only (``true[g == t]`` against
    ``pred[g == t]``), as in the transformer seed's per-race F-score figure. Mean and standard
    deviation are across groups, unweighted; the standard deviation is the population one
    (``np.std``, ddof = 0), since the groups are all the groups, not a sample of them.

    Args:
        true: ground-truth identity per sample.
        pred: predicted cluster per sample.
        groups: protected group per sample (every distinct value is a group).
        group_names: names of the groups: a list indexed by group value, or a mapping value ->
            name; default ``str(value)``.

    Returns:
        ``{"groups": {name: {"value", "num_samples", "pairwise": {"precision", "recall", "f"},
        "bcubed": {...}}}, "mean": {"pairwise": {...}, "bcubed": {...}}, "std": {...}}``,
        groups in increasing order of their values.
    """
    true = check_labels(true, "true")
    pred = noise_as_singletons(check_labels(pred, "pred"))
    groups = check_labels(groups, "groups")
    check_same_length(true=true, pred=pred, groups=groups)
    group_codes, group_values = relabel(groups)
    names = [_group_name(v, group_names) for v in group_values.tolist()]
    if len(set(names)) != len(names):
        raise DataError(f"group_names: names are not unique ({names}); give each group its own name")
    order = np.argsort(group_codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(group_codes, minlength=group_values.size))])
    per_group: dict[str, Any] = {}
    for index, (name, value) in enumerate(zip(names, group_values.tolist())):
        members = order[bounds[index]:bounds[index + 1]]
        true_codes, true_values = relabel(true[members])
        pred_codes, pred_values = relabel(pred[members])
        table = contingency_from_codes(true_codes, true_values.size, pred_codes, pred_values.size)
        per_group[name] = {
            "value": value,
            "num_samples": int(members.size),
            "pairwise": dict(zip(_SCORE_NAMES, pairwise_from_contingency(table))),
            "bcubed": dict(zip(_SCORE_NAMES, bcubed_from_contingency(table))),
        }
    summary: dict[str, Any] = {"mean": {}, "std": {}}
    for family in ("pairwise", "bcubed"):
        for stat, reduce in (("mean", np.mean), ("std", np.std)):
            summary[stat][family] = {
                score: float(reduce([g[family][score] for g in per_group.values()]))
                for score in _SCORE_NAMES
            }
    return {"groups": per_group, **summary}
