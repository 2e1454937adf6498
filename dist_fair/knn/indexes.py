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
- ``ivfpq_fs``: FAISS' 4-bit PQ fast-scan, ``IndexIVFPQFastScan`` (``pq_m`` sub-quantizers of 4
  bits, codes scanned 32 at a time with SIMD table lookups), wrapped in ``IndexRefineFlat`` like
  ``ivfpq``: the ``rerank * k`` best fast-scan candidates (``k_factor = rerank``) are re-ranked by
  their exact inner product. Scanning is so cheap that far more lists can be probed than with
  ``ivf``; the approximate PQ scores only pick candidates, the scores kept are exact.

Per-kind defaults (:data:`KIND_DEFAULTS`, used where the spec says ``None``): ``ivf`` and
``ivfpq`` probe 16 lists, ``ivfpq`` has 32 sub-quantizers and re-ranks ``4 k``. ``ivfpq_fs``
was tuned for 1M x 512 at k = 80 from a measurement at 200K x 512 (BUPT-style synthetic, 1
shard, recall@80 against exact search, 2 cores; ``benchmarks/results/bench_knn.*``):
``pq_m = dim / 2`` (2 dimensions per 4-bit sub-quantizer, 128-byte codes at 512-d; 64 and 128
sub-quantizers lost 0.1-0.2 recall for the same re-ranking), ``nprobe = 256`` of the default
``round(4 sqrt(n))`` lists (64 probes: 0.89; 128: 0.96; 256: 0.99 with ``rerank`` 8) and
``rerank = 8`` (5: 0.975, 8: 0.989, 10: 0.992 at 256 probes).

Training (``ivf``, ``ivfpq``, ``ivfpq_fs``): on ``train_size`` rows of the shard drawn without
replacement with seed ``seed + rank`` (default ``40 * nlist`` rows, at least ``40 * 2**nbits`` for
PQ, capped at the shard), so every index shard is trained on its own rows only. Default
``nlist = round(4 * sqrt(n))`` for a shard of ``n`` rows, bounded by ``n / 39`` (faiss' minimum of
39 training points per list) and 65,536.

GPU: with ``gpu="auto"`` or ``"yes"`` and a faiss build that has ``StandardGpuResources`` and
sees a GPU (``faiss.get_num_gpus() > 0``), ``flat`` and ``ivf`` shards are moved to the GPU with
``index_cpu_to_gpu`` (trained on the CPU, vectors added on the GPU); ``hnsw``, ``ivfpq`` and
``ivfpq_fs`` stay on the CPU. UNTESTED here: the development machine has faiss-cpu and no GPU.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from dist_fair.errors import ConfigError, DataError
from dist_fair.knn.ivf_lists import ListLayout, build_list_layout, search_lists

LOG = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw", "ivfpq", "ivfpq_fs")
#: kinds with an IVF coarse quantizer (trained on the shard's rows; ``nlist`` / ``nprobe`` apply).
IVF_KINDS = ("ivf", "ivfpq", "ivfpq_fs")
#: kinds whose candidates are re-ranked exactly by ``IndexRefineFlat`` (``rerank`` = its k_factor).
REFINE_KINDS = ("ivfpq", "ivfpq_fs")
#: defaults where the spec leaves a parameter ``None`` (see the module docstring for ``ivfpq_fs``);
#: ``pq_m = "dim/2"`` means half the embedding dimension (2 dimensions per sub-quantizer).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "ivf": {"nprobe": 16},
    "ivfpq": {"nprobe": 16, "pq_m": 32, "rerank": 4},
    "ivfpq_fs": {"nprobe": 256, "pq_m": "dim/2", "rerank": 8},
}
FASTSCAN_NBITS = 4  # IndexIVFPQFastScan supports 4-bit sub-quantizers only
#: ``index="auto"``: exact search while its work ``N^2 d`` stays under this (about a minute on two
#: cores), the approximate default beyond.
AUTO_EXACT_WORK = 2e12
AUTO_APPROXIMATE = "hnsw"
MAX_NLIST = 65536
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per k-means centroid


@dataclass(frozen=True)
class IndexSpec:
    """What index to build on every shard (the user's parameters; ``None`` = automatic: the
    kind's entry in :data:`KIND_DEFAULTS`, or the formulas of the module docstring)."""

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    pq_m: int | None = None
    rerank: int | None = None
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
        for name in ("nlist", "nprobe", "pq_m", "rerank"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"config field 'knn.{name}': got {value}; use a positive integer "
                                  f"(or null = the default for index {self.kind!r})")

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


def kind_default(kind: str, name: str, dim: int) -> int:
    """The default of parameter ``name`` for index ``kind`` (:data:`KIND_DEFAULTS`) at ``dim``."""
    value = KIND_DEFAULTS[kind][name]
    if value == "dim/2":
        return dim // 2 if dim % 2 == 0 and dim >= 2 else dim
    return int(value)


def _pq_m(spec: IndexSpec, dim: int) -> int:
    pq_m = kind_default(spec.kind, "pq_m", dim) if spec.pq_m is None else int(spec.pq_m)
    if dim % pq_m:
        divisors = [m for m in (4, 8, 16, 32, 48, 64, 96, 128, 256) if dim % m == 0 and m <= dim]
        raise ConfigError(f"config field 'knn.pq_m': {pq_m} sub-quantizers do not divide the embedding "
                          f"dimension {dim}; choose a divisor of {dim} such as {divisors or [1]}")
    return pq_m


def resolve_params(spec: IndexSpec, n_rows: int, dim: int) -> dict[str, Any]:
    """Concrete parameters for a shard of ``n_rows`` vectors of ``dim`` dimensions.

    Raises:
        ConfigError: a parameter that cannot work with this shard (``pq_m`` not dividing ``dim``,
            ``nlist`` above the shard's rows, too few rows to train 4-bit PQ); the message names the
            field and a valid value.
    """
    if n_rows < 1:
        raise DataError(f"an index shard needs at least one row (got {n_rows}); use fewer knn.workers")
    params: dict[str, Any] = {"kind": spec.kind, "rows": int(n_rows), "dim": int(dim)}
    if spec.kind in IVF_KINDS:
        nlist = default_nlist(n_rows) if spec.nlist is None else int(spec.nlist)
        if nlist > n_rows:
            raise ConfigError(f"config field 'knn.nlist': {nlist} lists for an index shard of {n_rows} rows; "
                              f"use at most {max(1, n_rows // MIN_POINTS_PER_CENTROID)} (or null = automatic)")
        nprobe = kind_default(spec.kind, "nprobe", dim) if spec.nprobe is None else int(spec.nprobe)
        params.update(nlist=nlist, nprobe=int(min(nprobe, nlist)))
        train = MIN_POINTS_PER_CENTROID * nlist + nlist
        if spec.kind in REFINE_KINDS:
            pq_m = _pq_m(spec, dim)
            train = max(train, 40 * (256 if spec.kind == "ivfpq" else 2 ** FASTSCAN_NBITS))
        train = min(n_rows, train if spec.train_size is None else int(spec.train_size))
        if train < nlist:
            raise ConfigError(f"config field 'knn.train_size': {train} training rows for {nlist} lists; "
                              f"use at least {MIN_POINTS_PER_CENTROID * nlist} (or null = automatic)")
        params["train_size"] = int(train)
        rerank = None if spec.kind not in REFINE_KINDS else (
            kind_default(spec.kind, "rerank", dim) if spec.rerank is None else int(spec.rerank))
        if spec.kind == "ivfpq":
            # 8-bit codes need >= 39 * 256 training rows; tiny shards get fewer bits instead of failing.
            nbits = int(min(8, max(1, math.floor(math.log2(max(2, train // MIN_POINTS_PER_CENTROID))))))
            params.update(pq_m=pq_m, nbits=nbits, rerank=rerank)
        elif spec.kind == "ivfpq_fs":
            if train < 2 ** FASTSCAN_NBITS:
                raise ConfigError(f"config field 'knn.index': ivfpq_fs trains {2 ** FASTSCAN_NBITS} centroids per "
                                  f"sub-quantizer but an index shard has only {train} training rows; use fewer "
                                  "knn.workers, a larger knn.train_size, or index flat for so few samples")
            params.update(pq_m=pq_m, nbits=FASTSCAN_NBITS, rerank=rerank)
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
            raise ConfigError(f"config field 'knn.gpu': yes, but dist_fair builds index flat and ivf on the GPU only "
                              f"(got {spec.kind!r}); use knn.gpu=auto or no")
        if not available:
            raise ConfigError("config field 'knn.gpu': yes, but this faiss build sees no GPU (install faiss-gpu and "
                              "give the index actors a GPU, or use knn.gpu=auto or no)")
    return available and spec.kind in ("flat", "ivf")


@dataclass
class ShardIndex:
    """A built index over one shard plus access to the shard's (normalised) vectors.

    ``vectors`` is a read-only view of the vectors faiss stores (flat, hnsw, the refine index of
    ivfpq and ivfpq_fs) or a host copy (GPU); ``None`` for CPU ``ivf``, whose vectors are read back through the
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


def _make_flat(dim: int, params: dict[str, Any]) -> Any:
    import faiss

    return faiss.IndexFlatIP(dim)


def _make_ivf(dim: int, params: dict[str, Any]) -> Any:
    import faiss

    return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)


def _make_hnsw(dim: int, params: dict[str, Any]) -> Any:
    import faiss

    index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params["ef_construction"]
    return index


def _make_ivfpq(dim: int, params: dict[str, Any]) -> Any:
    import faiss

    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params["nlist"], params["pq_m"], params["nbits"],
                             faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexRefineFlat(ivfpq)


def _make_ivfpq_fs(dim: int, params: dict[str, Any]) -> Any:
    import faiss

    fast = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(dim), dim, params["nlist"], params["pq_m"], params["nbits"],
                                    faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexRefineFlat(fast)


#: kind -> factory of the untrained faiss index for ``(dim, resolved params)``.
FACTORIES: dict[str, Callable[[int, dict[str, Any]], Any]] = {
    "flat": _make_flat, "ivf": _make_ivf, "hnsw": _make_hnsw, "ivfpq": _make_ivfpq, "ivfpq_fs": _make_ivfpq_fs,
}


def make_faiss_index(kind: str, dim: int, params: dict[str, Any]) -> Any:
    """The untrained faiss index of ``kind`` with the resolved ``params`` (:func:`resolve_params`)."""
    return FACTORIES[kind](dim, params)


def configure_search(index: Any, kind: str, params: dict[str, Any]) -> None:
    """Set the search-time parameters of a built faiss index of ``kind``: ``nprobe`` (IVF kinds),
    ``k_factor = rerank`` (refine kinds), ``efSearch`` (hnsw)."""
    import faiss

    if kind in IVF_KINDS:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    if kind in REFINE_KINDS:
        index.k_factor = float(params["rerank"])
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]


def _train(index: Any, kind: str, rows: np.ndarray) -> None:
    """Train an IVF index on ``rows``: the same result as ``index.train(rows)``.

    PQ kinds train in two steps: the coarse k-means (``faiss.Clustering`` with the IVF's own
    parameters, into its quantizer - exactly what ``IndexIVF.train`` runs, which then sees a
    trained quantizer of ``nlist`` centroids and skips it) on every faiss thread, then the product
    quantizer on ONE thread. PQ training is ``pq_m`` small k-means runs, thousands of short OpenMP
    regions; on a machine with more runnable threads than cores each region waits for all its
    threads to be scheduled, spinning meanwhile (measured on 2 cores at load 60-90: a 11K x 128
    ivfpq_fs shard with 2 threads, ``index.train`` 48 s wall / 16 s CPU, this function 1.8 s /
    0.8 s).
    """
    import faiss

    if kind not in REFINE_KINDS:
        index.train(rows)
        return
    ivf = faiss.extract_index_ivf(index)
    clustering = faiss.Clustering(ivf.d, ivf.nlist, ivf.cp)
    ivf.quantizer.reset()
    clustering.train(rows, ivf.quantizer)
    ivf.quantizer.is_trained = True
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.train(rows)
    finally:
        faiss.omp_set_num_threads(threads)


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
    timings: dict[str, float] = {}
    kind = spec.kind
    index = make_faiss_index(kind, dim, params)
    if kind in IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = int(spec.seed) + 1234 + rank
        ivf.cp.niter = 20
        t0 = time.perf_counter()
        _train(index, kind, _training_rows(vectors, params["train_size"], spec.seed + rank))
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
    elif kind in REFINE_KINDS:
        held = _flat_view(index.refine_index, n, dim)
    else:
        index.make_direct_map()
        held = None
    if not on_gpu:
        configure_search(index, kind, params)
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
