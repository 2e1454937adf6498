"""Fairness targets (dist_fair.fair.targets): roundings, eps bounds, errors."""
from __future__ import annotations

import numpy as np
import pytest

from dist_fair.errors import DataError, InfeasibleError
from dist_fair.fair.targets import check_groups, compute_targets


def _counts(rng, t, k, n):
    groups = rng.integers(0, t, n)
    labels = rng.integers(0, k, n)
    groups[:t] = np.arange(t)
    return np.bincount(groups * k + labels, minlength=t * k).reshape(t, k)


@pytest.mark.parametrize("seed", range(6))
def test_eps0_rounding_is_integral_floor_or_ceil_with_exact_sums(seed):
    rng = np.random.default_rng(seed)
    counts = _counts(rng, 1 + seed % 4, 2 + seed, 50 + 37 * seed)
    fair = compute_targets(counts.sum(0), counts.sum(1), counts)
    n = fair.lower
    assert fair.fixed and np.array_equal(fair.lower, fair.upper)
    x = np.outer(counts.sum(1) / counts.sum(), counts.sum(0))
    assert np.all(n >= np.floor(x - 1e-9)) and np.all(n <= np.ceil(x + 1e-9))
    assert np.array_equal(n.sum(1), counts.sum(1)) and np.array_equal(n.sum(0), counts.sum(0))


def test_eps0_rounding_is_the_one_closest_to_current_counts():
    from itertools import product

    counts = np.array([[3, 0, 2], [1, 4, 0]])  # G = (5, 5), C = (4, 4, 2): x = 2, 2, 1 in both rows
    fair = compute_targets(counts.sum(0), counts.sum(1), counts)
    best = None
    for cells in product(*[range(int(np.floor(v)), int(np.ceil(v)) + 1) for v in [2, 2, 1, 2, 2, 1]]):
        n = np.array(cells).reshape(2, 3)
        if np.array_equal(n.sum(1), [5, 5]) and np.array_equal(n.sum(0), [4, 4, 2]):
            d = np.abs(n - counts).sum()
            best = d if best is None else min(best, d)
    assert np.abs(fair.lower - counts).sum() == best


def test_eps_bounds_follow_the_documented_rule():
    counts = np.array([[40, 10, 1], [20, 30, 2]])
    eps = 0.2
    fair = compute_targets(counts.sum(0), counts.sum(1), counts, eps=eps)
    x = np.outer(counts.sum(1) / counts.sum(), counts.sum(0))
    lower = np.minimum(np.ceil(x * (1 - eps) - 1e-9), np.floor(x + 1e-9))
    upper = np.maximum(np.floor(x * (1 + eps) + 1e-9), np.ceil(x - 1e-9))
    cap = np.minimum(counts.sum(0)[None, :], counts.sum(1)[:, None])
    assert np.array_equal(fair.lower, np.clip(lower, 0, cap)) and np.array_equal(fair.upper, np.clip(upper, 0, cap))
    assert not fair.fixed
    assert np.all(fair.lower <= np.floor(x + 1e-9)) and np.all(fair.upper >= np.ceil(x - 1e-9))
    assert any("no integer" in note for note in fair.notes)  # the 3-member cluster has empty eps cells


def test_user_rho_and_explicit_targets():
    counts = np.array([[30, 20], [10, 40]])
    fair = compute_targets(counts.sum(0), counts.sum(1), counts, rho=[0.4, 0.6], eps=0.5)
    assert fair.rho.tolist() == [0.4, 0.6]
    explicit = np.array([[25, 25], [15, 35]])
    fixed = compute_targets(counts.sum(0), counts.sum(1), counts, targets=explicit)
    assert np.array_equal(fixed.lower, explicit) and fixed.fixed
    with pytest.raises(InfeasibleError, match="rows sum"):
        compute_targets(counts.sum(0), counts.sum(1), counts, targets=explicit + np.array([[1, 0], [0, 0]]))


@pytest.mark.parametrize("rho, message", [([0.5, 0.6], "sum to 1"), ([1.2, -0.2], "> 0"), ([1.0], "one per group")])
def test_bad_rho_is_a_clear_error(rho, message):
    counts = np.array([[3, 2], [1, 4]])
    with pytest.raises(DataError, match=message):
        compute_targets(counts.sum(0), counts.sum(1), counts, rho=rho)


def test_targets_that_cannot_be_met_are_reported():
    counts = np.array([[45, 45], [5, 5]])  # groups 90/10, rho asks for 10/90
    with pytest.raises(InfeasibleError, match="group 0 has 90 members"):
        compute_targets(counts.sum(0), counts.sum(1), counts, rho=[0.1, 0.9])


def test_group_checks():
    with pytest.raises(DataError, match="no members"):
        compute_targets(np.array([3, 3]), np.array([6, 0]), np.array([[3, 3], [0, 0]]))
    with pytest.raises(DataError, match="unknown"):
        check_groups(np.array([0, -1, 1]), 3, None)
    with pytest.raises(DataError, match="integers"):
        check_groups(np.array([0.0, 0.5]), 2, None)
    groups, t = check_groups(np.array([0, 1, 2, 1]), 4, None)
    assert t == 3 and groups.dtype == np.int64
