"""dist_fair.eval.metrics against independent references (METHODS.md §7).

References: brute-force pair counting over the N x N pair matrices (pairwise F), per-sample
definitions (BCubed), sklearn (NMI), scipy's dense ``linear_sum_assignment`` (ACC), the equations
written out cluster by cluster (balance, fairness) and POT's ``ot.emd2`` (FWD).
"""
from __future__ import annotations

import numpy as np
import ot
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score

from dist_fair.errors import DataError
from dist_fair.eval import contingency as contingency_module
from dist_fair.eval import metrics
from dist_fair.eval.contingency import contingency_table, relabel

TOL = 1e-9
SEEDS = [0, 1, 2]
SIZES = [1, 2, 7, 60, 240]
KINDS = ["random", "huge_values", "singletons", "one_cluster", "perfect", "noisy", "unsigned", "dbscan_noise"]


# --------------------------------------------------------------------------- cases
def make_case(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true, pred, groups) for one labeling kind."""
    rng = np.random.default_rng(seed)
    num_ids = max(1, n // 6)
    true = rng.integers(0, num_ids, n)
    groups = rng.integers(0, 3, n)
    if kind == "random":
        pred = rng.integers(0, max(1, n // 4), n)
    elif kind == "huge_values":
        table = rng.integers(-2**62, 2**62, size=num_ids + n, dtype=np.int64)
        true = table[true]
        pred = table[rng.integers(0, max(1, n // 5), n) + num_ids]
        groups = np.array([-7, 10**12, 3])[groups]
    elif kind == "singletons":
        pred = np.arange(n) * -3
    elif kind == "one_cluster":
        pred = np.full(n, 42)
    elif kind == "perfect":
        pred = rng.permutation(num_ids)[true] + 1000
    elif kind == "noisy":  # identities mostly kept together, some splits, merges and strays
        pred = true.copy()
        pred[rng.random(n) < 0.3] += num_ids
        pred[rng.random(n) < 0.1] = rng.integers(0, 3, 1)[0]
        strays = rng.random(n) < 0.1
        pred[strays] = 10 * n + np.arange(strays.sum())
    elif kind == "dbscan_noise":  # HDBSCAN / DBSCAN output: clusters plus many -1 (noise)
        pred = true.copy()
        pred[rng.random(n) < 0.4] = -1
    elif kind == "unsigned":
        true = (true.astype(np.uint64) + np.uint64(2**63 + 5))
        pred = rng.integers(0, max(1, n // 3), n).astype(np.uint8)
        groups = groups.astype(np.uint16)
    else:
        raise AssertionError(kind)
    return true, pred, groups


@pytest.fixture(params=["bincount", "sort"])
def table_path(request, monkeypatch):
    """Run a test through both ways of building the contingency (small ranges use bincount; the
    sort path is what large label ranges take)."""
    if request.param == "sort":
        monkeypatch.setattr(contingency_module, "_DENSE_RANGE_FACTOR", 0)
        monkeypatch.setattr(contingency_module, "_DENSE_RANGE_SLACK", 0)
    return request.param


# --------------------------------------------------------------------------- references
def ref_singletons(pred):
    """METHODS.md §7 last bullet, written out: every negative predicted label becomes a fresh cluster id."""
    out = [int(v) for v in pred]
    fresh = max([v for v in out if v >= 0], default=-1) + 1
    for i, v in enumerate(out):
        if v < 0:
            out[i] = fresh
            fresh += 1
    return np.array(out, dtype=object if fresh > 2**62 else np.int64)


def ref_pairwise(true, pred):
    same_true = true[:, None] == true[None, :]
    same_pred = pred[:, None] == pred[None, :]
    off_diagonal = ~np.eye(len(true), dtype=bool)
    tk = np.sum(same_true & same_pred & off_diagonal)
    pk = np.sum(same_pred & off_diagonal)
    qk = np.sum(same_true & off_diagonal)
    precision = tk / pk if pk else 1.0
    recall = tk / qk if qk else 1.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f


def ref_bcubed(true, pred):
    precisions, recalls = [], []
    for s in range(len(true)):
        in_cluster = pred == pred[s]
        in_class = true == true[s]
        both = np.sum(in_cluster & in_class)
        precisions.append(both / in_cluster.sum())
        recalls.append(both / in_class.sum())
    precision, recall = np.mean(precisions), np.mean(recalls)
    return precision, recall, 2 * precision * recall / (precision + recall)


def ref_accuracy(true, pred):
    true_values, pred_values = np.unique(true), np.unique(pred)
    dense = np.zeros((len(true_values), len(pred_values)))
    for t, p in zip(true, pred):
        dense[np.searchsorted(true_values, t), np.searchsorted(pred_values, p)] += 1
    r, c = linear_sum_assignment(dense, maximize=True)
    return dense[r, c].sum() / len(true)


def ref_cluster_group_counts(pred, groups):
    group_values = np.unique(groups)
    return {k: np.array([np.sum((pred == k) & (groups == t)) for t in group_values])
            for k in np.unique(pred)}, group_values


def ref_balance(pred, groups):
    counts, _ = ref_cluster_group_counts(pred, groups)
    return min(c.min() / c.max() for c in counts.values())


def ref_fairness(pred, groups, rho=None):
    counts, group_values = ref_cluster_group_counts(pred, groups)
    if rho is None:
        rho = np.array([np.mean(groups == t) for t in group_values])
    values = []
    for c in counts.values():
        share = c / c.sum()
        per_group = [0.0 if s == 0 else min(r / s, s / r) for s, r in zip(share, rho)]
        values.append(min(per_group))
    return min(values)


def ref_fwd(pred, groups):
    counts, group_values = ref_cluster_group_counts(pred, groups)
    num_groups = len(group_values)
    uniform = np.full(num_groups, 1.0 / num_groups)
    ground = 1.0 - np.eye(num_groups)
    return np.mean([ot.emd2(c / c.sum(), uniform, ground) for c in counts.values()])


# --------------------------------------------------------------------------- metrics vs references
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_identity_metrics_match_references(kind, n, seed, table_path):
    true, pred, _ = make_case(kind, n, seed)
    ref = ref_singletons(pred)
    np.testing.assert_allclose(metrics.pairwise_fscore(true, pred), ref_pairwise(true, ref), atol=TOL)
    np.testing.assert_allclose(metrics.bcubed_fscore(true, pred), ref_bcubed(true, ref), atol=TOL)
    assert metrics.nmi(true, pred) == pytest.approx(normalized_mutual_info_score(true, ref), abs=TOL)
    assert metrics.accuracy(true, pred) == pytest.approx(ref_accuracy(true, ref), abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_group_metrics_match_references(kind, n, seed, table_path):
    _, pred, groups = make_case(kind, n, seed)
    ref = ref_singletons(pred)
    assert metrics.balance(pred, groups) == pytest.approx(ref_balance(ref, groups), abs=TOL)
    assert metrics.fairness(pred, groups) == pytest.approx(ref_fairness(ref, groups), abs=TOL)
    assert metrics.fwd(pred, groups) == pytest.approx(ref_fwd(ref, groups), abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_metrics_on_fair_clusters_with_absent_groups(seed):
    """Half the clusters hold every group, the other half lack one: balance and fairness are 0,
    and dropping the unfair clusters gives positive values equal to the references."""
    rng = np.random.default_rng(seed)
    pred = np.repeat(np.arange(20), 30)
    groups = rng.integers(0, 4, pred.size)
    groups[(pred >= 10) & (groups == 2)] = 1  # clusters 10..19 have no group 2
    assert metrics.balance(pred, groups) == 0.0
    assert metrics.fairness(pred, groups) == 0.0
    assert metrics.fwd(pred, groups) == pytest.approx(ref_fwd(pred, groups), abs=TOL)
    fair = pred < 10
    if all(np.any((pred == k) & (groups == t)) for k in range(10) for t in range(4)):
        assert metrics.balance(pred[fair], groups[fair]) == pytest.approx(
            ref_balance(pred[fair], groups[fair]), abs=TOL)
        assert metrics.balance(pred[fair], groups[fair]) > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_fairness_with_given_targets(seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 3, 400)
    groups = rng.integers(0, 4, 400) * 5 - 2  # values -2, 3, 8, 13
    rho = np.array([0.1, 0.2, 0.3, 0.4])
    assert metrics.fairness(pred, groups, rho) == pytest.approx(ref_fairness(pred, groups, rho), abs=TOL)
    as_dict = {-2: 0.1, 3: 0.2, 8: 0.3, 13: 0.4}
    assert metrics.fairness(pred, groups, as_dict) == pytest.approx(ref_fairness(pred, groups, rho), abs=TOL)


def test_perfectly_proportional_clusters_score_one():
    groups = np.tile([0, 0, 1, 2], 6)  # rho = (1/2, 1/4, 1/4)
    pred = np.repeat(np.arange(6), 4)  # every cluster has exactly that mix
    assert metrics.fairness(pred, groups) == pytest.approx(1.0)
    assert metrics.balance(pred, groups) == pytest.approx(0.5)
    assert metrics.fwd(pred, groups) == pytest.approx(ref_fwd(pred, groups), abs=TOL)
    uniform = np.tile([0, 1, 2], 5)
    assert metrics.fwd(np.repeat(np.arange(5), 3), uniform) == pytest.approx(0.0, abs=TOL)


# --------------------------------------------------------------------------- accuracy at scale
@pytest.mark.parametrize("seed", range(6))
def test_accuracy_reduction_matches_dense_hungarian_on_clusterings_with_ties(seed):
    """Small counts with many ties exercise the dominant-cell reduction and the residual solve."""
    rng = np.random.default_rng(seed)
    num_ids = 40
    true = np.repeat(np.arange(num_ids), rng.integers(1, 6, num_ids))
    pred = true.copy()
    pred[rng.random(true.size) < 0.3] += num_ids
    pred[rng.random(true.size) < 0.2] = rng.integers(0, 2 * num_ids, 1)[0]
    pred[rng.random(true.size) < 0.2] = rng.integers(0, 8, 1)[0] + 500
    assert metrics.accuracy(true, pred) == pytest.approx(ref_accuracy(true, pred), abs=TOL)
    assert metrics.accuracy(pred, true) == pytest.approx(ref_accuracy(pred, true), abs=TOL)


def test_dominant_cells_form_a_matching_even_with_ties():
    # row 0 holds 5 in two private columns: only one of them may be fixed
    rows = np.array([0, 0, 1])
    cols = np.array([0, 1, 2])
    counts = np.array([5, 5, 3])
    fixed = metrics._fix_dominant_cells(rows, cols, counts, 2, 3)
    assert fixed.sum() == 2 and fixed[2]
    assert len(set(rows[fixed])) == fixed.sum() and len(set(cols[fixed])) == fixed.sum()


def test_accuracy_many_clusters_stays_sparse():
    """100K identities, 300K clusters: a dense table would need 2.4e11 bytes."""
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(100_000), 5)
    pred = true.copy()
    strays = rng.random(true.size) < 0.4
    pred[strays] = 10**6 + np.arange(strays.sum())
    kept = np.bincount(true[~strays], minlength=100_000)
    expected = (kept + (kept == 0)).sum() / true.size  # an all-stray identity still matches one stray
    assert metrics.accuracy(true, pred) == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------- conventions
def test_degenerate_conventions():
    assert metrics.pairwise_fscore([3], [9]) == (1.0, 1.0, 1.0)
    assert metrics.bcubed_fscore([3], [9]) == (1.0, 1.0, 1.0)
    assert metrics.nmi([3], [9]) == 1.0
    assert metrics.accuracy([3], [9]) == 1.0
    # every prediction a singleton, true pairs exist: no predicted pair -> precision 1, recall 0
    assert metrics.pairwise_fscore([0, 0, 1, 1], [0, 1, 2, 3]) == (1.0, 0.0, 0.0)
    # one class, one cluster: everything perfect
    assert metrics.pairwise_fscore([5, 5, 5], [1, 1, 1]) == (1.0, 1.0, 1.0)
    assert metrics.nmi([5, 5, 5], [1, 1, 1]) == 1.0
    assert metrics.nmi([5, 5, 6], [1, 1, 1]) == 0.0
    # one group only: balance and fairness 1, FWD 0
    assert metrics.balance([0, 1, 1], [4, 4, 4]) == 1.0
    assert metrics.fairness([0, 1, 1], [4, 4, 4]) == 1.0
    assert metrics.fwd([0, 1, 1], [4, 4, 4]) == 0.0


def test_pairwise_is_not_the_geometric_fmi():
    # tk = 2^2 + 2^2 + 1 - 5 = 4, pk = 2^2 + 3^2 - 5 = 8, qk = 4^2 + 1 - 5 = 12
    precision, recall, f = metrics.pairwise_fscore([0, 0, 0, 0, 1], [0, 0, 1, 1, 1])
    assert (precision, recall) == pytest.approx((0.5, 1 / 3))
    assert f == pytest.approx(0.4)
    assert f != pytest.approx(np.sqrt(precision * recall))


def test_large_counts_do_not_overflow():
    n = 3_000_000  # sum n_ij^2 = 9e12: beyond int32, far inside int64
    true = np.zeros(n, dtype=np.int32)
    pred = np.zeros(n, dtype=np.int32)
    pred[: n // 3] = 1
    a, b = n // 3, n - n // 3
    expected_precision = 1.0
    expected_recall = (a * a + b * b - n) / (n * n - n)
    precision, recall, _ = metrics.pairwise_fscore(true, pred)
    assert precision == expected_precision
    assert recall == pytest.approx(expected_recall, rel=1e-12)


def test_relabel_matches_numpy_unique():
    rng = np.random.default_rng(3)
    for labels in (rng.integers(-5, 5, 100), rng.integers(-2**63, 2**63 - 1, 100, dtype=np.int64),
                   rng.integers(0, 2**64 - 1, 100, dtype=np.uint64), rng.integers(-100, 100, 100).astype(np.int8)):
        codes, values = relabel(labels)
        ref_values, ref_codes = np.unique(labels, return_inverse=True)
        np.testing.assert_array_equal(values, ref_values)
        np.testing.assert_array_equal(codes, ref_codes)
        assert values.dtype == labels.dtype and codes.dtype == np.int64


def test_contingency_counts_match_dense_table(table_path):
    rng = np.random.default_rng(4)
    a, b = rng.integers(-3, 4, 300), rng.integers(10, 20, 300)
    table = contingency_table(a, b)
    dense = np.zeros(table.shape, dtype=np.int64)
    dense[table.rows, table.cols] = table.counts
    for i, va in enumerate(table.row_values):
        for j, vb in enumerate(table.col_values):
            assert dense[i, j] == np.sum((a == va) & (b == vb))
    np.testing.assert_array_equal(table.row_sums, dense.sum(1))
    np.testing.assert_array_equal(table.col_sums, dense.sum(0))


# --------------------------------------------------------------------------- per-group scores
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["random", "noisy", "huge_values", "singletons", "dbscan_noise"])
def test_per_group_scores_match_restricted_references(kind, seed):
    true, pred, groups = make_case(kind, 180, seed)
    pred_raw, pred = pred, ref_singletons(pred)
    values = np.unique(groups)
    names = {v: f"group{i}" for i, v in enumerate(values.tolist())}
    scores = metrics.per_group_scores(true, pred_raw, groups, group_names=names)
    assert list(scores["groups"]) == [names[v] for v in values.tolist()]
    ref_f = {"pairwise": [], "bcubed": []}
    for value in values:
        mask = groups == value
        entry = scores["groups"][names[value.item()]]
        assert entry["num_samples"] == mask.sum()
        pairwise, bcubed = ref_pairwise(true[mask], pred[mask]), ref_bcubed(true[mask], pred[mask])
        np.testing.assert_allclose([entry["pairwise"][k] for k in ("precision", "recall", "f")], pairwise, atol=TOL)
        np.testing.assert_allclose([entry["bcubed"][k] for k in ("precision", "recall", "f")], bcubed, atol=TOL)
        ref_f["pairwise"].append(pairwise[2])
        ref_f["bcubed"].append(bcubed[2])
    for family in ("pairwise", "bcubed"):
        assert scores["mean"][family]["f"] == pytest.approx(np.mean(ref_f[family]), abs=TOL)
        assert scores["std"][family]["f"] == pytest.approx(np.std(ref_f[family], ddof=0), abs=TOL)


def test_per_group_names_from_a_list():
    scores = metrics.per_group_scores([0, 0, 1, 1], [0, 0, 1, 1], [1, 0, 1, 0], ["Asian", "African"])
    assert list(scores["groups"]) == ["Asian", "African"]
    with pytest.raises(DataError, match="group value 2 has no name"):
        metrics.per_group_scores([0, 0], [0, 0], [2, 0], ["a", "b"])


# --------------------------------------------------------------------------- validation
def test_bad_inputs_raise_data_error_naming_the_argument():
    with pytest.raises(DataError, match=r"true has 3, pred has 2"):
        metrics.pairwise_fscore([0, 1, 2], [0, 1])
    with pytest.raises(DataError, match=r"pred: contains NaN.*index 1"):
        metrics.bcubed_fscore([0, 1, 2], [0.0, np.nan, 1.0])
    with pytest.raises(DataError, match=r"true: labels must have an integer dtype.*astype\(np.int64\)"):
        metrics.nmi([0.0, 1.0], [0, 1])
    with pytest.raises(DataError, match=r"pred: expected a 1-D array"):
        metrics.accuracy([0, 1], [[0, 1]])
    with pytest.raises(DataError, match=r"groups: no samples"):
        metrics.balance([0, 1], [])
    with pytest.raises(DataError, match=r"groups has 2"):
        metrics.fwd([0, 1, 2], [0, 1])
    with pytest.raises(DataError, match=r"groups: contains NaN"):
        metrics.per_group_scores([0, 1], [0, 1], [np.nan, 1.0])
    with pytest.raises(DataError, match=r"rho: 2 proportions for 3 groups"):
        metrics.fairness([0, 1, 2], [0, 1, 2], [0.5, 0.5])
    with pytest.raises(DataError, match=r"rho: target proportions must sum to 1"):
        metrics.fairness([0, 1, 2], [0, 1, 2], [0.5, 0.5, 0.5])
    with pytest.raises(DataError, match=r"rho: no target proportion for group"):
        metrics.fairness([0, 1], [0, 1], {0: 1.0})


def test_noise_labels_are_singletons_not_one_cluster():
    """Issue 16: all -1 (HDBSCAN noise) used to form one giant cluster."""
    true = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([-1, -1, 5, 5, -1, -1])
    groups = np.array([0, 1, 0, 1, 0, 1])
    assert metrics.pairwise_fscore(true, pred) == pytest.approx((1.0, 1 / 3, 0.5))
    assert metrics.bcubed_fscore(true, pred)[0] == 1.0  # no wrong link: noise points link nothing
    assert metrics.balance(pred, groups) == 0.0  # a singleton misses a group
    from dist_fair.eval.contingency import noise_as_singletons

    assert noise_as_singletons(pred).tolist() == [6, 7, 5, 5, 8, 9]
    assert noise_as_singletons(np.array([3, 1])).tolist() == [3, 1]
    big = np.array([np.iinfo(np.int64).max, -1, -1])
    assert len(set(noise_as_singletons(big).tolist())) == 3
