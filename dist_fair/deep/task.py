"""The deep (fair) clustering methods as training tasks for the engine (Ray Train + DeepSpeed).

:func:`train_deep` trains DEC, IMSAT, DFDC, Fair-DEC or Fairoids (METHODS.md §5) on any number of
workers through :func:`dist_fair.train.engine.fit`; :func:`deep_task` builds one phase's
:class:`~dist_fair.train.task.TrainTask`. Data: an embedding shard folder (digits are 784-d
"embeddings", tables their feature vectors) or in-memory arrays ``{"ids", "emb", "identity",
"attr_<name>"}``; each worker streams its disjoint share.

Phases (each one engine run in its own folder under ``run_dir``):

- DEC, Fair-DEC, Fairoids: ``autoencoder/`` (reconstruction), then ``cluster/``: the encoder is
  loaded from the first phase, the centroids are initialised by distributed k-means in the setup
  hook, and the loss is ``KL(P || Q)`` (+ ``beta L_Fair`` for Fair-DEC from epoch
  ``pretrain_epochs`` on; + ``beta KL(S || R)`` for Fairoids).
- IMSAT, DFDC: ``cluster/`` only; DFDC's loss adds ``beta L_Fair`` from epoch ``pretrain_epochs``
  on (the epochs before are IMSAT: dissertation Algorithm 5).

Per-epoch global quantities (epoch hook, all workers, after every epoch):

- every worker predicts ``y`` for ALL rows of its share (its eval stream, each row once);
- DEC's target ``P`` uses the global cluster mass ``f_j = sum_i q_ij`` (one all-reduce of K numbers)
  and is kept per row in the worker's state (saved with checkpoints);
- the fair assignment ``y_hat`` of METHODS.md §6 over ALL N samples, solved SPMD by the fair
  package (:func:`dist_fair.fair.solve_shard`, auction + exact finish) through the engine's
  collectives: each worker keeps its own rows and the workers exchange O(K * T) counts and small
  bid histograms per auction round, so nothing of size N travels; the labels are those one process
  would compute on all rows. Each worker keeps its share of ``y_hat`` in its state. (With the
  ``exact``/``lp`` solvers or a user callable the rows are gathered instead, rank 0 solves and
  broadcasts the labels: O(N * K) traffic, for moderate N only);
- BatchNorm running statistics are averaged over the workers first (DeepSpeed does not
  synchronise buffers), so every worker predicts with the same network, the one exported;
- the metrics of both labelings (ACC, NMI, balance, fairness, FWD) from all-reduced cluster x group
  and cluster x class count tables (O(K * T) and O(K * C), independent of N).

Inside the loss, IMSAT's marginal ``H(mean_i y_i)`` uses the mean over the GLOBAL batch (sum
all-reduced, gradient through this worker's rows). The VAT radius is ``vat_eps`` or, when the
arrays carry a ``vat_eps`` column, that per-sample value.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dist_fair.config import FairConfig
from dist_fair.errors import ConfigError, DataError
from dist_fair.model_registry import get_model, model_names
from dist_fair.train.task import TrainTask

LOG = logging.getLogger(__name__)

#: the deep clustering models of the registry (dist_fair/model_registry.py).
METHODS = model_names("deep")
#: methods whose clustering model is an autoencoder's encoder plus centroids (the DEC family).
CENTROID_METHODS = ("dec", "fair_dec", "fairoids")
#: methods that need the protected attribute to train.
FAIR_METHODS = ("dfdc", "fair_dec", "fairoids")
#: methods whose loss uses the global fair assignment of the previous epoch (registry: fair_training).
FAIR_TRAINING_METHODS = tuple(m for m in METHODS if get_model(m).fair_training)
#: Most cells of a cluster x class table all-reduced for ACC/NMI (larger: those metrics are skipped).
MAX_CLASS_TABLE = 4_000_000


@dataclass
class DeepOptions:
    """What a deep clustering task needs besides the engine's ``train`` section.

    Attributes:
        method: one of ``METHODS``.
        n_clusters: K.
        attribute: the protected attribute (array key ``attr_<attribute>``); required for the
            fair methods, optional otherwise (then fairness metrics and a final fair assignment).
        num_groups: groups of ``attribute`` (values 0..T-1).
        backbone, hidden, image_shape: IMSAT/DFDC network (:func:`create_backbone`); flat rows are
            reshaped to ``image_shape`` for ``conv``/``timm``.
        latent_dim, ae_hidden: DEC's autoencoder (latent default K).
        pretrain_epochs: DFDC / Fair-DEC: epochs of the base loss before the fairness loss starts.
        beta, gamma: fairness and VAT weights (Table 6.2: 4, 1).
        mu: weight of the marginal entropy, ``L_C = H(Y|X) - mu H(Y)`` (eq 6.5: 1).
        alpha: weight-decay term ``alpha sum ||theta||^2`` added to the loss (Table 6.2: 1e-4).
        vat_eps, vat_xi: VAT radius and power-iteration step.
        fair: the fair assignment (METHODS.md §6): :class:`~dist_fair.config.FairConfig` (``rho``,
            ``eps``, ``method``, ``top_m``; the job config's ``fair`` section).
        fair_assign: the solver (None: ``dist_fair.fair.fair_assign``); must be picklable.
        kmeans_sample, kmeans_iters: distributed k-means (sample for k-means++ and the restarts,
            Lloyd iterations over all rows).
        seed: seed of k-means and VAT.
    """

    method: str
    n_clusters: int = 10
    attribute: str | None = None
    num_groups: int = 0
    backbone: str = "mlp"
    hidden: tuple[int, ...] = (50, 50)
    image_shape: tuple[int, ...] | None = None
    latent_dim: int | None = None
    ae_hidden: tuple[int, ...] = (500, 500, 2000)
    pretrain_epochs: int = 0
    beta: float = 4.0
    gamma: float = 1.0
    mu: float = 1.0
    alpha: float = 0.0
    vat_eps: float = 1.0
    vat_xi: float = 10.0
    fair: FairConfig = field(default_factory=FairConfig)
    fair_assign: Callable[..., Any] | None = None
    kmeans_sample: int = 20000
    kmeans_iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"deep clustering method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.n_clusters < 2:
            raise ConfigError(f"n_clusters must be >= 2, got {self.n_clusters}")
        if self.method in FAIR_METHODS and (self.attribute is None or self.num_groups < 2):
            raise ConfigError(f"method {self.method!r} needs a protected attribute with >= 2 groups (attribute="
                              f"{self.attribute!r}, num_groups={self.num_groups}); name it with attribute=...")
        self.hidden = tuple(self.hidden)
        self.ae_hidden = tuple(self.ae_hidden)
        if self.image_shape is not None:
            self.image_shape = tuple(self.image_shape)
        if isinstance(self.fair, dict):
            self.fair = FairConfig(**self.fair)

    @property
    def latent(self) -> int:
        return self.n_clusters if self.latent_dim is None else int(self.latent_dim)

    @property
    def group_key(self) -> str | None:
        return None if self.attribute is None else f"attr_{self.attribute}"


# ----------------------------------------------------------------------------- models

def make_model(options: DeepOptions, dim: int, phase: str, init_weights: str | None = None):
    """The module of one phase: the autoencoder, or the clustering model (IMSAT/DFDC network, DEC,
    Fairoids) with the previous phase's weights (the encoder for the DEC family)."""
    from dist_fair.models.backbones import create_backbone
    from dist_fair.models.deep_clustering import Autoencoder, IMSATModel

    if phase == "autoencoder":
        return Autoencoder(dim, options.latent, options.ae_hidden)
    if options.method in CENTROID_METHODS:
        autoencoder = Autoencoder(dim, options.latent, options.ae_hidden)
        if init_weights:
            from dist_fair.train.checkpoint import load_model_weights

            state = load_model_weights(init_weights)
            encoder_state = {k[len("encoder."):]: v.float() for k, v in state.items() if k.startswith("encoder.")}
            if not encoder_state:  # a DEC-family model: its encoder plus centroids
                model = _centroid_model(options, autoencoder.encoder)
                model.load_state_dict({k: v.float() for k, v in state.items()})
                return model
            autoencoder.encoder.load_state_dict(encoder_state)
        return _centroid_model(options, autoencoder.encoder)
    shape = options.image_shape or (dim,)
    model = IMSATModel(create_backbone(options.backbone, shape, options.n_clusters, hidden=options.hidden),
                       options.n_clusters)
    if init_weights:
        from dist_fair.train.checkpoint import load_model_weights

        model.load_state_dict({k: v.float() for k, v in load_model_weights(init_weights).items()})
    return model


def _centroid_model(options: DeepOptions, encoder):
    from dist_fair.models.deep_clustering import DECModel, FairoidsModel

    if options.method == "fairoids":
        return FairoidsModel(encoder, options.n_clusters, options.latent, num_groups=options.num_groups,
                             rho=options.fair.rho)
    return DECModel(encoder, options.n_clusters, options.latent)


def deep_forward(model: Any, batch: dict[str, Any]) -> Any:
    return model(batch["emb"])


def _module(ctx: Any) -> Any:
    """The plain torch module behind the DeepSpeed engine."""
    return getattr(ctx.model, "module", ctx.model)


# ----------------------------------------------------------------------------- per-row state

def _lookup(ctx: Any, key: str, ids: Any) -> np.ndarray | None:
    """This worker's per-row values ``ctx.state[key]`` for the batch ids (None if not computed yet)."""
    if key not in ctx.state or "row_ids" not in ctx.state:
        return None
    row_ids = ctx.state["row_ids"]
    wanted = ids.detach().cpu().numpy() if hasattr(ids, "detach") else np.asarray(ids)
    pos = np.searchsorted(row_ids, wanted)
    pos = np.minimum(pos, len(row_ids) - 1)
    if len(wanted) and not np.array_equal(row_ids[pos], wanted):
        missing = wanted[row_ids[pos] != wanted][:5].tolist()
        raise DataError(f"worker {ctx.rank}: training rows {missing} are not in this worker's evaluation share; the "
                        "train and eval streams of a worker must cover the same rows")
    return ctx.state[key][pos]


# ----------------------------------------------------------------------------- losses

def autoencoder_loss(batch: dict[str, Any], outputs: Any, ctx: Any) -> tuple[Any, dict[str, Any]]:
    """Reconstruction ``mean ||x - x_rec||^2 / d``."""
    from dist_fair.models.deep_clustering import Autoencoder

    _, rec = outputs
    loss = Autoencoder.reconstruction_loss(batch["emb"].float(), rec.float()) if rec.shape[0] else rec.sum() * 0.0
    return loss, {}


def _fair_active(options: DeepOptions, ctx: Any) -> bool:
    return options.method in FAIR_TRAINING_METHODS and ctx.epoch >= options.pretrain_epochs


def _weight_decay(options: DeepOptions, ctx: Any) -> Any:
    """``alpha sum_l ||theta_l||^2`` over the module's parameters."""
    from dist_fair.losses.deep_clustering import l2_penalty

    return l2_penalty(_module(ctx).parameters(), options.alpha)


def discriminative_loss(options: DeepOptions, batch: dict[str, Any], logits: Any, ctx: Any) -> tuple[Any, dict[str, Any]]:
    """IMSAT / DFDC: ``H(Y|X) - mu H(Y) + gamma L_Aug (+ alpha ||theta||^2) (+ beta L_Fair)``, ``H(Y)``
    over the global batch."""
    import torch

    from dist_fair.losses.deep_clustering import (
        fair_cross_entropy,
        frozen_batchnorm_stats,
        imsat_mi_loss,
        vat_loss,
    )

    logits = logits.float()
    probs = torch.softmax(logits, dim=1)
    local_sum = probs.sum(dim=0)
    global_sum = ctx.collective.all_reduce_sum(local_sum.detach())
    global_rows = ctx.collective.all_reduce_sum(int(probs.shape[0]))
    mean_probs = (local_sum + (global_sum.to(local_sum) - local_sum.detach())) / max(global_rows, 1)
    mi, cond, marg = imsat_mi_loss(probs, mean_probs=mean_probs)
    eps = batch["vat_eps"].float() if "vat_eps" in batch else options.vat_eps
    x = batch["emb"]
    module = _module(ctx)
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise ConfigError("IMSAT/DFDC's VAT needs the full parameters on every worker: use ZeRO stage 0, 1 or 2 "
                          "(train.deepspeed=zero2_cpu), not ZeRO-3 (these networks are small)")
    # the power iteration runs on detached parameters: its backward touches no parameter, so the
    # DeepSpeed engine does not take it for the step's backward (which reduces the gradients)
    frozen = {**{n: p.detach() for n, p in module.named_parameters()}, **dict(module.named_buffers())}
    with frozen_batchnorm_stats(module):
        aug = vat_loss(lambda inputs: ctx.model(inputs).float(), x, probs, eps, xi=options.vat_xi,
                       power_forward=lambda inputs: torch.func.functional_call(module, frozen, (inputs,)).float())
    loss = cond - options.mu * marg + options.gamma * aug
    if options.alpha:
        loss = loss + _weight_decay(options, ctx)
    metrics: dict[str, Any] = {"loss_mi": mi.detach(), "cond_entropy": cond.detach(), "marg_entropy": marg.detach(),
                               "loss_vat": aug.detach()}
    if _fair_active(options, ctx):
        fair_labels = _lookup(ctx, "fair_labels", batch["ids"])
        if fair_labels is not None:
            fair = fair_cross_entropy(logits, torch.from_numpy(fair_labels).to(logits.device))
            loss = loss + options.beta * fair
            metrics["loss_fair"] = fair.detach()
    return loss, metrics


def centroid_loss(options: DeepOptions, batch: dict[str, Any], outputs: Any, ctx: Any) -> tuple[Any, dict[str, Any]]:
    """DEC ``KL(P || Q)`` (+ Fair-DEC's ``beta L_Fair`` or Fairoids' ``beta KL(S || R)``)."""
    import torch

    from dist_fair.losses.deep_clustering import dec_kl_loss, dec_target_distribution, fair_cross_entropy, fairoid_loss

    z, q = outputs
    target = _lookup(ctx, "target", batch["ids"])
    if target is None:  # before the first epoch hook: DEC's target from the batch itself
        target_t = dec_target_distribution(q.detach().double()).to(q)
    else:
        target_t = torch.from_numpy(target).to(q)
    kl = dec_kl_loss(target_t, q)
    loss, metrics = kl, {"loss_kl": kl.detach()}
    if options.alpha:
        loss = loss + _weight_decay(options, ctx)
    if options.method == "fair_dec" and _fair_active(options, ctx):
        fair_labels = _lookup(ctx, "fair_labels", batch["ids"])
        if fair_labels is not None:
            fair = fair_cross_entropy(q, torch.from_numpy(fair_labels).to(q.device), from_logits=False)
            loss = loss + options.beta * fair
            metrics["loss_fair"] = fair.detach()
    elif options.method == "fairoids":
        module = _module(ctx)
        fair, _ = fairoid_loss(z.float(), q, batch[options.group_key].long(), options.num_groups, rho=module.rho)
        loss = loss + options.beta * fair
        metrics["loss_fair"] = fair.detach()
    return loss, metrics


def _no_evaluation(ctx: Any) -> dict[str, float]:
    """The epoch hook already evaluates (metrics of both labelings); skip the engine's default."""
    return {}


# ----------------------------------------------------------------------------- hooks

@dataclass
class _Predictions:
    ids: np.ndarray
    probs: np.ndarray
    codes: np.ndarray | None
    groups: np.ndarray | None
    identity: np.ndarray | None


def _predict_share(ctx: Any, options: DeepOptions, with_codes: bool = False) -> _Predictions:
    """``y`` (and the latent codes) for every row of this worker's share (eval stream, each once)."""
    from dist_fair.train.engine import batch_rows

    module = _module(ctx)
    ids, probs, codes, groups, identity = [], [], [], [], []
    for batch in ctx.eval_batches():
        outputs = ctx.forward(batch)  # every worker takes part in each forward (ZeRO-3 gathers)
        if not batch_rows(batch):
            continue
        probs.append(module.probs(outputs).float().cpu().numpy())
        if with_codes:
            codes.append(outputs[0].float().cpu().numpy())
        ids.append(batch["ids"].cpu().numpy())
        if options.group_key and options.group_key in batch:
            groups.append(batch[options.group_key].cpu().numpy().astype(np.int64))
        if "identity" in batch:
            identity.append(batch["identity"].cpu().numpy().astype(np.int64))
    k = options.n_clusters
    out_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.argsort(out_ids, kind="stable")

    def cat(parts: list[np.ndarray], empty: np.ndarray) -> np.ndarray:
        return (np.concatenate(parts) if parts else empty)[order]

    return _Predictions(
        ids=out_ids[order],
        probs=cat(probs, np.zeros((0, k), np.float32)),
        codes=cat(codes, np.zeros((0, options.latent), np.float32)) if with_codes else None,
        groups=cat(groups, np.zeros(0, np.int64)) if options.group_key else None,
        identity=cat(identity, np.zeros(0, np.int64)) if identity or not ids else None,
    )


def global_fair_assignment(ctx: Any, options: DeepOptions, ids: np.ndarray, probs: np.ndarray,
                           groups: np.ndarray) -> np.ndarray:
    """The fair assignment of METHODS.md §6 over the rows of ALL workers; returns this worker's share
    (same order as ``probs``).

    Default (the fair package's solver, methods ``auto``/``auction``): SPMD — every worker runs
    :func:`dist_fair.fair.solve_shard` on its own rows and the workers exchange only per-(group,
    cluster) counts and bid histograms through the engine's collectives; the labels equal those of
    one process solving all rows. Other solvers (``exact``, ``lp`` or a user callable): the rows are
    gathered, rank 0 solves, the labels are broadcast (O(N K) traffic: moderate N only)."""
    from dist_fair.deep.estimators import call_fair_assign

    fair = options.fair
    if options.fair_assign is None and fair.method in ("auto", "auction"):
        from dist_fair.fair import Shard, solve_shard
        from dist_fair.fair.assign import as_candidates

        cands = as_candidates(probs.astype(np.float64), fair.top_m)
        labels, _ = solve_shard(Shard(cands, groups.astype(np.int64), ids.astype(np.int64)),
                                ctx.collective, n_groups=options.num_groups, rho=fair.rho,
                                eps=fair.eps, top_m=fair.top_m)
        return np.asarray(labels, dtype=np.int64)
    all_probs = ctx.collective.all_gather(probs.astype(np.float32))
    all_groups = ctx.collective.all_gather(groups.astype(np.int64))
    sizes = [len(p) for p in all_probs]
    labels = None
    if ctx.rank == 0:
        labels, _ = call_fair_assign(options.fair_assign, np.concatenate(all_probs).astype(np.float64),
                                     np.concatenate(all_groups), rho=fair.rho, eps=fair.eps,
                                     method=fair.method, top_m=fair.top_m)
    labels = ctx.collective.broadcast(labels.astype(np.int64) if labels is not None else None, 0)
    offset = sum(sizes[: ctx.rank])
    return labels[offset: offset + sizes[ctx.rank]]


def _contingency_from_dense(table: np.ndarray):
    """A sparse :class:`~dist_fair.eval.contingency.Contingency` from a dense count table (empty rows
    and columns dropped, as if built from labels)."""
    from dist_fair.eval.contingency import Contingency

    rows_keep = np.flatnonzero(table.sum(axis=1) > 0)
    cols_keep = np.flatnonzero(table.sum(axis=0) > 0)
    sub = table[np.ix_(rows_keep, cols_keep)].astype(np.int64)
    r, c = np.nonzero(sub)
    return Contingency(rows=r.astype(np.int64), cols=c.astype(np.int64), counts=sub[r, c],
                       row_sums=sub.sum(axis=1), col_sums=sub.sum(axis=0), row_values=rows_keep, col_values=cols_keep)


def global_scores(ctx: Any, options: DeepOptions, labels: np.ndarray, groups: np.ndarray | None,
                  identity: np.ndarray | None, prefix: str) -> dict[str, float]:
    """ACC, NMI (classes = ``identity``), balance, fairness, FWD (METHODS.md §7) of a labeling spread
    over the workers, from all-reduced count tables: cluster x group (K x T) and cluster x class
    (K x C, skipped when larger than ``MAX_CLASS_TABLE`` cells)."""
    from dist_fair.collective import global_group_cluster_counts
    from dist_fair.eval import metrics

    k = options.n_clusters
    out: dict[str, float] = {}
    if identity is not None:
        known = identity >= 0
        local_max = np.array([int(identity[known].max()) + 1 if known.any() else 0], np.int64)
        num_classes = int(max(a[0] for a in ctx.collective.all_gather(local_max)))
        if 0 < num_classes and num_classes * k <= MAX_CLASS_TABLE:
            flat = np.bincount(identity[known] * k + labels[known], minlength=num_classes * k)
            table = ctx.collective.all_reduce_sum(flat.astype(np.int64)).reshape(num_classes, k)
            contingency = _contingency_from_dense(table)
            out[f"{prefix}_acc"] = metrics.accuracy_from_contingency(contingency)
            out[f"{prefix}_nmi"] = metrics.nmi_from_contingency(contingency)
    if groups is not None and options.num_groups:
        table = global_group_cluster_counts(ctx.collective, labels, groups, k, options.num_groups).T  # K x T
        contingency = _contingency_from_dense(table)
        out[f"{prefix}_balance"] = metrics.balance_from_table(contingency)
        out[f"{prefix}_fairness"] = metrics.fairness_from_table(contingency)
        out[f"{prefix}_fwd"] = metrics.fwd_from_table(contingency)
    return out


def _store_rows(ctx: Any, ids: np.ndarray) -> None:
    if "row_ids" in ctx.state and not np.array_equal(ctx.state["row_ids"], ids):
        raise DataError(f"worker {ctx.rank}: its evaluation share changed between epochs; the eval stream must yield "
                        "the same rows every time")
    ctx.state["row_ids"] = ids


def sync_batchnorm_stats(ctx: Any) -> None:
    """Average the BatchNorm running statistics over the workers (in place, identical afterwards).

    Each worker updates its running mean and variance on its own batches and DeepSpeed does not
    synchronise buffers, so without this the workers would predict their shares with different
    normalisations and the exported model (rank 0's) would differ from what was evaluated."""
    import torch

    module = _module(ctx)
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None:
            for buffer in (layer.running_mean, layer.running_var):
                total = ctx.collective.all_reduce_sum(buffer.detach().double().cpu().numpy())
                buffer.copy_(torch.from_numpy(np.asarray(total) / ctx.world_size).to(buffer))


def _refresh(ctx: Any, options: DeepOptions) -> dict[str, float]:
    """Predict this worker's share; update DEC's target and the fair assignment; score both labelings."""
    import torch

    from dist_fair.losses.deep_clustering import dec_target_distribution

    sync_batchnorm_stats(ctx)
    pred = _predict_share(ctx, options)
    _store_rows(ctx, pred.ids)
    metrics: dict[str, float] = {}
    if options.method in CENTROID_METHODS:
        mass = ctx.collective.all_reduce_sum(pred.probs.astype(np.float64).sum(axis=0))
        target = dec_target_distribution(torch.from_numpy(pred.probs).double(), torch.from_numpy(np.asarray(mass)))
        ctx.state["target"] = target.float().numpy()
    labels = pred.probs.argmax(axis=1).astype(np.int64) if len(pred.probs) else np.zeros(0, np.int64)
    metrics.update(global_scores(ctx, options, labels, pred.groups, pred.identity, "net"))
    needs_fair = pred.groups is not None  # recorded every epoch; the next epoch's pseudo-labels
    if needs_fair:
        fair = global_fair_assignment(ctx, options, pred.ids, pred.probs, pred.groups)
        ctx.state["fair_labels"] = fair
        metrics.update(global_scores(ctx, options, fair, pred.groups, pred.identity, "fair"))
    return metrics


def epoch_hook(options: DeepOptions, ctx: Any) -> dict[str, float]:
    """After every epoch, on all workers (see the module docstring)."""
    return _refresh(ctx, options)


def distributed_kmeans(ctx: Any, codes: np.ndarray, k: int, sample: int, iters: int, seed: int) -> np.ndarray:
    """k-means over the rows of all workers: k-means++ with restarts (sklearn) on a gathered random
    sample (identical on every worker), then Lloyd iterations over ALL rows with the per-cluster sums
    and counts all-reduced (O(K * d) per iteration). Returns the ``[K, d]`` centroids."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng([seed, ctx.rank])
    share = max(1, sample // max(ctx.world_size, 1))
    take = rng.choice(len(codes), size=min(share, len(codes)), replace=False) if len(codes) else np.zeros(0, np.int64)
    pooled = np.concatenate(ctx.collective.all_gather(codes[take].astype(np.float64)))
    if len(pooled) < k:
        raise DataError(f"k-means: only {len(pooled)} samples for {k} clusters")
    centroids = KMeans(k, n_init=10, random_state=seed).fit(pooled).cluster_centers_
    codes64 = codes.astype(np.float64)
    for _ in range(iters):
        if len(codes64):
            dist = ((codes64[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
            nearest = dist.argmin(axis=1)
            sums = np.zeros_like(centroids)
            np.add.at(sums, nearest, codes64)
            counts = np.bincount(nearest, minlength=k).astype(np.float64)
        else:
            sums, counts = np.zeros_like(centroids), np.zeros(k)
        sums = ctx.collective.all_reduce_sum(sums)
        counts = ctx.collective.all_reduce_sum(counts)
        moved = counts > 0
        centroids = np.where(moved[:, None], sums / np.maximum(counts, 1.0)[:, None], centroids)
    return centroids


def setup_hook(options: DeepOptions, init_weights: str | None, ctx: Any) -> dict[str, float]:
    """Before the first epoch of a fresh run: k-means centroids (DEC family, unless the weights came
    from a clustering model), then the same refresh as after an epoch (target, fair labels)."""
    module = _module(ctx)
    if options.method in CENTROID_METHODS and not _has_centroids(init_weights):
        pred = _predict_share(ctx, options, with_codes=True)
        centroids = distributed_kmeans(ctx, pred.codes, options.n_clusters, options.kmeans_sample,
                                       options.kmeans_iters, options.seed)
        module.set_centroids(centroids)
    return _refresh(ctx, options)


def _has_centroids(init_weights: str | None) -> bool:
    if not init_weights:
        return False
    from dist_fair.train.checkpoint import load_model_weights

    return "centroid_init" in load_model_weights(init_weights)


# ----------------------------------------------------------------------------- data

def _streams(data: Any, options: DeepOptions, block_rows: int):
    """(streams, dim, num_classes): in-memory arrays or an embedding shard folder."""
    from dist_fair.train.stream import InMemoryStreams, ShardStreams

    keys = ["ids", "emb", "identity"] + ([options.group_key] if options.group_key else [])
    if isinstance(data, (str, Path)):
        streams = ShardStreams(str(data), keys=keys)
        if options.attribute is not None and options.attribute not in streams.attribute_names:
            raise DataError(f"shard folder {data} has no protected attribute {options.attribute!r} (it has "
                            f"{streams.attribute_names}); choose one of those")
        return streams, streams.dim
    arrays = dict(data)
    if "emb" not in arrays:
        raise DataError("deep_task: the arrays need 'emb' (float32 [N, d]) and optionally 'ids', 'identity', "
                        "'attr_<name>', 'vat_eps'")
    n = len(arrays["emb"])
    arrays.setdefault("ids", np.arange(n, dtype=np.int64))
    arrays.setdefault("identity", np.full(n, -1, np.int64))
    arrays["emb"] = np.asarray(arrays["emb"], dtype=np.float32).reshape(n, -1)
    if options.group_key and options.group_key not in arrays:
        raise DataError(f"deep_task: attribute {options.attribute!r} given but the arrays have no "
                        f"{options.group_key!r} column")
    if options.group_key and (np.asarray(arrays[options.group_key]) < 0).any():
        raise DataError(f"{options.group_key}: negative (unknown) groups; the fair assignment needs every row's group")
    return InMemoryStreams(arrays, block_rows=block_rows), int(arrays["emb"].shape[1])


def deep_task(options: DeepOptions, data: Any, phase: str = "cluster", init_weights: str | None = None,
              block_rows: int = 1024) -> TrainTask:
    """The TrainTask of one phase (``"autoencoder"`` or ``"cluster"``) of ``options.method``.

    Args:
        options: method and hyper-parameters.
        data: an embedding shard folder, or arrays ``{"emb", "ids", "identity", "attr_<name>"[, "vat_eps"]}``.
        phase: ``"autoencoder"`` (DEC family pre-training) or ``"cluster"``.
        init_weights: ``model.pt`` of the previous phase (the autoencoder, or a clustering model).
        block_rows: rows per block of in-memory streams.
    """
    if phase not in ("autoencoder", "cluster"):
        raise ConfigError(f"deep_task phase {phase!r}: choose 'autoencoder' or 'cluster'")
    if phase == "autoencoder" and options.method not in CENTROID_METHODS:
        raise ConfigError(f"method {options.method!r} has no autoencoder phase")
    streams, dim = _streams(data, options, block_rows)
    common = dict(train_stream=streams.train, eval_stream=streams.eval, num_samples=streams.num_samples,
                  forward=deep_forward, info={"method": options.method, "phase": phase, "dim": dim,
                                              "n_clusters": options.n_clusters, "attribute": options.attribute})
    factory = functools.partial(make_model, options, dim, phase, init_weights)
    if phase == "autoencoder":
        return TrainTask(name=f"{options.method}-autoencoder", model_factory=factory, loss_fn=autoencoder_loss,
                         evaluate=_no_evaluation, **common)
    loss = discriminative_loss if options.method in ("imsat", "dfdc") else centroid_loss
    return TrainTask(name=f"{options.method}", model_factory=factory, loss_fn=functools.partial(loss, options),
                     setup_hook=functools.partial(setup_hook, options, init_weights),
                     epoch_hook=functools.partial(epoch_hook, options), evaluate=_no_evaluation, **common)


# ----------------------------------------------------------------------------- orchestration

@dataclass
class DeepResult:
    """What :func:`train_deep` returns: the final metrics and each phase's engine result."""

    method: str
    metrics: dict[str, Any]
    model_path: Path
    phases: dict[str, Any] = field(default_factory=dict)

    def epoch_records(self, phase: str = "cluster") -> list[dict[str, Any]]:
        return self.phases[phase].events("epoch") if phase in self.phases else []


def train_deep(options: DeepOptions, data: Any, train: Any, run_dir: str | Path, ae_train: Any = None,
               init_weights: str | None = None, progress: bool = True, use_gpu: bool | None = None) -> DeepResult:
    """Train ``options.method`` through the engine: the autoencoder phase (DEC family, unless
    ``init_weights`` is given) then the clustering phase, each ``fit`` in its own folder under
    ``run_dir`` (finished phases are skipped on a re-run; killed ones resume).

    Args:
        options: method and hyper-parameters (:class:`DeepOptions`).
        data: an embedding shard folder or in-memory arrays (see :func:`deep_task`).
        train: the engine's ``TrainConfig`` for the clustering phase (workers, DeepSpeed config,
            epochs, batch size, lr, weight decay, seed).
        run_dir: the run folder.
        ae_train: ``TrainConfig`` of the autoencoder phase (default: ``train``).
        init_weights: skip pre-training and start from this ``model.pt``.
    """
    from dist_fair.train.engine import fit

    run_dir = Path(run_dir)
    phases: dict[str, Any] = {}
    if options.method in CENTROID_METHODS and init_weights is None:
        ae_config = ae_train or train
        ae_task = deep_task(options, data, phase="autoencoder")
        phases["autoencoder"] = fit(ae_task, ae_config, run_dir / "autoencoder", progress=progress, use_gpu=use_gpu)
        init_weights = str(phases["autoencoder"].model_path)
    task = deep_task(options, data, phase="cluster", init_weights=init_weights)
    phases["cluster"] = fit(task, train, run_dir / "cluster", progress=progress, use_gpu=use_gpu)
    final = {k[len("hook_"):]: v for k, v in phases["cluster"].metrics.items() if k.startswith("hook_")}
    return DeepResult(options.method, final, phases["cluster"].model_path, phases)


def deep_options(job: Any, shard_dir: str | Path) -> DeepOptions:
    """The :class:`DeepOptions` of ``job.train.model`` over a shard folder, from the job config:
    the ``deep`` section, the protected attribute ``train.group_attribute``, the ``fair`` section
    and K = ``deep.n_clusters`` (null: the number of identities in the manifest)."""
    from dist_fair.data.shards import read_manifest

    model = job.train.model
    if model not in METHODS:
        raise ConfigError(f"config field 'train.model': {model!r} is not a deep clustering method ({', '.join(METHODS)})")
    manifest = read_manifest(shard_dir)
    deep = job.deep
    attribute = job.train.group_attribute
    if attribute not in manifest.attributes:
        if model in FAIR_METHODS or manifest.attributes:
            raise ConfigError(f"config field 'train.group_attribute': {attribute!r} is not a protected attribute of "
                              f"{shard_dir} (it has {sorted(manifest.attributes) or 'none'}); name one of those")
        attribute = None
    if model in FAIR_TRAINING_METHODS and deep.pretrain_epochs >= job.train.epochs:
        raise ConfigError(f"config field 'deep.pretrain_epochs': {deep.pretrain_epochs} base-loss epochs of "
                          f"train.epochs={job.train.epochs} leave none for {model}'s fairness loss; lower it or raise "
                          "train.epochs")
    k = deep.n_clusters or int(getattr(manifest, "num_identities", 0) or 0)
    if k < 2:
        raise ConfigError(f"{shard_dir}: the manifest does not say how many identities (clusters) there are; "
                          "set deep.n_clusters")
    return DeepOptions(method=model, n_clusters=k, attribute=attribute,
                       num_groups=len(manifest.attributes[attribute]) if attribute else 0,
                       backbone=deep.backbone, hidden=tuple(deep.hidden),
                       image_shape=tuple(deep.image_shape) if deep.image_shape else None,
                       latent_dim=deep.latent_dim, ae_hidden=tuple(deep.ae_hidden),
                       pretrain_epochs=deep.pretrain_epochs, beta=deep.beta, gamma=deep.gamma, mu=deep.mu,
                       alpha=deep.alpha, vat_eps=deep.vat_eps, vat_xi=deep.vat_xi, fair=job.fair,
                       kmeans_sample=deep.kmeans_sample, kmeans_iters=deep.kmeans_iters, seed=job.train.seed)


def autoencoder_train_config(job: Any) -> Any:
    """The engine's config of the DEC family's autoencoder phase: ``train`` with ``deep.ae_epochs``
    epochs at ``deep.ae_lr`` (null = ``train.lr``)."""
    from dataclasses import replace

    return replace(job.train, epochs=job.deep.ae_epochs, lr=job.deep.ae_lr or job.train.lr)


def options_to_dict(options: DeepOptions) -> dict[str, Any]:
    """A JSON-friendly copy of ``options`` (without the solver callable), see :func:`options_from_dict`."""
    from dataclasses import asdict

    if options.fair_assign is not None:
        raise ConfigError("DeepOptions with a custom fair_assign callable cannot be saved; use the default solver")
    out = asdict(options)
    out.pop("fair_assign")
    return out


def options_from_dict(values: dict[str, Any]) -> DeepOptions:
    return DeepOptions(**values)


def build_deep_task(job: Any, inputs: Any) -> TrainTask:
    """``train.model=<dec|imsat|dfdc|fair_dec|fairoids>`` for ``dist-fair train`` (the registry's
    builder): the clustering phase over ``inputs.shards``; for the DEC family the autoencoder
    phase is trained first (in ``<run_dir>/autoencoder``, skipped when complete)."""
    from dist_fair.train.engine import fit

    options = deep_options(job, inputs.shards)
    init_weights = None
    if options.method in CENTROID_METHODS:
        ae_task = deep_task(options, inputs.shards, phase="autoencoder")
        init_weights = str(fit(ae_task, autoencoder_train_config(job), Path(inputs.run_dir) / "autoencoder").model_path)
    return deep_task(options, inputs.shards, phase="cluster", init_weights=init_weights)


__all__ = ["DeepOptions", "DeepResult", "METHODS", "deep_task", "train_deep", "build_deep_task", "make_model",
           "deep_options", "autoencoder_train_config", "options_to_dict", "options_from_dict",
           "global_fair_assignment", "global_scores", "distributed_kmeans"]
