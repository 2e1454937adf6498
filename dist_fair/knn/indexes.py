"""FAISS indexes for one index shard (METHODS.md §3): a factory per kind, pure faiss, no Ray.

Every index uses ``METRIC_INNER_PRODUCT`` on L2-normalised vectors, so the score of a pair is its
cosine similarity ``s(q, x) = <q, x> / (|q| |x|) = <q, x>``. Kinds (``auto`` picks ``flat`` for
small sets, ``N^2 d <= 2e12``, and ``hnsw`` beyond; see :func:`resolve_kind`):

- ``flat``: ``IndexFlatIP``, exhaustive and exact (the reference; see :mod:`dist_fair.knn.search`
  for how its candidates are made exactly reproducible).
- ``ivf``: ``IndexIVFFlat`` - k-means coarse quantizer with ``nlist`` lists, ``nprobe`` lists
  visited per query, full vectors stored (scores exact for the candidates it visits). On the CPU
  with ``ivf_search="lists"`` (default) the trained quantizer is kept and the vectors are laid out
  list by list (:mod:`dist_fair.knn.ivf_lists`): same candidates as faiss' search, searched with
  one matrix product per list and query block instead of one list scan per query.
- ``hnsw``: ``IndexHNSWFlat`` - graph with ``M`` links per node, ``efConstruction`` /
  ``efSearch`` beam widths (``efSearch`` is raised to the number of neighbours fetched if lower).
- ``ivfpq``: ``IndexIVFPQ`` (``pq_m`` sub-quantizers of ``nbits`` bits) wrapped in
  ``IndexRefineFlat``: the ``rerank * k`` best PQ candidates are re-ranked by their exact inner
  product against the shard's raw vectors (held once, inside the refine index).

Training (``ivf``, ``ivfpq``): on ``train_size`` rows of the shard drawn without replacement with
seed ``seed + rank`` (default ``40 * nlist`` rows, at least ``40 * 2**nbits`` for PQ, capped at
the shard), so every index shard is trained on its own rows only. Default
``nlist = round(4 * sqrt(n))`` for a shard of ``n`` rows, bounded by ``n / 39`` (faiss' minimum of
39 training points per list) and 65,536.

GPU: with ``gpu="auto"`` or ``"yes"`` and a faiss build that has ``StandardGpuResources`` and
sees a GPU (``faiss.get_num_gpus() > 0``), ``flat`` and ``ivf`` shards are moved to the GPU with
``index_cpu_to_gpu`` (trained on the CPU, vectors added on the GPU); ``hnsw`` and ``ivfpq`` stay on
the CPU. UNTESTED here: the development machine has faiss-cpu and no GPU.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from dist_fair.errors import ConfigError, DataError
from dist_fair.knn.ivf_lists import ListLayout, build_list_layout, search_lists

LOG = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
#: ``index="auto"``: exact search while its work ``N^2 d`` stays under this (about a minute on two
#: cores), the approximate default beyond.
AUTO_EXACT_WORK = 2e12
AUTO_APPROXIMATE = "hnsw"
MAX_NLIST = 65536
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per k-means centroid


@dataclass(frozen=True)
class IndexSpec:
    """What index to build on every shard (the user's parameters; ``None`` = automatic)."""

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    pq_m: int = 32
    rerank: int = 4
    train_size: int | None = None
    seed: int = 0
    gpu: str = "no"
    ivf_search: str = "lists"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"config field 'knn.index': got {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.gpu not in ("auto", "yes", "no"):
            raise ConfigError(f"config field 'knn.gpu': got {self.gpu!r}; choose auto, yes or no")
        if self.ivf_search not in ("lists", "faiss"):
            raise ConfigError(f"config field 'knn.ivf_search': got {self.ivf_search!r}; choose lists or faiss")

    @classmethod
    def from_config(cls, config: Any) -> "IndexSpec":
        """The spec of a :class:`dist_fair.config.KNNConfig`."""
        return cls(kind=config.index, nlist=config.nlist, nprobe=config.nprobe, hnsw_m=config.hnsw_m,
                   ef_construction=config.ef_construction, ef_search=config.ef_search, pq_m=config.pq_m,
                   rerank=config.rerank, train_size=config.train_size, seed=config.seed, gpu=config.gpu,
                   ivf_search=getattr(config, "ivf_search", "lists"))


def resolve_kind(kind: str, num_samples: int, dim: int) -> str:
    """The index kind to build: ``kind`` itself, or for ``"auto"`` ``flat`` when
    ``N^2 d <= AUTO_EXACT_WORK`` and ``AUTO_APPROXIMATE`` otherwise."""
    if kind != "auto":
        return kind
    return "flat" if float(num_samples) ** 2 * dim <= AUTO_EXACT_WORK else AUTO_APPROXIMATE


def default_nlist(n_rows: int) -> int:
    """``round(4 sqrt(n))`` bounded to ``[1, min(n / 39, 65536)]``."""
    upper = max(1, min(MAX_NLIST, n_rows // MIN_POINTS_PER_CENTROID))
    return int(min(upper, max(1, round(4.0 * math.sqrt(max(n_rows, 1))))))


def resolve_params(spec: IndexSpec, n_rows: int, dim: int) -> dict[str, Any]:
    """Concrete parameters for a shard of ``n_rows`` vectors of ``dim`` dimensions.

    Raises:
        ConfigError: a parameter that cannot work with this shard (``pq_m`` not dividing ``dim``,
            ``nlist`` above the shard's rows); the message names the field and a valid value.
    """
    if n_rows < 1:
        raise DataError(f"an index shard needs at least one row (got {n_rows}); use fewer knn.workers")
    params: dict[str, Any] = {"kind": spec.kind, "rows": int(n_rows), "dim": int(dim)}
    if spec.kind in ("ivf", "ivfpq"):
        nlist = default_nlist(n_rows) if spec.nlist is None else int(spec.nlist)
        if nlist > n_rows:
            raise ConfigError(f"config field 'knn.nlist': {nlist} lists for an index shard of {n_rows} rows; "
                              f"use at most {max(1, n_rows // MIN_POINTS_PER_CENTROID)} (or null = automatic)")
        params.update(nlist=nlist, nprobe=int(min(spec.nprobe, nlist)))
        train = MIN_POINTS_PER_CENTROID * nlist + nlist
        if spec.kind == "ivfpq":
            if dim % spec.pq_m:
                divisors = [m for m in (4, 8, 16, 32, 48, 64, 96, 128) if dim % m == 0 and m <= dim]
                raise ConfigError(f"config field 'knn.pq_m': {spec.pq_m} sub-quantizers do not divide the embedding "
                                  f"dimension {dim}; choose a divisor of {dim} such as {divisors or [1]}")
            train = max(train, 40 * 256)
        train = min(n_rows, train if spec.train_size is None else int(spec.train_size))
        if train < nlist:
            raise ConfigError(f"config field 'knn.train_size': {train} training rows for {nlist} lists; "
                              f"use at least {MIN_POINTS_PER_CENTROID * nlist} (or null = automatic)")
        params["train_size"] = int(train)
        if spec.kind == "ivfpq":
            # 8-bit codes need >= 39 * 256 training rows; tiny shards get fewer bits instead of failing.
            nbits = int(min(8, max(1, math.floor(math.log2(max(2, train // MIN_POINTS_PER_CENTROID))))))
            params.update(pq_m=int(spec.pq_m), nbits=nbits, rerank=int(spec.rerank))
    elif spec.kind == "hnsw":
        params.update(hnsw_m=int(spec.hnsw_m), ef_construction=int(spec.ef_construction),
                      ef_search=int(spec.ef_search))
    return params


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def wants_gpu(spec: IndexSpec) -> bool:
    """Whether a shard of this spec is built on the GPU here (``gpu=yes`` without one is an error)."""
    if spec.gpu == "no":
        return False
    available = gpu_available()
    if spec.gpu == "yes":
        if spec.kind not in ("flat", "ivf"):
            raise ConfigError(f"config field 'knn.gpu': yes, but the GPU build supports index flat and ivf only "
                              f"(got {spec.kind!r}); use knn.gpu=auto or no")
        if not available:
            raise ConfigError("config field 'knn.gpu': yes, but this faiss build sees no GPU (install faiss-gpu and "
                              "give the index actors a GPU, or use knn.gpu=auto or no)")
    return available and spec.kind in ("flat", "ivf")


@dataclass
class ShardIndex:
    """A built index over one shard plus access to the shard's (normalised) vectors.

    ``vectors`` is a read-only view of the vectors faiss stores (flat, hnsw, ivfpq's refine
    index) or a host copy (GPU); ``None`` for CPU ``ivf``, whose vectors are read back through the
    index's direct map. Local ids are row positions ``0 .. n-1`` in the shard.
    """

    kind: str
    index: Any
    n: int
    dim: int
    params: dict[str, Any]
    vectors: np.ndarray | None = None
    on_gpu: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    _gpu_resources: Any = None

    def gather(self, local_ids: np.ndarray) -> np.ndarray:
        """Vectors of the given local ids (any shape of non-negative ids) as float32 ``ids.shape + (d,)``."""
        flat = np.asarray(local_ids, dtype=np.int64).ravel()
        if self.vectors is not None:
            out = self.vectors[flat]
        elif isinstance(self.index, ListLayout):
            out = self.index.gather(flat)
        else:
            out = self.index.reconstruct_batch(flat) if flat.size else np.zeros((0, self.dim), np.float32)
        return out.reshape(tuple(np.shape(local_ids)) + (self.dim,))

    def chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """``(first local id, vectors)`` for consecutive chunks of at most ``rows`` rows."""
        for start in range(0, self.n, rows):
            stop = min(self.n, start + rows)
            if self.vectors is not None:
                yield start, self.vectors[start:stop]
            else:
                yield start, self.gather(np.arange(start, stop, dtype=np.int64))

    def describe(self) -> dict[str, Any]:
        return {**self.params, "on_gpu": self.on_gpu, **{f"{k}_s": round(v, 4) for k, v in self.timings.items()}}


def _flat_view(flat_index: Any, n: int, dim: int) -> np.ndarray:
    """Zero-copy, read-only numpy view of an ``IndexFlat``'s stored vectors."""
    import faiss

    flat = faiss.downcast_index(flat_index)
    if n == 0:
        return np.zeros((0, dim), np.float32)
    view = faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim)
    view.flags.writeable = False
    return view


def _training_rows(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    if size >= vectors.shape[0]:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(vectors.shape[0], size=size, replace=False))
    return np.ascontiguousarray(vectors[rows])


def build_shard_index(spec: IndexSpec, vectors: np.ndarray, rank: int = 0) -> ShardIndex:
    """Build the index of ``spec.kind`` over one shard's L2-normalised float32 vectors.

    The caller may drop its own reference to ``vectors`` afterwards: except for CPU ``ivf`` (whose
    vectors live in the inverted lists) and GPU indexes (which keep ``vectors`` as the host copy),
    the returned :class:`ShardIndex` reads the shard's vectors from the faiss index itself, so the
    shard is held once.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    params = resolve_params(spec, n, dim)
    on_gpu = wants_gpu(spec)
    metric = faiss.METRIC_INNER_PRODUCT
    timings: dict[str, float] = {}
    kind = spec.kind
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], metric)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], metric)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params["nlist"], params["pq_m"], params["nbits"], metric)
        index = faiss.IndexRefineFlat(ivfpq)
    if kind in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = int(spec.seed) + 1234 + rank
        ivf.cp.niter = 20
        t0 = time.perf_counter()
        index.train(_training_rows(vectors, params["train_size"], spec.seed + rank))
        timings["train"] = time.perf_counter() - t0
        ivf.nprobe = params["nprobe"]  # set before a GPU copy, which keeps it
    if kind == "ivf" and not on_gpu and spec.ivf_search == "lists":
        t0 = time.perf_counter()
        layout = build_list_layout(index.quantizer, vectors)
        timings["add"] = time.perf_counter() - t0
        params["ivf_search"] = "lists"
        LOG.debug("built ivf (list layout) shard index over %d x %d (%s)", n, dim, params)
        return ShardIndex(kind=kind, index=layout, n=n, dim=dim, params=params, vectors=None, timings=timings)
    resources = None
    if on_gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    t0 = time.perf_counter()
    index.add(vectors)
    timings["add"] = time.perf_counter() - t0
    held: np.ndarray | None
    if on_gpu:
        held = vectors
        vectors.flags.writeable = False
    elif kind == "flat":
        held = _flat_view(index, n, dim)
    elif kind == "hnsw":
        held = _flat_view(index.storage, n, dim)
    elif kind == "ivfpq":
        held = _flat_view(index.refine_index, n, dim)
    else:
        index.make_direct_map()
        held = None
    if kind == "ivfpq":
        index.k_factor = float(params["rerank"])
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    LOG.debug("built %s shard index over %d x %d (%s)", kind, n, dim, params)
    return ShardIndex(kind=kind, index=index, n=n, dim=dim, params=params, vectors=held, on_gpu=on_gpu,
                      timings=timings, _gpu_resources=resources)


def search_index(shard: ShardIndex, queries: np.ndarray, kf: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw faiss search: ``(sims float32 (nq, kf), local ids int64 (nq, kf))``, ``-1`` where the
    index found fewer than ``kf`` vectors."""
    if isinstance(shard.index, ListLayout):
        return search_lists(shard.index, queries, int(kf), int(shard.params["nprobe"]))
    if shard.kind == "hnsw" and shard.index.hnsw.efSearch < kf:
        shard.index.hnsw.efSearch = int(kf)
    sims, ids = shard.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(kf))
    return sims, ids.astype(np.int64, copy=False)


def spec_as_dict(spec: IndexSpec) -> dict[str, Any]:
    return asdict(spec)
