"""The Intraformer / Clusformer as a ``TrainTask`` for the engine (``dist_fair.train``; METHODS.md §4).

Each Ray Train worker streams sequence blocks of its disjoint share of the training anchors
(:class:`dist_fair.models.sequences.SequenceStreams`, built from memory-mapped ``emb.npy`` and the kNN
graph), runs ``logits = model(tokens, valid)`` and the loss of :mod:`dist_fair.losses.clustering`
with the engine's collective, so ``gamma_f`` (and the group means of the group-aware penalty) is
computed over the GLOBAL batch. The Intraformer minimises soft Fowlkes-Mallows plus lambda times
the purity penalty (plus an optional BCE term); the Clusformer baseline minimises BCE (its
purity metrics are still logged). After each epoch the validation loss is evaluated on up to
``train.eval_anchors`` validation anchors.

``model.json`` (the :class:`~dist_fair.models.intraformer.ModelSpec`) is written next to the
engine's ``model.pt`` so inference can rebuild the model.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.errors import ConfigError
from dist_fair.models.sequences import TRAIN, VAL, SequenceInputs, SequenceStreams
from dist_fair.losses.clustering import LossConfig
from dist_fair.models.intraformer import ModelSpec
from dist_fair.model_registry import model_names
from dist_fair.train.task import TrainTask

LOG = logging.getLogger(__name__)

SPEC_FILE = "model.json"
#: the sequence models of the registry (dist_fair/model_registry.py).
SEQUENCE_MODELS = model_names("sequence")


def model_spec(train: Any, in_dim: int, seq_len: int) -> ModelSpec:
    """The :class:`ModelSpec` of ``train.model`` from the ``train`` config section."""
    if train.model not in SEQUENCE_MODELS:
        raise ConfigError(f"config field 'train.model': {train.model!r} is not a sequence model {SEQUENCE_MODELS}")
    return ModelSpec(kind=train.model, in_dim=in_dim, seq_len=seq_len, width=train.width, heads=train.heads,
                     layers=train.layers, sub_clusters=train.sub_clusters, cross=train.cross,
                     sim_features=train.sim_features, dropout=train.dropout)


def loss_config(train: Any, num_groups: int) -> LossConfig:
    """Intraformer: FM + lambda * penalty (+ BCE); Clusformer: BCE, no penalty."""
    if train.model == "clusformer":
        return LossConfig(objective="bce", penalty="none", weight=0.0, num_groups=num_groups)
    return LossConfig(objective="fm", penalty=train.penalty, weight=train.penalty_weight, bce_weight=train.bce_weight,
                      num_groups=num_groups)


def sequence_forward(model: Any, batch: dict[str, Any]) -> Any:
    """``logits = model(tokens, valid)`` (B x L)."""
    return model(batch["tokens"], batch["valid"])


@dataclass
class SequenceLoss:
    """``loss_fn`` of the task: :func:`dist_fair.losses.clustering.clustering_loss` with the
    engine's collective (picklable)."""

    config: LossConfig

    def __call__(self, batch: dict[str, Any], logits: Any, ctx: Any) -> tuple[Any, dict[str, Any]]:
        from dist_fair.losses.clustering import clustering_loss

        return clustering_loss(logits, batch["target"], batch["mask"], self.config, batch.get("group"),
                               ctx.collective if ctx is not None else None)


def _make_model(spec: dict[str, Any]) -> Any:
    from dist_fair.models.intraformer import build_model

    return build_model(spec)


def sequence_task(spec: ModelSpec, inputs: SequenceInputs, train_rows: np.ndarray, loss: LossConfig,
                  eval_rows: np.ndarray | None = None, block_rows: int = 256,
                  samples_per_epoch: int | None = None) -> TrainTask:
    """A task training ``spec`` on the anchors ``train_rows`` (one epoch = ``samples_per_epoch``
    anchors, default all of them), evaluating on ``eval_rows`` after each epoch."""
    if loss.penalty == "group" and inputs.group_path is None:
        raise ConfigError("train.penalty=group needs the anchors' protected groups (train.group_attribute)")
    streams = SequenceStreams(inputs, train_rows, eval_rows if eval_rows is not None and len(eval_rows) else None,
                              block_rows=block_rows)
    return TrainTask(
        name=spec.kind,
        model_factory=functools.partial(_make_model, spec.to_dict()),
        loss_fn=SequenceLoss(loss),
        forward=sequence_forward,
        train_stream=streams.train,
        eval_stream=streams.eval if streams.eval_rows is not None else None,
        num_samples=int(min(samples_per_epoch or streams.num_samples, streams.num_samples)),
        float_keys=("tokens",),
        info={"spec": spec.to_dict(), "loss": asdict(loss), "train_anchors": int(streams.num_samples),
              "eval_anchors": 0 if streams.eval_rows is None else int(streams.eval_rows.size)},
    )


def task_from_folders(job: Any, seq_dir: str | Path, knn_dir: str | Path) -> TrainTask:
    """The task of ``job.train`` over a sequences folder (``dist_fair.models.sequences``) and a kNN
    graph folder: training anchors = the training split, evaluation = up to
    ``train.eval_anchors`` validation anchors (a seeded random subset)."""
    from dist_fair.models.sequences import SPLIT_NAME, open_sequence_inputs

    train = job.train
    info = json.loads((Path(seq_dir) / "sequences.json").read_text(encoding="utf-8"))
    seq_len = int(train.seq_len or job.knn.k)
    if seq_len != int(info["seq_len"]):
        raise ConfigError(f"the sequences in {seq_dir} have {info['seq_len']} tokens but train.seq_len resolves to "
                          f"{seq_len}; rerun the sequences stage")
    inputs = open_sequence_inputs(seq_dir, knn_dir, seq_len)
    if train.penalty != "group":
        inputs.group_path = None  # the group is read only where it is used
    split = np.load(Path(seq_dir) / SPLIT_NAME, allow_pickle=False)
    train_rows = np.nonzero(split == TRAIN)[0]
    val_rows = np.nonzero(split == VAL)[0]
    if train.eval_anchors and val_rows.size > train.eval_anchors:
        val_rows = np.sort(np.random.default_rng(train.seed).choice(val_rows, train.eval_anchors, replace=False))
    eval_rows = val_rows if train.eval_anchors else None
    spec = model_spec(train, int(info["dim"]), seq_len)
    return sequence_task(spec, inputs, train_rows, loss_config(train, inputs.num_groups), eval_rows=eval_rows,
                         block_rows=max(1, min(256, train.batch_size)), samples_per_epoch=train.samples_per_epoch)


def write_spec(task: TrainTask, train_dir: str | Path) -> Path:
    """Save the task's model spec as ``model.json`` beside the engine's ``model.pt``."""
    from dist_fair.io_atomic import atomic_write_json

    path = Path(train_dir) / SPEC_FILE
    atomic_write_json(path, task.info["spec"])
    return path


def load_trained(train_dir: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """``(spec, state_dict)`` of a finished training run folder (``model.json`` + ``model.pt``)."""
    from dist_fair.errors import DataError
    from dist_fair.train.checkpoint import load_model_weights

    train_dir = Path(train_dir)
    spec_path, model_path = train_dir / SPEC_FILE, train_dir / "model.pt"
    if not spec_path.is_file() or not model_path.is_file():
        raise DataError(f"{train_dir} holds no trained sequence model ({SPEC_FILE} and model.pt needed); "
                        "run the train stage first")
    spec = ModelSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
    weights = {k: v.float() for k, v in load_model_weights(model_path).items()}
    return spec, weights


def build_sequence_task(job: Any, inputs: Any) -> TrainTask:
    """``train.model=intraformer|clusformer`` (the registry's builder): the task over the sequence
    inputs ``inputs.sequences`` and the kNN graph ``inputs.knn`` (written by the pipeline's stages)."""
    if inputs.sequences is None or inputs.knn is None:
        raise ConfigError(f"train.model={job.train.model}: the task needs the sequences and kNN stages' folders")
    return task_from_folders(job, inputs.sequences, inputs.knn)


__all__ = ["SEQUENCE_MODELS", "SPEC_FILE", "model_spec", "loss_config", "sequence_forward", "SequenceLoss",
           "sequence_task", "task_from_folders", "write_spec", "load_trained", "build_sequence_task"]
