"""dist_fair: fair clustering of million-scale face data sets.

Ray orchestrates, DeepSpeed trains, FAISS searches and WebDataset shards carry the data; the
algorithms are specified in METHODS.md. Importing this package is cheap: heavy dependencies are
imported by the stages that need them. The scikit-learn-style deep fair clusterers
(``from dist_fair import DEC, IMSAT, DFDC, FairDEC, Fairoids``) are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Lazily exported names -> the module that defines them.
_LAZY_EXPORTS = {
    "DEC": "dist_fair.deep.estimators",
    "IMSAT": "dist_fair.deep.estimators",
    "DFDC": "dist_fair.deep.estimators",
    "FairDEC": "dist_fair.deep.estimators",
    "Fairoids": "dist_fair.deep.estimators",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_fair' has no attribute {name!r}")
