"""benchmarks/bench_deep_fair.py: every target can fail (issue 16) and the table recomputes from a results file."""
from __future__ import annotations

import json

import pytest

from conftest import load_benchmark

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_deep_fair")


def _row(dataset, method, labels, acc, nmi, balance):
    return {"dataset": dataset, "method": method, "labels": labels, "acc_mean": acc, "nmi_mean": nmi,
            "balance_mean": balance}


def test_targets_use_the_networks_own_labels_and_can_fail(bench):
    # an unfair network (balance 0) whose separate fair assignment is perfectly balanced: must fail
    rows = [_row("mnist_usps", "dfdc", "net", 0.95, 0.90, 0.0), _row("mnist_usps", "dfdc", "fair", 0.94, 0.89, 1.0),
            _row("reverse_mnist", "dfdc", "net", 0.60, 0.70, 0.50), _row("reverse_mnist", "dfdc", "fair", 0.59, 0.69, 1.0)]
    targets = bench.check_targets(rows)
    assert targets["mnist_usps: DFDC (conv net) network labels balance >= 0.119 (published 0.119)"]["met"] is False
    assert targets["reverse_mnist: DFDC (conv net) network labels balance >= 0.946 (published 0.946)"]["met"] is False
    assert targets["mnist_usps: DFDC (conv net) network labels ACC >= 0.899 (published 0.939)"]["met"] is True
    assert not any("fair-assignment" in name for name in targets)
    # the published numbers themselves meet every target
    published = [_row(d, "dfdc", "net", *bench.PUBLISHED[(d, "dfdc", "net")]) for d in ("mnist_usps", "reverse_mnist")]
    assert all(t["met"] for t in bench.check_targets(published).values())
    assert len(bench.check_targets(published)) == 6


def test_recompute_from_results_file(bench, tmp_path):
    runs = []
    for seed, (acc, bal) in enumerate([(0.90, 0.12), (0.92, 0.10)]):
        runs.append({"dataset": "mnist_usps", "method": "dfdc", "seed": seed, "seconds": 1.0, "config": {},
                     "scores": {"net_acc": acc, "net_nmi": 0.85, "net_balance": bal, "net_fairness": 0.5,
                                "net_fwd": 0.1, "fair_acc": acc, "fair_nmi": 0.85, "fair_balance": 0.121,
                                "fair_fairness": 0.9, "fair_fwd": 0.05}})
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"benchmark": "old", "machine": {"cpus": 2}, "rows": [], "config": {"seeds": [0, 1]},
                                "targets": {}, "runs": runs, "curves_seed0": {}}))
    loaded, payload = bench.runs_from_results(path)
    rows = bench.summarise(loaded, ["mnist_usps"], ["dfdc"])
    net = next(r for r in rows if r["labels"] == "net")
    assert net["acc_mean"] == pytest.approx(0.91) and net["balance_mean"] == pytest.approx(0.11)
    targets = bench.check_targets(rows)
    assert targets["mnist_usps: DFDC (conv net) network labels balance >= 0.119 (published 0.119)"]["met"] is False
    assert targets["mnist_usps: DFDC (conv net) network labels ACC >= 0.899 (published 0.939)"]["met"] is True
