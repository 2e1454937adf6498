"""Training progress: the metrics history (JSON lines) and what the user sees while it grows.

Rank 0 appends one JSON object per event to ``<run>/train/metrics.jsonl``:

- ``{"event": "start", "attempt": a, "resumed_from_step": s | null, "world_size": W, ...}``
- ``{"event": "train", "epoch": e, "step": s, "loss": ..., "samples_per_s": ..., "eta_s": ...}``
  every ``train.log_every`` steps (loss and metrics are global means over the steps since the
  previous record, all-reduced over workers);
- ``{"event": "epoch", ...}`` at the end of every epoch (with the epoch hook's and evaluation's
  metrics, prefixed ``eval_``);
- ``{"event": "checkpoint", "step": s}`` after each checkpoint is reported to Ray Train;
- ``{"event": "end", ...}`` when training finished.

The file is rewritten atomically on every append (a crash never leaves a torn line) and is
re-read by a restarted attempt, which continues it. On the driver, :class:`ProgressMonitor`
follows the file and shows a tqdm bar with loss, samples/s and ETA plus one line per epoch.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from dist_fair.io_atomic import atomic_write_text

LOG = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file (missing file = no records; unreadable lines skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            LOG.warning("%s: skipping an unreadable line", path)
    return records


class MetricsLog:
    """Append-only JSON-lines history, rewritten atomically on each append (rank 0 only)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lines = [json.dumps(r, sort_keys=False) for r in read_metrics(self.path)]

    @property
    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._lines]

    def append(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        self._lines.append(json.dumps(_jsonable(record)))
        atomic_write_text(self.path, "\n".join(self._lines) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (or ``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One human line per epoch: ``epoch 2/5  step 120  loss 0.5312  3,456 samples/s  ETA 0:01:23``
    followed by any evaluation/hook metrics."""
    parts = [f"epoch {record.get('epoch', 0) + 1}/{epochs}", f"step {record.get('step', 0)}"]
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    if record.get("samples_per_s") is not None:
        parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    parts.append(f"ETA {format_duration(record.get('eta_s'))}")
    skip = {"event", "time", "epoch", "step", "loss", "samples_per_s", "eta_s", "attempt", "samples", "elapsed_s",
            "data_wait_s"}
    for key, value in record.items():
        if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


class Throughput:
    """Samples/s and ETA from step timings (rank 0)."""

    def __init__(self, total_steps: int, samples_per_step: int, done_steps: int = 0) -> None:
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self.start_steps = done_steps
        self.start = time.perf_counter()
        self.window_start = self.start
        self.window_steps = done_steps

    def window(self, done_steps: int) -> tuple[float, float | None]:
        """(samples/s since the previous call, ETA in seconds from the run's average speed)."""
        now = time.perf_counter()
        steps = done_steps - self.window_steps
        rate = steps * self.samples_per_step / max(now - self.window_start, 1e-9)
        self.window_start, self.window_steps = now, done_steps
        overall = (done_steps - self.start_steps) / max(now - self.start, 1e-9)
        eta = (self.total_steps - done_steps) / overall if overall > 0 else None
        return rate, eta


class ProgressMonitor:
    """Follow ``metrics.jsonl`` from the driver and show a tqdm bar (use as a context manager).

    Works wherever the driver can read the run folder (one machine, or shared storage)."""

    def __init__(self, path: str | Path, total_steps: int, epochs: int, enabled: bool = True,
                 interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.total_steps = total_steps
        self.epochs = epochs
        self.enabled = enabled
        self.interval_s = interval_s
        self._seen = len(read_metrics(self.path))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def __enter__(self) -> "ProgressMonitor":
        if self.enabled:
            from tqdm.auto import tqdm

            # tqdm's own rate and ETA would count Ray's start-up; the engine's samples/s and ETA go
            # in the postfix instead.
            self._bar = tqdm(total=self.total_steps, unit="step", desc="train", dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]")
            self._thread = threading.Thread(target=self._run, name="train-progress", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        records = read_metrics(self.path)
        new, self._seen = records[self._seen:], len(records)
        self._show(new)

    def _show(self, records: Iterable[dict[str, Any]]) -> None:
        if self._bar is None:
            return
        for record in records:
            event = record.get("event")
            if "step" in record and record.get("step") is not None:
                self._bar.n = min(int(record["step"]), self.total_steps)
            if event == "start" and record.get("resumed_from_step"):
                self._bar.write(f"attempt {record.get('attempt')}: resumed from step {record['resumed_from_step']}")
            elif event == "train":
                self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                      samples_s=f"{record.get('samples_per_s', 0):,.0f}",
                                      eta=format_duration(record.get("eta_s")), refresh=False)
            elif event == "epoch":
                self._bar.write(epoch_line(record, self.epochs))
            self._bar.refresh()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self.poll()
            self._bar.close()
