"""The model registry: every trainable ``train.model`` is declared here, once (timm's
``register_model`` / ``create_model`` pattern).

An entry says what the pipeline and the training CLI need to know about a model:

- ``family``: how ``dist-fair run`` runs it: ``"sequence"`` (kNN sequences -> edge probabilities
  -> global decoding; METHODS.md §4), ``"deep"`` (embeddings -> soft assignments -> optional
  global fair assignment; METHODS.md §5-6) or ``"probe"`` (the engine's built-in identity probe,
  ``dist-fair train`` only);
- ``task_builder``: ``"package.module:function"`` building its
  :class:`~dist_fair.train.task.TrainTask` as ``function(job, inputs)`` where ``inputs`` is a
  :class:`TaskInputs` (the folders of the stages it trains on). The module is imported only when
  that model trains, so this module (and ``dist_fair.config``, which reads the names from here)
  imports nothing but the standard library;
- ``config``: its configuration schema: the dotted config fields that are its hyper-parameters
  (``train.width``, ``deep.beta``, ...), shown by ``dist-fair run --plan`` and checked by the
  config-coverage test;
- ``summary``: one line for listings and error messages;
- ``fair_training``: the global fair assignment feeds its loss after every epoch (DFDC, Fair-DEC).

Adding a model: write its task builder, then one :func:`register_model` call below.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("sequence", "deep", "probe")


@dataclass(frozen=True)
class TaskInputs:
    """Folders a task builder trains on (None where its family needs none).

    Attributes:
        run_dir: the run folder (phases that train before the task, e.g. DEC's autoencoder, go below it).
        shards: the embedding shard folder (``manifest.json``).
        knn: the kNN graph folder (``nbrs.npy``, ``sims.npy``); sequence models only.
        sequences: the sequence inputs folder (``emb.npy``, ``split.npy``, ...); sequence models only.
    """

    run_dir: Path
    shards: Path | None = None
    knn: Path | None = None
    sequences: Path | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One registered model (see the module docstring)."""

    name: str
    family: str
    task_builder: str
    config: tuple[str, ...] = ()
    summary: str = ""
    fair_training: bool = False

    def build_task(self, job: Any, inputs: TaskInputs) -> Any:
        """Import the builder's module and build the task of ``job`` over ``inputs``."""
        import importlib

        module_name, function_name = self.task_builder.split(":")
        return getattr(importlib.import_module(module_name), function_name)(job, inputs)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, family: str, task_builder: str, config: tuple[str, ...] = (), summary: str = "",
                   fair_training: bool = False) -> ModelEntry:
    """Declare ``train.model=<name>``; returns its entry. Raises ValueError on a malformed entry or a
    name registered twice."""
    if family not in FAMILIES:
        raise ValueError(f"register_model({name!r}): family {family!r} is not one of {FAMILIES}")
    if task_builder.count(":") != 1:
        raise ValueError(f"register_model({name!r}): task_builder {task_builder!r} must look like 'package.module:function'")
    if name in _REGISTRY or name == "none":
        raise ValueError(f"register_model: the model name {name!r} is taken")
    entry = ModelEntry(name, family, task_builder, tuple(config), summary, fair_training)
    _REGISTRY[name] = entry
    return entry


def model_names(family: str | None = None) -> tuple[str, ...]:
    """Registered names (in registration order), optionally of one family."""
    return tuple(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_model(name: str) -> ModelEntry:
    """The entry of ``name``; ConfigError naming the field and the choices for an unknown one."""
    from dist_fair.errors import ConfigError

    if name not in _REGISTRY:
        raise ConfigError(f"config field 'train.model': {name!r} is not a registered model; choose one of "
                          f"{', '.join(model_names())}")
    return _REGISTRY[name]


def create_task(job: Any, inputs: TaskInputs) -> Any:
    """The :class:`~dist_fair.train.task.TrainTask` of ``job.train.model`` over ``inputs``."""
    return get_model(job.train.model).build_task(job, inputs)


# ----------------------------------------------------------------------------- the models

_SEQUENCE_CONFIG = ("train.seq_len", "train.width", "train.heads", "train.layers", "train.sub_clusters",
                    "train.cross", "train.sim_features", "train.dropout", "train.train_fraction",
                    "train.samples_per_epoch", "train.eval_anchors")
_DEEP_CONFIG = ("deep.n_clusters", "train.group_attribute", "fair.rho", "fair.eps", "fair.method", "fair.top_m")
_DISCRIMINATIVE_CONFIG = ("deep.backbone", "deep.hidden", "deep.image_shape", "deep.gamma", "deep.mu",
                          "deep.vat_eps", "deep.vat_xi", "deep.alpha")
_CENTROID_CONFIG = ("deep.latent_dim", "deep.ae_hidden", "deep.ae_epochs", "deep.ae_lr", "deep.alpha",
                    "deep.kmeans_sample", "deep.kmeans_iters")

register_model("intraformer", "sequence", "dist_fair.tasks.sequence_task:build_sequence_task",
               _SEQUENCE_CONFIG + ("train.penalty", "train.penalty_weight", "train.bce_weight", "train.group_attribute"),
               "Intraformer: sub-cluster + cross attention over kNN sequences, soft FM + lambda purity penalty "
               "(METHODS.md §4)")
register_model("clusformer", "sequence", "dist_fair.tasks.sequence_task:build_sequence_task", _SEQUENCE_CONFIG,
               "Clusformer baseline: a plain transformer encoder over kNN sequences with BCE (METHODS.md §4)")
register_model("dec", "deep", "dist_fair.deep.task:build_deep_task", _DEEP_CONFIG + _CENTROID_CONFIG,
               "DEC: autoencoder, k-means centroids, KL(P || Q) (METHODS.md §5)")
register_model("imsat", "deep", "dist_fair.deep.task:build_deep_task", _DEEP_CONFIG + _DISCRIMINATIVE_CONFIG,
               "IMSAT: mutual information + VAT (METHODS.md §5)")
register_model("dfdc", "deep", "dist_fair.deep.task:build_deep_task",
               _DEEP_CONFIG + _DISCRIMINATIVE_CONFIG + ("deep.pretrain_epochs", "deep.beta"),
               "DFDC: IMSAT + beta L_Fair with the global fair assignment after every epoch (METHODS.md §5-6)",
               fair_training=True)
register_model("fair_dec", "deep", "dist_fair.deep.task:build_deep_task",
               _DEEP_CONFIG + _CENTROID_CONFIG + ("deep.pretrain_epochs", "deep.beta"),
               "Fair-DEC: DEC + beta L_Fair with the global fair assignment after every epoch (METHODS.md §5-6)",
               fair_training=True)
register_model("fairoids", "deep", "dist_fair.deep.task:build_deep_task", _DEEP_CONFIG + _CENTROID_CONFIG + ("deep.beta",),
               "Fairoids: DEC + beta KL(S || R) towards the group fairoids (METHODS.md §5)")
register_model("probe", "probe", "dist_fair.train.probe:build_probe_task", ("train.hidden",),
               "the engine's built-in MLP probe (embeddings -> identity); `dist-fair train` only")

__all__ = ["FAMILIES", "TaskInputs", "ModelEntry", "register_model", "model_names", "get_model", "create_task"]
