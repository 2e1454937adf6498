"""Clustering models over kNN sequences (METHODS.md §4): the Intraformer and the Clusformer
baseline (``intraformer.py``; their training task is ``dist_fair.tasks.sequence_task``) and
inference on Ray workers writing edge probabilities (``edge_inference.py``).

Imported lazily so that ``import dist_fair.models`` does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelSpec": "dist_fair.models.intraformer",
    "SequenceClusterer": "dist_fair.models.intraformer",
    "build_model": "dist_fair.models.intraformer",
    "sub_cluster_bounds": "dist_fair.models.intraformer",
    "CROSS_MODES": "dist_fair.models.intraformer",
    "predict_edge_probs": "dist_fair.models.edge_inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_fair.models' has no attribute {name!r}")
