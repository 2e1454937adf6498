"""The two collectives the distributed fair assignment needs, and the single-process identity.

The scalable solver (:mod:`dist_fair.fair.auction`, :mod:`dist_fair.fair.finish`) is written once
as SPMD code: every worker runs it on its own samples and calls, in the same order, only

- ``allreduce_sum(x)``: the element-wise sum of ``x`` over workers (returned to every worker);
- ``allgather(x)``: the list of every worker's array, in rank order (shapes may differ along
  axis 0).

Integer arrays are summed exactly, so every decision the solver takes (all of them rest on
integer counts, exact order statistics or data gathered in a canonical order) is the same however
the samples are split: W workers return the labels one process returns.

Implementations: :class:`LocalReducer` (one process; the identity), the Ray coordinator in
:mod:`dist_fair.fair.distributed`, and any adapter over ``torch.distributed`` (e.g. the training
engine's ``dist_fair.train.collective``: ``all_reduce`` with SUM for ``allreduce_sum``,
``all_gather_object`` or padded ``all_gather`` for ``allgather``).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Reducer(Protocol):
    """Collectives over the workers of one fair-assignment solve."""

    rank: int
    world_size: int

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        """Element-wise sum over workers (exact for integer dtypes)."""

    def allgather(self, x: np.ndarray) -> list[np.ndarray]:
        """Every worker's array, in rank order."""


class LocalReducer:
    """One worker: both collectives are the identity."""

    rank = 0
    world_size = 1

    def allreduce_sum(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, copy=True)

    def allgather(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(x)]


def broadcast(reducer: Reducer, x: np.ndarray | None, dtype: np.dtype | type) -> np.ndarray:
    """Rank 0's array on every worker (others pass None)."""
    if reducer.world_size == 1:
        return np.asarray(x, dtype=dtype)
    mine = np.asarray(x, dtype=dtype) if reducer.rank == 0 else np.zeros(0, dtype=dtype)
    return reducer.allgather(mine)[0]


def allreduce_max(reducer: Reducer, x: np.ndarray) -> np.ndarray:
    """Element-wise maximum over workers."""
    if reducer.world_size == 1:
        return np.array(x, copy=True)
    return np.max(np.stack(reducer.allgather(np.asarray(x))), axis=0)


def allgather_concat(reducer: Reducer, x: np.ndarray) -> np.ndarray:
    """Every worker's rows concatenated in rank order."""
    if reducer.world_size == 1:
        return np.asarray(x)
    parts = reducer.allgather(np.asarray(x))
    return np.concatenate(parts, axis=0)


def agree_on_error(reducer: Reducer, error: Exception | None) -> None:
    """Collective error check: if any worker passes an error, every worker raises the lowest rank's
    (so no worker is left waiting in a later collective). Call on every worker."""
    from dist_fair import errors

    if reducer.world_size == 1:
        if error is not None:
            raise error
        return
    text = b"" if error is None else f"{type(error).__name__}\x00{error}".encode("utf-8")
    for part in reducer.allgather(np.frombuffer(text, dtype=np.uint8)):
        if part.size:
            name, message = bytes(part).decode("utf-8").split("\x00", 1)
            cls = getattr(errors, name, errors.DistFairError)
            if error is not None and type(error).__name__ == name and str(error) == message:
                raise error
            raise cls(message)
