"""CPU seconds and peak memory of a measured cell: this driver and its Ray session's processes.

What is counted (psutil, sampled every ``interval`` seconds in a background thread):

- the driver process and all its descendants - with a local or simulated Ray cluster these are
  Ray's own processes too (GCS, raylets, dashboard, workers and actors started by them);
- every process on this machine whose command line names the Ray session's folder (the raylet and
  GCS of a cluster started with ``ray start`` on this machine) and their descendants.

CPU seconds = user + system time accrued during the cell: for a process alive at the start, its
time minus the time at the first sample; for a process started during the cell, all its time.
A process that ends between two samples loses its last < ``interval`` seconds. Peak RSS = the
largest sum of resident set sizes over one sample (shared pages, e.g. Ray's object store, count
once per process that touched them). On a multi-node cluster only THIS machine's processes are
visible: the record says so (``scope``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger(__name__)


def ray_session_dir() -> str | None:
    """The session folder of the Ray this process is connected to (None without Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        node = ray._private.worker._global_node  # noqa: SLF001 - the only place Ray exposes it
        return str(node.get_session_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001 - measurement must never break a run
        return None


@dataclass
class Usage:
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    processes: int
    scope: str


class ProcessSampler:
    """Samples the driver's and the Ray session's processes until :meth:`stop` (module docstring)."""

    def __init__(self, session_dir: str | None = None, interval: float = 0.25) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(os.getpid())
        self._session = os.path.basename(session_dir) if session_dir else None
        self._interval = float(interval)
        self._first: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._pre_existing: set[tuple[int, float]] = set()
        self._peak = 0
        self._session_roots: list[Any] = []
        self._roots_checked = 0.0
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._run, name="scale-sampler", daemon=True)
        self._thread.start()

    def _find_session_roots(self) -> None:
        if not self._session:
            return
        roots = []
        for proc in self._psutil.process_iter(["cmdline"]):
            try:
                if self._session in " ".join(proc.info["cmdline"] or []):
                    roots.append(proc)
            except self._psutil.Error:
                continue
        self._session_roots = roots
        self._roots_checked = time.perf_counter()

    def _processes(self) -> list[Any]:
        if time.perf_counter() - self._roots_checked > 5.0:
            self._find_session_roots()
        seen: dict[int, Any] = {}
        for root in [self._root, *self._session_roots]:
            try:
                for proc in [root, *root.children(recursive=True)]:
                    seen[proc.pid] = proc
            except self._psutil.Error:
                continue
        return list(seen.values())

    def _sample(self, initial: bool = False) -> None:
        total = 0
        for proc in self._processes():
            try:
                with proc.oneshot():
                    key = (proc.pid, proc.create_time())
                    times = proc.cpu_times()
                    cpu = times.user + times.system
                    total += proc.memory_info().rss
            except self._psutil.Error:
                continue
            if key not in self._first:
                self._first[key] = cpu
                if initial:
                    self._pre_existing.add(key)
            self._last[key] = cpu
        self._peak = max(self._peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sample()
            except Exception as err:  # noqa: BLE001 - keep sampling
                LOG.debug("sampler: %s", err)

    def stop(self) -> Usage:
        """Stop sampling (one last sample first) and return what was measured."""
        self._sample()
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._start
        cpu = sum(last - (self._first[key] if key in self._pre_existing else 0.0)
                  for key, last in self._last.items())
        scope = "driver + Ray session processes on this machine"
        return Usage(wall_s=wall, cpu_s=float(cpu), peak_rss_mib=self._peak / 2**20, processes=len(self._last),
                     scope=scope)
