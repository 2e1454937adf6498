"""The scalable fair assignment on Ray actors (METHODS.md §6, "At scale").

Each :class:`_FairWorker` actor holds one contiguous share of the samples (their candidate lists
and groups) and runs :func:`dist_fair.fair.assign.solve_shard` on it; its collectives are a
:class:`~dist_fair.collective.RayCollective`, whose coordinator actor waits for every worker's
contribution to step s and hands the list back to all of them.
Per collective a worker sends O(T K) numbers (counts, prices, radix histograms) - never its
probabilities - except once per finish step, when the cell-to-cell exchange edges (a few per cell)
and the samples left unassigned by the auction are gathered.

Inside a training job the engine's :class:`~dist_fair.collective.TorchCollective`
(``torch.distributed``) implements the same protocol, and every rank calls :func:`solve_shard`
directly (the deep fair clustering task, ``dist_fair/deep/task.py``); this module is for running
the fair assignment on its own, from a driver: ``dist-fair fair-assign --workers N`` (N > 1) and
``dist_fair.fair.fair_assign_ray``. The pipeline does not call it.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from dist_fair.collective import RayCollective, start_ray_coordinator
from dist_fair.errors import DataError, DistFairError
from dist_fair.fair.assign import FairAssignReport, FairAssignResult, as_candidates
from dist_fair.fair.auction import AuctionOptions
from dist_fair.fair.finish import FinishOptions

LOG = logging.getLogger(__name__)


def _worker_class():
    """The Ray actor class, created lazily so that importing this module does not import Ray."""
    import ray

    @ray.remote
    class _FairWorker:
        """Holds one share of the samples and solves SPMD with the others."""

        def __init__(self, rank: int, world_size: int, coordinator, value: np.ndarray, index: np.ndarray | None,
                     n_clusters: int, groups: np.ndarray, ids: np.ndarray) -> None:
            from dist_fair.fair.auction import Shard
            from dist_fair.fair.candidates import Candidates

            self.shard = Shard(Candidates(value, index, n_clusters), groups, ids)
            self.collective = RayCollective(coordinator, rank, world_size)

        def solve(self, kwargs: dict) -> tuple[np.ndarray, np.ndarray, dict]:
            from dist_fair.fair.assign import solve_shard

            labels, report = solve_shard(self.shard, self.collective, **kwargs)
            return self.shard.ids, labels, report.to_dict()

    return _FairWorker


def fair_assign_ray(probs: Any, groups: np.ndarray, rho: Any = None, eps: float = 0.0, top_m: int | None = None, *,
                    num_workers: int = 2, targets: np.ndarray | None = None, n_groups: int | None = None,
                    auction_options: AuctionOptions | None = None, finish_options: FinishOptions | None = None,
                    spread: bool = True) -> FairAssignResult:
    """:func:`~dist_fair.fair.assign.fair_assign` (method "auction") on ``num_workers`` Ray actors.

    The samples are split into contiguous shares, one per actor; labels come back in input order
    and equal the single-process result (every decision is split-independent). Ray must be
    initialised or startable (:func:`dist_fair.ray_runtime.init_ray`).

    Args:
        probs, groups, rho, eps, top_m, targets, n_groups: as for ``fair_assign``.
        num_workers: actors (each takes one CPU).
        spread: place the actors on different nodes when possible.
    """
    import ray

    from dist_fair.fair.targets import check_groups
    from dist_fair.ray_runtime import init_ray

    if num_workers < 1:
        raise DataError(f"num_workers must be >= 1, got {num_workers}")
    start = time.perf_counter()
    cands = as_candidates(probs, top_m)
    groups = np.asarray(groups)
    t_given = len(rho) if rho is not None else (np.asarray(targets).shape[0] if targets is not None else n_groups)
    groups, _ = check_groups(groups, cands.num_samples, t_given)
    init_ray()
    worker_cls = _worker_class()
    coordinator = start_ray_coordinator(num_workers)
    bounds = np.linspace(0, cands.num_samples, num_workers + 1).astype(np.int64)
    options = {"scheduling_strategy": "SPREAD"} if spread else {}
    workers = []
    for rank in range(num_workers):
        rows = slice(int(bounds[rank]), int(bounds[rank + 1]))
        workers.append(worker_cls.options(num_cpus=1, **options).remote(
            rank, num_workers, coordinator, np.ascontiguousarray(cands.value[rows]),
            None if cands.index is None else np.ascontiguousarray(cands.index[rows]), cands.n_clusters,
            groups[rows], np.arange(bounds[rank], bounds[rank + 1], dtype=np.int64)))
    kwargs = dict(n_groups=n_groups, rho=rho, eps=eps, targets=targets, top_m=top_m,
                  auction_options=auction_options, finish_options=finish_options)
    try:
        outputs = ray.get([w.solve.remote(kwargs) for w in workers])
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, DistFairError):
            raise cause from None
        raise
    finally:
        for actor in [*workers, coordinator]:
            ray.kill(actor)
    labels = np.empty(cands.num_samples, dtype=np.int64)
    for ids, part, _ in outputs:
        labels[ids] = part
    report = FairAssignReport(**outputs[0][2])
    report.seconds = time.perf_counter() - start
    LOG.info("fair assignment on %d Ray workers: objective %.6f, gap %.3g", num_workers, report.objective,
             report.gap)
    return FairAssignResult(labels, report)
