"""What a model needs to say to be trained by the engine: the ``TrainTask`` interface.

Every dist_fair model (Intraformer, Clusformer, DEC, IMSAT, DFDC, Fair-DEC, Fairoids, the built-in
probe) is a ``TrainTask``; :func:`dist_fair.train.engine.fit` trains any of them the same way on Ray
Train workers with DeepSpeed. A task is a bundle of plain callables, pickled to every worker:

- ``model_factory() -> torch.nn.Module`` builds the model (same seed on every worker);
- ``train_stream(rank, world_size, seed) -> Iterator[Block]``: an ENDLESS, resampled stream of
  row blocks from this worker's disjoint share of the data (the engine cuts it into batches);
- ``eval_stream(rank, world_size) -> Iterator[Block]`` (optional): every row of this worker's
  share EXACTLY once; over all workers, every row exactly once;
- ``forward(model, batch) -> outputs`` (default ``model(batch["x"])``);
- ``loss_fn(batch, outputs, ctx) -> (loss, metrics)``: a scalar tensor to minimise and a dict of
  scalars to log (floats or 0-dim tensors). Global quantities go through ``ctx.collective``
  (e.g. ``gamma_f = dist_fair.collective.global_mean(ctx.collective, purity)``, METHODS.md §4);
- ``setup_hook(ctx)`` (optional): runs once on all workers before the first epoch of a fresh run
  (e.g. k-means initialisation of DEC centroids);
- ``epoch_hook(ctx) -> metrics`` (optional): runs on all workers after every epoch (e.g. the
  global fair assignment of METHODS.md §6, recomputed for all N samples after each epoch);
- ``evaluate(ctx) -> metrics`` (optional): replaces the default evaluation, which is the mean of
  ``loss_fn``'s metrics over ``eval_stream`` (sample-weighted, all-reduced).

A ``Block`` is a dict of NumPy arrays sharing their first dimension (rows), e.g.
``{"emb": float32[n, d], "identity": int64[n], "ids": int64[n]}``; batches handed to
``forward``/``loss_fn`` are the same dicts as torch tensors on the worker's device, floating
arrays cast to the training precision.

Hooks and evaluation run under ``torch.no_grad()`` with the model in eval mode; like the loss
they run on every worker and may call collectives (the same ones, in the same order, on every
worker). During evaluation every worker runs the same number of batches: a worker whose share is
exhausted gets EMPTY batches (0 rows), so losses must accept an empty batch.

Per-worker state that must survive a restart (e.g. this worker's fair targets ``y_hat``) goes in
``ctx.state`` (a dict of NumPy arrays): it is saved with every checkpoint and restored on resume.

Only the standard library is imported at module level.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from dist_fair.collective import Collective

Block = Mapping[str, "np.ndarray"]
Batch = dict[str, "torch.Tensor"]


def default_forward(model: Any, batch: Batch) -> Any:
    """``model(batch["x"])``: the forward used when a task gives none."""
    return model(batch["x"])


@dataclass
class TrainTask:
    """A trainable model: factories and functions the engine calls on every worker (see module doc).

    Attributes:
        name: short name, used in logs and the run folder's summary.
        model_factory: builds the ``torch.nn.Module``.
        loss_fn: ``(batch, outputs, ctx) -> (loss, metrics)``.
        train_stream: ``(rank, world_size, seed) -> endless iterator of blocks``.
        num_samples: rows in one epoch over all workers (steps per epoch = ceil(num_samples / batch)).
        eval_stream: ``(rank, world_size) -> iterator of blocks``, each row exactly once, or None.
        forward: ``(model, batch) -> outputs``.
        setup_hook, epoch_hook, evaluate: optional ``(ctx) -> metrics dict`` callables.
        float_keys: batch keys cast to the training dtype (None = every floating-point array).
        info: free-form facts saved in the run summary (e.g. input dim, classes).
    """

    name: str
    model_factory: Callable[[], "torch.nn.Module"]
    loss_fn: Callable[[Batch, Any, "TrainContext"], tuple["torch.Tensor", dict[str, Any]]]
    train_stream: Callable[[int, int, int], Iterator[Block]]
    num_samples: int
    eval_stream: Callable[[int, int], Iterator[Block]] | None = None
    forward: Callable[[Any, Batch], Any] = default_forward
    setup_hook: Callable[["TrainContext"], dict[str, float] | None] | None = None
    epoch_hook: Callable[["TrainContext"], dict[str, float] | None] | None = None
    evaluate: Callable[["TrainContext"], dict[str, float]] | None = None
    float_keys: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from dist_fair.errors import ConfigError

        if self.num_samples < 1:
            raise ConfigError(f"training task {self.name!r}: num_samples must be >= 1, got {self.num_samples}; "
                              "the data set is empty")
        for attr in ("model_factory", "loss_fn", "train_stream", "forward"):
            if not callable(getattr(self, attr)):
                raise ConfigError(f"training task {self.name!r}: {attr} must be callable")


@dataclass
class TrainContext:
    """What losses and hooks see on a worker.

    Attributes:
        rank, world_size: this worker and the group size.
        device: torch device of the model and batches; dtype: the training precision.
        collective: global sums, means and gathers (:mod:`dist_fair.collective`).
        model: the DeepSpeed engine (call it like the module; ``model.module`` is the module).
        epoch: current epoch (0-based); step: optimizer steps done so far (global count).
        state: per-worker NumPy arrays saved with checkpoints and restored on resume.
        task: the task being trained; batch_size: rows per worker per step.
        eval_batches: ``() -> iterator of batches`` over this worker's eval share, exactly once.
            Under ZeRO-3 it runs in lockstep across workers and may yield EMPTY batches (0 rows)
            once this worker's share is exhausted: run the forward (the other workers need its
            parameter gathers) and skip the empty result.
    """

    rank: int
    world_size: int
    device: Any
    dtype: Any
    collective: "Collective"
    model: Any
    task: TrainTask
    batch_size: int
    epoch: int = 0
    step: int = 0
    state: dict[str, "np.ndarray"] = field(default_factory=dict)
    eval_batches: Callable[[], Iterator[Batch]] | None = None

    def forward(self, batch: Batch) -> Any:
        """The task's forward on the training model."""
        return self.task.forward(self.model, batch)


def check_trainable(model: str) -> None:
    """ConfigError unless ``train.model=<model>`` is a registered model (``dist_fair/model_registry.py``,
    the one list of models) whose task module is installed (located, not imported)."""
    import importlib.util

    from dist_fair.errors import ConfigError
    from dist_fair.model_registry import get_model, model_names

    if model == "none":
        raise ConfigError("config field 'train.model' is 'none': choose a model to train, e.g. "
                          "--set train.model=probe (the built-in identity probe)")
    entry = get_model(model)
    module_name = entry.task_builder.split(":")[0]
    try:
        found = importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        raise ConfigError(f"config field 'train.model': {model!r} is registered but its task module {module_name} is "
                          f"not installed; registered models: {', '.join(model_names())}")
