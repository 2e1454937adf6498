"""Global quantities shared by the training workers (DESIGN.md, "train"; METHODS.md §4, §6).

A few numbers must be computed over the GLOBAL batch or the whole data set although each worker
sees only its share: the mean purity ``gamma_f`` of METHODS.md §4 (a ``(sum, count)`` mean), the
cluster sizes ``|C_j|`` and the per-(group, cluster) counts ``n_tj`` of §6. They are built from
three collectives over the default ``torch.distributed`` process group (the one Ray Train creates
and DeepSpeed reuses; gloo on CPU, nccl on GPU):

- :func:`all_reduce_sum`: element-wise ``sum_w x_w``;
- :func:`all_reduce_mean`: ``(sum_w s_w) / (sum_w c_w)`` from per-worker sums ``s_w`` and counts ``c_w``;
- :func:`all_gather_arrays`: every worker's small array, in rank order (rows may differ per worker).

The defining property, tested for W = 1 and W = 2: an aggregate over W workers equals the same
aggregate computed by one worker over the union of their data. Without an initialised process
group (plain single-process use, unit tests of a loss) every function is the identity on the local
data, so the same loss code runs distributed or not.

Sums travel as float64 (int64 for integer input) so that results do not depend on how the data is
split, then come back in the input's type: a ``torch.Tensor`` stays a tensor (on its device,
detached: no gradient flows through a collective), a NumPy array stays an array, a Python number
stays a number. All workers must call the same collectives in the same order.
"""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one worker."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def world_size() -> int:
    """Number of workers in the default process group (1 outside one)."""
    dist = _dist()
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This worker's rank in the default process group (0 outside one)."""
    dist = _dist()
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _comm_device():
    """Device the backend exchanges tensors on: CUDA for nccl, CPU otherwise."""
    import torch

    dist = _dist()
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_wire(value: Any):
    """(float64/int64 tensor on the comm device, function restoring the caller's type)."""
    import torch

    if isinstance(value, torch.Tensor):
        source = value.detach()
        wide = torch.int64 if not (source.is_floating_point() or source.is_complex()) else torch.float64
        wire = source.to(device=_comm_device(), dtype=wide).contiguous()
        return wire, lambda t: t.to(device=source.device, dtype=source.dtype)
    array = np.asarray(value)
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        wire = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(_comm_device())
    elif np.issubdtype(array.dtype, np.floating):
        wire = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(_comm_device())
    else:
        raise TypeError(f"collective: cannot reduce an array of dtype {array.dtype}; pass numbers, "
                        "numeric NumPy arrays or torch tensors")
    if isinstance(value, np.ndarray):
        return wire, lambda t: t.cpu().numpy().astype(array.dtype, copy=False)
    if isinstance(value, (bool, int, np.integer)) and not isinstance(value, np.floating):
        return wire, lambda t: int(t.item())
    return wire, lambda t: float(t.item()) if t.numel() == 1 else t.cpu().numpy()


def all_reduce_sum(value: Any) -> Any:
    """Element-wise sum over all workers: ``out = sum_w value_w`` (identical on every worker).

    Args:
        value: a number, NumPy array or torch tensor; same shape on every worker.

    Returns:
        The global sum in the input's type (tensors detached, on their original device).
    """
    wire, back = _to_wire(value)  # also validates the type
    if not is_distributed():
        return back(wire)
    _dist().all_reduce(wire)
    return back(wire)


def all_reduce_mean(total: Any, count: Any) -> Any:
    """Global mean from per-worker sums and counts: ``mean = (sum_w total_w) / (sum_w count_w)``.

    This is the ``(sum, count)`` mean of METHODS.md §4 (``gamma_f``: the mean purity over the
    global batch). ``total`` and ``count`` may be arrays (one mean per element); ``count`` broadcasts.
    Both travel in ONE all-reduce. A zero global count gives NaN.

    Returns:
        The global mean; a tensor (float, detached) if ``total`` is a tensor, else a float or array.
    """
    import torch

    as_tensor = isinstance(total, torch.Tensor)
    total_np = total.detach().double().cpu().numpy() if as_tensor else np.asarray(total, dtype=np.float64)
    count_np = count.detach().double().cpu().numpy() if isinstance(count, torch.Tensor) else np.asarray(count, dtype=np.float64)
    count_np = np.broadcast_to(count_np, total_np.shape) if count_np.shape != total_np.shape else count_np
    packed = np.concatenate([total_np.reshape(-1), count_np.reshape(-1)])
    packed = all_reduce_sum(packed)
    size = total_np.size
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (packed[:size] / packed[size:]).reshape(total_np.shape)
    if as_tensor:
        dtype = total.dtype if total.is_floating_point() else torch.float64
        return torch.as_tensor(mean, dtype=dtype, device=total.device)
    return float(mean) if mean.ndim == 0 else mean


def all_gather_arrays(array: Any) -> list[np.ndarray]:
    """Every worker's array, in rank order, on every worker.

    Arrays may differ in their first dimension (rows) but must agree in dtype and trailing shape.
    Meant for small arrays (O(K * T), never O(N)): each worker receives all of them.

    Returns:
        ``[array_0, ..., array_{W-1}]`` as NumPy arrays of the input's dtype.
    """
    import torch

    local = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if not is_distributed():
        return [local.copy()]
    dist = _dist()
    device = _comm_device()
    if local.ndim == 0:
        local = local.reshape(1)
    # One round for the shapes: rows per worker, and a check that trailing shapes and dtypes agree.
    signature = zlib.crc32(repr((local.dtype.str, local.shape[1:])).encode())  # same on every worker
    meta = np.array([local.shape[0], local.ndim, signature], dtype=np.int64)
    metas = [torch.zeros(3, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(metas, torch.from_numpy(meta).to(device))
    metas_np = [m.cpu().numpy() for m in metas]
    if any(m[1] != meta[1] or m[2] != meta[2] for m in metas_np):
        raise ValueError(f"all_gather_arrays: rank {rank()} has an array of dtype {local.dtype} and shape "
                         f"(*, {', '.join(map(str, local.shape[1:]))}), but the workers disagree on dtype or "
                         "trailing shape; every worker must pass the same dtype and the same shape[1:]")
    rows = [int(m[0]) for m in metas_np]
    width = max(rows)
    raw = np.ascontiguousarray(local).view(np.uint8).reshape(local.shape[0], -1) if local.size else \
        np.zeros((local.shape[0], local.dtype.itemsize * int(np.prod(local.shape[1:], dtype=np.int64))), np.uint8)
    row_bytes = raw.shape[1]
    padded = np.zeros((width, row_bytes), dtype=np.uint8)
    padded[: raw.shape[0]] = raw
    outs = [torch.zeros((width, row_bytes), dtype=torch.uint8, device=device) for _ in range(world_size())]
    dist.all_gather(outs, torch.from_numpy(padded).to(device))
    result = []
    for out, n in zip(outs, rows):
        chunk = np.ascontiguousarray(out.cpu().numpy()[:n])
        result.append(chunk.view(local.dtype).reshape((n, *local.shape[1:])))
    return result


def broadcast_array(array: Any, src: int = 0) -> np.ndarray:
    """Rank ``src``'s array on every worker; the other workers' ``array`` is ignored (pass None).

    Returns:
        A NumPy copy of rank ``src``'s array.
    """
    import torch

    if not is_distributed():
        return np.array(array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else array)
    dist = _dist()
    device = _comm_device()
    header = torch.zeros(_MAX_DIMS + 2, dtype=torch.int64, device=device)
    dtype_codes = list(_BROADCAST_DTYPES)
    if rank() == src:
        local = np.ascontiguousarray(array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array))
        if local.ndim > _MAX_DIMS or local.dtype.str not in dtype_codes:
            raise ValueError(f"broadcast_array: arrays of up to {_MAX_DIMS} dims with dtype in {dtype_codes}; got "
                             f"shape {local.shape} dtype {local.dtype.str}")
        header[0] = dtype_codes.index(local.dtype.str)
        header[1] = local.ndim
        header[2: 2 + local.ndim] = torch.tensor(local.shape, dtype=torch.int64)
    dist.broadcast(header, src)
    head = header.cpu().numpy()
    dtype = np.dtype(dtype_codes[int(head[0])])
    shape = tuple(int(v) for v in head[2: 2 + int(head[1])])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    if rank() == src:
        payload.copy_(torch.from_numpy(local.reshape(-1).view(np.uint8)).to(device))
    dist.broadcast(payload, src)
    return payload.cpu().numpy().view(dtype).reshape(shape).copy()


_MAX_DIMS = 6
_BROADCAST_DTYPES = ("<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1")


def global_mean(values: Any) -> Any:
    """Mean of ``values`` over the union of every worker's values: ``sum_w sum(values_w) /
    sum_w len(values_w)`` — e.g. ``gamma_f``, the mean purity over the global batch (METHODS.md §4,
    computed from per-anchor purities; detached)."""
    import torch

    if isinstance(values, torch.Tensor):
        return all_reduce_mean(values.detach().double().sum(), values.numel()).to(values.dtype if values.is_floating_point() else torch.float64)
    values = np.asarray(values, dtype=np.float64)
    return all_reduce_mean(values.sum(), values.size)


def global_bincount(labels: Any, minlength: int) -> np.ndarray:
    """Global counts of each label ``j`` in ``[0, minlength)``: ``|C_j| = sum_w #{i in w: labels_i = j}``
    (cluster sizes of METHODS.md §6). Labels outside the range raise ValueError."""
    labels = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= minlength):
        raise ValueError(f"global_bincount: labels must lie in [0, {minlength}), got [{labels.min()}, {labels.max()}]")
    return all_reduce_sum(np.bincount(labels.astype(np.int64), minlength=minlength).astype(np.int64))


def global_group_cluster_counts(cluster: Any, group: Any, num_clusters: int, num_groups: int) -> np.ndarray:
    """Global (T, K) table ``n_tj = #{i : group_i = t, cluster_i = j}`` over all workers (METHODS.md
    §6: the counts all-reduced per auction round). Rows with ``group < 0`` (unknown) are ignored."""
    cluster = np.asarray(cluster.detach().cpu().numpy() if hasattr(cluster, "detach") else cluster).reshape(-1).astype(np.int64)
    group = np.asarray(group.detach().cpu().numpy() if hasattr(group, "detach") else group).reshape(-1).astype(np.int64)
    if cluster.shape != group.shape:
        raise ValueError(f"global_group_cluster_counts: {cluster.size} cluster labels but {group.size} group labels")
    known = group >= 0
    cluster, group = cluster[known], group[known]
    if cluster.size and (cluster.min() < 0 or cluster.max() >= num_clusters or group.max() >= num_groups):
        raise ValueError(f"global_group_cluster_counts: clusters must lie in [0, {num_clusters}) and groups in "
                         f"[0, {num_groups}) (negative groups mean unknown)")
    flat = np.bincount(group * num_clusters + cluster, minlength=num_groups * num_clusters)
    return all_reduce_sum(flat.astype(np.int64)).reshape(num_groups, num_clusters)


class Collective:
    """The collectives above bound to a training run, handed to losses and hooks as ``ctx.collective``
    (a small object so a loss can be tested with a single-process instance)."""

    rank = property(lambda self: rank())
    world_size = property(lambda self: world_size())

    @staticmethod
    def sum(value: Any) -> Any:
        return all_reduce_sum(value)

    @staticmethod
    def mean(total: Any, count: Any) -> Any:
        return all_reduce_mean(total, count)

    @staticmethod
    def gather(array: Any) -> list[np.ndarray]:
        return all_gather_arrays(array)

    @staticmethod
    def broadcast(array: Any, src: int = 0) -> np.ndarray:
        return broadcast_array(array, src)

    @staticmethod
    def barrier() -> None:
        if is_distributed():
            _dist().barrier()

    global_mean = staticmethod(global_mean)
    global_bincount = staticmethod(global_bincount)
    global_group_cluster_counts = staticmethod(global_group_cluster_counts)


__all__: Sequence[str] = [
    "Collective", "all_gather_arrays", "all_reduce_mean", "all_reduce_sum", "broadcast_array",
    "global_bincount", "global_group_cluster_counts", "global_mean", "is_distributed", "rank", "world_size",
]
