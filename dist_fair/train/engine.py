"""The training engine: a ``TrainTask`` on Ray Train workers, each running a DeepSpeed engine.

:func:`fit` starts Ray Train's ``TorchTrainer`` with ``train.workers`` workers. Ray creates the
``torch.distributed`` process group (gloo on CPU, nccl on GPU); inside each worker
``deepspeed.initialize`` reuses it, with the ZeRO configuration named by ``train.deepspeed``
(``launch/deepspeed/<name>.json``; batch sizes and precision filled in from the job config).

On every worker, per optimizer step: take the next batch of this worker's resampled stream
(prefetched in a background thread), ``outputs = task.forward(engine, batch)``,
``loss, metrics = task.loss_fn(batch, outputs, ctx)``, ``engine.backward(loss)``,
``engine.step()``. One epoch is ``ceil(num_samples / batch_size)`` steps, the same on every
worker. Every ``train.log_every`` steps the loss and metrics are averaged over all workers (one
all-reduce) and rank 0 appends a record to ``<run>/train/metrics.jsonl``. After each epoch:
``task.epoch_hook`` (all workers), evaluation over the exactly-once eval streams, and a DeepSpeed
checkpoint reported through ``ray.train.report`` (also every ``train.checkpoint_every`` steps).
When a worker dies, ``FailureConfig(max_failures=train.max_failures)`` restarts the worker group,
which resumes from the last reported checkpoint's step. A re-launched ``fit`` on the same run
folder also resumes (Ray Train restores its checkpoint list from the storage folder), and a
finished run is not trained again.

Run folder (``<run>/train/``): ``metrics.jsonl`` (history), ``run.json`` (what is trained),
``summary.json`` (final metrics, written last), ``model.pt`` (final weights, a plain state dict),
``ray/`` (Ray Train storage: checkpoints). On a multi-node cluster the run folder must be on
storage shared by all nodes (see launch/README.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dist_fair.config import TrainConfig
from dist_fair.errors import ConfigError, DataError, DistFairError
from dist_fair.faults import kill_point
from dist_fair.io_atomic import atomic_write_json
from dist_fair.train.progress import METRICS_FILE, MetricsLog, ProgressMonitor, Throughput, epoch_line, read_metrics
from dist_fair.train.task import TrainTask

LOG = logging.getLogger(__name__)

#: Folder of the named DeepSpeed configurations (``train.deepspeed=<name>``): package data
#: (``dist_fair/configs/deepspeed``, also reachable as ``launch/deepspeed`` in a checkout).
DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
TRAIN_FOLDER = "train"
STORAGE_FOLDER = "ray"
RAY_RUN_NAME = "run"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"
MODEL_FILE = "model.pt"


# ----------------------------------------------------------------------------- configuration

def load_deepspeed_config(name_or_path: str) -> dict[str, Any]:
    """The DeepSpeed JSON named ``name_or_path`` (a file in ``launch/deepspeed/`` without ``.json``,
    or a path), with comment keys (starting with ``_``) removed."""
    candidate = Path(name_or_path)
    path = candidate if candidate.suffix == ".json" or candidate.is_file() else DEEPSPEED_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in DEEPSPEED_CONFIG_DIR.glob("*.json")) if DEEPSPEED_CONFIG_DIR.is_dir() else []
        raise ConfigError(f"config field 'train.deepspeed': {name_or_path!r} is neither a file nor a name in "
                          f"{DEEPSPEED_CONFIG_DIR}; choose one of {', '.join(known) or '(none found)'} or give a path "
                          "to a DeepSpeed JSON file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def deepspeed_config_for(base: dict[str, Any], train: TrainConfig, world_size: int) -> dict[str, Any]:
    """``base`` with the batch sizes and precision of ``train`` filled in.

    ``train_batch_size = train.batch_size = micro_batch * world_size`` (no gradient accumulation);
    ``bf16``/``fp16`` sections follow ``train.precision`` (fp32: both off).
    """
    if train.batch_size % world_size:
        raise ConfigError(f"config field 'train.batch_size': the global batch {train.batch_size} must be a multiple of "
                          f"the {world_size} workers")
    config = deepcopy(base)
    micro = train.batch_size // world_size
    config.update(train_batch_size=train.batch_size, train_micro_batch_size_per_gpu=micro,
                  gradient_accumulation_steps=1)
    config.pop("bf16", None)
    config.pop("fp16", None)
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


# ----------------------------------------------------------------------------- driver side

@dataclass
class TrainResult:
    """What :func:`fit` returns: final metrics, history and where the outputs are."""

    train_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model_path: Path
    checkpoint_path: str | None = None
    skipped: bool = False

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.history if r.get("event") == kind]


@dataclass
class FaultInjection:
    """TEST ONLY: make worker ``rank`` exit abruptly (``os._exit(1)``) once it has completed
    ``after_step`` optimizer steps, on the first attempt only (a marker file in the run folder
    records that it happened). Before dying it waits until Ray Train has registered every
    checkpoint already reported, so the test knows which checkpoint the restart must use."""

    rank: int
    after_step: int
    marker: str = ""


def _fingerprint(task: TrainTask, train: TrainConfig) -> dict[str, Any]:
    described = dataclasses.asdict(train)
    for free in ("max_failures", "log_every", "prefetch", "placement", "cpus_per_worker", "checkpoint_every"):
        described.pop(free)  # may change between launches of the same run
    return {"task": task.name, "num_samples": task.num_samples, "train": described}


def fit(task: TrainTask, train: TrainConfig, run_dir: str | Path, *, use_gpu: bool | None = None,
        progress: bool = True, force: bool = False, fault: FaultInjection | None = None) -> TrainResult:
    """Train ``task`` with Ray Train + DeepSpeed; outputs in ``<run_dir>/train/``.

    Args:
        task: what to train (:class:`dist_fair.train.task.TrainTask`).
        train: the ``train`` section of the job config.
        run_dir: the run folder (made absolute; shared storage on a multi-node cluster).
        use_gpu: train on GPUs (nccl); None = when the Ray cluster has GPUs.
        progress: show a progress bar and per-epoch lines on the driver.
        force: train again even if the run folder holds a finished run of the same task.
        fault: test-only fault injection.

    Returns:
        The final metrics and history. Ray must be initialised (or is started locally).

    Raises:
        ConfigError: bad configuration, or the run folder holds a different training run.
        DistFairError: training failed more than ``train.max_failures`` times.
    """
    train_dir = Path(run_dir).expanduser().resolve() / TRAIN_FOLDER
    base_config = load_deepspeed_config(train.deepspeed)
    fingerprint = _fingerprint(task, train)
    run_file, summary_file = train_dir / RUN_FILE, train_dir / SUMMARY_FILE
    if force and train_dir.exists():
        import shutil

        shutil.rmtree(train_dir)
    if run_file.is_file():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous != fingerprint:
            changed = sorted(k for k in set(previous.get("train", {})) | set(fingerprint["train"])
                             if previous.get("train", {}).get(k) != fingerprint["train"].get(k))
            if previous.get("task") != task.name or previous.get("num_samples") != task.num_samples:
                changed = ["task/data", *changed]
            raise ConfigError(f"{train_dir} holds a training run with different settings ({', '.join(changed)}); "
                              "use a new --run-dir, or pass --force to discard it")
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
            if summary.get("complete"):
                LOG.info("%s: training already complete; skipping (use --force to train again)", train_dir)
                return TrainResult(train_dir, summary.get("metrics", {}), read_metrics(train_dir / METRICS_FILE),
                                   train_dir / MODEL_FILE, summary.get("checkpoint"), skipped=True)

    import ray

    from dist_fair.ray_runtime import init_ray

    init_ray()  # a no-op when Ray is already up (tests, `--address`)
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if train.precision == "fp16" and not use_gpu:
        raise ConfigError("config field 'train.precision': fp16 needs GPUs; on CPU use bf16 or fp32")
    ds_config = deepspeed_config_for(base_config, train, train.workers)
    if train.workers == 1 and zero_stage(ds_config) in (1, 2):
        LOG.warning("ZeRO stage %d with a single worker partitions nothing (no memory saved) but copies gradients "
                    "and weights through flat buffers every step; zero0_%s is faster", zero_stage(ds_config),
                    "gpu" if use_gpu else "cpu")
    train_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, fingerprint)

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    steps_per_epoch = math.ceil(task.num_samples / train.batch_size)
    loop_config = {
        "task": task, "train": dataclasses.asdict(train), "deepspeed": ds_config, "use_gpu": bool(use_gpu),
        "train_dir": str(train_dir), "steps_per_epoch": steps_per_epoch,
        "fault": dataclasses.asdict(fault) if fault else None,
    }
    env = {"DS_ACCELERATOR": "cpu"} if not use_gpu else {}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=bool(use_gpu),
                                     resources_per_worker={"CPU": train.cpus_per_worker},
                                     placement_strategy=train.placement),
        run_config=RunConfig(
            name=RAY_RUN_NAME, storage_path=str(train_dir / STORAGE_FOLDER),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env} if env else {},
            # Ray Train's own INFO lines (every report) drown the progress; our history has them.
            logging_config=LoggingConfig(log_level="INFO" if LOG.isEnabledFor(logging.DEBUG) else "WARNING"),
        ),
    )
    LOG.info("training %s: %d worker(s), %s, %s, %d epoch(s) x %d steps, global batch %d", task.name, train.workers,
             train.deepspeed, train.precision, train.epochs, steps_per_epoch, train.batch_size)
    with ProgressMonitor(train_dir / METRICS_FILE, steps_per_epoch * train.epochs, train.epochs, enabled=progress):
        try:
            result = trainer.fit()
        except Exception as err:  # Ray wraps worker errors; surface them as one DistFairError
            raise DistFairError(f"training {task.name!r} failed (after up to {train.max_failures} restarts): "
                                f"{_root_cause(err)}; worker logs: Ray's session folder, history: "
                                f"{train_dir / METRICS_FILE}") from err
    history = read_metrics(train_dir / METRICS_FILE)
    ends = [r for r in history if r.get("event") == "end"]
    final = {k: v for k, v in (ends[-1] if ends else {}).items() if k not in ("event", "time")}
    checkpoint = result.checkpoint.path if getattr(result, "checkpoint", None) is not None else None
    atomic_write_json(summary_file, {"complete": True, "task": task.name, "metrics": final, "checkpoint": checkpoint,
                                     "model": str(train_dir / MODEL_FILE), "info": task.info})
    return TrainResult(train_dir, final, history, train_dir / MODEL_FILE, checkpoint)


def _root_cause(err: BaseException) -> str:
    seen = err
    while seen.__cause__ is not None and seen.__cause__ is not seen:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return (text[-1] if text else type(seen).__name__)[:500]


# ----------------------------------------------------------------------------- worker side

@dataclass
class _Accumulator:
    """Sample-weighted sums of loss and metrics since the last record (kept on the device)."""

    sums: dict[str, Any] = field(default_factory=dict)
    rows: int = 0

    def add(self, loss: Any, metrics: dict[str, Any], rows: int) -> None:
        values = {"loss": loss, **metrics}
        for key, value in values.items():
            value = value.detach().double() if hasattr(value, "detach") else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value * rows
        self.rows += rows

    def global_means(self) -> dict[str, float]:
        """All-reduced means over workers (one collective; every worker must call it)."""
        import numpy as np

        from dist_fair.collective import TorchCollective, all_reduce_mean

        keys = sorted(self.sums)
        totals = np.array([float(self.sums[k]) for k in keys], dtype=np.float64)
        means = all_reduce_mean(TorchCollective(), totals, float(self.rows)) if keys else np.zeros(0)
        self.sums, self.rows = {}, 0
        return {k: float(v) for k, v in zip(keys, np.atleast_1d(means))}


def _batch_converter(device: Any, dtype: Any, float_keys: tuple[str, ...] | None):
    import numpy as np
    import torch

    def convert(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for key, array in arrays.items():
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            if tensor.is_floating_point() and (float_keys is None or key in float_keys):
                tensor = tensor.to(dtype)
            out[key] = tensor.to(device, non_blocking=True) if device.type != "cpu" else tensor
        return out

    return convert


def batch_rows(batch: dict[str, Any]) -> int:
    """Rows in a batch (0 for the empty batches of lockstep evaluation)."""
    return int(next(iter(batch.values())).shape[0]) if batch else 0


def _lockstep(batches: Iterator[dict[str, Any]], template: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield ``batches`` in lockstep across workers: every worker yields the same number of batches,
    those whose share is exhausted yield ``template`` (an empty batch). One 1-element all-reduce
    per batch decides when all are done."""
    from dist_fair.collective import TorchCollective

    exhausted = False
    while True:
        batch = None
        if not exhausted:
            batch = next(batches, None)
            exhausted = batch is None
        if TorchCollective().all_reduce_sum(0 if exhausted else 1) == 0:
            return
        yield template if batch is None else batch


def default_evaluate(ctx: Any) -> dict[str, float]:
    """Mean of ``loss_fn``'s loss and metrics over every worker's eval share (each row once),
    sample-weighted and all-reduced: ``m = sum_w sum_b n_b m_b / sum_w sum_b n_b``."""
    import torch

    acc = _Accumulator()
    with torch.no_grad():
        for batch in ctx.eval_batches():
            outputs = ctx.forward(batch)
            loss, metrics = ctx.task.loss_fn(batch, outputs, ctx)
            rows = batch_rows(batch)
            if rows:
                acc.add(loss, metrics, rows)
    return acc.global_means()


def _worker_loop(config: dict[str, Any]) -> None:
    """The per-worker training function run by Ray Train (see the module docstring)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    from dist_fair.collective import TorchCollective
    from dist_fair.train import checkpoint as ckpt_io
    from dist_fair.train.deepspeed_env import import_deepspeed
    from dist_fair.train.stream import batches
    from dist_fair.train.task import TrainContext

    ray_ctx = ray.train.get_context()
    rank, world = ray_ctx.get_world_rank(), ray_ctx.get_world_size()
    task: TrainTask = config["task"]
    train = TrainConfig(**config["train"])
    use_gpu: bool = config["use_gpu"]
    train_dir = Path(config["train_dir"])
    deepspeed = import_deepspeed(use_gpu)
    import torch

    torch.set_num_threads(train.cpus_per_worker)
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[train.precision]
    ds_config = config["deepspeed"]
    stage = zero_stage(ds_config)

    torch.manual_seed(train.seed)
    model = task.model_factory()
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if world == 1 and stage == 0 and train.precision == "fp32":
        # Nothing to average over one worker; DeepSpeed would still flatten, all-reduce and unflatten
        # every gradient each step (about 4% of a step of the benchmark's MLP on CPU). fp32 only:
        # the bf16/fp16 optimizer wrappers take part in that call.
        engine.enable_backward_allreduce = False

    micro = train.batch_size // world
    steps_per_epoch = int(config["steps_per_epoch"])
    total_steps = steps_per_epoch * train.epochs
    to_batch = _batch_converter(device, dtype, task.float_keys)
    ctx = TrainContext(rank=rank, world_size=world, device=device, dtype=dtype, collective=TorchCollective(),
                       model=engine, task=task, batch_size=micro)

    # ---- resume
    step, start_epoch, start_in_epoch, resumed_from = 0, 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved, ctx.state = ckpt_io.load(engine, Path(folder), rank, world, stage)
        step, start_epoch, start_in_epoch, resumed_from = saved.step, saved.epoch, saved.step_in_epoch, saved.step
        if start_in_epoch >= steps_per_epoch:
            start_epoch, start_in_epoch = start_epoch + 1, 0
    ctx.step = step

    log = MetricsLog(train_dir / METRICS_FILE) if rank == 0 else None
    node_id = np.frombuffer(ray.get_runtime_context().get_node_id().encode(), dtype=np.uint8)
    node_ids = ctx.collective.all_gather(node_id)
    if log is not None:
        attempt = 1 + sum(1 for r in log.records if r.get("event") == "start")
        log.append({"event": "start", "attempt": attempt, "resumed_from_step": resumed_from, "step": step,
                    "world_size": world, "zero_stage": stage, "precision": train.precision,
                    "total_steps": total_steps, "nodes": [bytes(n).decode() for n in node_ids]})

    # ---- data: this worker's resampled stream, seeded by where training (re)starts
    stream_seed = (train.seed * 1_000_003 + step * 7919 + 17) % (2**31 - 1)
    train_batches = batches(task.train_stream(rank, world, stream_seed), micro, to_batch, depth=train.prefetch,
                            drop_last=True)
    template: dict[str, Any] = {}

    def eval_batches() -> Iterator[dict[str, Any]]:
        if task.eval_stream is None:
            return
        source = batches(task.eval_stream(rank, world), micro, to_batch, depth=train.prefetch, drop_last=False)
        try:
            yield from _lockstep(iter(source), template)
        finally:
            source.close()

    ctx.eval_batches = eval_batches

    def next_batch() -> dict[str, Any]:
        try:
            return next(train_batches)
        except StopIteration:
            raise DataError(f"the training stream of task {task.name!r} ended on worker {rank}; train_stream must be "
                            "endless (resampled)") from None

    def save_and_report(metrics: dict[str, Any], epoch: int, in_epoch: int) -> None:
        """Every worker writes its part of the checkpoint to a local folder; Ray Train copies the
        folders (merged) into the run's storage in a background thread and registers the result,
        so training does not wait for the copy. Ray deletes the local folder afterwards."""
        progress = ckpt_io.Progress(step=step, epoch=epoch, step_in_epoch=in_epoch, tag=ckpt_io.tag_for(step),
                                    world_size=world, zero_stage=stage, samples_seen=step * train.batch_size)
        local = Path(tempfile.mkdtemp(prefix="dist_fair_ckpt_"))
        ckpt_io.save(engine, local, progress, ctx.state, rank)
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, type(None)))},
                         checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=f"checkpoint_{ckpt_io.tag_for(step)}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True)
        if log is not None:
            log.append({"event": "checkpoint", "step": step, "epoch": epoch})

    fault = config.get("fault")
    meter = Throughput(total_steps, train.batch_size, done_steps=step)
    epoch_times: list[float] = []
    try:
        first = next_batch()
        template.update({k: v[:0] for k, v in first.items()})
        pending: dict[str, Any] | None = first
        if resumed_from is None and task.setup_hook is not None:
            engine.eval()
            with torch.no_grad():
                _log_event(log, "setup", step, start_epoch, task.setup_hook(ctx) or {})
        for epoch in range(start_epoch, train.epochs):
            ctx.epoch = epoch
            engine.train()
            acc, epoch_acc = _Accumulator(), _Accumulator()
            epoch_start, epoch_cpu_start = time.perf_counter(), time.process_time()
            epoch_samples_start = step
            for in_epoch in range(start_in_epoch if epoch == start_epoch else 0, steps_per_epoch):
                if fault and rank == fault["rank"] and step == fault["after_step"] and not Path(fault["marker"]).exists():
                    _die_for_test(Path(fault["marker"]))
                batch, pending = (pending, None) if pending is not None else (next_batch(), None)
                outputs = task.forward(engine, batch)
                loss, metrics = task.loss_fn(batch, outputs, ctx)
                engine.backward(loss)
                engine.step()
                kill_point("train.step")
                step += 1
                ctx.step = step
                acc.add(loss, metrics, batch_rows(batch))
                epoch_acc.add(loss, metrics, batch_rows(batch))
                last_of_epoch = in_epoch == steps_per_epoch - 1
                if step % train.log_every == 0 or last_of_epoch:
                    means = acc.global_means()
                    if log is not None:
                        rate, eta = meter.window(step)
                        log.append({"event": "train", "epoch": epoch, "step": step, **means,
                                    "samples_per_s": rate, "eta_s": eta, "data_wait_s": train_batches.wait_s})
                if train.checkpoint_every and step % train.checkpoint_every == 0 and not last_of_epoch:
                    save_and_report({"step": step, "epoch": epoch}, epoch, in_epoch + 1)
            epoch_seconds = time.perf_counter() - epoch_start
            # CPU seconds of all workers' processes (every thread) for this epoch's steps: samples
            # per CPU-second measures the engine's efficiency even on a machine shared with other jobs.
            epoch_cpu = ctx.collective.all_reduce_sum(time.process_time() - epoch_cpu_start)
            epoch_times.append(epoch_seconds)
            record: dict[str, Any] = {"epoch": epoch, "step": step,
                                      "samples_per_s": (step - epoch_samples_start) * train.batch_size / epoch_seconds,
                                      "epoch_s": epoch_seconds, "cpu_s": epoch_cpu,
                                      "samples_per_cpu_s": (step - epoch_samples_start) * train.batch_size / max(epoch_cpu, 1e-9),
                                      "eta_s": (train.epochs - epoch - 1) * (sum(epoch_times) / len(epoch_times))}
            if epoch_acc.rows:
                record.update(epoch_acc.global_means())  # the epoch's mean loss and metrics
            engine.eval()
            with torch.no_grad():
                if task.epoch_hook is not None:
                    record.update({f"hook_{k}": v for k, v in (task.epoch_hook(ctx) or {}).items()})
                if task.eval_stream is not None or task.evaluate is not None:
                    evaluate = task.evaluate or default_evaluate
                    record.update({f"eval_{k}": v for k, v in evaluate(ctx).items()})
            record["peak_rss_mib"] = _peak_rss_mib()
            if log is not None:
                log.append({"event": "epoch", **record})
                LOG.debug("%s", epoch_line(record, train.epochs))  # the driver's ProgressMonitor shows it
            save_and_report(record, epoch, steps_per_epoch)
    finally:
        train_batches.close()

    # ---- final weights and the closing record
    ckpt_io.export_model(engine, train_dir / MODEL_FILE, rank, stage)
    peaks = ctx.collective.all_gather(np.array([_peak_rss_mib()], dtype=np.float64))
    if log is not None:
        last_epoch = [r for r in log.records if r.get("event") == "epoch"]
        final = {k: v for k, v in (last_epoch[-1] if last_epoch else {}).items() if k not in ("event", "time")}
        final.update(step=step, total_steps=total_steps, peak_rss_mib_per_worker=[float(p[0]) for p in peaks])
        log.append({"event": "end", **final})


def _log_event(log: MetricsLog | None, event: str, step: int, epoch: int, metrics: dict[str, Any]) -> None:
    if log is not None:
        log.append({"event": event, "step": step, "epoch": epoch, **metrics})


def _peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (``VmHWM``: unlike ``ru_maxrss`` it is not
    inherited across ``exec`` from the parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _die_for_test(marker: Path) -> None:
    """Fault injection (tests): record the death, let Ray register pending checkpoints, exit hard."""
    import ray.train

    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()), encoding="utf-8")
    try:
        from ray.train import CheckpointConsistencyMode

        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    except Exception as err:  # noqa: BLE001 - the test then shows which checkpoint was used
        LOG.warning("fault injection: could not confirm reported checkpoints: %s", err)
    LOG.warning("fault injection: worker exits now (pid %d)", os.getpid())
    os._exit(1)
