"""dist_fair.cluster.grid: logit and quantile candidate grids (against scipy / brute force), and a
threshold choice that needs the resolution of the quantile grid (saturated probabilities)."""
import numpy as np
import pytest
from scipy.special import expit, logit

from dist_fair.cluster.edges import choose_decoding
from dist_fair.cluster.grid import decoding_grid, logit_grid, quantile_grid, validation_edge_scores
from dist_fair.cluster.threshold import choose_threshold, threshold_clusters
from dist_fair.errors import DataError
from dist_fair.eval.metrics import pairwise_fscore


def test_logit_grid_is_even_in_the_logit():
    grid = logit_grid(-2.0, 10.0, 0.5)
    assert len(grid) == 25
    assert np.allclose(grid, expit(np.arange(-2.0, 10.01, 0.5)))
    assert np.allclose(np.diff(logit(np.array(grid))), 0.5)
    with pytest.raises(DataError, match="step"):
        logit_grid(0.0, 1.0, 0.0)


def test_quantile_grid_matches_nearest_rank_brute_force():
    rng = np.random.default_rng(0)
    values = rng.permutation(rng.random(1001))
    ordered = np.sort(values)
    grid = quantile_grid(values, 10)
    # level (m + 1/2) / 10 of 1001 values: rank (m + 1/2) * 100, an integer (no rounding tie)
    assert grid == [float(ordered[int((m + 0.5) * 100)]) for m in range(10)]
    assert quantile_grid(values, 0) == [] and quantile_grid(np.zeros(0), 5) == []
    assert quantile_grid(np.ones(50), 8) == [1.0]  # duplicates collapse


def test_validation_edge_scores_skip_self_missing_and_other_rows():
    nbrs = np.array([[0, 2, -1, 1], [1, 0, 2, 3], [2, 1, 0, -1], [3, 2, 1, 0]])
    scores = np.arange(16, dtype=np.float64).reshape(4, 4) / 16
    val = np.array([True, False, True, False])
    expected = [scores[i, j] for i in (0, 2) for j in range(1, 4) if nbrs[i, j] >= 0]
    assert validation_edge_scores(nbrs, scores, val).tolist() == expected
    # scores narrower than nbrs (the model reads fewer tokens than k): only the scored columns
    assert validation_edge_scores(nbrs, scores[:, :2], val).tolist() == [scores[0, 1], scores[2, 1]]
    with pytest.raises(DataError):
        validation_edge_scores(nbrs[:, :2], scores, val)


def _saturated_graph(seed: int = 0):
    """12 identities of 4 samples; each row: itself, its 3 positives (p in 0.99975..0.99999), then
    4 negatives, a few of which score 0.9990..0.9997 (inside the band a probability grid misses)."""
    rng = np.random.default_rng(seed)
    identity = np.repeat(np.arange(12), 4)
    n = identity.size
    nbrs = np.zeros((n, 8), np.int64)
    scores = np.zeros((n, 8))
    for i in range(n):
        same = [j for j in np.nonzero(identity == identity[i])[0] if j != i]
        other = rng.choice(np.nonzero(identity != identity[i])[0], 4, replace=False)
        nbrs[i] = [i, *same, *other]
        scores[i, 0] = 1.0
        scores[i, 1:4] = np.sort(rng.uniform(0.99975, 0.99999, 3))[::-1]
        scores[i, 4:] = np.where(rng.random(4) < 0.3, rng.uniform(0.9990, 0.9997, 4), rng.uniform(0.0, 0.5, 4))
    return nbrs, scores.astype(np.float32), identity


def test_quantiles_find_the_threshold_a_coarse_grid_misses():
    nbrs, scores, identity = _saturated_graph()
    val = identity < 8
    coarse = [0.5, 0.9, 0.99, 0.999, 0.9999]
    plain = choose_decoding(nbrs, scores, identity, val, coarse, "threshold")
    fine = choose_decoding(nbrs, scores, identity, val, coarse, "threshold", quantiles=400)
    # brute force: the best threshold over every distinct validation edge score
    rows = np.nonzero(val)[0]
    every = sorted(set(validation_edge_scores(nbrs, scores, val).tolist()))
    best = choose_threshold(nbrs, scores, identity, val, every).val_fscore
    assert best == pytest.approx(1.0)
    assert plain.val_fscore < 0.99  # 0.999 keeps merging negatives, 0.9999 cuts positives
    assert fine.val_fscore == pytest.approx(best)
    assert fine.tau in decoding_grid(coarse, nbrs, scores, val, 400)
    # the test rows' labels play no part (the grid reads validation scores only)
    scrambled = identity.copy()
    scrambled[~val] = np.random.default_rng(1).permutation(scrambled[~val])
    again = choose_decoding(nbrs, scores, scrambled, val, coarse, "threshold", quantiles=400)
    assert (again.tau, again.val_fscore) == (fine.tau, fine.val_fscore)
    # and the chosen threshold clusters the validation identities exactly
    local = threshold_clusters(nbrs, scores, fine.tau)
    assert pairwise_fscore(identity[rows], local[rows])[2] == pytest.approx(1.0)


def test_peak_choice_accepts_quantiles():
    nbrs, scores, identity = _saturated_graph(2)
    val = identity < 8
    choice = choose_decoding(nbrs, scores, identity, val, [0.5], "peak", quantiles=64)
    assert choice.tau in decoding_grid([0.5], nbrs, scores, val, 64)
    assert len(choice.grid) == len(decoding_grid([0.5], nbrs, scores, val, 64))
