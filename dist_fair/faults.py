"""Fault injection: kill the process at a named point of a stage (the kill harness of the tests).

A stage marks the places where a crash would hurt most with ``kill_point("knn.block_searched")``.
Nothing happens unless the environment asks for it:

- ``DIST_FAIR_KILL_AT=<point>`` (several separated by commas) kills the process that reaches the
  point, with ``SIGKILL``: no ``finally`` block, no atexit handler, no flush - what an
  out-of-memory kill, a pre-empted node or ``kill -9`` does. ``<point>@<n>`` kills on the n-th
  time the point is reached in that process (default: the first).
- ``DIST_FAIR_KILL_ONCE=<file>``: the kill happens only while ``<file>`` does not exist, and the
  file is created just before it. Inside a Ray task or actor this kills ONE worker process once:
  Ray's retry (or actor restart) then runs the same code again without being killed, so the stage
  must finish with the same outputs as an uninterrupted run.

Ray worker processes started by a local ``ray.init`` inherit the driver's environment, so the
variables set for a ``dist-fair`` command reach its workers too; on a running cluster pass them in
the job's runtime environment (``env_vars``).

The points are listed in :data:`KILL_POINTS`; the tests (``tests/test_kill_resume.py``) kill each
one and check that a rerun finishes with outputs equal to those of an uninterrupted run.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

LOG = logging.getLogger(__name__)

KILL_AT_ENV = "DIST_FAIR_KILL_AT"
KILL_ONCE_ENV = "DIST_FAIR_KILL_ONCE"

#: Every point a stage marks, with where it is.
KILL_POINTS: dict[str, str] = {
    "shards.shard_written": "a shard file and its receipt are written, the manifest is not (data/shards.py)",
    "embed.shard_written": "an embedding shard is written, the manifest is not (data/shards.py, embed stage)",
    "knn.block_searched": "one query block of the kNN search is merged, the graph files are not final "
                          "(knn/graph.py)",
    "train.step": "an optimizer step of a Ray Train worker (train/engine.py)",
    "infer.task_done": "one Ray inference task wrote its rows, the probabilities file is not final "
                       "(models/edge_inference.py)",
    "fair_assign.solved": "the fair assignment is solved, labels.npy is not written (fair/cli.py)",
    "evaluate.scored": "the metrics are computed, the report is not written (eval/cli.py)",
}

_counts: dict[str, int] = {}


def _requested() -> dict[str, int]:
    wanted: dict[str, int] = {}
    for item in os.environ.get(KILL_AT_ENV, "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition("@")
        wanted[name] = int(nth) if nth.isdigit() and int(nth) >= 1 else 1
    return wanted


def kill_point(name: str) -> None:
    """Kill this process with SIGKILL if ``DIST_FAIR_KILL_AT`` names ``name`` (see the module
    docstring); otherwise return at once."""
    if name not in KILL_POINTS:
        raise ValueError(f"kill point {name!r} is not registered in dist_fair.faults.KILL_POINTS")
    if KILL_AT_ENV not in os.environ:
        return
    nth = _requested().get(name)
    if nth is None:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] != nth:
        return
    once = os.environ.get(KILL_ONCE_ENV)
    if once:
        marker = Path(once)
        try:
            with open(marker, "x", encoding="utf-8") as handle:  # atomic: only one process wins
                handle.write(f"{name} pid {os.getpid()}\n")
        except FileExistsError:
            return
    LOG.warning("fault injection: killing pid %d at %s", os.getpid(), name)
    os.kill(os.getpid(), signal.SIGKILL)
