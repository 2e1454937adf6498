"""Training the Intraformer through the engine (Ray Train + DeepSpeed) on the simulated two-node
cluster, the global purity mean over 2 workers, and edge inference on Ray workers.

- ``trained``: 2 workers (ZeRO-1, fp32) train an Intraformer with the purity penalty on kNN sequences
  of a tiny BUPT-style set; the loss must go down, gamma_f is logged, the validation anchors are
  evaluated every epoch; then the edge probabilities of every anchor are predicted by Ray tasks
  and must equal the exported model's predictions made here, every row exactly once.
- ``test_two_worker_purity_mean_equals_one_worker``: the same global batch split over 2 Ray Train
  workers (gloo process group) gives the same gamma_f, the same penalty values and, after the
  engine's gradient averaging, the same gradients as one process with the whole batch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dist_fair.config import JobConfig, TrainConfig

SEQ_LEN = 12


@pytest.fixture(scope="module")
def ray_by_value(ray_cluster):
    """Ray workers cannot import test modules: pickle this one by value; poll Ray Train faster."""
    import os

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    old = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    yield ray_cluster
    if old is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = old


def brute_knn(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, 2.0)  # the sample itself first
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(sims, nbrs, axis=1)
    out[:, 0] = 1.0
    return nbrs.astype(np.int64), out.astype(np.float32)


@pytest.fixture(scope="module")
def sequence_folders(tmp_path_factory):
    from dist_fair.data.shards import load_embeddings, load_labels
    from dist_fair.data.synthetic import generate_synthetic_shards
    from dist_fair.models.sequences import prepare_sequence_inputs

    root = tmp_path_factory.mktemp("intraformer_data")
    generate_synthetic_shards(root / "shards", preset="skewed", identities=100, images_per_identity=10, dim=32,
                              seed=4, shard_rows=200, block_rows=64, progress=False)
    nbrs, sims = brute_knn(load_embeddings(root / "shards"), SEQ_LEN)
    (root / "knn").mkdir()
    np.save(root / "knn" / "nbrs.npy", nbrs)
    np.save(root / "knn" / "sims.npy", sims)
    prepare_sequence_inputs(root / "shards", root / "knn", root / "seq", SEQ_LEN, val_fraction=0.2,
                            train_fraction=0.6, seed=0, group_attribute="race")
    return root, load_labels(root / "shards")


TRAIN = TrainConfig(model="intraformer", deepspeed="zero1_cpu", workers=2, placement="SPREAD", epochs=4,
                    batch_size=32, lr=3e-3, log_every=5, seq_len=SEQ_LEN, width=16, heads=2, layers=1,
                    sub_clusters=3, cross="last", penalty="upper_bound", eval_anchors=64, max_failures=0)


@pytest.fixture(scope="module")
def trained(ray_by_value, sequence_folders):
    from dist_fair.tasks.sequence_task import task_from_folders, write_spec
    from dist_fair.train.engine import fit

    root, _ = sequence_folders
    job = JobConfig(train=TRAIN)
    job.knn.k = SEQ_LEN
    task = task_from_folders(job, root / "seq", root / "knn")
    result = fit(task, TRAIN, root / "run", progress=False)
    write_spec(task, result.train_dir)
    return root, task, result


@pytest.mark.ray
def test_two_workers_train_the_intraformer(trained):
    _, task, result = trained
    start = result.events("start")[0]
    assert start["world_size"] == 2 and start["zero_stage"] == 1
    train, epochs = result.events("train"), result.events("epoch")
    assert len(epochs) == TRAIN.epochs
    assert epochs[-1]["loss"] < 0.85 * train[0]["loss"]
    assert epochs[-1]["eval_loss"] < epochs[0]["eval_loss"]
    for record in train:
        assert 0 < record["gamma_f"] <= 1 and record["loss_purity"] >= 0 and "loss_fm" in record
    assert task.info["eval_anchors"] == 64 and task.num_samples == task.info["train_anchors"]


@pytest.mark.ray
def test_ray_inference_writes_every_row_once_equal_to_local_predictions(trained, tmp_path):
    from dist_fair.models.sequences import open_sequence_inputs
    from dist_fair.models.edge_inference import predict_edge_probs, predict_probs
    from dist_fair.models.intraformer import build_model
    from dist_fair.tasks.sequence_task import load_trained

    root, _, result = trained
    spec, weights = load_trained(result.train_dir)
    inputs = open_sequence_inputs(root / "seq", root / "knn", spec.seq_len)
    inputs.identity_path = inputs.group_path = None
    summary = predict_edge_probs(spec, weights, inputs, tmp_path, workers=2, rows_per_task=97, batch=40)
    probs = np.load(tmp_path / "probs.npy")
    n = inputs.num_samples
    assert summary["samples"] == n and summary["tasks"] == -(-n // 97) and summary["predicted_now"] == n
    assert not (tmp_path / "parts").exists()
    model = build_model(spec)
    model.load_state_dict(weights)
    expected = predict_probs(model, inputs, np.arange(n), batch=64)
    assert np.allclose(probs, expected, atol=1e-5)
    nbrs = np.load(root / "knn" / "nbrs.npy")
    assert (probs[nbrs < 0] == 0).all() and ((probs >= 0) & (probs <= 1)).all()
    again = predict_edge_probs(spec, weights, inputs, tmp_path, workers=2, rows_per_task=97, batch=40)
    assert again["samples"] == n  # re-run: recomputes nothing it has (parts were merged and removed)


# ----------------------------------------------------------------------------- 2 workers vs 1

BATCH, TOKENS, GROUPS = 8, 6, 3


def fixed_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    targets = (rng.random((BATCH, TOKENS)) < 0.5).astype(np.float64)
    targets[:, 0] = 1.0
    mask = rng.random((BATCH, TOKENS)) < 0.85
    mask[:, 0] = True
    return {"logits": rng.normal(size=(BATCH, TOKENS)), "target": targets, "mask": mask,
            "group": np.array([0, 1, 2, 0, 1, 1, 0, 2])}


def losses_on(rows: np.ndarray, penalty: str) -> dict[str, np.ndarray]:
    """gamma_f, penalty values and d loss / d logits of the anchors ``rows`` of the fixed batch,
    with whatever collective is active (the process group inside Ray Train, else none)."""
    import torch

    from dist_fair.losses.clustering import LossConfig, clustering_loss

    batch = fixed_batch()
    logits = torch.tensor(batch["logits"][rows], requires_grad=True)
    config = LossConfig(objective="fm", penalty=penalty, weight=1.0, num_groups=GROUPS)
    loss, metrics = clustering_loss(logits, torch.tensor(batch["target"][rows]), torch.tensor(batch["mask"][rows]),
                                    config, torch.tensor(batch["group"][rows]))
    loss.backward()
    grad = np.zeros((BATCH, TOKENS))
    grad[rows] = logits.grad.numpy()
    return {"gamma_f": float(metrics["gamma_f"]), "loss_purity": float(metrics["loss_purity"]),
            "loss_group": float(metrics.get("loss_group", np.nan)), "loss": float(loss.detach()), "grad": grad}


def purity_worker_loop(config: dict) -> None:
    import ray.train

    from dist_fair.io_atomic import atomic_save_npy

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    rows = np.arange(BATCH)[rank::world]
    for penalty in ("upper_bound", "group"):
        out = losses_on(rows, penalty)
        values = np.array([out["gamma_f"], out["loss_purity"], out["loss_group"], out["loss"]])
        atomic_save_npy(Path(config["out"]) / f"{penalty}_values_{rank}.npy", values)
        atomic_save_npy(Path(config["out"]) / f"{penalty}_grad_{rank}.npy", out["grad"])


@pytest.mark.ray
def test_two_worker_purity_mean_equals_one_worker(ray_by_value, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(purity_worker_loop, train_loop_config={"out": str(tmp_path)},
                           torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1},
                                                        placement_strategy="SPREAD"),
                           run_config=RunConfig(name="purity", storage_path=str(tmp_path / "ray")))
    trainer.fit()
    everything = np.arange(BATCH)
    for penalty in ("upper_bound", "group"):
        reference = losses_on(everything, penalty)  # one process, the whole global batch
        values = [np.load(tmp_path / f"{penalty}_values_{r}.npy") for r in range(2)]
        grads = [np.load(tmp_path / f"{penalty}_grad_{r}.npy") for r in range(2)]
        for v in values:  # gamma_f: the global mean, identical on both workers and equal to one worker's
            assert v[0] == pytest.approx(reference["gamma_f"], abs=1e-12)
        # per-anchor means of equal halves average to the whole-batch mean
        assert np.mean([v[1] for v in values]) == pytest.approx(reference["loss_purity"], abs=1e-12)
        if penalty == "group":  # the group spread is global: the same value on every worker
            for v in values:
                assert v[2] == pytest.approx(reference["loss_group"], abs=1e-12)
        # DeepSpeed averages gradients over the workers: (1/W) sum_w grad_w = single-process grad
        assert np.allclose((grads[0] + grads[1]) / 2, reference["grad"], atol=1e-12)


# ----------------------------------------------------------------------------- the whole job

@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("config_file", ["intraformer.yaml", "clusformer.yaml"])
def test_dist_fair_run_with_the_sequence_model_configs(ray_by_value, tmp_path, config_file):
    """``dist-fair run --config launch/configs/<model>.yaml`` on tiny data: synth -> kNN -> sequences ->
    train -> infer -> cluster -> evaluate; the report covers the test identities only; a re-run
    skips every stage; a changed decoding parameter redoes only cluster and evaluate."""
    import json

    from dist_fair.config import load_config
    from dist_fair.models.sequences import TEST
    from dist_fair.pipeline import run_job
    root = Path(__file__).resolve().parents[1]
    overrides = [f"run_dir={tmp_path / 'run'}", "data.preset=balanced", "data.identities=80", "data.images_per_identity=8", "data.dim=32",
                 "data.workers=1", "knn.k=16", "knn.recall_sample=0", "train.seq_len=12", "train.epochs=1",
                 "train.batch_size=32", "train.width=16", "train.heads=2", "train.sub_clusters=3",
                 "cluster.infer_rows_per_task=200"]
    config = load_config(root / "launch" / "configs" / config_file, overrides)
    outcomes = run_job(config)
    assert [o.name for o in outcomes] == ["shards", "knn", "sequences", "train", "infer", "cluster", "baseline",
                                          "evaluate"]
    run_dir = tmp_path / "run"
    report = json.loads((run_dir / "report.json").read_text())
    split = np.load(run_dir / "sequences" / "split.npy")
    assert report["num_samples"] == int((split == TEST).sum())
    assert 0.0 < report["identity"]["pairwise"]["f"] <= 1.0
    cluster = json.loads((run_dir / "cluster" / "stage.json").read_text())["info"]
    assert cluster["scores"] == "edge probabilities" and cluster["method"] == config.cluster.method
    assert np.load(run_dir / "infer" / "probs.npy").shape == (len(split), 12)
    assert all(o.skipped for o in run_job(config))
    changed = run_job(load_config(root / "launch" / "configs" / config_file, overrides + ["cluster.method=threshold"]))
    assert [o.skipped for o in changed] == [True] * 5 + [False, False, False]
