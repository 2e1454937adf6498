"""Training: Ray Train workers, each running a DeepSpeed engine (DESIGN.md, "Engines").

Public surface (imported lazily, so ``import dist_fair.train`` costs nothing and commands that do
not train never import torch, Ray or DeepSpeed):

- :class:`TrainTask`, :class:`TrainContext` (``dist_fair.train.task``): what a model provides;
- :func:`fit`, :class:`TrainResult` (``dist_fair.train.engine``): train a task;
- :func:`probe_task` (``dist_fair.train.probe``): the built-in identity probe;
- :func:`load_model_weights` (``dist_fair.train.checkpoint``): the trained weights.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainTask": "dist_fair.train.task",
    "TrainContext": "dist_fair.train.task",
    "fit": "dist_fair.train.engine",
    "TrainResult": "dist_fair.train.engine",
    "FaultInjection": "dist_fair.train.engine",
    "load_deepspeed_config": "dist_fair.train.engine",
    "probe_task": "dist_fair.train.probe",
    "identity_blobs": "dist_fair.train.probe",
    "load_model_weights": "dist_fair.train.checkpoint",
    "read_metrics": "dist_fair.train.progress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_fair.train' has no attribute {name!r}")
