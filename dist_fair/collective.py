"""The collective protocol: global quantities over the workers of one job (DESIGN.md, bottom floor).

Some numbers must be computed over ALL the data although each worker holds only its share: the
mean purity ``gamma_f`` of METHODS.md §4 (a ``(sum, count)`` mean over the global batch), the
cluster sizes ``|C_j|`` and per-(group, cluster) counts ``n_tj`` of §6, the fair-assignment
auction's counts, prices and radix histograms (§6, "At scale"). Algorithms (losses, solvers) are
written once as SPMD code against the small :class:`Collective` protocol - every worker calls the
same collectives in the same order - and know nothing of the engine that moves the bytes.

Primitives (every implementation provides them):

- ``all_reduce_sum(value)``: the element-wise sum ``sum_w value_w``, on every worker;
- ``all_gather(array)``: ``[array_0, ..., array_{W-1}]`` in rank order (rows may differ per worker,
  dtype and trailing shape must agree);
- ``broadcast(array, src)``: rank ``src``'s array on every worker (the others pass None);
- ``barrier()``; ``rank`` and ``world_size``.

Derived collectives are module functions over any implementation, written once:
:func:`all_reduce_mean`, :func:`all_reduce_max`, :func:`all_gather_concat`, :func:`global_mean`,
:func:`global_bincount`, :func:`global_group_cluster_counts`, :func:`agree_on_error`.

Implementations:

- :class:`LocalCollective`: one process (W = 1; every collective is the identity on the local data);
- :class:`TorchCollective`: the default ``torch.distributed`` process group (the one Ray Train
  creates and DeepSpeed reuses; gloo on CPU, nccl on GPU); the identity outside an initialised
  group, so a loss runs unchanged in a unit test;
- :class:`RayCollective`: Ray actors meeting at a coordinator actor (:func:`start_ray_coordinator`),
  for SPMD jobs outside a training group (``dist_fair.fair.distributed.fair_assign_ray``).

Values (the same rules in every implementation). Sums travel as float64 (int64 for integer and
bool input), so that results do not depend on how the data is split, and come back in the input's
type: a ``torch.Tensor`` stays a tensor (same dtype and device, detached: no gradient flows
through a collective), a NumPy array stays an array of its dtype, a Python int stays an int and
any other number a float. Gathered and broadcast arrays come back as NumPy arrays of the sender's
dtype (a 0-dim array is gathered as shape ``(1,)``). Every result is a NEW object: an input is
never modified, whatever the number of workers.

The defining property, tested for W = 1, 2 and 3: an aggregate over W workers equals the same
aggregate computed by one worker over the union of their data.
"""
from __future__ import annotations

import sys
import zlib
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Collective", "LocalCollective", "RayCollective", "TorchCollective", "agree_on_error", "all_gather_concat",
    "all_reduce_max", "all_reduce_mean", "default_collective", "global_bincount", "global_group_cluster_counts",
    "global_mean", "start_ray_coordinator",
]


@runtime_checkable
class Collective(Protocol):
    """Collectives over the workers of one SPMD job (see the module docstring for the value rules)."""

    @property
    def rank(self) -> int:
        """This worker, ``0 .. world_size - 1``."""

    @property
    def world_size(self) -> int:
        """Number of workers W."""

    def all_reduce_sum(self, value: Any) -> Any:
        """``sum_w value_w`` (same shape on every worker), in the input's type, on every worker."""

    def all_gather(self, array: Any) -> list[np.ndarray]:
        """Every worker's array, in rank order."""

    def broadcast(self, array: Any, src: int = 0) -> np.ndarray:
        """Rank ``src``'s array on every worker (the others' ``array`` is ignored; pass None)."""

    def barrier(self) -> None:
        """Return once every worker has called it."""


# ----------------------------------------------------------------------------- value conversion
def _torch_tensor_type() -> type | None:
    """``torch.Tensor`` if torch is already imported (this module never imports torch for NumPy input)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def _is_tensor(value: Any) -> bool:
    tensor_type = _torch_tensor_type()
    return tensor_type is not None and isinstance(value, tensor_type)


def _wide_dtype_of_array(array: np.ndarray) -> type:
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        return np.int64
    if np.issubdtype(array.dtype, np.floating):
        return np.float64
    raise TypeError(f"collective: cannot reduce an array of dtype {array.dtype}; pass numbers, numeric NumPy "
                    "arrays or real-valued torch tensors")


def _restorer(value: Any) -> Callable[[np.ndarray], Any]:
    """The function that turns a wide NumPy result back into ``value``'s type (a new object)."""
    if _is_tensor(value):
        import torch

        dtype, device = value.dtype, value.device
        return lambda wide: torch.from_numpy(np.ascontiguousarray(wide)).to(device=device, dtype=dtype)
    if isinstance(value, np.ndarray):
        dtype = value.dtype
        return lambda wide: np.asarray(wide).astype(dtype, copy=False)
    if isinstance(value, (bool, int, np.integer)):
        return lambda wide: int(np.asarray(wide).reshape(-1)[0])
    return lambda wide: float(np.asarray(wide).reshape(-1)[0]) if np.asarray(wide).size == 1 else np.asarray(wide)


def _wide_copy(value: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """``(a NEW float64 / int64 NumPy copy of value, the function restoring value's type)``."""
    if _is_tensor(value):
        if value.is_complex():
            raise TypeError(f"collective: cannot reduce a complex tensor ({value.dtype}); pass real values")
        array = value.detach().cpu().numpy()
    else:
        array = np.asarray(value)
    wide = np.array(array, dtype=_wide_dtype_of_array(array), copy=True)
    return wide, _restorer(value)


def _as_numpy(array: Any) -> np.ndarray:
    """A NumPy view of ``array`` (a tensor is detached and moved to the CPU)."""
    if _is_tensor(array):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _gather_signature(array: np.ndarray) -> int:
    """A number that two workers' arrays share iff they agree on dtype and trailing shape."""
    return zlib.crc32(repr((array.dtype.str, array.shape[1:])).encode())


def _mismatch_error(rank: int, array: np.ndarray) -> ValueError:
    return ValueError(f"all_gather: rank {rank} has an array of dtype {array.dtype} and shape "
                      f"(*, {', '.join(map(str, array.shape[1:]))}), but the workers disagree on dtype or "
                      "trailing shape; every worker must pass the same dtype and the same shape[1:]")


# ----------------------------------------------------------------------------- one process
class LocalCollective:
    """One worker (W = 1): every collective is the identity on the local data (returned as a copy)."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, value: Any) -> Any:
        wide, restore = _wide_copy(value)
        return restore(wide)

    def all_gather(self, array: Any) -> list[np.ndarray]:
        local = np.array(_as_numpy(array), copy=True)
        return [local.reshape(1) if local.ndim == 0 else local]

    def broadcast(self, array: Any, src: int = 0) -> np.ndarray:
        if src != 0:
            raise ValueError(f"broadcast: src={src} but a single-process collective has only rank 0")
        return np.array(_as_numpy(array), copy=True)

    def barrier(self) -> None:
        return None


# ----------------------------------------------------------------------------- torch.distributed
def _dist():
    import torch.distributed as dist

    return dist


def _group_initialised() -> bool:
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


class TorchCollective:
    """The collectives over the default ``torch.distributed`` process group (Ray Train workers,
    DeepSpeed); the identity (like :class:`LocalCollective`) outside an initialised group of W > 1.

    Stateless: every instance talks to the same default group, so instances are cheap and picklable.
    """

    @property
    def rank(self) -> int:
        return _dist().get_rank() if _group_initialised() else 0

    @property
    def world_size(self) -> int:
        return _dist().get_world_size() if _group_initialised() else 1

    @staticmethod
    def is_distributed() -> bool:
        """True inside an initialised process group with more than one worker."""
        return _group_initialised() and _dist().get_world_size() > 1

    @staticmethod
    def _device():
        """Device the backend exchanges tensors on: CUDA for nccl, CPU otherwise."""
        import torch

        if _group_initialised() and _dist().get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_sum(self, value: Any) -> Any:
        import torch

        if _is_tensor(value) and not value.is_complex():
            # stays on its device; copy=True: the in-place all_reduce never writes into the caller's tensor
            wide_dtype = torch.float64 if value.is_floating_point() else torch.int64
            wire = value.detach().to(device=self._device(), dtype=wide_dtype, copy=True).contiguous()
            if self.is_distributed():
                _dist().all_reduce(wire)
            return wire.to(device=value.device, dtype=value.dtype)
        wide, restore = _wide_copy(value)  # a new array: from_numpy shares it, never the caller's memory
        if not self.is_distributed():
            return restore(wide)
        wire = torch.from_numpy(wide).to(self._device())
        _dist().all_reduce(wire)
        return restore(wire.cpu().numpy())

    def all_gather(self, array: Any) -> list[np.ndarray]:
        import torch

        local = np.array(_as_numpy(array), copy=True)
        if local.ndim == 0:
            local = local.reshape(1)
        if not self.is_distributed():
            return [local]
        dist, device, world = _dist(), self._device(), self.world_size
        # one round for the shapes: rows per worker, and a check that trailing shapes and dtypes agree
        meta = np.array([local.shape[0], local.ndim, _gather_signature(local)], dtype=np.int64)
        metas = [torch.zeros(3, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(metas, torch.from_numpy(meta).to(device))
        metas_np = [m.cpu().numpy() for m in metas]
        if any(m[1] != meta[1] or m[2] != meta[2] for m in metas_np):
            raise _mismatch_error(self.rank, local)
        rows = [int(m[0]) for m in metas_np]
        row_bytes = local.dtype.itemsize * int(np.prod(local.shape[1:], dtype=np.int64))
        raw = np.ascontiguousarray(local).view(np.uint8).reshape(local.shape[0], row_bytes) if local.size else \
            np.zeros((local.shape[0], row_bytes), np.uint8)
        padded = np.zeros((max(rows), row_bytes), dtype=np.uint8)
        padded[: raw.shape[0]] = raw
        outs = [torch.zeros((max(rows), row_bytes), dtype=torch.uint8, device=device) for _ in range(world)]
        dist.all_gather(outs, torch.from_numpy(padded).to(device))
        result = []
        for out, n in zip(outs, rows):
            chunk = np.ascontiguousarray(out.cpu().numpy()[:n])
            result.append(chunk.view(local.dtype).reshape((n, *local.shape[1:])))
        return result

    def broadcast(self, array: Any, src: int = 0) -> np.ndarray:
        import torch

        if not self.is_distributed():
            return np.array(_as_numpy(array), copy=True)
        dist, device = _dist(), self._device()
        header = torch.zeros(_MAX_DIMS + 2, dtype=torch.int64, device=device)
        dtype_codes = list(_BROADCAST_DTYPES)
        local = None
        if self.rank == src:
            local = np.ascontiguousarray(_as_numpy(array))
            if local.ndim > _MAX_DIMS or local.dtype.str not in dtype_codes:
                raise ValueError(f"broadcast: arrays of up to {_MAX_DIMS} dims with dtype in {dtype_codes}; got "
                                 f"shape {local.shape} dtype {local.dtype.str}")
            header[0] = dtype_codes.index(local.dtype.str)
            header[1] = local.ndim
            header[2: 2 + local.ndim] = torch.tensor(local.shape, dtype=torch.int64)
        dist.broadcast(header, src)
        head = header.cpu().numpy()
        dtype = np.dtype(dtype_codes[int(head[0])])
        shape = tuple(int(v) for v in head[2: 2 + int(head[1])])
        payload = torch.zeros(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, dtype=torch.uint8, device=device)
        if local is not None:
            payload.copy_(torch.from_numpy(local.reshape(-1).view(np.uint8)).to(device))
        dist.broadcast(payload, src)
        return payload.cpu().numpy().view(dtype).reshape(shape).copy()

    def barrier(self) -> None:
        if self.is_distributed():
            _dist().barrier()


_MAX_DIMS = 6
_BROADCAST_DTYPES = ("<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1")


# ----------------------------------------------------------------------------- Ray actors
_COORDINATOR_CLASS = None


def _coordinator_class():
    """The Ray actor class, created lazily so that importing this module does not import Ray."""
    global _COORDINATOR_CLASS
    if _COORDINATOR_CLASS is None:
        import asyncio

        import ray

        @ray.remote(num_cpus=0)
        class CollectiveCoordinator:
            """Rendezvous for SPMD collectives: step s completes when all ``world_size`` parts arrived."""

            def __init__(self, world_size: int) -> None:
                self.world_size = world_size
                self.steps: dict[int, dict[str, Any]] = {}

            async def exchange(self, step: int, rank: int, part: Any) -> list[Any]:
                entry = self.steps.setdefault(step, {"parts": [None] * self.world_size, "arrived": 0, "left": 0,
                                                     "done": asyncio.Event()})
                entry["parts"][rank] = part
                entry["arrived"] += 1
                if entry["arrived"] == self.world_size:
                    entry["done"].set()
                await entry["done"].wait()
                entry["left"] += 1
                parts = entry["parts"]
                if entry["left"] == self.world_size:
                    del self.steps[step]
                return parts

        _COORDINATOR_CLASS = CollectiveCoordinator
    return _COORDINATOR_CLASS


def start_ray_coordinator(world_size: int):
    """The coordinator actor of one group of ``world_size`` :class:`RayCollective` members (Ray must be
    initialised). Kill it (``ray.kill``) when the group is done."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return _coordinator_class().remote(world_size)


class RayCollective:
    """The collectives between Ray actors (or tasks) that share one coordinator actor.

    Each collective sends this worker's part to the coordinator and waits for the list of all
    ``world_size`` parts (step ``s`` of every worker meets step ``s`` of the others); sums are taken
    locally in rank order over float64 / int64, so every worker computes the identical result.
    """

    def __init__(self, coordinator: Any, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.coordinator = coordinator
        self.rank = rank
        self.world_size = world_size
        self.step = 0

    def _exchange(self, part: Any) -> list[Any]:
        import ray

        self.step += 1
        return ray.get(self.coordinator.exchange.remote(self.step, self.rank, part))

    def all_reduce_sum(self, value: Any) -> Any:
        wide, restore = _wide_copy(value)
        parts = self._exchange(wide)
        if any(np.shape(p) != wide.shape for p in parts):
            raise ValueError(f"all_reduce_sum: rank {self.rank} passes shape {wide.shape}, but the workers' "
                             f"shapes are {[np.shape(p) for p in parts]}; every worker must pass the same shape")
        total = np.array(parts[0], dtype=wide.dtype, copy=True)
        for part in parts[1:]:
            total += part
        return restore(total)

    def all_gather(self, array: Any) -> list[np.ndarray]:
        local = np.array(_as_numpy(array), copy=True)
        if local.ndim == 0:
            local = local.reshape(1)
        parts = self._exchange(local)
        if any(_gather_signature(p) != _gather_signature(local) for p in parts):
            raise _mismatch_error(self.rank, local)
        return [np.array(p, copy=True) for p in parts]

    def broadcast(self, array: Any, src: int = 0) -> np.ndarray:
        parts = self._exchange(np.asarray(_as_numpy(array)) if self.rank == src else None)
        return np.array(parts[src], copy=True)

    def barrier(self) -> None:
        self._exchange(None)


# ----------------------------------------------------------------------------- choosing one
def default_collective() -> Collective:
    """The collective of the running job: :class:`TorchCollective` inside an initialised
    ``torch.distributed`` group of W > 1 (a training worker), else :class:`LocalCollective`.
    Never imports torch itself."""
    if "torch.distributed" in sys.modules and TorchCollective.is_distributed():
        return TorchCollective()
    return LocalCollective()


# ----------------------------------------------------------------------------- derived collectives
def all_reduce_mean(collective: Collective, total: Any, count: Any) -> Any:
    """Global mean from per-worker sums and counts: ``mean = (sum_w total_w) / (sum_w count_w)``.

    The ``(sum, count)`` mean of METHODS.md §4 (``gamma_f``: the mean purity over the global
    batch). ``total`` and ``count`` may be arrays (one mean per element; ``count`` broadcasts);
    both travel in ONE all-reduce. A zero global count gives NaN.

    Returns:
        A tensor (float, detached, on ``total``'s device) if ``total`` is a tensor, else a float
        (0-dim) or a float64 array.
    """
    as_tensor = _is_tensor(total)
    total_np = np.asarray(_as_numpy(total), dtype=np.float64)
    count_np = np.asarray(_as_numpy(count), dtype=np.float64)
    if count_np.shape != total_np.shape:
        count_np = np.broadcast_to(count_np, total_np.shape)
    packed = collective.all_reduce_sum(np.concatenate([total_np.reshape(-1), count_np.reshape(-1)]))
    size = total_np.size
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (packed[:size] / packed[size:]).reshape(total_np.shape)
    if as_tensor:
        import torch

        dtype = total.dtype if total.is_floating_point() else torch.float64
        return torch.as_tensor(mean, dtype=dtype, device=total.device)
    return float(mean) if mean.ndim == 0 else mean


def global_mean(collective: Collective, values: Any) -> Any:
    """Mean over the union of every worker's values: ``sum_w sum(values_w) / sum_w len(values_w)``,
    e.g. ``gamma_f``, the mean purity over the global batch (METHODS.md §4; detached). A tensor
    gives a 0-dim tensor (float64 for integer input), anything else a float; NaN when no worker has
    a value."""
    if _is_tensor(values):
        import torch

        mean = all_reduce_mean(collective, values.detach().double().sum(), values.numel())
        return mean.to(values.dtype if values.is_floating_point() else torch.float64)
    values = np.asarray(values, dtype=np.float64)
    return all_reduce_mean(collective, values.sum(), values.size)


def all_reduce_max(collective: Collective, array: Any) -> np.ndarray:
    """Element-wise maximum over workers (same shape on every worker), as a NumPy array."""
    local = np.asarray(_as_numpy(array))
    if collective.world_size == 1:
        return np.array(local, copy=True)
    return np.max(np.stack(collective.all_gather(local)), axis=0).reshape(local.shape)


def all_gather_concat(collective: Collective, array: Any) -> np.ndarray:
    """Every worker's rows concatenated in rank order (a new array)."""
    if collective.world_size == 1:
        return np.array(_as_numpy(array), copy=True)
    return np.concatenate(collective.all_gather(array), axis=0)


def _labels(values: Any) -> np.ndarray:
    return np.asarray(_as_numpy(values)).reshape(-1)


def global_bincount(collective: Collective, labels: Any, minlength: int) -> np.ndarray:
    """Global counts of each label ``j`` in ``[0, minlength)``: ``|C_j| = sum_w #{i in w: labels_i = j}``
    (cluster sizes of METHODS.md §6), int64. Labels outside the range raise ValueError."""
    labels = _labels(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= minlength):
        raise ValueError(f"global_bincount: labels must lie in [0, {minlength}), got [{labels.min()}, {labels.max()}]")
    return collective.all_reduce_sum(np.bincount(labels.astype(np.int64), minlength=minlength).astype(np.int64))


def global_group_cluster_counts(collective: Collective, cluster: Any, group: Any, num_clusters: int,
                                num_groups: int) -> np.ndarray:
    """Global (T, K) table ``n_tj = #{i : group_i = t, cluster_i = j}`` over all workers (METHODS.md
    §6: the counts all-reduced per auction round), int64. Rows with ``group < 0`` (unknown) are ignored."""
    cluster = _labels(cluster).astype(np.int64)
    group = _labels(group).astype(np.int64)
    if cluster.shape != group.shape:
        raise ValueError(f"global_group_cluster_counts: {cluster.size} cluster labels but {group.size} group labels")
    known = group >= 0
    cluster, group = cluster[known], group[known]
    if cluster.size and (cluster.min() < 0 or cluster.max() >= num_clusters or group.max() >= num_groups):
        raise ValueError(f"global_group_cluster_counts: clusters must lie in [0, {num_clusters}) and groups in "
                         f"[0, {num_groups}) (negative groups mean unknown)")
    flat = np.bincount(group * num_clusters + cluster, minlength=num_groups * num_clusters)
    return collective.all_reduce_sum(flat.astype(np.int64)).reshape(num_groups, num_clusters)


def agree_on_error(collective: Collective, error: Exception | None) -> None:
    """Collective error check: if any worker passes an error, every worker raises the lowest rank's
    (so no worker is left waiting in a later collective). Call on every worker."""
    from dist_fair import errors

    if collective.world_size == 1:
        if error is not None:
            raise error
        return
    text = b"" if error is None else f"{type(error).__name__}\x00{error}".encode("utf-8")
    for part in collective.all_gather(np.frombuffer(text, dtype=np.uint8)):
        if part.size:
            name, message = bytes(part).decode("utf-8").split("\x00", 1)
            cls = getattr(errors, name, errors.DistFairError)
            if error is not None and type(error).__name__ == name and str(error) == message:
                raise error
            raise cls(message)
