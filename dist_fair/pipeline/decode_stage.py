"""Decoding stages: scores on the kNN graph -> cluster labels of all N samples (METHODS.md §4).

- ``cluster``: the trained sequence model's edge probabilities (``infer``) or, without a model,
  the kNN cosine similarities, decoded globally by ``cluster.method`` (threshold + union-find, or
  the confidence-peak rule) with its parameter chosen on the validation identities;
- ``baseline``: next to a sequence model, the kNN baseline (cosine similarities, same decoding
  rule, parameter chosen on the SAME validation identities) so that the report compares both on
  the same test identities.

Each writes ``labels.npy`` (N), ``val_mask.npy`` (the samples the parameter was chosen on) and
``eval_mask.npy`` (the samples the report evaluates: the test split with a model, else every
non-validation sample).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.io_atomic import atomic_save_npy
from .stage import JobContext, StageOutcome

#: ClusterConfig fields that change no label (inference settings).
INFERENCE_FIELDS = ("infer_workers", "infer_batch", "infer_rows_per_task")


def _decode(config: Any, folder: Path, shards: StageOutcome, knn: StageOutcome, seqs: StageOutcome | None,
            infer: StageOutcome | None, neighbours: int | None = None) -> dict[str, Any]:
    from dist_fair.cluster.edges import choose_decoding, decode_edges
    from dist_fair.cluster.peak import neighbour_confidence
    from dist_fair.data.splits import split_identities
    from dist_fair.data.shards import load_labels

    cluster = config.cluster
    nbrs = np.load(knn.folder / "nbrs.npy", mmap_mode="r", allow_pickle=False)
    labels = load_labels(shards.folder)
    val_mask = eval_mask = None
    if seqs is not None:
        from dist_fair.models.sequences import SPLIT_NAME, TEST, VAL

        split = np.load(seqs.folder / SPLIT_NAME, allow_pickle=False)
        val_mask, eval_mask = split == VAL, split == TEST
    if infer is not None:
        scores = np.load(infer.folder / "probs.npy", mmap_mode="r", allow_pickle=False)
        nbrs = nbrs[:, :scores.shape[1]]
        grid, fixed = cluster.prob_grid, cluster.threshold
    else:
        scores = np.load(knn.folder / "sims.npy", mmap_mode="r", allow_pickle=False)
        if neighbours:  # the baseline beside a model: the neighbours the model sees
            nbrs, scores = nbrs[:, :neighbours], scores[:, :neighbours]
        grid = cluster.threshold_grid
        fixed = cluster.threshold if seqs is None else None  # a fixed threshold is the model's, in probabilities
    info: dict[str, Any] = {"method": cluster.method,
                            "scores": "edge probabilities" if infer is not None else "cosine similarities"}
    confidence = neighbour_confidence(nbrs, scores) if cluster.method == "peak" else None
    if fixed is None:
        if val_mask is None:
            val_mask = split_identities(labels.identity, cluster.val_fraction, seed=config.data.seed)
        choice = choose_decoding(nbrs, scores, labels.identity, val_mask, grid, cluster.method, cluster.val_context,
                                 confidence, quantiles=cluster.grid_quantiles)
        tau = choice.tau
        info.update(tau=tau, chosen_on=f"validation identities ({cluster.val_context})",
                    val_pairwise_f=choice.val_fscore, val_samples=int(val_mask.sum()))
    else:
        tau = fixed
        info.update(tau=tau, chosen_on="config")
        if val_mask is None:
            val_mask = np.zeros(len(labels), bool)
    if eval_mask is None:
        eval_mask = ~val_mask
    pred = decode_edges(nbrs, scores, cluster.method, tau, confidence)
    atomic_save_npy(folder / "labels.npy", pred)
    atomic_save_npy(folder / "val_mask.npy", val_mask)
    atomic_save_npy(folder / "eval_mask.npy", eval_mask)
    info["clusters"] = int(pred.max() + 1) if pred.size else 0
    info["evaluated_samples"] = int(eval_mask.sum())
    return info


def _params(config: Any) -> dict[str, Any]:
    params = {k: v for k, v in asdict(config.cluster).items() if k not in INFERENCE_FIELDS}
    params["seed"] = config.data.seed
    return params


def cluster_stage(ctx: JobContext, shards: StageOutcome, knn: StageOutcome, seqs: StageOutcome | None = None,
                  infer: StageOutcome | None = None) -> StageOutcome:
    """Decode the model's edge probabilities (``infer`` given) or the kNN similarities."""
    config = ctx.config
    upstream = [shards, knn] + ([seqs, infer] if infer is not None else [])
    return ctx.stage("cluster", "cluster", _params(config), upstream).run(
        lambda folder: _decode(config, folder, shards, knn, seqs, infer))


def baseline_stage(ctx: JobContext, shards: StageOutcome, knn: StageOutcome, seqs: StageOutcome) -> StageOutcome:
    """The kNN baseline on the sequence model's split: its first ``seq_len`` neighbours, the same
    decoding rule, its parameter chosen on the same validation identities, evaluated on the same
    test identities."""
    config = ctx.config
    params = {**_params(config), "seq_len": int(config.train.seq_len or config.knn.k)}

    return ctx.stage("baseline", "baseline", params, [shards, knn, seqs]).run(
        lambda folder: _decode(config, folder, shards, knn, seqs, None, neighbours=params["seq_len"]))


__all__ = ["cluster_stage", "baseline_stage"]
