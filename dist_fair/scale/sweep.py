"""The grid of a scaling study: sizes x workers x stages, every cell cached and resumable.

Layout of the study folder ``out``:

- ``cells/<stage>-n<N>-w<W>.json``: one finished cell (its measurement, the settings'
  fingerprint, what the stage reported), written atomically after the stage's own marker;
- ``work/n<N>-w<W>/<stage>/``: the stage's outputs for that size and worker count (the next
  stage of the same cell reads them; ``.done.json`` marks them complete).

A cell counts as finished when its record exists with the same settings and its outputs are
marked complete; a rerun skips it. Running a stage first deletes its own folder and the markers
and records of every stage downstream of it in the same (N, W) folder, so nothing stale survives.

Ray: a private local instance (default), the cluster at ``address`` (``--address``), or a
simulated multi-node cluster on this machine (``nodes > 1``: :class:`ray.cluster_utils.Cluster`
with ``cpus_per_node`` CPUs per node). Ray is started only if some cell has to run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Sequence

from dist_fair.errors import ConfigError
from dist_fair.scale.stages import DEPENDS, RUNNERS, STAGES, Cell, ScaleSettings, with_dependencies

LOG = logging.getLogger(__name__)

CELLS = "cells"
WORK = "work"
#: tries to start a local Ray instance (its raylet must register within a fixed 30 s; a heavily
#: loaded machine can miss that).
START_ATTEMPTS = 3


def cell_name(stage: str, n: int, workers: int) -> str:
    return f"{stage}-n{n}-w{workers}"


def downstream(stage: str) -> list[str]:
    """Every stage that (transitively) reads ``stage``'s outputs."""
    out: list[str] = []
    for other in STAGES:
        seen, todo = set(), list(DEPENDS[other])
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(DEPENDS[dep])
        if stage in seen:
            out.append(other)
    return out


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and arrays (stage reports may hold them)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Study:
    """A scaling study folder (module docstring)."""

    def __init__(self, out: str | Path, settings: ScaleSettings) -> None:
        self.out = Path(out).expanduser().resolve()
        self.settings = settings

    def cell(self, stage: str, n: int, workers: int) -> Cell:
        return Cell(stage, int(n), int(workers), self.out / WORK / f"n{n}-w{workers}", self.settings)

    def record_path(self, stage: str, n: int, workers: int) -> Path:
        return self.out / CELLS / f"{cell_name(stage, n, workers)}.json"

    def load_record(self, stage: str, n: int, workers: int) -> dict[str, Any] | None:
        try:
            record = json.loads(self.record_path(stage, n, workers).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if record.get("settings") == json.loads(json.dumps(self.settings.fingerprint())) else None

    def finished(self, stage: str, n: int, workers: int) -> bool:
        return self.load_record(stage, n, workers) is not None and self.cell(stage, n, workers).done(stage)

    def invalidate_downstream(self, stage: str, n: int, workers: int) -> None:
        cell = self.cell(stage, n, workers)
        for later in downstream(stage):
            (cell.path(later) / ".done.json").unlink(missing_ok=True)
            self.record_path(later, n, workers).unlink(missing_ok=True)

    def run_cell(self, stage: str, n: int, workers: int, nodes: int) -> dict[str, Any]:
        """Run one cell now (its inputs must be complete) and record it."""
        from dist_fair.io_atomic import atomic_write_json
        from dist_fair.scale.measure import ProcessSampler, ray_session_dir

        cell = self.cell(stage, n, workers)
        for dep in DEPENDS[stage]:
            if not cell.done(dep):
                raise ConfigError(f"scale: cell {cell_name(stage, n, workers)} needs stage {dep!r} of the same cell "
                                  "first (internal order error, please report)")
        self.invalidate_downstream(stage, n, workers)
        self.record_path(stage, n, workers).unlink(missing_ok=True)
        shutil.rmtree(cell.path(stage), ignore_errors=True)
        cell.folder.mkdir(parents=True, exist_ok=True)
        LOG.info("scale: %s at N=%d on %d worker(s)", stage, n, workers)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        load_before = os.getloadavg()[0]
        sampler = ProcessSampler(ray_session_dir())
        try:
            info = RUNNERS[stage](cell)
        finally:
            usage = sampler.stop()
        samples = int(info.get("samples") or n)
        record = {
            "stage": stage, "n_target": int(n), "n": samples, "workers": int(workers), "nodes": int(nodes),
            "wall_s": round(usage.wall_s, 4), "cpu_s": round(usage.cpu_s, 3),
            "peak_rss_mib": round(usage.peak_rss_mib, 1), "throughput_per_s": round(samples / usage.wall_s, 2),
            "processes": usage.processes, "cpu_scope": usage.scope, "parts": dict(cell.parts), "info": info,
            "load_avg_1min": f"{load_before:.1f}->{os.getloadavg()[0]:.1f}", "started": started,
            "settings": self.settings.fingerprint(),
        }
        record = json.loads(json.dumps(record, default=_plain))
        cell.mark_done(stage, record["info"])
        atomic_write_json(self.record_path(stage, n, workers), record)
        return record

    def records(self, sizes: Sequence[int], workers: Sequence[int], stages: Sequence[str]) -> list[dict[str, Any]]:
        out = []
        for n in sizes:
            for w in workers:
                for stage in stages:
                    record = self.load_record(stage, n, w)
                    if record is not None:
                        out.append(record)
        return out


def grid(sizes: Sequence[int], workers: Sequence[int], stages: Sequence[str]) -> Iterator[tuple[str, int, int]]:
    """Cells in running order: stage by stage in the pipeline's order, each at every size (smallest
    first) and worker count - so an interrupted sweep leaves whole stages measured (and fittable),
    and every cell finds its inputs done."""
    for stage in stages:
        for n in sorted(set(int(s) for s in sizes)):
            for w in sorted(set(int(x) for x in workers)):
                yield stage, n, w


class RayScope:
    """Ray for the sweep: local, joined at ``address``, or a simulated ``nodes``-node cluster."""

    def __init__(self, address: str | None, nodes: int, cpus_per_node: int | None) -> None:
        if address is not None and nodes > 1:
            raise ConfigError("scale: --address joins an existing cluster; --nodes simulates one on this machine - "
                              "give one of them")
        if nodes < 1:
            raise ConfigError(f"scale: --nodes {nodes}; use 1 (this machine) or more (a simulated cluster)")
        self.address, self.nodes, self.cpus_per_node = address, int(nodes), cpus_per_node
        self._cluster: Any = None
        self._started = False

    def __enter__(self) -> "RayScope":
        import ray

        from dist_fair.ray_runtime import init_ray

        if ray.is_initialized():
            return self
        if self.nodes > 1:
            from ray.cluster_utils import Cluster

            cpus = self.cpus_per_node or max(1, (os.cpu_count() or 2) // self.nodes)
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            self._cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
            for _ in range(self.nodes - 1):
                self._cluster.add_node(num_cpus=cpus)
            self._cluster.wait_for_nodes()
            ray.init(address=self._cluster.address, namespace="dist_fair", log_to_driver=False)
            LOG.info("scale: simulated Ray cluster of %d nodes x %d CPUs at %s", self.nodes, cpus, self._cluster.address)
        else:
            for attempt in range(START_ATTEMPTS):
                try:
                    init_ray(self.address, num_cpus=self.cpus_per_node)
                    break
                except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception on a slow start
                    if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS - 1:
                        raise
                    LOG.warning("scale: Ray did not start within its 30 s (machine busy?); retrying (%d/%d)",
                                attempt + 2, START_ATTEMPTS)
                    ray.shutdown()
        self._started = True
        return self

    def describe(self) -> dict[str, Any]:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return {"address": self.address, "simulated_nodes": self.nodes if self._cluster else None,
                "nodes": len(nodes), "cpus": float(ray.cluster_resources().get("CPU", 0.0))}

    def __exit__(self, *exc: Any) -> None:
        import ray

        if self._started:
            ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()


def run_sweep(out: str | Path, sizes: Sequence[int], workers: Sequence[int], stages: Sequence[str],
              settings: ScaleSettings, *, address: str | None = None, nodes: int = 1,
              cpus_per_node: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every unfinished cell of the grid; return ``{"records", "ran", "skipped", "ray"}``.

    Raises:
        ConfigError: bad grid (no sizes, workers < 1, unknown stage, --address with --nodes).
        DistFairError: a stage failed (its cell is not recorded; a rerun starts there).
    """
    from tqdm.auto import tqdm

    if not sizes or min(sizes) < 2:
        raise ConfigError(f"scale: --sizes {list(sizes)}; give sample counts >= 2, e.g. 10000,30000,100000")
    if not workers or min(workers) < 1:
        raise ConfigError(f"scale: --workers {list(workers)}; give worker counts >= 1, e.g. 1,2")
    stages = with_dependencies(list(stages))
    study = Study(out, settings)
    cells = list(grid(sizes, workers, stages))
    todo = [c for c in cells if not study.finished(*c)]
    ran: list[str] = []
    ray_info: dict[str, Any] | None = None
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", desc="scale", disable=not progress)
    if todo:
        with RayScope(address, nodes, cpus_per_node) as scope:
            ray_info = scope.describe()
            for stage, n, w in cells:
                if study.finished(stage, n, w):
                    continue
                bar.set_postfix_str(cell_name(stage, n, w))
                study.run_cell(stage, n, w, ray_info["nodes"])
                ran.append(cell_name(stage, n, w))
                bar.update(1)
    bar.close()
    return {"records": study.records(sizes, workers, stages), "ran": ran,
            "skipped": [cell_name(*c) for c in cells if cell_name(*c) not in ran], "ray": ray_info,
            "stages": stages, "settings": asdict(settings)}
