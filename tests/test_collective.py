"""dist_fair.train.collective: an aggregate over W workers equals one worker over the union.

W = 1: in this process (no process group: every collective is the identity on the local data).
W = 2: two real Ray Train workers (gloo process group created by Ray), the data split unevenly.
Both are compared with NumPy / brute-force references computed on the union of the data.
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


def aggregates(rank: int, world_size: int) -> dict[str, np.ndarray]:
    """Every collective applied to this worker's share of ``global_data``."""
    import torch

    from dist_fair.train import collective as C

    data = {k: v[split(rank, world_size)] for k, v in global_data().items()}
    x = data["x"]
    out = {
        "sum_array": C.all_reduce_sum(x.sum(axis=0)),
        "sum_ints": C.all_reduce_sum(data["ints"].sum(axis=0)),
        "sum_tensor": C.all_reduce_sum(torch.tensor(x.sum(axis=0), dtype=torch.float32)).numpy(),
        "sum_number": np.array(C.all_reduce_sum(float(x[:, 0].sum()))),
        "count_number": np.array(C.all_reduce_sum(len(x))),
        "mean_pairs": C.all_reduce_mean(x.sum(axis=0), len(x)),
        "mean_tensor": C.all_reduce_mean(torch.tensor(x.sum(axis=0)), torch.tensor(float(len(x)))).numpy(),
        "global_mean_purity": np.array(float(C.global_mean(torch.tensor(data["purity"], dtype=torch.float64)))),
        "global_mean_np": np.array(C.global_mean(data["purity"])),
        "cluster_sizes": C.global_bincount(data["cluster"], K),
        "group_cluster_counts": C.global_group_cluster_counts(data["cluster"], data["group"], K, T),
        "gathered_rows": np.concatenate(C.all_gather_arrays(x)),
        "gathered_counts": np.array([len(a) for a in C.all_gather_arrays(data["cluster"])]),
        "broadcast_from_last": C.broadcast_array(np.arange(3) * 10 + rank if rank == world_size - 1 else None,
                                                 src=world_size - 1),
        "world_size": np.array(C.world_size()),
    }
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
        "gathered_rows": d["x"],
    }


def check_against_reference(result: dict[str, np.ndarray], world_size: int) -> None:
    ref = reference()
    for key, expected in ref.items():
        tol = 1e-5 if key == "sum_tensor" else 1e-12
        np.testing.assert_allclose(np.asarray(result[key], dtype=np.float64), expected, rtol=tol, atol=tol,
                                   err_msg=f"{key} over {world_size} worker(s)")
    assert int(result["world_size"]) == world_size
    assert result["sum_ints"].dtype.kind == "i" and result["cluster_sizes"].dtype == np.int64
    expected_counts = [ROWS] if world_size == 1 else [7, ROWS - 7]
    assert result["gathered_counts"].tolist() == expected_counts
    np.testing.assert_array_equal(result["broadcast_from_last"], np.arange(3) * 10 + (world_size - 1))


def test_one_worker_equals_union():
    check_against_reference(aggregates(0, 1), 1)


def test_bad_inputs_raise_single_process():
    from dist_fair.train import collective as C

    assert [a.shape for a in C.all_gather_arrays(np.zeros((0, 3)))] == [(0, 3)]
    with pytest.raises(ValueError, match="labels must lie"):
        C.global_bincount(np.array([0, 5]), 5)
    with pytest.raises(TypeError, match="cannot reduce"):
        C.all_reduce_sum(np.array(["a"]))


def _worker(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    result = aggregates(rank, world)
    from dist_fair.train.collective import all_gather_arrays

    try:  # trailing shapes differ between the workers: both must raise, neither may hang
        all_gather_arrays(np.zeros((2, 3 + rank)))
        result["mismatch_raised"] = np.array(False)
    except ValueError:
        result["mismatch_raised"] = np.array(True)
    np.savez(Path(config["out"]) / f"rank{rank}.npz", **result)


@pytest.mark.ray
def test_two_workers_equal_union(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # reports consumed faster
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")  # a loaded machine starts slowly
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    trainer = TorchTrainer(
        _worker, train_loop_config={"out": str(tmp_path)},
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
