"""The Stage helper: fingerprinting, skipping and resuming for every pipeline stage.

A stage is a folder of the run folder plus a fingerprint::

    key = sha256({"stage": name, "params": params, "upstream": [fingerprints of its inputs]})[:16]

where ``params`` are the settings the output depends on and the upstream fingerprints are those of
the stages it reads (the shard stage's fingerprint is the digest of its shards' sha256 list, so
a stage over external shards is redone when the shards change, not only when a path does). Files:

- ``stage.json`` (written last, atomically): the key, the params, timings and the ``info`` the
  work function returned. A stage whose ``stage.json`` holds the current key is complete and is
  skipped;
- ``stage.pending.json`` (written before the work starts): the key the folder's partial content
  belongs to. A re-run with the same key keeps the folder (work that resumes on its own, such
  as the engine's checkpoints or the shard writer's receipts, continues where it stopped);
  with another key the folder is emptied first, so no partial output of other settings survives.

In plan mode (``dist-fair run --plan``) nothing runs: every stage reports whether it is complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dist_fair.io_atomic import atomic_write_json

LOG = logging.getLogger(__name__)

STAGE_RECORD = "stage.json"
PENDING_RECORD = "stage.pending.json"


def fingerprint(params: Any) -> str:
    """First 16 hex digits of the sha256 of ``params`` as canonical JSON."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageOutcome:
    """What a stage produced (or, in plan mode, would produce).

    Attributes:
        name: the stage name; folder: its output folder.
        fingerprint: what later stages include in their own key.
        skipped: True when the stage was already complete (or external) and did not run.
        seconds: run time (0 when skipped).
        info: the work function's summary (from ``stage.json`` when skipped).
        complete: False only in plan mode, for a stage that would run.
    """

    name: str
    folder: Path
    fingerprint: str
    skipped: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    complete: bool = True


@dataclass
class JobContext:
    """One run of the job: the config, the run folder, ``fresh`` (redo every stage), ``plan`` (run
    nothing, report completeness) and the outcomes so far, in order."""

    config: Any
    run_dir: Path
    fresh: bool = False
    plan: bool = False
    outcomes: list[StageOutcome] = field(default_factory=list)

    def stage(self, name: str, folder: str | Path, params: dict[str, Any],
              upstream: Sequence[StageOutcome] = ()) -> "Stage":
        return Stage(self, name, self.run_dir / folder, params, upstream)


class Stage:
    """One stage of a job (see the module docstring)."""

    def __init__(self, ctx: JobContext, name: str, folder: Path, params: dict[str, Any],
                 upstream: Sequence[StageOutcome] = ()) -> None:
        self.ctx, self.name, self.folder, self.params = ctx, name, Path(folder), params
        self.upstream = [u.fingerprint for u in upstream]
        self.upstream_complete = all(u.complete for u in upstream)
        self.key = fingerprint({"stage": name, "params": params, "upstream": self.upstream})

    def completed_record(self) -> dict[str, Any] | None:
        """``stage.json`` when it holds this key, else None."""
        path = self.folder / STAGE_RECORD
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None
        return record if record.get("fingerprint") == self.key else None

    def run(self, work: Callable[[Path], dict[str, Any]]) -> StageOutcome:
        """Run ``work(folder) -> info`` unless the stage is complete; record and return the outcome."""
        ctx = self.ctx
        record = None if ctx.fresh else self.completed_record()
        if record is not None and self.upstream_complete:
            LOG.info("stage %-11s complete in %s: skipped", self.name, self.folder)
            return self._done(StageOutcome(self.name, self.folder, self.key, True, 0.0, record.get("info", {})))
        if ctx.plan:
            return self._done(StageOutcome(self.name, self.folder, self.key, False, 0.0, {}, complete=False))
        self._prepare_folder()
        LOG.info("stage %-11s running -> %s", self.name, self.folder)
        start = time.perf_counter()
        info = work(self.folder) or {}
        seconds = time.perf_counter() - start
        atomic_write_json(self.folder / STAGE_RECORD, {
            "stage": self.name, "fingerprint": self.key, "upstream": self.upstream, "params": self.params,
            "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "info": info})
        (self.folder / PENDING_RECORD).unlink(missing_ok=True)
        LOG.info("stage %-11s done in %.1f s", self.name, seconds)
        return self._done(StageOutcome(self.name, self.folder, self.key, False, seconds, info))

    def external(self, digest: str, info: dict[str, Any]) -> StageOutcome:
        """An input produced outside the run (e.g. a shard folder the user gave): nothing runs; its
        fingerprint is ``digest`` (of its content)."""
        LOG.info("stage %-11s external input %s", self.name, self.folder)
        return self._done(StageOutcome(self.name, self.folder, digest, True, 0.0, info))

    def _prepare_folder(self) -> None:
        pending = self.folder / PENDING_RECORD
        keep = False
        if pending.is_file() and not self.ctx.fresh:
            try:
                keep = json.loads(pending.read_text(encoding="utf-8")).get("fingerprint") == self.key
            except json.JSONDecodeError:
                keep = False
        if not keep and self.folder.exists():
            shutil.rmtree(self.folder)  # output of other settings (or of a --fresh run): never mixed in
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / STAGE_RECORD).unlink(missing_ok=True)
        atomic_write_json(pending, {"stage": self.name, "fingerprint": self.key})

    def _done(self, outcome: StageOutcome) -> StageOutcome:
        self.ctx.outcomes.append(outcome)
        return outcome


__all__ = ["STAGE_RECORD", "PENDING_RECORD", "fingerprint", "StageOutcome", "JobContext", "Stage"]
