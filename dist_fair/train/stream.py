"""Row-block streams for training workers: who reads what, in which order, and ahead of time.

Each worker reads a DISJOINT share of the data (DESIGN.md, "train"): for training an endless
stream resampled from its share (shuffled anew every pass, seeded by (seed, rank, pass)); for
evaluation every row of its share exactly once, so that over all workers every row is seen once.
Blocks are dicts of NumPy arrays sharing their first dimension; :func:`rebatch` cuts them into
fixed-size batches and :class:`Prefetcher` pulls them in a background thread, so reading and
decoding overlap with the training step (on a 2-core machine the step never waits for data as long
as reading a batch is faster than training on it).

Two sources:
- in memory (tests, benchmarks, the built-in probe on generated data): :class:`InMemoryStreams`;
- a shard folder (``dist_fair.data.shards``): :class:`ShardStreams`.
Both are small picklable objects that the engine calls on each worker.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

Block = Mapping[str, np.ndarray]


def block_rows(block: Block) -> int:
    """Rows in a block; DataError if its arrays disagree."""
    sizes = {name: len(array) for name, array in block.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"block arrays have different numbers of rows: {sizes}; every array of a block must "
                        "hold one entry per row")
    return next(iter(sizes.values()), 0)


def rebatch(blocks: Iterable[Block], batch_size: int, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Cut a stream of row blocks into batches of exactly ``batch_size`` rows (the last one smaller
    unless ``drop_last``). Rows keep their order."""
    if batch_size < 1:
        raise ValueError(f"rebatch: batch_size must be >= 1, got {batch_size}")
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    for block in blocks:
        rows = block_rows(block)
        if rows == 0:
            continue
        pending.append(dict(block))
        pending_rows += rows
        while pending_rows >= batch_size:
            batch, pending, pending_rows = _take(pending, batch_size), *_rest(pending, batch_size, pending_rows)
            yield batch
    if pending_rows and not drop_last:
        yield _take(pending, pending_rows)


def _take(parts: list[dict[str, np.ndarray]], rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` rows of the concatenated parts."""
    chunks: list[dict[str, np.ndarray]] = []
    need = rows
    for part in parts:
        n = min(need, block_rows(part))
        chunks.append({k: v[:n] for k, v in part.items()})
        need -= n
        if need == 0:
            break
    if len(chunks) == 1:
        return {k: np.ascontiguousarray(v) for k, v in chunks[0].items()}
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _rest(parts: list[dict[str, np.ndarray]], rows: int, total: int) -> tuple[list[dict[str, np.ndarray]], int]:
    """The parts left after dropping the first ``rows`` rows."""
    out = []
    drop = rows
    for part in parts:
        n = block_rows(part)
        if drop >= n:
            drop -= n
            continue
        out.append({k: v[drop:] for k, v in part.items()} if drop else part)
        drop = 0
    return out, total - rows


_END = object()


class Prefetcher:
    """Iterate ``source`` in a daemon thread, keeping up to ``depth`` items ready.

    Exceptions raised by the source are re-raised in the consumer; :meth:`close` (or leaving a
    ``with`` block) stops the thread without waiting for the source to end.
    """

    def __init__(self, source: Iterable[Any], depth: int = 4, name: str = "prefetch") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(source),), name=name, daemon=True)
        self.wait_s = 0.0  # time the consumer spent waiting for data (data-starvation indicator)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(err)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        import time

        start = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if item is _END:
            self._stop.set()
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def partition(num_items: int, rank: int, world_size: int) -> np.ndarray:
    """Indices of the items worker ``rank`` owns: ``{i : i mod world_size = rank}`` (disjoint, and
    together every item exactly once)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"partition: rank {rank} is not in [0, {world_size})")
    return np.arange(rank, num_items, world_size, dtype=np.int64)


class InMemoryStreams:
    """Train/eval streams over arrays held in memory (pickled to every worker: keep them small).

    Rows are dealt to workers round-robin (:func:`partition`); training resamples a worker's rows
    in a fresh random order every pass, evaluation yields them once, in order. Blocks have
    ``block_rows`` rows.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], block_rows: int = 1024) -> None:
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.num_samples = block_rows_of(self.arrays)
        self.block_rows = block_rows

    def _blocks(self, index: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(index), self.block_rows):
            rows = index[start: start + self.block_rows]
            yield {k: v[rows] for k, v in self.arrays.items()}

    def train(self, rank: int, world_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        mine = partition(self.num_samples, rank, world_size)
        if len(mine) == 0:
            raise DataError(f"worker {rank} of {world_size} has no training rows: the data holds only "
                            f"{self.num_samples} rows; use fewer workers")
        rng = np.random.default_rng([seed, rank])
        while True:
            yield from self._blocks(rng.permutation(mine))

    def eval(self, rank: int, world_size: int) -> Iterator[dict[str, np.ndarray]]:
        yield from self._blocks(partition(self.num_samples, rank, world_size))


def block_rows_of(arrays: Mapping[str, np.ndarray]) -> int:
    """Rows shared by all arrays; DataError naming them if they disagree."""
    return block_rows(arrays) if arrays else 0


def block_to_arrays(block: Any, attribute_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """A ``dist_fair.data.shards.Block`` as a flat dict: ``ids``, ``emb`` (float32), ``identity``
    and one ``attr_<name>`` array per protected attribute."""
    out: dict[str, np.ndarray] = {"ids": np.asarray(block.ids, dtype=np.int64),
                                  "identity": np.asarray(block.identity, dtype=np.int64)}
    if getattr(block, "emb", None) is not None:
        out["emb"] = np.asarray(block.emb, dtype=np.float32)
    attrs = getattr(block, "attrs", {}) or {}
    for name in attribute_names or list(attrs):
        if name in attrs:
            out[f"attr_{name}"] = np.asarray(attrs[name], dtype=np.int64)
    return out


class ShardStreams:
    """Train/eval streams over an embedding shard folder (``dist_fair.data.shards``).

    With at least as many shards as workers, each worker reads only its own shards
    (``shards_for_worker``): training through ``stream_blocks(..., resampled=True, seed)`` (endless,
    shuffled), evaluation through ``iter_blocks`` over the same shards, each row once. With fewer
    shards than workers (small data sets) every worker reads all shards and keeps the rows with
    ``id mod world_size = rank`` — still disjoint and exactly once, at the price of reading
    everything on every worker. ``keys`` restricts the arrays handed on (None = all of
    :func:`block_to_arrays`).
    """

    def __init__(self, shard_dir: str, keys: Sequence[str] | None = None) -> None:
        from dist_fair.data.shards import read_manifest

        self.shard_dir = str(shard_dir)
        manifest = read_manifest(self.shard_dir)
        if manifest.kind != "embeddings":
            raise DataError(f"shard folder {self.shard_dir} holds {manifest.kind!r} shards; training streams need "
                            "embedding shards (run `dist-fair embed` first)")
        self.num_samples = int(manifest.num_samples)
        self.num_shards = len(manifest.shards)
        self.dim = int(manifest.dim)
        self.attribute_names = list(manifest.attributes)
        self.keys = None if keys is None else tuple(keys)

    def _select(self, block: Any) -> dict[str, np.ndarray]:
        arrays = block_to_arrays(block, self.attribute_names)
        return arrays if self.keys is None else {k: arrays[k] for k in self.keys}

    def _rows_of_rank(self, rank: int, world_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Every block of every shard, restricted to the rows with ``id mod world_size = rank``."""
        from dist_fair.data.shards import iter_blocks

        for block in iter_blocks(self.shard_dir):
            keep = np.asarray(block.ids) % world_size == rank
            if keep.any():
                yield {k: v[keep] for k, v in self._select(block).items()}

    def train(self, rank: int, world_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        if world_size > self.num_shards:
            rng = np.random.default_rng([seed, rank])
            while True:  # few shards: row split, rows reshuffled every pass
                blocks = list(self._rows_of_rank(rank, world_size))
                if not blocks:
                    raise DataError(f"worker {rank} of {world_size} has no rows in {self.shard_dir}; use fewer workers")
                merged = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
                order = rng.permutation(len(next(iter(merged.values()))))
                yield {k: v[order] for k, v in merged.items()}
        from dist_fair.data.shards import stream_blocks

        for block in stream_blocks(self.shard_dir, rank, world_size, resampled=True, seed=seed):
            yield self._select(block)

    def eval(self, rank: int, world_size: int) -> Iterator[dict[str, np.ndarray]]:
        if world_size > self.num_shards:
            yield from self._rows_of_rank(rank, world_size)
            return
        from dist_fair.data.shards import iter_blocks, read_manifest, shards_for_worker

        names = shards_for_worker(read_manifest(self.shard_dir), rank, world_size)
        for block in iter_blocks(self.shard_dir, names):
            yield self._select(block)


def batches(blocks: Iterable[Block], batch_size: int, to_batch: Callable[[dict[str, np.ndarray]], Any],
            depth: int, drop_last: bool) -> Prefetcher:
    """Rebatched, converted (``to_batch``, e.g. to torch tensors) and prefetched in a thread."""
    return Prefetcher((to_batch(b) for b in rebatch(blocks, batch_size, drop_last=drop_last)), depth=depth)
