"""One cell of one stage of a scaling study, through the library's own functions.

Every stage reads the outputs of the stages before it in the same cell folder
(``<out>/work/n<N>-w<W>/``) and writes its own sub-folder; a stage is complete when its marker
file exists. What each stage runs (``W`` = the cell's workers):

- ``shards``: :func:`dist_fair.data.synthetic.generate_synthetic_shards` (``N / images`` identities,
  ``W`` Ray shard writers), or with ``--shards`` the first N samples of the user's shard folder
  rewritten by :func:`dist_fair.data.shards.write_embedding_shards` (``W`` writers);
- ``knn``: :func:`dist_fair.knn.build_knn_graph` (``W`` index actors);
- ``sequences``: :func:`dist_fair.models.sequences.prepare_sequence_inputs` (single process);
- ``train``: ONE epoch over the training split (``val_fraction`` of the identities validate,
  ``train_fraction`` of the rest train, as in the job) of the Intraformer through
  :func:`dist_fair.train.engine.fit` (Ray Train + DeepSpeed ZeRO-1, ``W`` workers), the task from
  :func:`dist_fair.tasks.sequence_task.task_from_folders`;
- ``infer``: edge probabilities of every anchor, :func:`dist_fair.models.edge_inference.predict_edge_probs`
  (``W`` Ray tasks at once);
- ``cluster``: :func:`dist_fair.cluster.edges.decode_edges` (threshold 0.5 on the edge
  probabilities; single process);
- ``fair_assign``: DEC's Student-t soft assignment
  (:func:`dist_fair.losses.deep_clustering.student_t_assignment`) of the normalised embeddings to
  ``clusters`` k-means centres (faiss, on at most 20,000 rows), then
  :func:`dist_fair.fair.fair_assign` (``W = 1``) or :func:`dist_fair.fair.distributed.fair_assign_ray`
  (``W`` actors) on those soft assignments with the protected attribute's population proportions,
  tolerance ``fair_eps``;
- ``evaluate``: :func:`dist_fair.eval.report.evaluate_labels` of the decoded clusters (single process).

The parts of a stage that are preparation rather than the stage's own work are timed separately
in the cell's ``parts`` (e.g. the soft assignments before the fair assignment).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dist_fair.errors import ConfigError, DataError

LOG = logging.getLogger(__name__)

STAGES = ("shards", "knn", "sequences", "train", "infer", "cluster", "evaluate", "fair_assign")
#: stages whose work runs on ``W`` Ray workers (the others are single-process; their efficiency is
#: reported but says only how the machine's load changed).
PARALLEL_STAGES = ("shards", "knn", "train", "infer", "fair_assign")
DEPENDS: dict[str, tuple[str, ...]] = {
    "shards": (), "knn": ("shards",), "sequences": ("shards", "knn"), "train": ("sequences",),
    "infer": ("train",), "cluster": ("infer",), "fair_assign": ("shards",), "evaluate": ("cluster",),
}
DONE = ".done.json"


@dataclass(frozen=True)
class ScaleSettings:
    """Everything that decides a cell's result apart from its size and workers (its fingerprint)."""

    dim: int = 128
    images_per_identity: float | None = 46.0  # None: the preset's own table (realistic: LFW's long tail)
    preset: str = "balanced"
    seed: int = 0
    shard_rows: int = 32768
    user_shards: str | None = None
    group_attribute: str = "race"
    k: int = 40
    index: str = "ivfpq_fs"
    recall_sample: int = 200
    seq_len: int = 20
    val_fraction: float = 0.2
    train_fraction: float = 0.5
    width: int = 32
    layers: int = 1
    batch_size: int = 128
    deepspeed: str = "zero1_cpu"
    infer_rows_per_task: int = 8192
    decode_tau: float = 0.5
    clusters: int = 100
    fair_eps: float = 0.05

    def __post_init__(self) -> None:
        if self.seq_len > self.k:
            raise ConfigError(f"scale: --seq-len {self.seq_len} exceeds --k {self.k}; the sequences are cut from the "
                              "kNN graph, so use --seq-len <= --k")
        if self.index not in ("auto", "flat", "ivf", "hnsw", "ivfpq", "ivfpq_fs"):
            raise ConfigError(f"scale: --index {self.index!r}; choose flat, ivf, hnsw, ivfpq, ivfpq_fs or auto")
        if self.clusters < 2:
            raise ConfigError(f"scale: --clusters {self.clusters}; the fair assignment needs at least 2 clusters")

    def fingerprint(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class Cell:
    """One grid point: ``stage`` at target size ``n`` with ``workers``; ``folder`` holds every stage
    of the same (n, workers)."""

    stage: str
    n: int
    workers: int
    folder: Path
    settings: ScaleSettings
    parts: dict[str, float] = field(default_factory=dict)

    def path(self, stage: str) -> Path:
        return self.folder / stage

    def done(self, stage: str) -> bool:
        return (self.path(stage) / DONE).is_file()

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        from dist_fair.io_atomic import atomic_write_json

        atomic_write_json(self.path(stage) / DONE, info)


def _timed(cell: Cell, name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    cell.parts[name] = round(time.perf_counter() - start, 4)
    return out


def _num_samples(cell: Cell) -> int:
    from dist_fair.data.shards import read_manifest

    return int(read_manifest(cell.path("shards")).num_samples)


def run_shards(cell: Cell) -> dict[str, Any]:
    import shutil

    s = cell.settings
    out = cell.path("shards")
    shutil.rmtree(out, ignore_errors=True)
    if s.user_shards is None:
        from dist_fair.data.synthetic import generate_synthetic_shards

        from dist_fair.data.synthetic import spec_from_preset

        mean_images = s.images_per_identity or spec_from_preset(s.preset, dim=s.dim).images_per_identity
        manifest = generate_synthetic_shards(out, preset=s.preset, identities=max(2, round(cell.n / mean_images)),
                                             images_per_identity=s.images_per_identity, dim=s.dim, seed=s.seed,
                                             shard_rows=s.shard_rows, workers=cell.workers, progress=False)
    else:
        from dist_fair.data.shards import load_embeddings, load_labels, read_manifest, write_embedding_shards

        source = read_manifest(s.user_shards)
        if cell.n > source.num_samples:
            raise DataError(f"scale: size {cell.n} exceeds the {source.num_samples} samples of {s.user_shards}; "
                            f"use --sizes up to {source.num_samples}")
        emb = _timed(cell, "read_s", lambda: load_embeddings(s.user_shards))[:cell.n]
        labels = load_labels(s.user_shards)
        manifest = write_embedding_shards(out, emb, identity=labels.identity[:cell.n],
                                          attrs={a: v[:cell.n] for a, v in labels.attrs.items()},
                                          attribute_names=labels.attribute_names, shard_rows=s.shard_rows,
                                          dtype=source.dtype or "float32", workers=cell.workers)
    return {"samples": int(manifest.num_samples), "shards": len(manifest.shards)}


def run_knn(cell: Cell) -> dict[str, Any]:
    from dist_fair.config import KNNConfig
    from dist_fair.knn import build_knn_graph

    s = cell.settings
    config = KNNConfig(k=s.k, index=s.index, workers=cell.workers, recall_sample=s.recall_sample, gpu="no",
                       seed=s.seed)
    result = build_knn_graph(cell.path("shards"), cell.path("knn"), config, resume=False, progress=False)
    cell.parts.update({f"knn_{k}": round(float(v), 4) for k, v in result.timings.items()})
    return {"samples": result.num_samples, "index": result.index, "recall_at_k": result.recall_at_k,
            "same_identity_recall": result.same_identity_recall}


def _job(cell: Cell) -> Any:
    from dist_fair.config import JobConfig, KNNConfig, TrainConfig

    s = cell.settings
    train = TrainConfig(model="intraformer", deepspeed=s.deepspeed, workers=cell.workers, cpus_per_worker=1,
                        placement="PACK", epochs=1, batch_size=s.batch_size, seq_len=s.seq_len, width=s.width,
                        layers=s.layers, seed=s.seed, group_attribute=s.group_attribute,
                        train_fraction=s.train_fraction, eval_anchors=0, log_every=50, max_failures=1)
    return JobConfig(knn=KNNConfig(k=s.k, index=s.index), train=train)


def run_sequences(cell: Cell) -> dict[str, Any]:
    from dist_fair.models.sequences import prepare_sequence_inputs

    s = cell.settings
    info = prepare_sequence_inputs(cell.path("shards"), cell.path("knn"), cell.path("sequences"), s.seq_len,
                                   val_fraction=s.val_fraction, train_fraction=s.train_fraction, seed=s.seed,
                                   group_attribute=s.group_attribute)
    return {"samples": int(info["samples"]), "split_samples": info.get("split_samples")}


def run_train(cell: Cell) -> dict[str, Any]:
    from dist_fair.tasks.sequence_task import task_from_folders, write_spec  # E may move these: lazy
    from dist_fair.train.engine import fit

    job = _job(cell)
    task = _timed(cell, "task_s", lambda: task_from_folders(job, cell.path("sequences"), cell.path("knn")))
    result = fit(task, job.train, cell.path("train"), progress=False, force=True)
    write_spec(task, result.train_dir)
    epochs = result.events("epoch")
    if epochs and epochs[-1].get("epoch_s") is not None:
        cell.parts["epoch_s"] = round(float(epochs[-1]["epoch_s"]), 4)  # the engine's own epoch time
        if epochs[-1].get("cpu_s") is not None:
            cell.parts["epoch_cpu_s"] = round(float(epochs[-1]["cpu_s"]), 3)  # all workers' processes
    return {"samples": int(task.num_samples), "train_dir": str(result.train_dir),
            "samples_per_s": epochs[-1].get("samples_per_s") if epochs else None,
            "loss": epochs[-1].get("loss") if epochs else None}


def run_infer(cell: Cell) -> dict[str, Any]:
    from dist_fair.models.sequences import open_sequence_inputs
    from dist_fair.models.edge_inference import predict_edge_probs
    from dist_fair.tasks.sequence_task import load_trained

    s = cell.settings
    train_dir = json.loads((cell.path("train") / DONE).read_text(encoding="utf-8"))["train_dir"]
    spec, weights = load_trained(train_dir)
    inputs = open_sequence_inputs(cell.path("sequences"), cell.path("knn"), s.seq_len)
    inputs.identity_path = inputs.group_path = None
    summary = predict_edge_probs(spec, weights, inputs, cell.path("infer"), workers=cell.workers,
                                 rows_per_task=s.infer_rows_per_task, batch=256)
    return {"samples": int(summary["samples"]), "anchors_per_s": summary.get("anchors_per_s")}


def run_cluster(cell: Cell) -> dict[str, Any]:
    from dist_fair.cluster.edges import decode_edges
    from dist_fair.io_atomic import atomic_save_npy

    probs = np.load(cell.path("infer") / "probs.npy", allow_pickle=False)
    nbrs = np.load(cell.path("knn") / "nbrs.npy", mmap_mode="r", allow_pickle=False)[:, :probs.shape[1]]
    labels = decode_edges(np.asarray(nbrs), probs, "threshold", cell.settings.decode_tau)
    cell.path("cluster").mkdir(parents=True, exist_ok=True)
    atomic_save_npy(cell.path("cluster") / "labels.npy", labels.astype(np.int64))
    return {"samples": int(labels.size), "clusters": int(np.unique(labels).size)}


def soft_assignments(emb: np.ndarray, clusters: int, seed: int, sample: int = 20000,
                     block: int = 65536) -> np.ndarray:
    """DEC's Student-t soft assignment of ``emb`` to ``clusters`` faiss k-means centres (trained on
    at most ``sample`` rows), computed ``block`` rows at a time; float32 ``(N, clusters)``."""
    import faiss
    import torch

    from dist_fair.losses.deep_clustering import student_t_assignment

    rows = emb if emb.shape[0] <= sample else emb[np.sort(np.random.default_rng(seed).choice(
        emb.shape[0], sample, replace=False))]
    kmeans = faiss.Kmeans(emb.shape[1], clusters, niter=10, seed=seed + 1, verbose=False)
    kmeans.train(np.ascontiguousarray(rows, dtype=np.float32))
    centres = torch.from_numpy(kmeans.centroids.astype(np.float32))
    out = np.empty((emb.shape[0], clusters), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, emb.shape[0], block):
            z = torch.from_numpy(np.ascontiguousarray(emb[start:start + block], dtype=np.float32))
            out[start:start + block] = student_t_assignment(z, centres).numpy()
    return out


def run_fair_assign(cell: Cell) -> dict[str, Any]:
    from dist_fair.data.shards import load_embeddings, load_labels
    from dist_fair.io_atomic import atomic_save_npy
    from dist_fair.knn.search import normalize_rows

    s = cell.settings
    labels = load_labels(cell.path("shards"))
    if s.group_attribute not in labels.attrs:
        raise ConfigError(f"scale: --group-attribute {s.group_attribute!r} is not an attribute of the shards "
                          f"({sorted(labels.attrs)})")
    groups = labels.attrs[s.group_attribute].astype(np.int64)
    if (groups < 0).any():
        raise DataError(f"scale: {int((groups < 0).sum())} samples have no {s.group_attribute!r} group; the fair "
                        "assignment needs every sample's group")
    n_groups = len(labels.attribute_names[s.group_attribute])
    emb = _timed(cell, "load_s", lambda: normalize_rows(load_embeddings(cell.path("shards"))))
    probs = _timed(cell, "soft_assign_s", lambda: soft_assignments(emb, s.clusters, s.seed))
    start = time.perf_counter()
    if cell.workers > 1:
        from dist_fair.fair.distributed import fair_assign_ray

        result = fair_assign_ray(probs, groups, eps=s.fair_eps, num_workers=cell.workers, n_groups=n_groups)
    else:
        from dist_fair.fair import fair_assign

        result = fair_assign(probs, groups, eps=s.fair_eps, n_groups=n_groups)
    cell.parts["fair_assign_s"] = round(time.perf_counter() - start, 4)
    cell.path("fair_assign").mkdir(parents=True, exist_ok=True)
    atomic_save_npy(cell.path("fair_assign") / "labels.npy", np.asarray(result.labels, dtype=np.int64))
    report = result.report
    return {"samples": int(groups.size), "clusters": s.clusters,
            "balance_before": report.balance_before, "balance_after": report.balance_after,
            "samples_changed": report.samples_changed}


def run_evaluate(cell: Cell) -> dict[str, Any]:
    from dist_fair.data.shards import load_labels
    from dist_fair.eval.report import evaluate_labels
    from dist_fair.io_atomic import atomic_write_json

    labels = load_labels(cell.path("shards"))
    pred = np.load(cell.path("cluster") / "labels.npy", allow_pickle=False)
    report = evaluate_labels(pred, labels, [cell.settings.group_attribute], with_accuracy=False)
    atomic_write_json(cell.path("evaluate") / "report.json", report)
    ident = report.get("identity") or {}
    return {"samples": int(pred.size), "pairwise_f": (ident.get("pairwise") or {}).get("f"),
            "bcubed_f": (ident.get("bcubed") or {}).get("f")}


RUNNERS: dict[str, Callable[[Cell], dict[str, Any]]] = {
    "shards": run_shards, "knn": run_knn, "sequences": run_sequences, "train": run_train, "infer": run_infer,
    "cluster": run_cluster, "fair_assign": run_fair_assign, "evaluate": run_evaluate,
}


def with_dependencies(stages: list[str]) -> list[str]:
    """``stages`` plus every stage they need, in pipeline order."""
    wanted = set(stages)
    unknown = wanted - set(STAGES)
    if unknown:
        raise ConfigError(f"scale: unknown stage(s) {sorted(unknown)}; choose from {', '.join(STAGES)}")
    changed = True
    while changed:
        changed = False
        for stage in list(wanted):
            for dep in DEPENDS[stage]:
                if dep not in wanted:
                    wanted.add(dep)
                    changed = True
    return [s for s in STAGES if s in wanted]
