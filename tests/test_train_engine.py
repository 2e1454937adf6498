"""dist_fair.train.engine: Ray Train + DeepSpeed training on the simulated two-node cluster.

Ray Train and DeepSpeed start-ups are slow on a 2-core machine, so each run checks several things:

- ``spread_run`` (2 workers placed on the two simulated nodes, ZeRO-2, fp32, in-memory data):
  rank 1 is killed (``os._exit``) mid-epoch on the first attempt; the run must finish, the restart
  must resume from the last checkpoint's step (not from zero), the loss must go down, the epoch
  hook must see every eval row exactly once, task state must survive the restart, and the exported
  weights must reproduce the evaluated accuracy when re-evaluated here;
- ``zero3_run`` (2 workers, ZeRO-3, bf16, real WebDataset shards): trains, lowers the loss,
  evaluates every row once, exports gathered weights.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_fair.config import TrainConfig
from dist_fair.errors import ConfigError

IDENTITIES, PER_IDENTITY, DIM = 60, 16, 24  # 960 rows


# ----------------------------------------------------------------------------- task pieces (pickled by value)

def counting_hook(ctx):
    """Epoch hook: every eval row exactly once over all workers (ids gathered), and per-worker
    state that must survive a restart (number of hook calls)."""
    from dist_fair.train.engine import batch_rows

    ids, rows = [], 0
    for batch in ctx.eval_batches():
        ctx.forward(batch)  # under ZeRO-3 every worker must take part in each forward
        rows += batch_rows(batch)
        ids.append(batch["ids"].cpu().numpy())
    all_ids = np.concatenate(ctx.collective.all_gather(np.concatenate(ids) if ids else np.zeros(0, np.int64)))
    calls = int(ctx.state.get("calls", np.array(0))) + 1
    ctx.state["calls"] = np.array(calls)
    return {"rows": float(ctx.collective.all_reduce_sum(rows)), "unique_ids": float(len(np.unique(all_ids))),
            "calls": float(ctx.collective.all_reduce_sum(calls)) / ctx.world_size}


def loss_with_global_term(batch, logits, ctx):
    """The probe loss plus a logged global quantity computed with a collective inside the loss."""
    import torch

    from dist_fair.collective import global_mean
    from dist_fair.train.probe import probe_loss

    loss, metrics = probe_loss(batch, logits, ctx)
    confidence = torch.softmax(logits.float(), dim=1).max(dim=1).values
    metrics["global_confidence"] = global_mean(ctx.collective, confidence)
    return loss, metrics


def blobs() -> dict[str, np.ndarray]:
    from dist_fair.train.probe import identity_blobs

    data = identity_blobs(IDENTITIES, PER_IDENTITY, DIM, seed=3)
    data["ids"] = np.arange(len(data["identity"]), dtype=np.int64)
    return data


def accuracy_of_exported(model_path: Path, data: dict[str, np.ndarray], hidden: int) -> float:
    import torch

    from dist_fair.train.checkpoint import load_model_weights
    from dist_fair.train.probe import make_probe_model

    model = make_probe_model(DIM, hidden, IDENTITIES)
    model.load_state_dict({k: v.float() for k, v in load_model_weights(model_path).items()})
    with torch.no_grad():
        predicted = model(torch.from_numpy(data["emb"])).argmax(dim=1).numpy()
    return float((predicted == data["identity"]).mean())


#: Ray Train's controller polls every 0.25 s instead of 2 s (reports are consumed one per poll), and
#: a loaded 2-core machine gets 5 minutes instead of 1 to start a worker group.
TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}


@pytest.fixture(scope="module")
def fast_ray_train(ray_cluster):
    import os

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    old = {k: os.environ.get(k) for k in TEST_ENV}
    os.environ.update(TEST_ENV)
    yield ray_cluster
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


SPREAD = TrainConfig(model="probe", deepspeed="zero2_cpu", workers=2, placement="STRICT_SPREAD", epochs=3,
                     batch_size=64, lr=3e-3, checkpoint_every=5, log_every=5, hidden=64, max_failures=2)
KILL_AFTER_STEP = 22  # mid-epoch 2 (15 steps per epoch); the last checkpoint before it is step 20


@pytest.fixture(scope="module")
def spread_run(fast_ray_train, tmp_path_factory):
    from dist_fair.train.engine import FaultInjection, fit
    from dist_fair.train.probe import probe_task

    run_dir = tmp_path_factory.mktemp("spread_run")
    task = dataclasses.replace(probe_task(blobs(), hidden=SPREAD.hidden), epoch_hook=counting_hook,
                               loss_fn=loss_with_global_term)
    fault = FaultInjection(rank=1, after_step=KILL_AFTER_STEP, marker=str(run_dir / "killed.marker"))
    result = fit(task, SPREAD, run_dir, progress=False, fault=fault)
    return run_dir, task, result


@pytest.mark.ray
def test_killed_worker_resumes_from_checkpoint_step(spread_run):
    run_dir, _, result = spread_run
    assert (run_dir / "killed.marker").is_file(), "the fault was not injected"
    starts = result.events("start")
    assert [s["attempt"] for s in starts] == [1, 2]
    assert starts[0]["resumed_from_step"] is None
    assert starts[1]["resumed_from_step"] == 20  # the last checkpoint before the kill at step 22, not zero
    # the restarted attempt continued from step 20: its first record is the next log step
    after = result.history[result.history.index(starts[1]) + 1:]
    first_train = next(r for r in after if r["event"] == "train")
    assert first_train["step"] == 25
    steps_per_epoch = 15
    assert result.events("end")[-1]["step"] == SPREAD.epochs * steps_per_epoch
    # at most the work since the checkpoint was lost: steps 21..22 were done twice, nothing more
    done_before_kill = max(r["step"] for r in result.history[: result.history.index(starts[1])] if "step" in r)
    assert 20 <= done_before_kill <= KILL_AFTER_STEP


@pytest.mark.ray
def test_two_workers_on_two_nodes_lower_the_loss(spread_run):
    run_dir, task, result = spread_run
    start = result.events("start")[0]
    assert start["world_size"] == 2 and start["zero_stage"] == 2
    assert len(set(start["nodes"])) == 2, "STRICT_SPREAD must place the workers on both simulated nodes"
    train = result.events("train")
    epochs = result.events("epoch")
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["loss"] < 0.9 * train[0]["loss"]
    assert epochs[-1]["eval_loss"] < epochs[0]["eval_loss"]
    assert epochs[-1]["eval_accuracy"] > 10.0 / IDENTITIES
    for record in train:
        assert record["samples_per_s"] > 0 and record["eta_s"] is not None and 0 < record["global_confidence"] <= 1
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["complete"] and summary["task"] == "probe"


@pytest.mark.ray
def test_epoch_hook_sees_every_row_once_and_state_survives_restart(spread_run):
    _, task, result = spread_run
    epochs = result.events("epoch")
    for epoch in epochs:
        assert epoch["hook_rows"] == task.num_samples
        assert epoch["hook_unique_ids"] == task.num_samples
    # the hook counted its calls in ctx.state; the restart restored it from the checkpoint
    assert [e["hook_calls"] for e in epochs] == [1.0, 2.0, 3.0]


@pytest.mark.ray
def test_exported_weights_reproduce_eval_accuracy(spread_run):
    run_dir, _, result = spread_run
    accuracy = accuracy_of_exported(run_dir / "train" / "model.pt", blobs(), SPREAD.hidden)
    assert accuracy == pytest.approx(result.events("epoch")[-1]["eval_accuracy"], abs=1e-6)


@pytest.mark.ray
def test_finished_run_is_skipped_and_changed_settings_refused(spread_run):
    from dist_fair.train.engine import fit

    run_dir, task, first = spread_run
    again = fit(task, SPREAD, run_dir, progress=False)
    assert again.skipped and again.history == first.history  # nothing was trained or recorded again
    assert again.metrics == first.metrics
    with pytest.raises(ConfigError, match="different settings.*lr"):
        fit(task, dataclasses.replace(SPREAD, lr=1e-2), run_dir, progress=False)


@pytest.mark.ray
def test_zero3_bf16_on_shards(fast_ray_train, tmp_path):
    from dist_fair.data.shards import write_embedding_shards
    from dist_fair.train.engine import fit
    from dist_fair.train.probe import probe_task

    data = blobs()
    shard_dir = tmp_path / "shards"
    write_embedding_shards(shard_dir, data["emb"], data["identity"], shard_rows=320, block_rows=64)  # 3 shards
    cfg = dataclasses.replace(SPREAD, deepspeed="zero3_cpu", precision="bf16", placement="PACK", epochs=2,
                              checkpoint_every=0, lr=5e-3)
    task = dataclasses.replace(probe_task(shard_dir, hidden=cfg.hidden), epoch_hook=counting_hook)
    assert task.num_samples == len(data["identity"])
    result = fit(task, cfg, tmp_path / "run", progress=False)
    start = result.events("start")[0]
    assert start["zero_stage"] == 3 and start["precision"] == "bf16"
    epochs = result.events("epoch")
    assert epochs[-1]["loss"] < 0.95 * result.events("train")[0]["loss"]
    for epoch in epochs:
        assert epoch["hook_rows"] == task.num_samples and epoch["hook_unique_ids"] == task.num_samples
    accuracy = accuracy_of_exported(result.model_path, data, cfg.hidden)  # ZeRO-3 weights gathered on export
    assert accuracy == pytest.approx(epochs[-1]["eval_accuracy"], abs=0.05)  # bf16 training vs fp32 re-evaluation


# ----------------------------------------------------------------------------- no Ray needed

def test_deepspeed_config_filled_from_train_config():
    from dist_fair.train.engine import deepspeed_config_for, load_deepspeed_config, zero_stage

    for stage in range(4):
        for device in ("cpu", "gpu"):
            base = load_deepspeed_config(f"zero{stage}_{device}")
            assert zero_stage(base) == stage and not any(k.startswith("_") for k in base)
    config = deepspeed_config_for(load_deepspeed_config("zero2_cpu"), TrainConfig(batch_size=96, workers=2,
                                                                                  precision="bf16"), 2)
    assert config["train_batch_size"] == 96 and config["train_micro_batch_size_per_gpu"] == 48
    assert config["gradient_accumulation_steps"] == 1 and config["bf16"] == {"enabled": True} and "fp16" not in config
    with pytest.raises(ConfigError, match="zero2_cpu"):
        load_deepspeed_config("zero9")


def test_train_config_validation():
    with pytest.raises(ConfigError, match="multiple of train.workers"):
        TrainConfig(batch_size=65, workers=2)
    with pytest.raises(ConfigError, match="train.placement"):
        TrainConfig(placement="ANYWHERE")
    with pytest.raises(ConfigError, match="train.model"):
        TrainConfig(model="kmeans")
    assert TrainConfig(model="probe").model == "probe"


def test_lockstep_yields_empty_batches_single_process():
    from dist_fair.train.engine import _lockstep

    template = {"x": np.zeros((0, 2))}
    out = list(_lockstep(iter([{"x": np.ones((3, 2))}]), template))
    assert len(out) == 1 and out[0]["x"].shape == (3, 2)
