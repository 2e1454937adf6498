"""The kill harness itself: a named point kills the process with SIGKILL, only when asked, once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from dist_fair.faults import KILL_AT_ENV, KILL_ONCE_ENV, KILL_POINTS, kill_point

SCRIPT = "from dist_fair.faults import kill_point\nfor i in range(3):\n    kill_point('knn.block_searched')\n    print(i, flush=True)\n"


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in (KILL_AT_ENV, KILL_ONCE_ENV)}
    full.update(env)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=60)


def test_no_environment_means_no_kill():
    done = _run({})
    assert done.returncode == 0 and done.stdout.split() == ["0", "1", "2"]


def test_named_point_kills_with_sigkill_on_the_nth_visit():
    done = _run({KILL_AT_ENV: "knn.block_searched@2"})
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["0"]  # killed on the second visit, before printing 1


def test_other_points_are_ignored():
    done = _run({KILL_AT_ENV: "train.step,evaluate.scored"})
    assert done.returncode == 0


def test_once_marker_kills_only_the_first_process(tmp_path):
    marker = tmp_path / "killed"
    first = _run({KILL_AT_ENV: "knn.block_searched", KILL_ONCE_ENV: str(marker)})
    second = _run({KILL_AT_ENV: "knn.block_searched", KILL_ONCE_ENV: str(marker)})
    assert first.returncode == -signal.SIGKILL and marker.is_file()
    assert "knn.block_searched" in marker.read_text()
    assert second.returncode == 0 and second.stdout.split() == ["0", "1", "2"]


def test_unknown_point_is_a_programming_error():
    with pytest.raises(ValueError, match="not registered"):
        kill_point("knn.nowhere")


def test_every_point_is_described():
    assert all(isinstance(v, str) and v for v in KILL_POINTS.values())
    assert {name.split(".")[0] for name in KILL_POINTS} >= {"shards", "embed", "knn", "train", "infer",
                                                            "fair_assign", "evaluate"}
