"""Soft assignments of a trained deep clustering model for every sample, on Ray workers.

``probs[i] = y(x_i)`` (METHODS.md §5: the network's softmax for IMSAT / DFDC, the Student-t
assignment ``q_i`` for the DEC family), ``labels[i] = argmax_j probs[i, j]``. One Ray task per
shard (an exactly-once share: every row of the shard folder belongs to exactly one shard), at
most ``workers`` at once; each task builds the model from the weights put once into the object
store, predicts its shard's blocks in batches and writes ``parts/<shard>.probs.npy`` and
``parts/<shard>.ids.npy`` atomically (ids last); a re-run skips shards whose ids part exists. The driver copies the parts, in id
order, into ``probs.npy`` (float32, N x K) and ``labels.npy`` (int64, N) and deletes them. No
protected attribute is read: predictions need none (out-of-sample clustering).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.errors import DataError, DistFairError
from dist_fair.io_atomic import atomic_path, atomic_save_npy

LOG = logging.getLogger(__name__)

PROBS_NAME = "probs.npy"
LABELS_NAME = "labels.npy"
PARTS_FOLDER = "parts"


def predict_block_probs(model: Any, emb: np.ndarray, batch: int = 1024) -> np.ndarray:
    """``probs`` (rows x K, float32) of ``emb`` with ``model`` in eval mode, in this process."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(emb), batch):
            xb = torch.from_numpy(np.ascontiguousarray(emb[start:start + batch], dtype=np.float32))
            out.append(model.probs(model(xb)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.n_clusters), np.float32)


def _predict_shard(options: dict[str, Any], dim: int, weights: dict[str, Any], shard_dir: str, shard: str,
                   batch: int, part_path: str, threads: int) -> dict[str, Any]:
    """Ray task body: the soft assignments of one shard, written as ``(ids, probs)`` part files."""
    import torch

    from dist_fair.data.shards import iter_blocks
    from dist_fair.deep.task import make_model, options_from_dict

    torch.set_num_threads(max(1, threads))
    began = time.perf_counter()
    model = make_model(options_from_dict(options), dim, "cluster")
    model.load_state_dict(weights)
    ids, probs = [], []
    for block in iter_blocks(shard_dir, [shard]):
        ids.append(block.ids.astype(np.int64))
        probs.append(predict_block_probs(model, block.emb.reshape(len(block), -1), batch))
    atomic_save_npy(part_path + ".probs.npy", np.concatenate(probs))
    atomic_save_npy(part_path + ".ids.npy", np.concatenate(ids))
    return {"shard": shard, "rows": int(sum(len(i) for i in ids)), "seconds": time.perf_counter() - began}


def predict_soft_assignments(options: dict[str, Any], dim: int, weights: dict[str, Any], shard_dir: str | Path,
                             out_dir: str | Path, workers: int = 2, batch: int = 1024,
                             cpus_per_task: int = 1) -> dict[str, Any]:
    """Write ``probs.npy`` and ``labels.npy`` of every sample of ``shard_dir`` (module docstring).

    Args:
        options: the model's :class:`~dist_fair.deep.task.DeepOptions` as a dict
            (:func:`~dist_fair.deep.task.options_to_dict`); dim: the input dimension.
        weights: the clustering model's state dict (``<train>/cluster/train/model.pt``).
        shard_dir: embedding shard folder (readable by every worker: shared storage on a cluster).
        out_dir: folder receiving the two arrays.
        workers: Ray tasks at once; batch: rows per forward; cpus_per_task: CPUs (torch threads) per task.
    """
    import ray

    from dist_fair.data.shards import read_manifest

    manifest = read_manifest(shard_dir)
    out_dir = Path(out_dir)
    parts = out_dir / PARTS_FOLDER
    parts.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in manifest.shards]
    todo = [n for n in names if not (parts / f"{n}.ids.npy").is_file()]
    LOG.info("soft assignments: %d samples in %d shard tasks (%d already done), %d at once", manifest.num_samples,
             len(names), len(names) - len(todo), workers)
    began = time.perf_counter()
    remote = ray.remote(num_cpus=cpus_per_task, max_retries=2)(_predict_shard)
    weights_ref = ray.put(weights)
    pending: list[Any] = []
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                name = queue.pop(0)
                pending.append(remote.remote(options, dim, weights_ref, str(shard_dir), name, batch,
                                             str(parts / name), cpus_per_task))
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])
    except Exception as err:
        if isinstance(err, DistFairError):
            raise
        cause = getattr(err, "cause", None)
        if isinstance(cause, DistFairError):
            raise cause from None
        raise DistFairError(f"soft-assignment inference failed: {err}") from err
    n, k = int(manifest.num_samples), int(options["n_clusters"])
    with atomic_path(out_dir / PROBS_NAME) as tmp:
        probs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, k))
        seen = np.zeros(n, bool)
        for name in names:
            ids = np.load(parts / f"{name}.ids.npy", allow_pickle=False)
            part = np.load(parts / f"{name}.probs.npy", allow_pickle=False)
            if part.shape != (len(ids), k) or (len(ids) and (ids.min() < 0 or ids.max() >= n)):
                raise DataError(f"soft-assignment part {name} has shape {part.shape} for {len(ids)} ids; delete "
                                f"{parts} and run again")
            probs[ids] = part
            seen[ids] = True
        if not seen.all():
            raise DataError(f"soft assignments: {int((~seen).sum())} of {n} sample ids are in no shard of {shard_dir}")
        probs.flush()
        labels = np.asarray(probs).argmax(axis=1).astype(np.int64)
        del probs
    atomic_save_npy(out_dir / LABELS_NAME, labels)
    shutil.rmtree(parts)
    seconds = time.perf_counter() - began
    return {"samples": n, "clusters": k, "tasks": len(names), "seconds": seconds, "workers": workers,
            "occupied_clusters": int(np.unique(labels).size)}


__all__ = ["predict_block_probs", "predict_soft_assignments", "PROBS_NAME", "LABELS_NAME"]
