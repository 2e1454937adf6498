"""Training losses (METHODS.md §4): soft Fowlkes-Mallows, purity and the purity penalties, BCE
(``clustering.py``). Imported lazily so that ``import dist_fair.losses`` does not import torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {name: "dist_fair.losses.clustering" for name in (
    "LossConfig", "clustering_loss", "soft_counts", "soft_fowlkes_mallows", "purity", "purity_penalty",
    "one_sided_purity_penalty", "group_purity_means", "group_purity_spread", "masked_bce", "PENALTIES")}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_fair.losses' has no attribute {name!r}")
