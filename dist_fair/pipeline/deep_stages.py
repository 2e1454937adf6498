"""Stages of the deep (fair) clustering models (``train.model`` dec, imsat, dfdc, fair_dec,
fairoids; METHODS.md §5-6):

- ``train``: :func:`dist_fair.deep.task.train_deep` on Ray Train + DeepSpeed: the DEC family's
  autoencoder phase (``<run>/train/autoencoder``) then the clustering phase
  (``<run>/train/cluster``); DFDC and Fair-DEC recompute the global fair assignment of all N
  samples after every epoch. ``deep_model.json`` records the model's options and input dim;
- ``predict``: the soft assignments ``probs.npy`` (N x K) and the network's labels ``labels.npy``
  of every sample on Ray workers (:mod:`dist_fair.deep.inference`);
- ``fair_assign`` (``fair.enabled``): the global fair assignment (METHODS.md §6) closest to those
  soft assignments, over the protected attribute ``train.group_attribute``: ``labels.npy``. One
  process (``fair.workers=1``) or the auction on ``fair.workers`` Ray actors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.errors import ConfigError
from dist_fair.io_atomic import atomic_save_npy, atomic_write_json
from .sequence_stages import log_training, train_params
from .stage import JobContext, StageOutcome

MODEL_FILE = "deep_model.json"


def deep_train_stage(ctx: JobContext, shards: StageOutcome) -> StageOutcome:
    config = ctx.config

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.data.shards import read_manifest
        from dist_fair.deep.task import autoencoder_train_config, deep_options, options_to_dict, train_deep

        options = deep_options(config, shards.folder)
        result = train_deep(options, str(shards.folder), config.train, folder,
                            ae_train=autoencoder_train_config(config), progress=False)
        for phase, result_phase in result.phases.items():
            log_training(result_phase, autoencoder_train_config(config) if phase == "autoencoder" else config.train,
                         f"{options.method} {phase}")
        dim = int(read_manifest(shards.folder).dim)
        atomic_write_json(folder / MODEL_FILE, {"options": options_to_dict(options), "dim": dim,
                                                "weights": str(result.model_path.relative_to(folder))})
        epochs = result.epoch_records("cluster")
        return {"model": options.method, "n_clusters": options.n_clusters, "attribute": options.attribute,
                "loss_per_epoch": [r.get("loss") for r in epochs],
                "autoencoder_loss_per_epoch": [r.get("loss") for r in result.epoch_records("autoencoder")],
                "final": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}

    params = {"train": train_params(config), "deep": _asdict(config.deep), "group_attribute": config.train.group_attribute,
              "fair": {k: v for k, v in _asdict(config.fair).items() if k not in ("enabled", "workers")}}
    return ctx.stage("train", "train", params, [shards]).run(work)


def _asdict(section: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(section)


def predict_stage(ctx: JobContext, shards: StageOutcome, trained: StageOutcome) -> StageOutcome:
    cluster = ctx.config.cluster

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.deep.inference import predict_soft_assignments
        from dist_fair.train.checkpoint import load_model_weights

        record = json.loads((trained.folder / MODEL_FILE).read_text(encoding="utf-8"))
        weights = {k: v.float() for k, v in load_model_weights(trained.folder / record["weights"]).items()}
        return predict_soft_assignments(record["options"], int(record["dim"]), weights, shards.folder, folder,
                                        workers=cluster.infer_workers, batch=cluster.infer_batch)

    return ctx.stage("predict", "predict", {}, [shards, trained]).run(work)


def fair_assign_stage(ctx: JobContext, shards: StageOutcome, predicted: StageOutcome) -> StageOutcome:
    """The fair assignment of the soft assignments in ``predicted.folder/probs.npy``."""
    config = ctx.config
    fair, attribute = config.fair, config.train.group_attribute

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.data.shards import load_labels

        labels = load_labels(shards.folder)
        if attribute not in labels.attrs:
            raise ConfigError(f"config field 'train.group_attribute': {attribute!r} is not a protected attribute of "
                              f"{shards.folder} (it has {sorted(labels.attrs) or 'none'}); the fair assignment needs one")
        groups = labels.attrs[attribute].astype(np.int64)
        if (groups < 0).any():
            raise ConfigError(f"{shards.folder}: {int((groups < 0).sum())} samples have no {attribute!r} group; the "
                              "fair assignment needs every sample's group")
        probs = np.load(predicted.folder / "probs.npy", allow_pickle=False).astype(np.float64)
        n_groups = len(labels.attribute_names[attribute])
        if fair.workers > 1:
            from dist_fair.fair.distributed import fair_assign_ray

            result = fair_assign_ray(probs, groups, rho=fair.rho, eps=fair.eps, top_m=fair.top_m,
                                     num_workers=fair.workers, n_groups=n_groups)
        else:
            from dist_fair.fair import fair_assign

            result = fair_assign(probs, groups, rho=fair.rho, eps=fair.eps, method=fair.method, top_m=fair.top_m,
                                 n_groups=n_groups)
        atomic_save_npy(folder / "labels.npy", np.asarray(result.labels, dtype=np.int64))
        summary = _asdict(result.report)
        return {"attribute": attribute, "workers": fair.workers,
                **{k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}}

    params = {"eps": fair.eps, "method": fair.method if fair.workers == 1 else "auction", "top_m": fair.top_m,
              "rho": fair.rho, "attribute": attribute}
    return ctx.stage("fair_assign", "fair_assign", params, [shards, predicted]).run(work)


__all__ = ["deep_train_stage", "predict_stage", "fair_assign_stage", "MODEL_FILE"]
