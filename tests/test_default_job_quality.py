"""Regression test of the default job (`make run` = `dist-fair run` with the defaults) at its fixed
seed: the full-size job (the realistic preset, 20,000 identities / ~46K faces, 4 epochs on 2 Ray
Train workers), run as a user runs it, must keep its measured quality (seed 0: Intraformer pairwise
F 0.921, BCubed F 0.814, per-race mean F 0.832; kNN baseline 0.793 / 0.817 / 0.748) above floors
below those numbers, and the Intraformer must beat the baseline on pairwise F and on the mean
per-race F. Not asserted, because it is not so: a lower per-race F std than the baseline's (0.102
vs 0.098 at seed 0; benchmarks/results/bench_intraformer.md studies it). Two to three minutes on
an idle 2-core machine, so it is in the slow suite (CI runs it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the trained model moves between runs (CPU training is not bit-reproducible across processes), the kNN
# baseline does not: its floors are tight
FLOORS = {"intraformer": {"pairwise_f": 0.85, "bcubed_f": 0.77}, "kNN baseline": {"pairwise_f": 0.78, "bcubed_f": 0.80}}


@pytest.mark.slow
def test_default_job_quality_floor(tmp_path):
    run_dir = tmp_path / "runs" / "default"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu")
    # a RELATIVE run folder, as `make run` passes it: Ray Train workers run elsewhere and must get absolute paths
    done = subprocess.run([sys.executable, "-m", "dist_fair.cli", "run", "--run-dir", "runs/default"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    rows = {row["method"]: row for row in report["comparison"]}
    assert set(rows) == set(FLOORS)
    for method, floors in FLOORS.items():
        for metric, floor in floors.items():
            assert rows[method][metric] >= floor, f"{method} {metric} {rows[method][metric]:.4f} fell below {floor}"
    assert rows["intraformer"]["pairwise_f"] > rows["kNN baseline"]["pairwise_f"] + 0.03
    assert rows["intraformer"]["attributes"]["race"]["f_mean"] > rows["kNN baseline"]["attributes"]["race"]["f_mean"]
