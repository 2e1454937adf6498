"""Global fair assignment (METHODS.md §6): the fairest labels closest to a model's soft assignments.

One entry point, :func:`fair_assign`; :func:`solve_shard` is the same solver for one worker of a
distributed job (collectives through a :class:`~dist_fair.collective.Collective`);
:func:`fair_assign_ray` runs it on Ray actors. Targets, exact reference solvers and the LP live in their own modules.
"""
from dist_fair.fair.assign import FairAssignReport, FairAssignResult, fair_assign, solve_shard
from dist_fair.fair.auction import AuctionOptions, Shard
from dist_fair.fair.candidates import Candidates, dense_candidates, sparse_candidates, top_m_candidates
from dist_fair.fair.finish import FinishOptions
from dist_fair.fair.targets import FairTargets, compute_targets

__all__ = [
    "AuctionOptions", "Candidates", "FairAssignReport", "FairAssignResult", "FairTargets", "FinishOptions",
    "Shard", "compute_targets", "dense_candidates", "fair_assign", "fair_assign_ray",
    "solve_shard", "sparse_candidates", "top_m_candidates",
]


def __getattr__(name: str):
    if name == "fair_assign_ray":  # imports Ray lazily
        from dist_fair.fair.distributed import fair_assign_ray

        return fair_assign_ray
    raise AttributeError(name)
