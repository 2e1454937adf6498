"""dist_fair.eval.report, several methods: the comparison table opens the job's report, its numbers
are those of each method's own report (checked against sklearn-free brute force where it counts),
the plot shows every method, plots=False writes none."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dist_fair.eval.report import (comparison_rows, evaluate_labels, plot_per_group_f_by_method, render_comparison,
                                   write_job_report)


def _pairwise_f_brute(truth, pred):
    """Pairwise F over all ordered pairs i != j (METHODS.md §7, P = tk/pk, R = tk/qk)."""
    same_t = truth[:, None] == truth[None, :]
    same_p = pred[:, None] == pred[None, :]
    off = ~np.eye(len(truth), dtype=bool)
    tk, pk, qk = (same_t & same_p & off).sum(), (same_p & off).sum(), (same_t & off).sum()
    p, r = tk / pk, tk / qk
    return 2 * p * r / (p + r)


@pytest.fixture
def methods():
    rng = np.random.default_rng(3)
    identity = np.repeat(np.arange(12), 5)
    group = identity % 3
    good = identity.copy()
    good[rng.choice(60, 6, replace=False)] = 99  # a few mistakes
    coarse = identity // 2  # pairs of identities merged
    attrs, names = {"race": group}, {"race": ["a", "b", "c"]}
    return {"model": evaluate_labels(good, identity, attrs=attrs, attribute_names=names),
            "baseline": evaluate_labels(coarse, identity, attrs=attrs, attribute_names=names)}, identity, good, coarse


def test_rows_and_table_carry_each_methods_numbers(methods):
    reports, identity, good, coarse = methods
    rows = comparison_rows(reports)
    assert [r["method"] for r in rows] == ["model", "baseline"]
    assert rows[0]["pairwise_f"] == pytest.approx(_pairwise_f_brute(identity, good))
    assert rows[1]["pairwise_f"] == pytest.approx(_pairwise_f_brute(identity, coarse))
    per_group = [_pairwise_f_brute(identity[identity % 3 == t], good[identity % 3 == t]) for t in range(3)]
    assert rows[0]["attributes"]["race"]["f_mean"] == pytest.approx(np.mean(per_group))
    assert rows[0]["attributes"]["race"]["f_std"] == pytest.approx(np.std(per_group))  # population std
    table = render_comparison(reports)
    assert table[0].startswith("| method | pairwise F | BCubed F | race: per-group F mean | race: F std |")
    assert table[2].startswith(f"| model | {rows[0]['pairwise_f']:.4f} |") and table[3].startswith("| baseline |")
    assert "balance" not in table[0] and "race: balance" in render_comparison(reports, fairness=True)[0]


def test_job_report_opens_with_the_comparison_and_draws_every_method(methods, tmp_path):
    reports, *_ = methods
    written = write_job_report(reports, tmp_path, "title", evaluated_on="the test identities", facts=["a fact"])
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# title")
    assert markdown.index("## Comparison") < markdown.index("## model") < markdown.index("## baseline")
    assert "- a fact" in markdown
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["method"] == "model" and payload["identity"] == reports["model"]["identity"]
    assert set(payload["methods"]) == {"model", "baseline"} and len(payload["comparison"]) == 2
    assert written["plot"].read_bytes()[:4] == b"\x89PNG"
    assert plot_per_group_f_by_method({"x": {"attributes": {}}}) is None
    (tmp_path / "none").mkdir()
    assert "plot" not in write_job_report(reports, tmp_path / "none", "t", plots=False)
    assert not (tmp_path / "none" / "report.png").exists()
