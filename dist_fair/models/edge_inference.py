"""Edge inference on Ray workers: predicted edge probabilities for every anchor (METHODS.md §4).

For anchor i and token j of its sequence, ``probs[i, j] = sigmoid(logit_ij)``, the probability that
``nbrs[i, j]`` has i's identity (0 where the neighbour is missing). The N anchors are cut into
contiguous row ranges of ``rows_per_task``; each range is one Ray task (an exactly-once share:
ranges are disjoint and cover 0..N-1) that memory-maps the sequence inputs, builds the model
from the weights put once into the object store, predicts in batches of ``batch`` anchors and
writes ``parts/probs-<start>-<stop>.npy`` atomically. At most ``workers`` tasks run at once. A
re-run skips ranges whose part file exists (a killed inference resumes). The driver then copies
the parts, in id order, into ``probs.npy`` (float32, N x L, aligned with ``nbrs[:, :L]``) and
deletes them; the decode step reads ``probs.npy`` memory-mapped.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.errors import DataError, DistFairError
from dist_fair.faults import kill_point
from dist_fair.io_atomic import atomic_path, atomic_save_npy
from dist_fair.models.sequences import SequenceInputs

LOG = logging.getLogger(__name__)

PROBS_NAME = "probs.npy"
PARTS_FOLDER = "parts"


def predict_probs(model: Any, inputs: SequenceInputs, rows: np.ndarray, batch: int = 256) -> np.ndarray:
    """``probs`` (len(rows) x L, float32) of the anchors ``rows`` with ``model`` (in this process)."""
    import torch

    out = np.zeros((len(rows), inputs.seq_len), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            seq = inputs.sequences(rows[start:start + batch], with_targets=False)
            valid = torch.from_numpy(seq["valid"])
            logits = model(torch.from_numpy(seq["tokens"]), valid)
            out[start:start + len(seq["ids"])] = torch.where(valid, torch.sigmoid(logits.float()), 0.0).numpy()
    return out


def _part_name(start: int, stop: int) -> str:
    return f"probs-{start:012d}-{stop:012d}.npy"


def _predict_range(spec: dict[str, Any], weights: dict[str, Any], inputs: SequenceInputs, start: int, stop: int,
                   batch: int, part_path: str, threads: int) -> dict[str, float]:
    """Ray task body: predict anchors ``start..stop-1`` and write their part file atomically."""
    import torch

    from dist_fair.models.intraformer import build_model

    torch.set_num_threads(max(1, threads))
    began = time.perf_counter()
    model = build_model(spec)
    model.load_state_dict(weights)
    probs = predict_probs(model, inputs, np.arange(start, stop, dtype=np.int64), batch)
    atomic_save_npy(part_path, probs)
    kill_point("infer.task_done")
    return {"start": start, "stop": stop, "seconds": time.perf_counter() - began}


def predict_edge_probs(spec: Any, weights: dict[str, Any], inputs: SequenceInputs, out_dir: str | Path,
                       workers: int = 2, rows_per_task: int = 8192, batch: int = 256,
                       cpus_per_task: int = 1) -> dict[str, Any]:
    """Predict ``probs.npy`` for every anchor on Ray (see the module docstring).

    Args:
        spec: the model's ModelSpec (or its dict); weights: its state dict (float tensors).
        inputs: sequence inputs (paths readable by every worker: shared storage on a cluster).
        out_dir: folder receiving ``probs.npy``.
        workers: Ray tasks at once; rows_per_task: anchors per task; batch: anchors per forward.
        cpus_per_task: CPUs (and torch threads) of each task.

    Returns:
        A summary: samples, tasks, seconds, anchors per second, path.
    """
    import ray

    spec_dict = spec if isinstance(spec, dict) else spec.to_dict()
    if int(spec_dict["seq_len"]) != inputs.seq_len:
        raise DataError(f"the model reads {spec_dict['seq_len']} tokens but the sequence inputs give {inputs.seq_len}")
    out_dir = Path(out_dir)
    parts = out_dir / PARTS_FOLDER
    parts.mkdir(parents=True, exist_ok=True)
    n = inputs.num_samples
    ranges = [(s, min(s + rows_per_task, n)) for s in range(0, n, rows_per_task)]
    todo = [(s, e) for s, e in ranges if not (parts / _part_name(s, e)).is_file()]
    LOG.info("edge inference: %d anchors in %d tasks (%d already done), %d at once", n, len(ranges),
             len(ranges) - len(todo), workers)
    began = time.perf_counter()
    remote = ray.remote(num_cpus=cpus_per_task, max_retries=2)(_predict_range)
    weights_ref = ray.put(weights)
    pending: list[Any] = []
    task_seconds: list[float] = []
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < workers:
                s, e = queue.pop(0)
                pending.append(remote.remote(spec_dict, weights_ref, inputs, s, e, batch,
                                             str(parts / _part_name(s, e)), cpus_per_task))
            done, pending = ray.wait(pending, num_returns=1)
            task_seconds.append(ray.get(done[0])["seconds"])
    except Exception as err:
        if isinstance(err, DistFairError):
            raise
        raise DistFairError(f"edge inference failed: {err}") from err
    predict_seconds = time.perf_counter() - began
    with atomic_path(out_dir / PROBS_NAME) as tmp:
        probs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, inputs.seq_len))
        for s, e in ranges:
            part = np.load(parts / _part_name(s, e), allow_pickle=False)
            if part.shape != (e - s, inputs.seq_len):
                raise DataError(f"edge inference part {_part_name(s, e)} has shape {part.shape}, expected "
                                f"{(e - s, inputs.seq_len)}; delete {parts} and run again")
            probs[s:e] = part
        probs.flush()
        del probs
    shutil.rmtree(parts)
    seconds = time.perf_counter() - began
    return {"samples": n, "tasks": len(ranges), "predicted_now": sum(e - s for s, e in todo),
            "seconds": seconds, "predict_seconds": predict_seconds,
            "anchors_per_s": (sum(e - s for s, e in todo) / predict_seconds) if todo and predict_seconds > 0 else None,
            "workers": workers, "path": str(out_dir / PROBS_NAME)}


__all__ = ["PROBS_NAME", "predict_probs", "predict_edge_probs"]
