"""The Ray actor that holds one index shard (DESIGN.md, "[knn]").

An :class:`IndexShardActor` owns the contiguous global id range ``[start, stop)``: it reads those
rows itself from the shard files (only the tar files overlapping its range; nothing goes through
the driver), L2-normalises them, builds its FAISS index (:mod:`dist_fair.knn.indexes`) and then
answers one query block at a time (:func:`dist_fair.knn.search.search_shard`). Its memory is its
shard (held once, inside the index) plus the block being searched.

Fault tolerance: the index is built lazily by whichever call comes first, so when Ray restarts a
dead actor (``max_restarts``) and re-sends its unfinished calls (``max_task_retries``), the new
life rebuilds the same index from the same files (same seeds) and the re-sent blocks get the same
answers. :class:`FaultInjection` lets tests kill an actor once, on purpose.

This module is importable without Ray; :func:`dist_fair.knn.graph.build_knn_graph` wraps the class
with ``ray.remote``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.errors import ShardError
from dist_fair.knn.indexes import IndexSpec, ShardIndex, build_shard_index
from dist_fair.knn.search import DEFAULT_MARGIN, exact_topk, normalize_rows, search_shard

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaultInjection:
    """TEST ONLY: actor ``rank`` exits abruptly (``os._exit``) when asked to search block ``block``,
    once - the first life creates ``marker`` just before dying, later lives see it and carry on."""

    rank: int
    block: int
    marker: str


def load_rows(shard_dir: str | Path, start: int, stop: int) -> np.ndarray:
    """Embeddings of global ids ``[start, stop)``, L2-normalised, float32 ``(stop - start, dim)``.

    Reads only the shard files whose id range overlaps ``[start, stop)``, block by block, into one
    preallocated array.

    Raises:
        ShardError: the folder holds image shards, a shard is missing/corrupt, or a block's
            dimension differs from the manifest's (raised by the shard reader, naming the shard).
    """
    from dist_fair.data.shards import iter_blocks, read_manifest

    manifest = read_manifest(shard_dir)
    if manifest.kind != "embeddings":
        raise ShardError(f"{shard_dir} holds {manifest.kind} shards; the kNN graph needs embeddings - run the embed "
                         "stage first (`dist-fair run` with an images source)")
    names = [s.name for s in manifest.shards
             if s.samples > 0 and s.first_id < stop and s.first_id + s.samples > start]
    out = np.empty((stop - start, int(manifest.dim)), dtype=np.float32)
    filled = 0
    for block in iter_blocks(shard_dir, names):
        if len(block) == 0:
            continue
        lo, hi = max(start, int(block.ids[0])), min(stop, int(block.ids[-1]) + 1)
        if hi <= lo:
            continue
        rows = slice(lo - int(block.ids[0]), hi - int(block.ids[0]))
        out[lo - start:hi - start] = normalize_rows(block.emb[rows], first_id=lo, where=f"shard {block.shard}")
        filled += hi - lo
    if filled != stop - start:
        raise ShardError(f"{shard_dir}: read {filled} rows for ids {start}..{stop - 1}, expected {stop - start}; "
                         "the shard folder is inconsistent with its manifest - rewrite it")
    return out


class IndexShardActor:
    """One index shard: global ids ``[start, stop)`` of ``shard_dir``, searched block by block."""

    def __init__(self, shard_dir: str, rank: int, start: int, stop: int, spec: IndexSpec, k: int,
                 threads: int = 1, margin: int = DEFAULT_MARGIN, fault: FaultInjection | None = None) -> None:
        self.shard_dir = str(shard_dir)
        self.rank, self.start, self.stop = int(rank), int(start), int(stop)
        self.spec, self.k, self.margin = spec, int(k), int(margin)
        self.threads = max(1, int(threads))
        self.fault = fault
        self._shard: ShardIndex | None = None
        self._stats: dict[str, Any] = {"rank": self.rank, "start": self.start, "stop": self.stop, "lives": 1,
                                       "builds": 0, "blocks": 0, "search_s": 0.0, "exact_s": 0.0}
        self._stats["node_id"] = None
        import ray

        if ray.is_initialized():  # also usable as a plain object, without Ray (tests, debugging)
            context = ray.get_runtime_context()
            self._stats["node_id"] = context.get_node_id()
            if context.get_actor_id() is not None and context.was_current_actor_reconstructed:
                self._stats["lives"] = 2  # at least: this life follows a failure
        self._stats["pid"] = os.getpid()

    def _ensure_built(self) -> ShardIndex:
        if self._shard is None:
            import faiss
            from threadpoolctl import threadpool_limits

            faiss.omp_set_num_threads(self.threads)
            threadpool_limits(limits=self.threads, user_api="blas")  # numpy's BLAS (ivf list search)
            t0 = time.perf_counter()
            vectors = load_rows(self.shard_dir, self.start, self.stop)
            load_s = time.perf_counter() - t0
            self._shard = build_shard_index(self.spec, vectors, rank=self.rank)
            del vectors
            self._stats.update(load_s=load_s, train_s=self._shard.timings.get("train", 0.0),
                               add_s=self._shard.timings.get("add", 0.0), index=self._shard.describe())
            self._stats["builds"] += 1
            LOG.info("index shard %d: ids %d..%d, %s built in %.1f s", self.rank, self.start, self.stop - 1,
                     self.spec.kind, time.perf_counter() - t0)
        return self._shard

    def build(self) -> dict[str, Any]:
        """Load the rows and build the index (if not yet); return this actor's statistics."""
        self._ensure_built()
        return self.stats()

    def search(self, queries: np.ndarray, block: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Top-``min(k, rows)`` of a block of normalised queries in this shard: ``(global ids, sims)``."""
        fault = self.fault
        if fault is not None and fault.rank == self.rank and fault.block == block and not os.path.exists(fault.marker):
            Path(fault.marker).write_text(f"actor {self.rank} died on block {block}\n")
            os._exit(1)
        shard = self._ensure_built()
        t0 = time.perf_counter()
        out = search_shard(shard, queries, self.k, id_offset=self.start, margin=self.margin)
        self._stats["search_s"] += time.perf_counter() - t0
        self._stats["blocks"] += 1
        return out

    def exact_search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``min(k, rows)`` in this shard whatever the index kind (the recall reference)."""
        shard = self._ensure_built()
        t0 = time.perf_counter()
        ids, sims = exact_topk(shard, queries, self.k, self.margin)
        self._stats["exact_s"] += time.perf_counter() - t0
        return np.where(ids >= 0, ids + self.start, -1), sims

    def stats(self) -> dict[str, Any]:
        """Rows, timings, builds, blocks searched, lives, node, peak resident memory (MiB) and CPU
        seconds of this actor's process (this life)."""
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {**self._stats, "peak_rss_mib": usage.ru_maxrss / 1024.0, "cpu_s": usage.ru_utime + usage.ru_stime}
