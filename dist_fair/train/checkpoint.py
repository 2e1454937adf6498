"""Training checkpoints: a DeepSpeed checkpoint plus the engine's own small state.

Layout of one checkpoint folder (merged by Ray Train from every worker's local folder into
``<run>/train/ray/run/checkpoint_<step>/``):

    deepspeed/<tag>/...              DeepSpeed's files (model, ZeRO optimizer partitions per rank)
    deepspeed/latest                 DeepSpeed's pointer to <tag>
    dist_fair/progress.json          rank 0: step, epoch, step within epoch, tag, world size, stage
    dist_fair/state_rank<r>.npz      rank r's task state (``ctx.state``), NumPy arrays only

The engine's own files are JSON and ``.npz`` loaded with ``allow_pickle=False``. DeepSpeed's files
are read by DeepSpeed itself (``torch.load(weights_only=False)`` inside DeepSpeed): load only
checkpoints your own runs wrote. The final weights for inference are exported separately as
``<run>/train/model.pt`` (a plain state dict, read with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.errors import DistFairError
from dist_fair.io_atomic import atomic_path, atomic_write_json

LOG = logging.getLogger(__name__)

DEEPSPEED_FOLDER = "deepspeed"
STATE_FOLDER = "dist_fair"
PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    """Where training stood when a checkpoint was taken."""

    step: int
    epoch: int
    step_in_epoch: int
    tag: str
    world_size: int
    zero_stage: int
    samples_seen: int = 0


def tag_for(step: int) -> str:
    """DeepSpeed checkpoint tag of optimizer step ``step``."""
    return f"step{step:09d}"


def save(engine: Any, folder: Path, progress: Progress, state: dict[str, np.ndarray], rank: int) -> None:
    """Write this worker's part of a checkpoint into ``folder`` (all workers must call it)."""
    (folder / DEEPSPEED_FOLDER).mkdir(parents=True, exist_ok=True)  # DeepSpeed makes it on rank 0 only
    (folder / STATE_FOLDER).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=progress.tag)
    if rank == 0:
        atomic_write_json(folder / STATE_FOLDER / PROGRESS_FILE, asdict(progress))
    if state:
        with atomic_path(folder / STATE_FOLDER / f"state_rank{rank}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **{k: np.asarray(v) for k, v in state.items()})


def read_progress(folder: Path) -> Progress:
    """The progress record of a checkpoint folder; DistFairError naming the folder if unusable."""
    path = Path(folder) / STATE_FOLDER / PROGRESS_FILE
    try:
        return Progress(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise DistFairError(f"checkpoint {folder} has no readable {STATE_FOLDER}/{PROGRESS_FILE} ({err}); it was not "
                            "written by dist_fair or is incomplete: start a new run (new --run-dir)") from err


def load(engine: Any, folder: Path, rank: int, world_size: int, zero_stage: int) -> tuple[Progress, dict[str, np.ndarray]]:
    """Restore model, optimizer and task state from ``folder``; return (progress, state)."""
    progress = read_progress(folder)
    if progress.world_size != world_size and zero_stage > 0:
        raise DistFairError(f"checkpoint {folder} was written by {progress.world_size} workers with ZeRO stage "
                            f"{progress.zero_stage}; it cannot resume on {world_size} workers. Set "
                            f"train.workers={progress.world_size} or start a new run")
    load_path, _ = engine.load_checkpoint(str(Path(folder) / DEEPSPEED_FOLDER), tag=progress.tag,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise DistFairError(f"DeepSpeed found no checkpoint with tag {progress.tag} in {folder}/{DEEPSPEED_FOLDER}; "
                            "the checkpoint is incomplete: start a new run")
    state: dict[str, np.ndarray] = {}
    state_file = Path(folder) / STATE_FOLDER / f"state_rank{rank}.npz"
    if state_file.is_file():
        with np.load(state_file, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
    return progress, state


def export_model(engine: Any, path: Path, rank: int, zero_stage: int) -> None:
    """Write the trained weights as a plain state dict at ``path`` (all workers must call it:
    under ZeRO-3 the partitions are gathered first)."""
    import torch

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers on every rank, returns on rank 0
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0 and state is not None:
        cpu_state = {k: v.detach().to("cpu").clone() for k, v in state.items()}
        with atomic_path(path) as tmp:
            torch.save(cpu_state, tmp)


def load_model_weights(path: str | Path) -> dict[str, Any]:
    """The state dict exported by :func:`export_model` (``torch.load(weights_only=True)``)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DistFairError(f"{path} not found: train the model first (`dist-fair train --run-dir ...`)")
    return torch.load(path, map_location="cpu", weights_only=True)
