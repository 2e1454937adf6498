"""benchmarks/bench_intraformer.py (issue 14): the verdict can fail, the best variant is chosen on
validation only, paired statistics agree with an independent computation, and the report renders
from a results payload; benchmarks/common.paired_differences against scipy's sign test."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_intraformer")


def _row(seed, method, val_f, f_mean, f_std, pairwise=None, split="skewed", decode="threshold"):
    races = {f"F_{r}": f_mean for r in ("African", "Asian", "Caucasian", "Indian")}
    return {"seed": seed, "method": method, "grid": "fine", "val_split": split, "decode": decode, "tau": 0.5,
            "val_pairwise_f": val_f, "pairwise_f": f_mean if pairwise is None else pairwise, "bcubed_f": f_mean,
            "nmi": 0.9, "F_mean": f_mean, "F_std": f_std, **races}


def test_paired_differences_match_scipy_sign_test_and_a_direct_bootstrap(bench):
    from scipy.stats import binomtest

    from common import paired_differences  # benchmarks/common.py, on sys.path through load_benchmark

    diff = [0.02, -0.01, 0.03, 0.04, 0.0, 0.01]
    out = paired_differences(diff, resamples=4000, seed=3)
    assert (out["wins"], out["losses"], out["ties"]) == (4, 1, 1)
    assert out["sign_test_p"] == pytest.approx(binomtest(4, 5, 0.5).pvalue)
    assert out["mean_diff"] == pytest.approx(np.mean(diff))
    d = np.asarray(diff)
    boot = d[np.random.default_rng(3).integers(0, d.size, size=(4000, d.size))].mean(axis=1)
    assert out["bootstrap95"] == pytest.approx([np.quantile(boot, 0.025), np.quantile(boot, 0.975)])
    assert paired_differences([0.0, 0.0])["sign_test_p"] == 1.0


def test_best_variant_is_chosen_on_validation_never_on_test(bench):
    # lambda=3 has the best TEST F but the worse validation F: the choice must not see the test set
    rows = [_row(s, "intraformer+pur", 0.95, 0.80, 0.05) for s in (0, 1)]
    rows += [_row(s, "intraformer+pur lambda=3", 0.90, 0.99, 0.01) for s in (0, 1)]
    rows += [_row(0, "intraformer+group", 0.99, 0.70, 0.10)]  # not run on seed 1: not a candidate
    chosen = bench.chosen_rows(rows)
    best = bench.choose_best_variant(chosen, [0, 1], ["intraformer+pur", "intraformer+pur lambda=3",
                                                      "intraformer+group"])
    assert best == "intraformer+pur"


def test_chosen_rows_keep_the_validation_split_and_the_better_decoding(bench):
    rows = [_row(0, "intraformer", 0.90, 0.80, 0.05, decode="threshold"),
            _row(0, "intraformer", 0.93, 0.70, 0.05, decode="peak"),
            _row(0, "intraformer", 0.99, 0.60, 0.05, split="balanced")]
    skewed = bench.chosen_rows(rows)
    assert len(skewed) == 1 and skewed[0]["decode"] == "peak" and skewed[0]["F_mean"] == 0.70
    balanced = bench.chosen_rows(rows, val_split="balanced")
    assert len(balanced) == 1 and balanced[0]["F_mean"] == 0.60


def test_verdict_can_fail_and_can_pass(bench):
    def verdict(best_f, best_std):
        chosen = [_row(0, "knn", 0.9, 0.85, 0.06), _row(0, "clusformer", 0.9, 0.90, 0.04),
                  _row(0, "intraformer", 0.9, 0.91, 0.03), _row(0, "intraformer+pur one-sided", 0.9, best_f, best_std)]
        return bench.verdict_of(chosen, "intraformer+pur one-sided")

    assert verdict(0.92, 0.02)["target_met"] is True
    assert verdict(0.89, 0.02)["target_met"] is False  # below the Clusformer
    assert verdict(0.92, 0.035)["target_met"] is False  # less even than without the penalty


def test_paired_report_pairs_by_seed_and_the_report_renders(bench):
    rows = []
    for s in range(5):
        rows += [_row(s, "knn", 0.9, 0.80 + 0.001 * s, 0.06), _row(s, "clusformer", 0.9, 0.85, 0.04),
                 _row(s, "intraformer", 0.9, 0.86, 0.03), _row(s, "intraformer+pur", 0.92, 0.87 + 0.002 * s, 0.02),
                 _row(s, "intraformer+group", 0.91, 0.86, 0.025)]
    for s in (0, 1):
        rows += [_row(s, v, 0.91, 0.86, 0.03) for v in bench.SWEEP_VARIANTS]
        rows += [_row(s, m, 0.9, 0.8, 0.05, split="balanced") for m in ("knn", *bench.MAIN_VARIANTS)]
    chosen = bench.chosen_rows(rows)
    comparisons = bench.paired_report(chosen, "intraformer+pur", [0, 1])
    eqn = next(c for c in comparisons if c["a"] == "intraformer+group" and c["metric"] == "F_mean")
    expected = [0.86 - (0.87 + 0.002 * s) for s in range(5)]
    assert eqn["seeds"] == [0, 1, 2, 3, 4] and eqn["per_seed_diff"] == pytest.approx(expected)
    assert eqn["losses"] == 5
    sweep = [c for c in comparisons if c["a"] in bench.SWEEP_VARIANTS]
    assert sweep and all(c["seeds"] == [0, 1] for c in sweep)
    summary = bench.summarise(chosen)
    payload = {"benchmark": "bench_intraformer", "machine": {"date": "today", "cpu_count": 2}, "rows": rows,
               "setup": {"preset": "realistic", "seed_list": [0, 1, 2, 3, 4], "sweep_seeds": [0, 1],
                         "train_identities": 10, "train_samples": 20, "val_identities": 4, "val_samples": 9,
                         "test_identities": 8, "test_samples": 18, "val_balanced_samples": 9, "dim": 128, "k": 80,
                         "seq_len": 40, "width": 64, "epochs": 3, "batch": 128, "lr": 1e-3, "workers": 2,
                         "penalty_weight": 1.0},
               "summary": summary, "best_variant": "intraformer+pur",
               "best_variant_on_balanced_validation": None,
               "summary_by_val_split": {"skewed": summary,
                                        "balanced": bench.summarise(bench.chosen_rows(rows, val_split="balanced"))},
               "verdict": bench.verdict_of(summary, "intraformer+pur"), "verdict_per_seed": {}, "paired": comparisons}
    text = bench.markdown(payload)
    for needle in ("## Sweeps", "### lambda (upper bound)", "### cross-attention", "Validation split",
                   "open questions", "intraformer+group - intraformer+pur", "Target met: **True**"):
        assert needle in text, needle


def test_seed_plan_runs_the_sweep_seeds_first(bench):
    args = bench.parse_args(["--seeds", "3,1,4,0", "--sweep-seeds", "0,4"])
    assert bench.seed_plan(args) == ([0, 4, 3, 1], [0, 4])
    assert bench.seed_plan(bench.parse_args(["--seeds", "2,3,5"]))[1] == [2, 3]
    assert bench.seed_plan(bench.parse_args(["--seeds", "2", "--sweep-seeds", "none"])) == ([2], [])
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "intraformer+nonsense"])
