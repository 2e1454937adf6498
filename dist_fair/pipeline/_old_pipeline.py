"""The main job: stages glued together through files (DESIGN.md, "The job, as data flows").

    shards -> knn -> [sequences -> train -> infer] -> cluster -> evaluate

The bracketed stages run for the sequence models (``train.model`` intraformer or clusformer,
METHODS.md §4): ``sequences`` writes the normalised embeddings and the identity split
(train / validation / test identities), ``train`` trains the model on Ray Train + DeepSpeed,
``infer`` predicts the edge probabilities of every anchor on Ray workers, and ``cluster`` decodes
them globally (threshold + union-find, or the confidence-peak rule) with the threshold chosen on
the validation identities. The report then covers the test identities only (neither trained on
nor used for the threshold). Without a model, ``cluster`` decodes the kNN similarities (the
baseline) and the report covers every non-validation identity.

Each stage writes into its own folder of the run folder and, last, ``stage.json`` recording its
parameters (with the fingerprint of the stage before it), timings and outputs. A stage whose
``stage.json`` matches the current parameters is skipped, so a killed run resumes where it
stopped; changed parameters redo that stage and everything after it. Stages never reach into each
other's internals: they read the previous stage's files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dist_fair.config import JobConfig
from dist_fair.errors import ConfigError
from dist_fair.io_atomic import atomic_save_npy, atomic_write_json, atomic_write_text

LOG = logging.getLogger(__name__)

STAGE_RECORD = "stage.json"
#: ``train.model`` values that run the sequences -> train -> infer stages (METHODS.md §4).
SEQUENCE_MODELS = ("intraformer", "clusformer")


@dataclass
class StageOutcome:
    name: str
    folder: Path
    fingerprint: str
    skipped: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def fingerprint(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_stage(name: str, folder: Path, params: dict[str, Any], work: Callable[[Path], dict[str, Any]],
              fresh: bool = False) -> StageOutcome:
    """Run ``work(folder)`` unless the folder already holds this stage's complete output."""
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / STAGE_RECORD
    key = fingerprint({"stage": name, **params})
    if record_path.is_file() and not fresh:
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == key:
            LOG.info("stage %-8s already complete in %s: skipped", name, folder)
            return StageOutcome(name, folder, key, True, 0.0, record.get("info", {}))
    if record_path.exists():
        record_path.unlink()  # about to be redone: never leave a record describing other output
    LOG.info("stage %-8s running -> %s", name, folder)
    start = time.perf_counter()
    info = work(folder)
    seconds = time.perf_counter() - start
    atomic_write_json(record_path, {"stage": name, "fingerprint": key, "params": params, "seconds": seconds,
                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "info": info})
    LOG.info("stage %-8s done in %.1f s", name, seconds)
    return StageOutcome(name, folder, key, False, seconds, info)


# --------------------------------------------------------------------------- stages

def shards_stage(config: JobConfig, run_dir: Path, fresh: bool) -> StageOutcome:
    data = config.data
    if data.source == "shards":
        from dist_fair.data.shards import read_manifest

        folder = Path(data.shards)
        manifest = read_manifest(folder)  # validates
        return StageOutcome("shards", folder, fingerprint({"manifest": [s.sha256 for s in manifest.shards]}), True,
                            0.0, {"samples": manifest.num_samples, "external": True})

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.data.synthetic import generate_synthetic_shards

        manifest = generate_synthetic_shards(
            folder, preset=data.preset, identities=data.identities, images_per_identity=data.images_per_identity,
            dim=data.dim, seed=data.seed, shard_rows=data.shard_rows, block_rows=data.block_rows,
            workers=data.workers)
        return {"samples": manifest.num_samples, "identities": manifest.num_identities,
                "shards": len(manifest.shards), "groups": manifest.group_counts()}

    return run_stage("shards", run_dir / "shards", asdict(data), work, fresh)


def knn_stage(config: JobConfig, shards: StageOutcome, run_dir: Path, fresh: bool) -> StageOutcome:
    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.knn.graph import build_knn_graph

        result = build_knn_graph(shards.folder, folder, config.knn)
        return result if isinstance(result, dict) else getattr(result, "summary", lambda: {})()

    return run_stage("knn", run_dir / "knn", {"upstream": shards.fingerprint, **asdict(config.knn)}, work, fresh)


def sequences_stage(config: JobConfig, shards: StageOutcome, knn: StageOutcome, run_dir: Path,
                    fresh: bool) -> StageOutcome:
    """Inputs of the sequence models: ``emb.npy`` (normalised, id order), ``split.npy`` (test 0 /
    train 1 / validation 2 by identity), ``visible_identity.npy`` (test identities hidden) and
    ``group.npy`` (``train.group_attribute``), see :mod:`dist_fair.knn.sequences`."""
    train = config.train
    seq_len = int(train.seq_len or config.knn.k)

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.data.shards import read_manifest
        from dist_fair.knn.sequences import prepare_sequence_inputs

        attributes = read_manifest(shards.folder).attributes
        group = train.group_attribute if train.group_attribute in attributes else None
        if group is None and train.penalty == "group":
            raise ConfigError(f"config field 'train.group_attribute': {train.group_attribute!r} is not an attribute of "
                              f"the shards ({sorted(attributes)}); the group-aware penalty needs one")
        return prepare_sequence_inputs(shards.folder, knn.folder, folder, seq_len, config.cluster.val_fraction,
                                       train.train_fraction, seed=config.data.seed, group_attribute=group)

    params = {"upstream": [shards.fingerprint, knn.fingerprint], "seq_len": seq_len,
              "val_fraction": config.cluster.val_fraction, "train_fraction": train.train_fraction,
              "group_attribute": train.group_attribute, "seed": config.data.seed}
    return run_stage("sequences", run_dir / "sequences", params, work, fresh)


TRAIN_INPUTS = "stage_inputs.json"


def train_stage(config: JobConfig, seqs: StageOutcome, knn: StageOutcome, run_dir: Path,
                fresh: bool) -> StageOutcome:
    """Train ``train.model`` with the engine (``dist_fair.train.engine.fit``) into ``<run>/train/``.

    The engine resumes a killed run from its last checkpoint; ``stage_inputs.json`` records which
    inputs and settings the engine's files belong to, so changed inputs start training afresh.
    """
    params = {"upstream": [seqs.fingerprint, knn.fingerprint], **asdict(config.train)}
    for volatile in ("log_every", "prefetch", "max_failures"):
        params.pop(volatile)

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.models.intraformer_task import task_from_folders, write_spec
        from dist_fair.train.engine import fit

        key = fingerprint(params)
        inputs_file = folder / TRAIN_INPUTS
        previous = json.loads(inputs_file.read_text()).get("fingerprint") if inputs_file.is_file() else None
        force = fresh or (previous is not None and previous != key) or (previous is None and (folder / "run.json").exists())
        task = task_from_folders(config, seqs.folder, knn.folder)
        if force and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(inputs_file, {"fingerprint": key})
        result = fit(task, config.train, run_dir, progress=False, force=False)
        write_spec(task, result.train_dir)
        metrics = result.metrics
        speeds = [r["samples_per_s"] for r in result.events("epoch") if r.get("samples_per_s")]
        return {"model": task.name, "train_anchors": task.info["train_anchors"], "epochs": config.train.epochs,
                "final": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                "samples_per_s": float(np.mean(speeds)) if speeds else None, "resumed_or_skipped": result.skipped}

    return run_stage("train", run_dir / "train", params, work, fresh)


def infer_stage(config: JobConfig, seqs: StageOutcome, knn: StageOutcome, trained: StageOutcome, run_dir: Path,
                fresh: bool) -> StageOutcome:
    """Edge probabilities ``probs.npy`` (N x L, aligned with ``nbrs[:, :L]``) on Ray workers."""
    cluster = config.cluster

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.knn.sequences import open_sequence_inputs
        from dist_fair.models.edge_inference import predict_edge_probs
        from dist_fair.models.intraformer_task import load_trained

        spec, weights = load_trained(trained.folder)
        inputs = open_sequence_inputs(seqs.folder, knn.folder, spec.seq_len)
        inputs.identity_path = inputs.group_path = None  # inference sees no label
        return predict_edge_probs(spec, weights, inputs, folder, workers=cluster.infer_workers,
                                  rows_per_task=cluster.infer_rows_per_task, batch=cluster.infer_batch)

    params = {"upstream": [seqs.fingerprint, knn.fingerprint, trained.fingerprint]}
    return run_stage("infer", run_dir / "infer", params, work, fresh)


def cluster_stage(config: JobConfig, shards: StageOutcome, knn: StageOutcome, run_dir: Path,
                  fresh: bool, seqs: StageOutcome | None = None, infer: StageOutcome | None = None) -> StageOutcome:
    """Decode to ``labels.npy`` (all N samples). Scores: predicted edge probabilities when ``infer``
    is given, else cosine similarities. ``val_mask.npy``: the samples the threshold was chosen on;
    ``eval_mask.npy``: the samples the report evaluates (test split with a model, else all
    non-validation samples)."""
    cluster = config.cluster
    with_model = infer is not None

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.cluster.edges import choose_decoding, decode_edges
        from dist_fair.cluster.peak import neighbour_confidence
        from dist_fair.cluster.threshold import split_identities
        from dist_fair.data.shards import load_labels

        nbrs = np.load(knn.folder / "nbrs.npy", mmap_mode="r", allow_pickle=False)
        if with_model:
            from dist_fair.knn.sequences import SPLIT_NAME, TEST, VAL

            scores = np.load(infer.folder / "probs.npy", mmap_mode="r", allow_pickle=False)
            nbrs = nbrs[:, :scores.shape[1]]
            grid = cluster.prob_grid
            split = np.load(seqs.folder / SPLIT_NAME, allow_pickle=False)
            val_mask, eval_mask = split == VAL, split == TEST
        else:
            scores = np.load(knn.folder / "sims.npy", mmap_mode="r", allow_pickle=False)
            grid = cluster.threshold_grid
            val_mask = eval_mask = None
        labels = load_labels(shards.folder)
        info: dict[str, Any] = {"method": cluster.method, "scores": "edge probabilities" if with_model else
                                "cosine similarities"}
        confidence = neighbour_confidence(nbrs, scores) if cluster.method == "peak" else None
        if cluster.threshold is None:
            if val_mask is None:
                val_mask = split_identities(labels.identity, cluster.val_fraction, seed=config.data.seed)
            choice = choose_decoding(nbrs, scores, labels.identity, val_mask, grid, cluster.method,
                                     cluster.val_context, confidence, quantiles=cluster.grid_quantiles)
            tau = choice.tau
            info.update(tau=tau, chosen_on=f"validation identities ({cluster.val_context})",
                        val_pairwise_f=choice.val_fscore, val_samples=int(val_mask.sum()), grid=choice.grid)
        else:
            tau = cluster.threshold
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

    upstream = [shards.fingerprint, knn.fingerprint] + ([seqs.fingerprint, infer.fingerprint] if with_model else [])
    params = {"upstream": upstream, **asdict(cluster), "seed": config.data.seed}
    for unused in ("infer_workers", "infer_batch", "infer_rows_per_task"):
        params.pop(unused)
    return run_stage("cluster", run_dir / "cluster", params, work, fresh)


def evaluate_stage(config: JobConfig, shards: StageOutcome, cluster: StageOutcome, run_dir: Path,
                   fresh: bool) -> StageOutcome:
    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.data.shards import load_labels
        from dist_fair.eval.report import evaluate_labels, write_report

        labels = load_labels(shards.folder)
        pred = np.load(cluster.folder / "labels.npy", allow_pickle=False)
        test = np.load(cluster.folder / "eval_mask.npy", allow_pickle=False)
        groups = config.eval.groups or list(labels.attribute_names)
        unknown = [g for g in groups if g not in labels.attribute_names]
        if unknown:
            raise ConfigError(f"config field 'eval.groups': unknown attribute(s) {unknown}; the shards have "
                              f"{list(labels.attribute_names)}")
        report = evaluate_labels(pred[test], labels.identity[test], groups,
                                 attrs={g: labels.attrs[g][test] for g in groups},
                                 attribute_names={g: labels.attribute_names[g] for g in groups})
        excluded = ("the training identities and the validation identities used to choose the threshold"
                    if cluster.info.get("scores") == "edge probabilities" else
                    "the validation identities used to choose the threshold")
        report["evaluated_on"] = f"test identities only ({excluded} are excluded): {int(test.sum())} of {len(test)} samples"
        report["cluster"] = {k: v for k, v in cluster.info.items() if k != "grid"}
        write_report(report, folder, title=f"dist_fair report: {config.run_dir}")
        for name in ("report.json", "report.md", "report.png"):
            if (folder / name).exists():
                shutil.copyfile(folder / name, run_dir / name)
        identity = report.get("identity") or {}
        return {"pairwise_f": (identity.get("pairwise") or {}).get("f"), "report": str(folder / "report.json")}

    params = {"upstream": [shards.fingerprint, cluster.fingerprint], **asdict(config.eval)}
    return run_stage("evaluate", run_dir / "eval", params, work, fresh)


# --------------------------------------------------------------------------- the job

def run_job(config: JobConfig, fresh: bool = False) -> list[StageOutcome]:
    """Run every stage of the job described by ``config`` (skipping completed ones)."""
    from dist_fair.ray_runtime import init_ray

    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    if config.train.model not in ("none",) + SEQUENCE_MODELS:
        raise ConfigError(f"config field 'train.model': {config.train.model!r} is not wired into `dist-fair run` yet; "
                          f"use one of none (the kNN + threshold baseline), {', '.join(SEQUENCE_MODELS)}")
    init_ray(address=config.ray.address, num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard,
             namespace=config.ray.namespace)
    outcomes = []
    shards = shards_stage(config, run_dir, fresh)
    outcomes.append(shards)
    knn = knn_stage(config, shards, run_dir, fresh)
    outcomes.append(knn)
    seqs = infer = None
    if config.train.model in SEQUENCE_MODELS:
        seqs = sequences_stage(config, shards, knn, run_dir, fresh)
        trained = train_stage(config, seqs, knn, run_dir, fresh)
        infer = infer_stage(config, seqs, knn, trained, run_dir, fresh)
        outcomes += [seqs, trained, infer]
    cluster = cluster_stage(config, shards, knn, run_dir, fresh, seqs=seqs, infer=infer)
    outcomes.append(cluster)
    outcomes.append(evaluate_stage(config, shards, cluster, run_dir, fresh))
    atomic_write_text(run_dir / "stages.json", json.dumps(
        [{"stage": o.name, "folder": str(o.folder), "skipped": o.skipped, "seconds": round(o.seconds, 2)}
         for o in outcomes], indent=2) + "\n")
    return outcomes
