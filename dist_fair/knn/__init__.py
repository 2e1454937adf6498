"""The kNN graph stage (METHODS.md §3; DESIGN.md "[knn]"): FAISS index shards held by Ray actors,
every query block searched on every shard, per-shard top-k merged exactly with global ids.

Public entry point: :func:`build_knn_graph` (the pipeline's kNN stage and ``dist-fair knn`` both
call it); :func:`is_complete` / :func:`graph_params` tell whether a stage folder can be reused,
:func:`load_knn_graph` reads ``nbrs.npy`` / ``sims.npy`` memory-mapped.

Names are imported lazily, so ``dist_fair.knn.cli`` (and ``dist-fair --help``) load no numpy,
faiss or Ray.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["build_knn_graph", "KNNResult", "is_complete", "graph_params", "load_knn_graph", "partition_rows",
           "NBRS_NAME", "SIMS_NAME", "INFO_NAME"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("dist_fair.knn.graph"), name)
    raise AttributeError(f"module 'dist_fair.knn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
