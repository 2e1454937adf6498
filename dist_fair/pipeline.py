"""The main job: stages glued together through files (DESIGN.md, "The job, as data flows").

    shards -> knn -> [train] -> cluster -> evaluate

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


def cluster_stage(config: JobConfig, shards: StageOutcome, knn: StageOutcome, run_dir: Path,
                  fresh: bool) -> StageOutcome:
    cluster = config.cluster

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.cluster.threshold import choose_threshold, split_identities, threshold_clusters
        from dist_fair.data.shards import load_labels

        nbrs = np.load(knn.folder / "nbrs.npy", mmap_mode="r", allow_pickle=False)
        sims = np.load(knn.folder / "sims.npy", mmap_mode="r", allow_pickle=False)
        labels = load_labels(shards.folder)
        info: dict[str, Any] = {"method": cluster.method}
        val_mask = np.zeros(len(labels), bool)
        if cluster.threshold is None:
            val_mask = split_identities(labels.identity, cluster.val_fraction, seed=config.data.seed)
            choice = choose_threshold(nbrs, sims, labels.identity, val_mask, cluster.threshold_grid)
            tau = choice.tau
            info.update(tau=tau, chosen_on="validation identities", val_pairwise_f=choice.val_fscore,
                        val_samples=int(val_mask.sum()), grid=choice.grid)
        else:
            tau = cluster.threshold
            info.update(tau=tau, chosen_on="config")
        pred = threshold_clusters(nbrs, sims, tau)
        atomic_save_npy(folder / "labels.npy", pred)
        atomic_save_npy(folder / "val_mask.npy", val_mask)
        info["clusters"] = int(pred.max() + 1) if pred.size else 0
        return info

    params = {"upstream": [shards.fingerprint, knn.fingerprint], **asdict(cluster), "seed": config.data.seed}
    return run_stage("cluster", run_dir / "cluster", params, work, fresh)


def evaluate_stage(config: JobConfig, shards: StageOutcome, cluster: StageOutcome, run_dir: Path,
                   fresh: bool) -> StageOutcome:
    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.data.shards import load_labels
        from dist_fair.eval.report import evaluate_labels, write_report

        labels = load_labels(shards.folder)
        pred = np.load(cluster.folder / "labels.npy", allow_pickle=False)
        val_mask = np.load(cluster.folder / "val_mask.npy", allow_pickle=False)
        test = ~val_mask
        groups = config.eval.groups or list(labels.attribute_names)
        unknown = [g for g in groups if g not in labels.attribute_names]
        if unknown:
            raise ConfigError(f"config field 'eval.groups': unknown attribute(s) {unknown}; the shards have "
                              f"{list(labels.attribute_names)}")
        report = evaluate_labels(pred[test], labels.identity[test], groups,
                                 attrs={g: labels.attrs[g][test] for g in groups},
                                 attribute_names={g: labels.attribute_names[g] for g in groups})
        report["evaluated_on"] = ("test identities only (the validation identities used to choose the threshold "
                                  f"are excluded): {int(test.sum())} of {len(test)} samples")
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
    if config.train.model != "none":
        raise ConfigError(f"config field 'train.model': {config.train.model!r} is not wired into `dist-fair run` yet; "
                          "use train.model=none (the kNN + threshold baseline)")
    init_ray(address=config.ray.address, num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard,
             namespace=config.ray.namespace)
    outcomes = []
    shards = shards_stage(config, run_dir, fresh)
    outcomes.append(shards)
    knn = knn_stage(config, shards, run_dir, fresh)
    outcomes.append(knn)
    cluster = cluster_stage(config, shards, knn, run_dir, fresh)
    outcomes.append(cluster)
    outcomes.append(evaluate_stage(config, shards, cluster, run_dir, fresh))
    atomic_write_text(run_dir / "stages.json", json.dumps(
        [{"stage": o.name, "folder": str(o.folder), "skipped": o.skipped, "seconds": round(o.seconds, 2)}
         for o in outcomes], indent=2) + "\n")
    return outcomes
