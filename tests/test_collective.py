"""dist_fair.collective: an aggregate over W workers equals one worker over the union, and no
collective ever writes into its input.

W = 1: ``LocalCollective`` and ``TorchCollective`` outside a process group, in this process.
W = 2: ``TorchCollective`` in two real Ray Train workers (gloo process group created by Ray), and
``RayCollective`` in two Ray actors meeting at a coordinator actor; the data split unevenly.
Every result is compared with NumPy / brute-force references computed on the union of the data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROWS, K, T = 11, 5, 3


def global_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "x": rng.standard_normal((ROWS, 4)),
        "purity": rng.uniform(0, 1, ROWS),
        "cluster": rng.integers(0, K, ROWS),
        "group": np.where(rng.uniform(size=ROWS) < 0.15, -1, rng.integers(0, T, ROWS)),
        "ints": rng.integers(-50, 50, (ROWS, 2)),
    }


def split(rank: int, world_size: int) -> slice:
    """Uneven shares: rank 0 of 2 gets 7 rows, rank 1 gets 4."""
    if world_size == 1:
        return slice(0, ROWS)
    return slice(0, 7) if rank == 0 else slice(7, ROWS)


def untouched_checks(collective) -> dict[str, np.ndarray]:
    """all_reduce_sum on inputs of every kind: the input keeps its values and the result is a new
    object that shares no memory with it (issue 16: with W >= 2 the old reducer summed float64
    arrays and tensors in place)."""
    import torch

    out = {}
    inputs = {
        "np_f64": np.arange(4, dtype=np.float64) + 1.5 + collective.rank,
        "np_f32": np.arange(4, dtype=np.float32) + 0.5,
        "np_i64": np.arange(4, dtype=np.int64) + 3,
        "torch_f64": torch.arange(4, dtype=torch.float64) + 2.0,
        "torch_f32": torch.arange(4, dtype=torch.float32) - 1.0,
        "torch_i64": torch.arange(4, dtype=torch.int64) * 7,
    }
    for name, value in inputs.items():
        before = value.clone() if isinstance(value, torch.Tensor) else value.copy()
        result = collective.all_reduce_sum(value)
        same_values = bool(torch.equal(value, before)) if isinstance(value, torch.Tensor) else \
            bool(np.array_equal(value, before))
        if isinstance(value, torch.Tensor):
            shares = result.data_ptr() == value.data_ptr()
            same_type = isinstance(result, torch.Tensor) and result.dtype == value.dtype
        else:
            shares = np.shares_memory(result, value)
            same_type = isinstance(result, np.ndarray) and result.dtype == value.dtype
        out[f"untouched_{name}"] = np.array(same_values and not shares and result is not value and same_type)
    gathered_input = np.arange(3.0)
    gathered = collective.all_gather(gathered_input)
    gathered[collective.rank][:] = -1.0
    out["untouched_gather"] = np.array(np.array_equal(gathered_input, np.arange(3.0)))
    return out


def aggregates(collective) -> dict[str, np.ndarray]:
    """Every collective applied to this worker's share of ``global_data``."""
    import torch

    from dist_fair import collective as C

    rank, world_size = collective.rank, collective.world_size
    data = {k: v[split(rank, world_size)] for k, v in global_data().items()}
    x = data["x"]
    out = {
        "sum_array": collective.all_reduce_sum(x.sum(axis=0)),
        "sum_ints": collective.all_reduce_sum(data["ints"].sum(axis=0)),
        "sum_tensor": collective.all_reduce_sum(torch.tensor(x.sum(axis=0), dtype=torch.float32)).numpy(),
        "sum_number": np.array(collective.all_reduce_sum(float(x[:, 0].sum()))),
        "count_number": np.array(collective.all_reduce_sum(len(x))),
        "count_is_int": np.array(isinstance(collective.all_reduce_sum(len(x)), int)),
        "mean_pairs": C.all_reduce_mean(collective, x.sum(axis=0), len(x)),
        "mean_tensor": C.all_reduce_mean(collective, torch.tensor(x.sum(axis=0)),
                                         torch.tensor(float(len(x)))).numpy(),
        "global_mean_purity": np.array(float(C.global_mean(collective, torch.tensor(data["purity"],
                                                                                    dtype=torch.float64)))),
        "global_mean_np": np.array(C.global_mean(collective, data["purity"])),
        "cluster_sizes": C.global_bincount(collective, data["cluster"], K),
        "group_cluster_counts": C.global_group_cluster_counts(collective, data["cluster"], data["group"], K, T),
        "max_rows": C.all_reduce_max(collective, x.max(axis=0)),
        "gathered_rows": np.concatenate(collective.all_gather(x)),
        "concat_rows": C.all_gather_concat(collective, x),
        "gathered_counts": np.array([len(a) for a in collective.all_gather(data["cluster"])]),
        "broadcast_from_last": collective.broadcast(np.arange(3) * 10 + rank if rank == world_size - 1 else None,
                                                    src=world_size - 1),
        "world_size": np.array(world_size),
        **untouched_checks(collective),
    }
    collective.barrier()
    return out


def reference() -> dict[str, np.ndarray]:
    """The same quantities computed by one process over the union (independent code paths)."""
    d = global_data()
    counts = np.zeros((T, K), dtype=np.int64)
    for c, g in zip(d["cluster"], d["group"]):
        if g >= 0:
            counts[g, c] += 1
    return {
        "sum_array": d["x"].sum(axis=0),
        "sum_ints": d["ints"].sum(axis=0),
        "sum_tensor": d["x"].sum(axis=0),
        "sum_number": np.array(d["x"][:, 0].sum()),
        "count_number": np.array(ROWS),
        "mean_pairs": d["x"].mean(axis=0),
        "mean_tensor": d["x"].mean(axis=0),
        "global_mean_purity": np.array(d["purity"].mean()),
        "global_mean_np": np.array(d["purity"].mean()),
        "cluster_sizes": np.array([(d["cluster"] == j).sum() for j in range(K)]),
        "group_cluster_counts": counts,
        "max_rows": d["x"].max(axis=0),
        "gathered_rows": d["x"],
        "concat_rows": d["x"],
    }


def check_against_reference(result: dict[str, np.ndarray], world_size: int) -> None:
    ref = reference()
    for key, expected in ref.items():
        tol = 1e-5 if key == "sum_tensor" else 1e-12
        np.testing.assert_allclose(np.asarray(result[key], dtype=np.float64), expected, rtol=tol, atol=tol,
                                   err_msg=f"{key} over {world_size} worker(s)")
    assert int(result["world_size"]) == world_size
    assert bool(result["count_is_int"])
    assert result["sum_ints"].dtype.kind == "i" and result["cluster_sizes"].dtype == np.int64
    assert result["group_cluster_counts"].dtype == np.int64
    expected_counts = [ROWS] if world_size == 1 else [7, ROWS - 7]
    assert result["gathered_counts"].tolist() == expected_counts
    np.testing.assert_array_equal(result["broadcast_from_last"], np.arange(3) * 10 + (world_size - 1))
    untouched = {k: bool(v) for k, v in result.items() if k.startswith("untouched_")}
    assert len(untouched) == 7 and all(untouched.values()), f"inputs modified or aliased: {untouched}"


@pytest.mark.parametrize("kind", ["local", "torch_without_group"])
def test_one_worker_equals_union(kind):
    from dist_fair.collective import Collective, LocalCollective, TorchCollective

    collective = LocalCollective() if kind == "local" else TorchCollective()
    assert isinstance(collective, Collective)
    check_against_reference(aggregates(collective), 1)


def test_default_collective_outside_a_group_is_local():
    from dist_fair.collective import LocalCollective, default_collective

    assert isinstance(default_collective(), LocalCollective)


def test_bad_inputs_raise_single_process():
    from dist_fair import collective as C
    from dist_fair.errors import DataError

    local = C.LocalCollective()
    assert [a.shape for a in local.all_gather(np.zeros((0, 3)))] == [(0, 3)]
    assert [a.shape for a in local.all_gather(np.float64(2.0))] == [(1,)]
    with pytest.raises(ValueError, match="labels must lie"):
        C.global_bincount(local, np.array([0, 5]), 5)
    with pytest.raises(TypeError, match="cannot reduce"):
        local.all_reduce_sum(np.array(["a"]))
    with pytest.raises(DataError, match="bad sample"):
        C.agree_on_error(local, DataError("bad sample"))
    C.agree_on_error(local, None)


# ----------------------------------------------------------------------------- W = 2, torch.distributed
def _torch_worker(config: dict) -> None:
    import ray.train

    from dist_fair.collective import TorchCollective, default_collective

    collective = TorchCollective()
    assert isinstance(default_collective(), TorchCollective)
    result = aggregates(collective)
    try:  # trailing shapes differ between the workers: both must raise, neither may hang
        collective.all_gather(np.zeros((2, 3 + collective.rank)))
        result["mismatch_raised"] = np.array(False)
    except ValueError:
        result["mismatch_raised"] = np.array(True)
    assert collective.rank == ray.train.get_context().get_world_rank()
    np.savez(Path(config["out"]) / f"rank{collective.rank}.npz", **result)


@pytest.mark.ray
def test_two_torch_workers_equal_union(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # reports consumed faster
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")  # a loaded machine starts slowly
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    trainer = TorchTrainer(
        _torch_worker, train_loop_config={"out": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="collective", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    results = []
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz", allow_pickle=False) as data:
            results.append({k: data[k] for k in data.files})
    for result in results:  # every worker holds the global result
        check_against_reference(result, 2)
        assert bool(result["mismatch_raised"])


# ----------------------------------------------------------------------------- W = 2, Ray actors
@pytest.mark.ray
def test_two_ray_actors_equal_union(ray_cluster):
    import sys

    import ray
    from ray import cloudpickle

    from dist_fair.collective import RayCollective, start_ray_coordinator

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    @ray.remote(num_cpus=1)
    def member(coordinator, rank: int) -> dict[str, np.ndarray]:
        collective = RayCollective(coordinator, rank, 2)
        result = aggregates(collective)
        try:
            collective.all_gather(np.zeros((2, 3 + rank)))
            result["mismatch_raised"] = np.array(False)
        except ValueError:
            result["mismatch_raised"] = np.array(True)
        return result

    coordinator = start_ray_coordinator(2)
    try:
        results = ray.get([member.remote(coordinator, rank) for rank in range(2)], timeout=300)
    finally:
        ray.kill(coordinator)
    for result in results:
        check_against_reference(result, 2)
        assert bool(result["mismatch_raised"])
