"""Stages of the sequence models (``train.model`` intraformer / clusformer, METHODS.md §4):

- ``sequences``: the models' inputs: ``emb.npy`` (normalised, id order), ``split.npy`` (test 0 /
  train 1 / validation 2 by identity), ``visible_identity.npy`` (test identities hidden) and
  ``group.npy`` (``train.group_attribute``), see :mod:`dist_fair.models.sequences`;
- ``train``: the model on Ray Train + DeepSpeed (:func:`dist_fair.train.engine.fit`) into
  ``<run>/train/`` (the engine resumes a killed run from its last checkpoint: the Stage helper
  keeps the folder while the stage's fingerprint is unchanged);
- ``infer``: edge probabilities ``probs.npy`` (N x L, aligned with ``nbrs[:, :L]``) of every
  anchor on Ray workers.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.errors import ConfigError
from .stage import JobContext, StageOutcome

LOG = logging.getLogger(__name__)

#: TrainConfig fields that do not change what is trained (left out of the train stage's fingerprint).
VOLATILE_TRAIN_FIELDS = ("log_every", "prefetch", "max_failures")


def sequence_length(config: Any) -> int:
    return int(config.train.seq_len or config.knn.k)


def sequences_stage(ctx: JobContext, shards: StageOutcome, knn: StageOutcome) -> StageOutcome:
    config = ctx.config
    train = config.train
    seq_len = sequence_length(config)
    if seq_len > config.knn.k:
        raise ConfigError(f"config field 'train.seq_len': {seq_len} tokens but the kNN graph has knn.k = "
                          f"{config.knn.k} neighbours; set knn.k >= {seq_len} or lower train.seq_len")

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.data.shards import read_manifest
        from dist_fair.models.sequences import prepare_sequence_inputs

        attributes = read_manifest(shards.folder).attributes
        if train.group_attribute not in attributes:
            raise ConfigError(f"config field 'train.group_attribute': {train.group_attribute!r} is not an attribute of "
                              f"the shards ({sorted(attributes)}); it names the protected groups of the purity "
                              "penalty and of the training records")
        return prepare_sequence_inputs(shards.folder, knn.folder, folder, seq_len, config.cluster.val_fraction,
                                       train.train_fraction, seed=config.data.seed,
                                       group_attribute=train.group_attribute)

    params = {"seq_len": seq_len, "val_fraction": config.cluster.val_fraction,
              "train_fraction": train.train_fraction, "group_attribute": train.group_attribute,
              "seed": config.data.seed}
    return ctx.stage("sequences", "sequences", params, [shards, knn]).run(work)


def log_training(result: Any, train: Any, label: str) -> None:
    """Log how ``label`` was trained (Ray Train workers and nodes, DeepSpeed ZeRO stage) and its
    loss per epoch, from the engine's history."""
    starts = result.events("start")
    start = starts[-1] if starts else {}
    nodes = len(set(start.get("nodes") or []))
    LOG.info("%s: trained on %s Ray Train worker(s) on %d node(s), DeepSpeed ZeRO stage %s (%s, %s)%s", label,
             start.get("world_size", train.workers), nodes, start.get("zero_stage", "?"), train.deepspeed,
             train.precision, " - already complete, reused" if result.skipped else "")
    epochs = result.events("epoch")
    for record in epochs:
        extra = "".join(f", {k} {record[k]:.4f}" for k in ("eval_loss", "hook_net_acc", "hook_net_balance",
                                                            "hook_fair_balance") if isinstance(record.get(k), float))
        LOG.info("%s: epoch %d/%d  loss %.4f%s  (%.1f s, %.0f samples/s)", label, record.get("epoch", 0) + 1,
                 len(epochs), record.get("loss", float("nan")), extra, record.get("epoch_s", 0.0),
                 record.get("samples_per_s") or 0.0)


def train_params(config: Any) -> dict[str, Any]:
    params = asdict(config.train)
    for volatile in VOLATILE_TRAIN_FIELDS:
        params.pop(volatile)
    return params


def sequence_train_stage(ctx: JobContext, seqs: StageOutcome, knn: StageOutcome) -> StageOutcome:
    """Train ``train.model`` (its registry entry builds the task) into ``<run>/train/``."""
    config = ctx.config

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.tasks.sequence_task import write_spec
        from dist_fair.model_registry import TaskInputs, create_task
        from dist_fair.train.engine import fit

        task = create_task(config, TaskInputs(run_dir=ctx.run_dir, knn=knn.folder, sequences=seqs.folder))
        result = fit(task, config.train, ctx.run_dir, progress=False, force=False)
        log_training(result, config.train, task.name)
        write_spec(task, result.train_dir)
        epochs = result.events("epoch")
        speeds = [r["samples_per_s"] for r in epochs if r.get("samples_per_s")]
        return {"model": task.name, "train_anchors": task.info["train_anchors"], "epochs": config.train.epochs,
                "loss_per_epoch": [r.get("loss") for r in epochs],
                "final": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
                "samples_per_s": float(np.mean(speeds)) if speeds else None}

    return ctx.stage("train", "train", train_params(config), [seqs, knn]).run(work)


def infer_stage(ctx: JobContext, seqs: StageOutcome, knn: StageOutcome, trained: StageOutcome) -> StageOutcome:
    cluster = ctx.config.cluster

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.models.sequences import open_sequence_inputs
        from dist_fair.models.edge_inference import predict_edge_probs
        from dist_fair.tasks.sequence_task import load_trained

        spec, weights = load_trained(trained.folder)
        inputs = open_sequence_inputs(seqs.folder, knn.folder, spec.seq_len)
        inputs.identity_path = inputs.group_path = None  # inference sees no label
        return predict_edge_probs(spec, weights, inputs, folder, workers=cluster.infer_workers,
                                  rows_per_task=cluster.infer_rows_per_task, batch=cluster.infer_batch)

    return ctx.stage("infer", "infer", {}, [seqs, knn, trained]).run(work)


__all__ = ["sequences_stage", "sequence_train_stage", "infer_stage", "sequence_length", "train_params", "log_training"]
