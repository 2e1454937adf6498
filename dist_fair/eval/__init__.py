"""Evaluation (METHODS.md §7): clustering quality and fairness metrics, per-group scores, reports.

``metrics`` holds the pure metric functions over label arrays; ``report`` turns labels into a
report dictionary and writes it as JSON, Markdown and PNG; ``cli`` is ``dist-fair evaluate``.

The metric functions are re-exported lazily, so importing ``dist_fair.eval.cli`` (which the
``dist-fair`` command does for ``--help``) does not import numpy.
"""
from __future__ import annotations

from typing import Any

__all__ = [
    "accuracy", "balance", "bcubed_fscore", "fairness", "fwd", "nmi", "pairwise_fscore",
    "per_group_scores", "evaluate_labels", "write_report",
]

_HOMES = {name: "dist_fair.eval.metrics" for name in __all__[:8]}
_HOMES.update(evaluate_labels="dist_fair.eval.report", write_report="dist_fair.eval.report")


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'dist_fair.eval' has no attribute {name!r}")
