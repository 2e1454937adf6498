"""Embedding image shards with any registered embedder (DESIGN.md, "[embed]"; ``registry.py``).

Each image shard becomes one embedding shard with the same name stem and the same id range, so
ids, identities and protected attributes carry over unchanged (and ``identity_names.json`` is
copied when the image folder has one). One Ray task per shard (``workers`` at a time, 1 CPU each,
thread pools limited to it); a task decodes its JPEGs in batches of ``batch_size`` and the
embedder returns L2-normalised rows ``x = f(image) / ||f(image)||`` (METHODS.md §1). Writing goes
through ``write_shard_set``: atomic per shard, and resumable (a killed run keeps finished shards).

Per-image flags (``dlib-resnet`` reports ``no_face``: no face detected, embedded from the centred
fallback box) are never dropped silently. Each shard task writes a record
``.<stem>.embed-<job>.npz`` (the flags by position in the shard, the seconds it took, the run id)
atomically *before* its tar is renamed into place, so every finished shard has one; a shard found
without its record is redone. After all shards, ``<flag>.npy`` (bool, one entry per id) is written
atomically and the totals go into the manifest's ``source`` (``source["no_face"]``) together with
``source["flag_files"]``. ``load_flag`` reads such a file back.

Progress: a tqdm bar in images (images/s), advanced after every batch of every task (tasks report
to a small counter actor that the driver polls).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dist_fair.data.schema import Manifest
from dist_fair.data.shards import Block, ShardPlan, decode_sample, iter_shard_samples, read_manifest, write_shard_set
from dist_fair.embed.registry import Embedder, create_embedder
from dist_fair.errors import ConfigError, DataError, ShardError
from dist_fair.io_atomic import atomic_path, atomic_save_npy

LOG = logging.getLogger(__name__)

IDENTITY_NAMES_FILE = "identity_names.json"
_EMBEDDERS: dict[tuple, Embedder] = {}


def _embedder(model: str, options: tuple[tuple[str, Any], ...]) -> Embedder:
    """One embedder per (model, options) per process (Ray reuses worker processes)."""
    key = (model, options)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = create_embedder(model, **dict(options))
    return _EMBEDDERS[key]


def record_path(out_dir: str | Path, shard_name: str, job: str) -> Path:
    """Where a shard's flags/timing record of job ``job`` lives."""
    return Path(out_dir) / f".{Path(shard_name).stem}.embed-{job[:16]}.npz"


class _Counter:
    """Images embedded so far (in the driver, or as a Ray actor that tasks report to)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += int(n)

    def total(self) -> int:
        return self.count


@dataclass
class _Report:
    """Picklable progress callback: ``counter`` is a ``_Counter`` or a Ray actor handle of one."""

    counter: Any
    remote: bool

    def __call__(self, n: int) -> None:
        if self.remote:
            self.counter.add.remote(n)
        else:
            self.counter.add(n)

    def total(self) -> int:
        if self.remote:
            import ray

            return int(ray.get(self.counter.total.remote()))
        return self.counter.total()


@dataclass
class EmbedProducer:
    """Producer for ``write_shard_set``: the rows of one image shard, embedded, plus its record."""

    image_dir: str
    out_dir: str
    model: str
    options: tuple[tuple[str, Any], ...]
    batch_size: int
    job: str
    run_id: str
    threads: int = 1
    block_rows: int = 4096
    report: Callable[[int], None] | None = None

    def __call__(self, plan: ShardPlan) -> Iterator[Block]:
        embedder = _embedder(self.model, self.options)
        manifest = read_manifest(self.image_dir)
        source = plan.payload
        flags: dict[str, list[np.ndarray]] = {f: [] for f in embedder.flags}
        pending: list[tuple[Block, bytes, str]] = []
        out: list[Block] = []
        started, cpu_started = time.perf_counter(), time.process_time()

        def flush() -> None:
            batch = embedder.embed_jpegs([p[1] for p in pending], [p[2] for p in pending])
            _check_batch(batch.rows, batch.flags, embedder, len(pending), pending[0][2])
            for name in embedder.flags:
                flags[name].append(np.asarray(batch.flags[name], bool))
            for (meta, _, _), row in zip(pending, batch.rows):
                out.append(Block(meta.ids, row[None, :], meta.identity, meta.attrs))
            if self.report is not None:
                self.report(len(pending))
            pending.clear()

        with embedder.limit_threads(self.threads):
            info = next(s for s in manifest.shards if s.name == source)
            for sample in iter_shard_samples(self.image_dir, info):  # sha256-verified, truncation checked
                where = f"shard {source}, sample {sample.get('__key__')!r}"
                if "jpg" not in sample:
                    raise ShardError(f"{where}: no jpg entry; is {self.image_dir} an image shard folder?")
                meta = decode_sample(sample, manifest, source, with_emb=False)
                pending.append((meta, sample["jpg"], where))
                if len(pending) == self.batch_size:
                    flush()
                if len(out) >= self.block_rows:
                    yield _merge(out, manifest)
                    out = []
            if pending:
                flush()
        arrays = {f"flag_{name}": (np.concatenate(parts) if parts else np.zeros(0, bool))
                  for name, parts in flags.items()}
        for name, values in arrays.items():
            if values.shape != (plan.rows,):
                raise DataError(f"shard {plan.name}: {values.shape[0]} {name} flags for {plan.rows} planned rows; "
                                f"the image shard {source} does not hold the rows its manifest lists - rewrite it")
        # The record goes down before the tar is renamed into place: a finished shard always has one.
        with atomic_path(record_path(self.out_dir, plan.name, self.job)) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays, images=np.int64(plan.rows),
                         seconds=np.float64(time.perf_counter() - started),
                         cpu_seconds=np.float64(time.process_time() - cpu_started), run=np.array(self.run_id))
        if out:
            yield _merge(out, manifest)


def _check_batch(rows: np.ndarray, flags: dict[str, np.ndarray], embedder: Embedder, n: int, first: str) -> None:
    where = f"embedder {embedder.name!r} on the batch starting at {first}"
    if not isinstance(rows, np.ndarray) or rows.shape != (n, embedder.dim):
        raise DataError(f"{where}: returned rows of shape {getattr(rows, 'shape', None)}, expected ({n}, "
                        f"{embedder.dim}); the embedder is broken")
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-3):
        raise DataError(f"{where}: rows are not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f}); "
                        "embedders must return unit rows")
    for name in embedder.flags:
        if name not in flags or np.shape(flags[name]) != (n,):
            raise DataError(f"{where}: flag {name!r} missing or of the wrong shape; expected ({n},) booleans")


def _merge(rows: list[Block], manifest: Manifest) -> Block:
    return Block(ids=np.concatenate([r.ids for r in rows]), emb=np.concatenate([r.emb for r in rows]),
                 identity=np.concatenate([r.identity for r in rows]),
                 attrs={a: np.concatenate([r.attrs[a] for r in rows]) for a in manifest.attribute_order})


@dataclass
class EmbedRun:
    """What one ``run_embed`` call did: the output manifest, flag totals and throughput.

    ``embedded`` images were embedded in this run (the rest came from finished shards of an earlier
    run); ``images_per_s`` = embedded / wall ``seconds`` of the stage (model loading included);
    ``images_per_s_per_task`` = embedded / summed wall seconds inside the shard tasks;
    ``images_per_cpu_s`` = embedded / summed CPU seconds of those tasks (what one free core gives,
    whatever else loads the machine).
    """

    manifest: Manifest
    embedded: int
    resumed: int
    seconds: float
    task_seconds: float
    task_cpu_seconds: float = 0.0
    flags: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def images_per_s_per_task(self) -> float:
        return self.embedded / self.task_seconds if self.task_seconds > 0 else 0.0

    @property
    def images_per_cpu_s(self) -> float:
        return self.embedded / self.task_cpu_seconds if self.task_cpu_seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {"samples": self.manifest.num_samples, "dim": self.manifest.dim, "shards": len(self.manifest.shards),
                "embedded": self.embedded, "resumed": self.resumed, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 2),
                "images_per_s_per_task": round(self.images_per_s_per_task, 2),
                "images_per_cpu_s": round(self.images_per_cpu_s, 2), **self.flags}


class _ProgressBar:
    """A tqdm bar in images, fed by polling the tasks' counter from a background thread."""

    def __init__(self, report: _Report, total: int, initial: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.report, self.initial = report, initial
        self.bar = tqdm(total=total, initial=initial, unit="img", desc=desc, disable=not enabled)
        self.shown = initial
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, name="embed-progress", daemon=True)

    def _update(self) -> None:
        value = min(self.bar.total, self.initial + self.report.total())
        if value > self.shown:
            self.bar.update(value - self.shown)
            self.shown = value

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self._update()
            except Exception:  # noqa: BLE001 - progress must never break the run
                LOG.debug("progress poll failed", exc_info=True)

    def __enter__(self) -> "_ProgressBar":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        if exc[0] is None:
            self._update()
        self.bar.close()


def _job_digest(source: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()


def run_embed(image_dir: str | Path, out_dir: str | Path, model: str = "resnet18", batch_size: int | None = None,
              workers: int = 1, dtype: str = "float16", progress: bool = True, **options: Any) -> EmbedRun:
    """Embed every image shard of ``image_dir`` with embedder ``model`` into ``out_dir``.

    ``options`` go to the embedder's factory (timm: ``checkpoint``, ``image_size``, ``seed``;
    ``dlib-resnet`` takes none). ``batch_size`` None = the embedder's default.
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    manifest = read_manifest(image_dir)
    if manifest.kind != "images":
        raise ShardError(f"{image_dir} holds {manifest.kind} shards, not images; it needs no embedding")
    if out_dir.resolve() == image_dir.resolve():
        raise ConfigError(f"embed: --out {out_dir} is the image shard folder itself; choose another folder")
    if workers < 1:
        raise ConfigError(f"embed workers must be >= 1, got {workers}")
    options = {k: v for k, v in options.items() if v is not None}
    embedder = create_embedder(model, **options)  # fails here, before any work, on a bad name or option
    batch_size = embedder.default_batch_size if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ConfigError(f"embed batch size must be >= 1, got {batch_size}")
    described = embedder.describe()
    source = {"source": "embed", "images": str(image_dir.resolve()),
              "image_shards_sha256": [s.sha256 for s in manifest.shards], "model": model,
              "embedder": described, "random_weights": bool(described.get("random_weights", False)),
              "flags": list(embedder.flags), **{k: options[k] for k in ("checkpoint", "image_size", "seed")
                                                 if k in options}}
    job = _job_digest({**source, "dtype": dtype, "dim": embedder.dim})
    run_id = uuid.uuid4().hex
    plans = [ShardPlan(i, f"{Path(s.name).stem}.tar", s.first_id, s.samples, s.name)
             for i, s in enumerate(manifest.shards)]
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = 0
    for plan in plans:  # a shard without its record (flags, timing) is redone
        tar = out_dir / plan.name
        if tar.exists() and not record_path(out_dir, plan.name, job).is_file():
            LOG.info("embed: %s has no record of this job; it is embedded again", tar)
            tar.unlink()
        elif tar.exists():
            finished += plan.rows
    if workers > 1:
        import ray

        from dist_fair.ray_runtime import init_ray

        init_ray()
        report = _Report(ray.remote(num_cpus=0)(_Counter).remote(), remote=True)
    else:
        report = _Report(_Counter(), remote=False)
    producer = EmbedProducer(str(image_dir), str(out_dir), model, tuple(sorted(options.items())), batch_size,
                             job, run_id, report=report)
    started = time.perf_counter()
    try:
        with _ProgressBar(report, manifest.num_samples, finished, f"embed {model}", progress):
            out = write_shard_set(out_dir, plans, producer, "embeddings", manifest.attributes, dim=embedder.dim,
                                  dtype=dtype, workers=workers, source=source,
                                  num_identities=manifest.num_identities, progress=False)
    finally:
        if report.remote:
            import ray

            ray.kill(report.counter)
    seconds = time.perf_counter() - started
    embedded, task_seconds, task_cpu_seconds, totals = _collect_records(out_dir, out, embedder.flags, job, run_id)
    if (image_dir / IDENTITY_NAMES_FILE).is_file():
        with atomic_path(out_dir / IDENTITY_NAMES_FILE) as tmp:
            shutil.copyfile(image_dir / IDENTITY_NAMES_FILE, tmp)
    if embedder.flags:
        out.source.update(totals)
        out.source["flag_files"] = {name: f"{name}.npy" for name in embedder.flags}
        out.save(out_dir)
        for name, count in totals.items():
            if count:
                LOG.warning("embed: %d of %d images flagged %s (embedded anyway; per id in %s)", count,
                            out.num_samples, name, out_dir / f"{name}.npy")
    run = EmbedRun(out, embedded, out.num_samples - embedded, seconds, task_seconds, task_cpu_seconds, totals)
    LOG.info("embed: %d images embedded in %.1f s (%.1f images/s; %.2f per task-second, %.2f per CPU-second), "
             "%d resumed", embedded, seconds, run.images_per_s, run.images_per_s_per_task, run.images_per_cpu_s,
             run.resumed)
    return run


def _collect_records(out_dir: Path, manifest: Manifest, flag_names: tuple[str, ...], job: str,
                     run_id: str) -> tuple[int, float, float, dict[str, int]]:
    """Read every shard's record: (images embedded in this run, their task wall and CPU seconds, flag totals);
    write ``<flag>.npy`` (by id) atomically."""
    full = {name: np.zeros(manifest.num_samples, bool) for name in flag_names}
    embedded, task_seconds, task_cpu_seconds = 0, 0.0, 0.0
    for shard in manifest.shards:
        path = record_path(out_dir, shard.name, job)
        try:
            with np.load(path, allow_pickle=False) as record:
                data = {k: record[k] for k in record.files}
        except (OSError, ValueError, EOFError) as err:
            raise ShardError(f"embed record {path} of shard {shard.name} is missing or unreadable ({err}); delete "
                             f"{out_dir / shard.name} and re-run to embed that shard again") from err
        for name in flag_names:
            values = data.get(f"flag_{name}")
            if values is None or values.shape != (shard.samples,) or values.dtype != bool:
                raise ShardError(f"embed record {path}: flag {name!r} does not hold {shard.samples} booleans; delete "
                                 f"{out_dir / shard.name} and re-run")
            full[name][shard.first_id: shard.first_id + shard.samples] = values
        if str(data["run"]) == run_id:
            embedded += int(data["images"])
            task_seconds += float(data["seconds"])
            task_cpu_seconds += float(data["cpu_seconds"])
    for name, values in full.items():
        atomic_save_npy(out_dir / f"{name}.npy", values)
    for stale in out_dir.glob(".*.embed-*.npz"):  # records of other jobs (the shards were rewritten)
        if not stale.name.endswith(f".embed-{job[:16]}.npz"):
            stale.unlink()
    return embedded, task_seconds, task_cpu_seconds, {name: int(values.sum()) for name, values in full.items()}


def load_flag(shard_dir: str | Path, name: str = "no_face") -> np.ndarray:
    """A per-id flag written by the embed stage (bool array, one entry per sample id)."""
    manifest = read_manifest(shard_dir)
    files = manifest.source.get("flag_files", {})
    if name not in files:
        raise ShardError(f"{shard_dir}: the embed stage recorded no flag {name!r} (recorded: {sorted(files)}); "
                         "only embedders that detect faces (dlib-resnet) record no_face")
    values = np.load(Path(shard_dir) / files[name], allow_pickle=False)
    if values.shape != (manifest.num_samples,) or values.dtype != bool:
        raise ShardError(f"{Path(shard_dir) / files[name]}: expected {manifest.num_samples} booleans, got "
                         f"{values.dtype} {values.shape}; re-run the embed stage")
    return values


def embed_image_shards(image_dir: str | Path, out_dir: str | Path, model: str = "resnet18",
                       checkpoint: str | None = None, image_size: int = 112, batch_size: int = 64,
                       workers: int = 1, seed: int = 0, dtype: str = "float16", progress: bool = True) -> Manifest:
    """A timm backbone over image shards (the original signature; ``run_embed`` takes any embedder)."""
    return run_embed(image_dir, out_dir, model, batch_size=batch_size, workers=workers, dtype=dtype,
                     progress=progress, checkpoint=checkpoint, image_size=image_size, seed=seed).manifest
