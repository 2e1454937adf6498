"""One configuration tree for the whole job (DESIGN.md, "Configuration").

``JobConfig`` holds one dataclass per stage. It loads from YAML, takes ``--set a.b=c``
overrides, validates every field when built (messages name the dotted field and the fix) and is
saved as ``config.yaml`` in every run folder. Sections validate in ``__post_init__`` the way Ray
Train's ``ScalingConfig`` does, so a bad value fails before any work starts.

Only the standard library and PyYAML are imported here.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dist_fair.errors import ConfigError

#: Job configs shipped as package data (``launch/configs`` links to this folder in a checkout).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config field '{field_name}': {message}")


def _choice(value: str, allowed: Sequence[str], field_name: str) -> None:
    _require(value in allowed, field_name, f"got {value!r}; choose one of {', '.join(map(repr, allowed))}")


@dataclass
class RayConfig:
    """How Ray starts. ``address=None`` starts a private local instance (dashboard off, ports on
    localhost); ``"auto"`` or ``"ray://host:10001"`` joins an existing cluster."""

    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool = False
    namespace: str = "dist_fair"

    def __post_init__(self) -> None:
        _require(self.num_cpus is None or self.num_cpus >= 1, "ray.num_cpus", "must be >= 1 or null (all cores)")


@dataclass
class DataConfig:
    """Where samples come from (the pipeline's shards stage).

    ``source``: ``synth`` generates BUPT-style embeddings (METHODS.md §2; ``preset``,
    ``identities``, ``images_per_identity`` (null = the preset's own; realistic: LFW's long tail),
    ``dim``, ``seed``); ``shards`` uses an existing shard
    folder given in ``shards`` (e.g. written by ``dist-fair shards`` or ``dist-fair embed``);
    ``digits`` writes MNIST-USPS / Reverse-MNIST (``dataset``) from the ``mnist_usps.npz`` at
    ``path`` (``limit``: at most this many images per source); ``table`` writes a CSV table at
    ``path`` with the ``protected`` column(s), the ``label`` column as identity and the
    ``features`` columns (null = every numeric column; ``limit``: the first rows only). Relative
    paths are relative to the working directory. ``block_rows``/``shard_rows``: rows per tar
    sample and per shard file; ``workers``: parallel shard writers (Ray tasks)."""

    source: str = "synth"
    shards: str | None = None
    path: str | None = None
    dataset: str = "mnist_usps"
    limit: int | None = None
    protected: list[str] = field(default_factory=list)
    label: str | None = None
    features: list[str] | None = None
    preset: str = "realistic"
    identities: int = 20000
    images_per_identity: float | None = None
    dim: int = 128
    seed: int = 0
    block_rows: int = 4096
    shard_rows: int = 65536
    workers: int = 2

    def __post_init__(self) -> None:
        _choice(self.source, ["synth", "shards", "digits", "table"], "data.source")
        _require(self.preset in ("balanced", "global", "skewed", "realistic") or self.preset.endswith((".yaml", ".yml")),
                 "data.preset", f"{self.preset!r} must be balanced, global, skewed, realistic (calibrated on LFW, "
                 "dim 128) or the path of a preset file written by `dist-fair shards synth --calibrate`")
        _choice(self.dataset, ["mnist_usps", "reverse_mnist"], "data.dataset")
        _require(self.source != "shards" or bool(self.shards), "data.shards",
                 "is required when data.source=shards (a folder holding manifest.json)")
        _require(self.source not in ("digits", "table") or bool(self.path), "data.path",
                 f"is required when data.source={self.source} (the {'mnist_usps.npz' if self.source == 'digits' else 'CSV'}"
                 " file, e.g. ../shared/data/digits/mnist_usps.npz)")
        _require(self.source != "table" or bool(self.protected), "data.protected",
                 "is required when data.source=table (the protected column(s), e.g. [sex])")
        _require(self.limit is None or self.limit >= 1, "data.limit", "must be >= 1 or null (everything)")
        _require(self.identities >= 2, "data.identities", "must be >= 2")
        _require(self.images_per_identity is None or self.images_per_identity >= 2, "data.images_per_identity",
                 "must be >= 2 (mean images per identity, lognormal) or null (the preset's own: realistic draws "
                 "from LFW's images-per-identity table, a classic preset 46 on average)")
        _require(self.dim >= 2, "data.dim", "must be >= 2")
        _require(self.block_rows >= 1, "data.block_rows", "must be >= 1")
        _require(self.shard_rows >= self.block_rows, "data.shard_rows", "must be >= data.block_rows")
        _require(self.workers >= 1, "data.workers", "must be >= 1")


@dataclass
class KNNConfig:
    """kNN graph (METHODS.md §3): FAISS index shards on Ray actors, per-shard top-k merged
    (``dist_fair.knn.build_knn_graph``). ``index``: auto (flat when N^2 * dim <= 2e12, else hnsw) |
    flat (exact) | ivf | hnsw | ivfpq | ivfpq_fs (FAISS 4-bit PQ fast-scan + exact re-ranking);
    ``nprobe``/``pq_m``/``rerank`` null = the index kind's default
    (``dist_fair.knn.indexes.KIND_DEFAULTS``); ``workers``:
    index actors, one contiguous id range each; ``nlist``/``train_size`` apply per index shard
    (null = ~4*sqrt(rows) lists, 40*nlist training rows); ``recall_sample`` random queries are
    checked against exact search; ``cpus_per_worker`` null = the cluster's CPUs / workers;
    ``placement`` spread (actors on different nodes) or pack; ``max_restarts`` per failed actor;
    ``ivf_search``: lists (CPU ivf searched list by list with matrix products, same candidates as
    faiss; ``dist_fair/knn/ivf_lists.py``) or faiss (faiss' own IndexIVFFlat search); ``symmetrize``:
    approximate graphs also offer i to j when j is among i's neighbours (``dist_fair/knn/symmetrize.py``;
    no new distances, recall can only rise)."""

    k: int = 80
    index: str = "auto"
    workers: int = 1
    query_block: int = 16384
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    pq_m: int | None = None
    rerank: int | None = None
    recall_sample: int = 1000
    gpu: str = "auto"
    train_size: int | None = None
    cpus_per_worker: float | None = None
    placement: str = "spread"
    max_restarts: int = 3
    seed: int = 0
    ivf_search: str = "lists"
    symmetrize: bool = True

    def __post_init__(self) -> None:
        _choice(self.ivf_search, ["lists", "faiss"], "knn.ivf_search")
        _require(self.k >= 2, "knn.k", "must be >= 2 (the sample itself is neighbour 0)")
        _choice(self.index, ["auto", "flat", "ivf", "hnsw", "ivfpq", "ivfpq_fs"], "knn.index")
        _require(self.workers >= 1, "knn.workers", "must be >= 1")
        _require(self.query_block >= 1, "knn.query_block", "must be >= 1")
        _require(self.nlist is None or self.nlist >= 1, "knn.nlist", "must be >= 1 or null (automatic: ~4*sqrt(N))")
        _require(self.nprobe is None or self.nprobe >= 1, "knn.nprobe", "must be >= 1 or null (the index's default)")
        _require(self.rerank is None or self.rerank >= 1, "knn.rerank",
                 "must be >= 1 (candidates re-ranked = rerank * k) or null (the index's default)")
        _require(self.recall_sample >= 0, "knn.recall_sample", "must be >= 0 (0 skips the recall check)")
        _choice(self.gpu, ["auto", "yes", "no"], "knn.gpu")
        _require(self.hnsw_m >= 2, "knn.hnsw_m", "must be >= 2 (HNSW links per node)")
        _require(self.ef_construction >= 1 and self.ef_search >= 1, "knn.ef_construction/ef_search", "must be >= 1")
        _require(self.pq_m is None or self.pq_m >= 1, "knn.pq_m",
                 "must be >= 1 (and divide the embedding dimension) or null (the index's default)")
        _require(self.train_size is None or self.train_size >= 1, "knn.train_size",
                 "must be >= 1 or null (automatic: 40 * nlist rows of each index shard)")
        _require(self.cpus_per_worker is None or self.cpus_per_worker > 0, "knn.cpus_per_worker",
                 "must be > 0 or null (automatic: the cluster's CPUs divided by knn.workers)")
        _choice(self.placement, ["spread", "pack"], "knn.placement")
        _require(self.max_restarts >= 0, "knn.max_restarts", "must be >= 0 (restarts of a failed index actor)")


@dataclass
class ClusterConfig:
    """Decoding to clusters (METHODS.md §4). ``method=threshold``: edges with similarity (or edge
    probability) above ``threshold`` joined by union-find; ``threshold=null`` chooses it on the
    labelled validation identities by pairwise F, never on the test identities. ``method=peak``:
    the confidence-peak rule (``dist_fair/cluster/peak.py``), its floor chosen the same way.
    With a trained model (``train.model`` intraformer/clusformer) the scores are predicted edge
    probabilities, searched over ``prob_grid``; without one, cosine similarities over
    ``threshold_grid``. ``val_context``: ``isolated`` decodes the validation samples with the edges
    among themselves only; ``graph`` decodes the whole graph and scores the validation samples
    (chaining through other samples then counts as it does for the test samples; see
    ``dist_fair/cluster/edges.py``). The default is ``graph``: on the realistic preset at 20,000
    identities a tau chosen ``isolated`` (validation F 0.97) chained the whole-graph decoding
    into giant clusters (test pairwise F 0.37, kNN baseline 0.18); chosen in the ``graph`` the
    same models scored 0.92 / 0.79. ``grid_quantiles``: the grid is extended by this many quantiles
    of the validation edge scores (resolution where the scores are; ``dist_fair/cluster/grid.py``).
    ``infer_*``: edge inference on Ray (tasks at once, batch, anchors per task)."""

    method: str = "threshold"
    threshold: float | None = None
    val_fraction: float = 0.2
    threshold_grid: list[float] = field(default_factory=lambda: [round(0.30 + 0.02 * i, 2) for i in range(33)])
    prob_grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)] +
                                   [0.97, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999])
    val_context: str = "graph"
    grid_quantiles: int = 64
    infer_workers: int = 2
    infer_batch: int = 256
    infer_rows_per_task: int = 8192

    def __post_init__(self) -> None:
        _choice(self.method, ["threshold", "peak"], "cluster.method")
        _require(self.threshold is None or -1.0 <= self.threshold <= 1.0, "cluster.threshold",
                 "must be in [-1, 1] or null (chosen on the validation split)")
        _require(0.0 < self.val_fraction < 1.0, "cluster.val_fraction", "must be in (0, 1)")
        _require(len(self.threshold_grid) > 0, "cluster.threshold_grid", "must list at least one value")
        _require(len(self.prob_grid) > 0 and all(0.0 <= p <= 1.0 for p in self.prob_grid), "cluster.prob_grid",
                 "must list at least one edge probability in [0, 1]")
        _choice(self.val_context, ["isolated", "graph"], "cluster.val_context")
        _require(self.grid_quantiles >= 0, "cluster.grid_quantiles",
                 "must be >= 0 (quantiles of the validation edge scores added to the grid; 0 = the grid alone)")
        _require(self.infer_workers >= 1, "cluster.infer_workers", "must be >= 1 (Ray tasks predicting edges at once)")
        _require(self.infer_batch >= 1, "cluster.infer_batch", "must be >= 1 (anchors per forward pass)")
        _require(self.infer_rows_per_task >= 1, "cluster.infer_rows_per_task", "must be >= 1 (anchors per Ray task)")


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed training (DESIGN.md, "Engines"; dist_fair/train/).

    ``batch_size`` is the GLOBAL batch (every step all workers together process ``batch_size``
    rows, ``batch_size / workers`` each). ``deepspeed`` names a JSON file in ``launch/deepspeed/``
    (``zero0_cpu`` .. ``zero3_cpu``, ``zero0_gpu`` .. ``zero3_gpu``) or is a path to one.
    ``checkpoint_every`` counts optimizer steps (0 = at the end of every epoch only); ``log_every``
    steps between records in ``metrics.jsonl``; ``prefetch`` batches read ahead per worker;
    ``placement`` is Ray's placement strategy (``SPREAD``: workers on different nodes).
    ``model`` names a registered model (``dist_fair/model_registry.py``) or ``none`` (the kNN +
    threshold baseline alone); ``model=probe`` is the built-in MLP probe (embeddings -> identity)
    that exercises the engine (``dist-fair train`` only); ``hidden`` is its hidden width (0 = linear).
    The defaults are the main job: the Intraformer with the purity penalty on 2 workers, ZeRO-1.

    ``model=intraformer`` / ``clusformer`` (METHODS.md §4, ``dist_fair/models/intraformer.py``):
    sequences of ``seq_len`` tokens (null = knn.k), model ``width``/``heads``/``layers``,
    Intraformer ``sub_clusters`` (M) and ``cross`` (none | last: F_{M-1} queries F_0 | both | all:
    every F_m queries F_0), ``sim_features`` (append each token's similarity row). Loss:
    soft Fowlkes-Mallows + ``penalty_weight`` * purity ``penalty`` (none | upper_bound: global
    gamma_f | group: spread of per-group mean purity over ``group_attribute`` | one_sided: only
    anchors below gamma_f, mean max(0, gamma_f - gamma_i)) + ``bce_weight`` *
    BCE (default 1: with FM alone the edge probabilities saturate at 1 and training can stall);
    the Clusformer uses BCE. ``train_fraction`` of the non-validation identities trains, the
    rest is the test split; ``samples_per_epoch`` caps anchors per epoch; ``eval_anchors``
    validation anchors are evaluated after every epoch.

    Deep clustering models (``dec`` .. ``fairoids``, METHODS.md §5) read their hyper-parameters from
    the ``deep`` section and their protected attribute from ``group_attribute``; ``epochs``,
    ``batch_size``, ``lr``, ``weight_decay`` (AdamW's decoupled decay) are those of their
    clustering phase."""

    model: str = "intraformer"
    deepspeed: str = "zero1_cpu"
    workers: int = 2
    cpus_per_worker: int = 1
    placement: str = "PACK"
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    precision: str = "fp32"
    checkpoint_every: int = 0
    max_failures: int = 2
    log_every: int = 20
    prefetch: int = 4
    hidden: int = 256
    seed: int = 0
    seq_len: int | None = 40
    width: int = 64
    heads: int = 4
    layers: int = 1
    sub_clusters: int = 4
    cross: str = "last"
    sim_features: bool = True
    dropout: float = 0.0
    penalty: str = "upper_bound"
    penalty_weight: float = 1.0
    bce_weight: float = 1.0
    group_attribute: str = "race"
    train_fraction: float = 0.5
    samples_per_epoch: int | None = None
    eval_anchors: int = 1024

    def __post_init__(self) -> None:
        from dist_fair.model_registry import model_names

        _choice(self.model, ["none", *model_names()], "train.model")
        _require(bool(self.deepspeed), "train.deepspeed", "name a file in launch/deepspeed/ (e.g. zero2_cpu) or give a path")
        _require(self.workers >= 1, "train.workers", "must be >= 1")
        _require(self.cpus_per_worker >= 1, "train.cpus_per_worker", "must be >= 1")
        _choice(self.placement, ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"], "train.placement")
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.batch_size % self.workers == 0, "train.batch_size",
                 f"the global batch {self.batch_size} must be a multiple of train.workers={self.workers}")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _choice(self.precision, ["fp32", "bf16", "fp16"], "train.precision")
        _require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = once per epoch)")
        _require(self.max_failures >= -1, "train.max_failures", "must be >= 0, or -1 for unlimited restarts")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1 (optimizer steps between progress records)")
        _require(self.prefetch >= 1, "train.prefetch", "must be >= 1 (batches queued ahead per worker)")
        _require(self.hidden >= 0, "train.hidden", "must be >= 0 (0 = linear probe)")
        _require(self.seq_len is None or self.seq_len >= 2, "train.seq_len",
                 "must be >= 2 (anchor + neighbours) or null (= knn.k)")
        _require(self.width >= 1 and self.heads >= 1 and self.width % self.heads == 0, "train.width",
                 f"must be a positive multiple of train.heads={self.heads}")
        _require(self.layers >= 1, "train.layers", "must be >= 1")
        _require(self.sub_clusters >= 1, "train.sub_clusters", "must be >= 1 (contiguous sub-clusters of a sequence)")
        _choice(self.cross, ["none", "last", "both", "all"], "train.cross")
        _require(self.cross == "none" or self.sub_clusters >= 2, "train.cross",
                 "the Cross Transformer block needs train.sub_clusters >= 2 (or train.cross=none)")
        _require(0.0 <= self.dropout < 1.0, "train.dropout", "must be in [0, 1)")
        _choice(self.penalty, ["none", "upper_bound", "group", "one_sided"], "train.penalty")
        _require(self.penalty_weight >= 0, "train.penalty_weight", "must be >= 0 (lambda)")
        _require(self.bce_weight >= 0, "train.bce_weight", "must be >= 0")
        _require(0.0 < self.train_fraction < 1.0, "train.train_fraction",
                 "must be in (0, 1): the share of the non-validation identities that trains (the rest is tested)")
        _require(self.samples_per_epoch is None or self.samples_per_epoch >= 1, "train.samples_per_epoch",
                 "must be >= 1 or null (every training anchor once per epoch)")
        _require(self.eval_anchors >= 0, "train.eval_anchors", "must be >= 0 (validation anchors evaluated per epoch)")


@dataclass
class DeepConfig:
    """Hyper-parameters of the deep (fair) clustering models (METHODS.md §5; ``train.model`` dec,
    imsat, dfdc, fair_dec, fairoids; ``dist_fair/deep/task.py``). One name per parameter:

    - ``n_clusters``: K (null = the number of identities in the manifest);
    - IMSAT / DFDC: network ``backbone`` (mlp | conv | a timm name) with ``hidden`` widths (mlp) and
      ``image_shape`` (flat rows reshaped for conv/timm, e.g. [1, 28, 28]); loss
      ``H(Y|X) - mu H(Y) + gamma L_Aug`` with the VAT radius ``vat_eps`` and power-iteration step
      ``vat_xi`` (eq 6.5: mu = gamma = 1);
    - DEC family (dec, fair_dec, fairoids): autoencoder ``ae_hidden`` (DEC: 500-500-2000) to a
      ``latent_dim`` code (null = K), pre-trained for ``ae_epochs`` at ``ae_lr`` (null = train.lr);
      centroids by distributed k-means on the codes (``kmeans_sample`` rows for k-means++,
      ``kmeans_iters`` Lloyd iterations over all rows);
    - ``alpha``: the weight-decay term ``alpha sum ||theta||^2`` of eq 6.5 added to the loss
      (Table 6.2: 1e-4);
    - DFDC / Fair-DEC: ``pretrain_epochs`` epochs of the base loss, then ``+ beta L_Fair`` with the
      global fair assignment (section ``fair``) recomputed for all N samples after every epoch;
      Fairoids: ``+ beta KL(S || R)`` (beta is the seed's lambda)."""

    n_clusters: int | None = None
    backbone: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    image_shape: list[int] | None = None
    latent_dim: int | None = None
    ae_hidden: list[int] = field(default_factory=lambda: [500, 500, 2000])
    ae_epochs: int = 10
    ae_lr: float | None = None
    pretrain_epochs: int = 1
    beta: float = 4.0
    gamma: float = 1.0
    mu: float = 1.0
    alpha: float = 0.0
    vat_eps: float = 1.0
    vat_xi: float = 10.0
    kmeans_sample: int = 20000
    kmeans_iters: int = 20

    def __post_init__(self) -> None:
        _require(self.n_clusters is None or self.n_clusters >= 2, "deep.n_clusters",
                 "must be >= 2 or null (the number of identities in the manifest)")
        _require(bool(self.backbone), "deep.backbone", "name a backbone: mlp, conv or a timm model name")
        _require(all(h >= 1 for h in self.hidden), "deep.hidden", "every width must be >= 1")
        _require(self.image_shape is None or all(s >= 1 for s in self.image_shape), "deep.image_shape",
                 "must list positive sizes, e.g. [1, 28, 28], or be null")
        _require(self.latent_dim is None or self.latent_dim >= 1, "deep.latent_dim", "must be >= 1 or null (= K)")
        _require(all(h >= 1 for h in self.ae_hidden), "deep.ae_hidden", "every width must be >= 1")
        _require(self.ae_epochs >= 1, "deep.ae_epochs", "must be >= 1 (autoencoder pre-training epochs)")
        _require(self.ae_lr is None or self.ae_lr > 0, "deep.ae_lr", "must be > 0 or null (= train.lr)")
        _require(self.pretrain_epochs >= 0, "deep.pretrain_epochs", "must be >= 0")
        for name in ("beta", "gamma", "mu", "alpha"):
            _require(getattr(self, name) >= 0, f"deep.{name}", "must be >= 0")
        _require(self.vat_eps > 0 and self.vat_xi > 0, "deep.vat_eps/vat_xi", "must be > 0")
        _require(self.kmeans_sample >= 1 and self.kmeans_iters >= 0, "deep.kmeans_sample/kmeans_iters",
                 "need kmeans_sample >= 1 and kmeans_iters >= 0")


@dataclass
class FairConfig:
    """Global fair assignment (METHODS.md §6; ``dist_fair.fair.fair_assign``). ``enabled``: run the
    pipeline's ``fair_assign`` stage on the soft assignments of a deep clustering model (any of
    them; DFDC and Fair-DEC also use this section after every training epoch). ``eps``: fairness
    tolerance (0 = exact proportions); ``method``: auto (= auction: scalable, exact, certified by
    a duality gap) | exact (network simplex, dense) | lp (HiGHS); ``top_m``: candidate clusters
    per sample (null = all); ``rho``: target proportions (null = population); ``workers``: Ray
    actors of the ``fair_assign`` stage (1 = in process; more: the auction on that many actors)."""

    enabled: bool = False
    eps: float = 0.0
    method: str = "auto"
    top_m: int | None = None
    rho: list[float] | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "fair.workers", "must be >= 1 (1 = solve in the calling process)")
        _require(self.eps >= 0, "fair.eps", "must be >= 0 (0 = exact proportions)")
        _choice(self.method, ["auto", "exact", "auction", "lp"], "fair.method")
        _require(self.workers == 1 or self.method in ("auto", "auction"), "fair.workers",
                 "several workers run the auction only: set fair.method=auto (or fair.workers=1)")
        _require(self.top_m is None or self.top_m >= 1, "fair.top_m", "must be >= 1 or null (all clusters)")
        if self.rho is not None:
            _require(all(r > 0 for r in self.rho), "fair.rho", "every proportion must be > 0")
            _require(abs(sum(self.rho) - 1.0) < 1e-6, "fair.rho", f"must sum to 1 (sums to {sum(self.rho):.6f})")


@dataclass
class EvalConfig:
    """Evaluation (METHODS.md §7): metrics overall and per protected attribute in ``groups``
    (empty = every attribute in the manifest); ``plots``: also draw ``report.png`` (per-group F of
    every method)."""

    groups: list[str] = field(default_factory=list)
    plots: bool = True


@dataclass
class JobConfig:
    """The whole job. ``run_dir`` receives every stage's output and ``config.yaml``."""

    run_dir: str = "runs/default"
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deep: DeepConfig = field(default_factory=DeepConfig)
    fair: FairConfig = field(default_factory=FairConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        import yaml

        from dist_fair.io_atomic import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce(value: Any, annotation: Any, field_name: str) -> Any:
    """Convert a YAML value to the field's annotated type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config field '{field_name}': expected a mapping of its sub-fields, got {value!r}")
        return _build(annotation, value, field_name)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        errors = []
        for option in others:
            try:
                return _coerce(value, option, field_name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config field '{field_name}': bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{field_name}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{field_name}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{field_name}': expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config field '{field_name}': expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{field_name}': expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{field_name}': expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config field(s) {', '.join(repr(f'{prefix}.{u}' if prefix else u) for u in unknown)} in {where}; "
            f"known fields: {', '.join(sorted(known))}"
        )
    kwargs = {name: _coerce(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"config section '{prefix or 'job'}': {err}") from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=c`` into (["a", "b"], value); the value is read as YAML (``3e-4``, ``null``,
    ``[1, 2]``, ``true``)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.field=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} names no field")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from err
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        value = float(value)  # YAML 1.1 reads '3e-4' as a string; '--set train.lr=3e-4' means a number
    return path, value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Build the job config: defaults, then the YAML file at ``path`` (or the name of a config
    shipped in ``dist_fair/configs/``, e.g. ``default``), then ``overrides``."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        shipped = SHIPPED_CONFIGS / f"{path.name}.yaml"
        if not path.is_file() and path.suffix == "" and path.parent == Path(".") and shipped.is_file():
            path = shipped  # a config shipped with the package, by name: --config mnist_usps_dfdc
        if not path.is_file():
            names = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file or the name of a shipped "
                              f"config ({', '.join(names)}; dist_fair/configs/, linked as launch/configs/)")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (ray:, data:, knn:, ...)")
        values = loaded
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{key}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return _build(JobConfig, values)
