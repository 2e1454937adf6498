"""The ``knn`` stage: the kNN graph of every sample (METHODS.md §3; :func:`dist_fair.knn.build_knn_graph`)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .stage import JobContext, StageOutcome


def knn_stage(ctx: JobContext, shards: StageOutcome) -> StageOutcome:
    """``<run>/knn/nbrs.npy`` and ``sims.npy`` (N x k) on Ray index actors."""
    config = ctx.config

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.knn.graph import build_knn_graph

        result = build_knn_graph(shards.folder, folder, config.knn, resume=False)
        return {"k": result.k, "index": result.index, "workers": result.workers, "recall_at_k": result.recall_at_k,
                "same_identity_recall": result.same_identity_recall, "timings": result.timings}

    return ctx.stage("knn", "knn", asdict(config.knn), [shards]).run(work)


__all__ = ["knn_stage"]
