"""Deep (fair) clustering: scikit-learn-style estimators for data in memory and the training task
that runs the same models distributed through the engine (METHODS.md §5, §6).

- :class:`DEC`, :class:`IMSAT`, :class:`DFDC`, :class:`FairDEC`, :class:`Fairoids`
  (``dist_fair.deep.estimators``): ``fit(X, groups)``, ``predict(X)``, ``labels_``, ``fair_labels_``;
- :func:`deep_task` (``dist_fair.deep.task``): the :class:`~dist_fair.train.task.TrainTask` of a
  method over shards or arrays, for :func:`dist_fair.train.engine.fit`.

Imports are lazy: ``import dist_fair.deep`` does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEC": "dist_fair.deep.estimators",
    "IMSAT": "dist_fair.deep.estimators",
    "DFDC": "dist_fair.deep.estimators",
    "FairDEC": "dist_fair.deep.estimators",
    "Fairoids": "dist_fair.deep.estimators",
    "adaptive_vat_eps": "dist_fair.deep.estimators",
    "pretrain_autoencoder": "dist_fair.deep.estimators",
    "deep_task": "dist_fair.deep.task",
    "train_deep": "dist_fair.deep.task",
    "build_deep_task": "dist_fair.deep.task",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_fair.deep' has no attribute {name!r}")
