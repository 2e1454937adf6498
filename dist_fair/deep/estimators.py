"""scikit-learn-style deep (fair) clusterers for data in memory: DEC, IMSAT, DFDC, FairDEC, Fairoids.

Three lines to try a method before scaling it out (METHODS.md §5, §6)::

    from dist_fair import DFDC
    model = DFDC(n_clusters=10).fit(X, groups)      # groups: the protected attribute per row
    model.labels_, model.fair_labels_, model.predict(X_new)   # predict needs no protected attribute

``labels_`` is the network's clustering (argmax of its soft assignment ``y``) of the training data,
``fair_labels_`` the global fair assignment ``y_hat`` of METHODS.md §6 computed from the final
``y`` (for every method when ``groups`` are given: for DEC and IMSAT it is a post-hoc fair
assignment). ``predict(X)`` uses the network only. ``history_`` holds one record per epoch (losses
and, when ``groups``/``y`` are given, ACC, NMI, balance, fairness and FWD of both labelings);
``metrics_`` the same at the end. ``y`` is used for those records only, never for training.

Training runs in this process with plain PyTorch (CPU or one GPU, ``device``); the same models
train distributed through the engine with :mod:`dist_fair.deep.task`.

Methods (losses in :mod:`dist_fair.losses.deep_clustering`):

- ``IMSAT``: ``L = L_C + gamma L_Aug`` (mutual information + VAT), for ``epochs``.
- ``DFDC``: IMSAT for ``pretrain_epochs``, then ``epochs`` epochs of ``L_C + beta L_Fair + gamma
  L_Aug``; before each of them the fair assignment ``y_hat`` of ALL samples is recomputed from the
  current ``y`` and used as pseudo-labels (dissertation Algorithm 5).
- ``DEC``: autoencoder pre-trained for ``ae_epochs``, k-means on the codes, then ``epochs`` epochs of
  ``KL(P || Q)`` with the target ``P`` recomputed over all samples before each epoch.
- ``FairDEC``: DEC for ``pretrain_epochs``, then ``epochs`` epochs of ``KL(P || Q) + beta L_Fair``
  with per-epoch fair pseudo-labels (dissertation §6.4.4).
- ``Fairoids``: pre-trained autoencoder and k-means as DEC, then ``epochs`` epochs of
  ``KL(P || Q) + beta KL(S || R)`` (multi-state seed).

Defaults follow the dissertation's Table 6.2 (batch 256, lr 5e-4, beta 4, gamma 1, alpha 1e-4);
``alpha sum ||theta||^2`` is applied as ``Adam(weight_decay=2 alpha)`` (the same gradient).
``init_model`` warm-starts from an earlier fit (skipping the pre-training it already did): a fitted
IMSAT/DFDC for IMSAT/DFDC, a fitted DEC/FairDEC/Fairoids or a pre-trained
:class:`~dist_fair.models.deep_clustering.Autoencoder` for the DEC family.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from dist_fair.errors import ConfigError, DataError

LOG = logging.getLogger(__name__)

__all__ = ["DEC", "IMSAT", "DFDC", "FairDEC", "Fairoids", "adaptive_vat_eps", "pretrain_autoencoder",
           "clustering_scores", "call_fair_assign"]

try:  # scikit-learn's base classes give get_params/set_params/clone and the familiar repr
    from sklearn.base import BaseEstimator, ClusterMixin
except ImportError:  # pragma: no cover - sklearn is a dependency
    BaseEstimator, ClusterMixin = object, object


# ----------------------------------------------------------------------------- helpers (pure)

def adaptive_vat_eps(X: np.ndarray, k: int = 10, scale: float = 0.25, max_dim: int = 64, seed: int = 0,
                     batch: int = 8192) -> np.ndarray:
    """IMSAT's per-sample VAT radius: ``eps_i = scale * ||x_i - x_(k)||``, the distance from ``x_i`` to
    its k-th nearest neighbour (IMSAT uses k = 10, scale = 0.25).

    Inputs with more than ``max_dim`` features are first projected on their top ``max_dim``
    principal components (randomised PCA) so that the exact FAISS search stays cheap; this slightly
    shortens the distances. Cost: O(N^2 * min(d, max_dim)) with FAISS's exact search.

    Returns:
        float32 ``[N]``.
    """
    import faiss

    flat = np.ascontiguousarray(X.reshape(len(X), -1), dtype=np.float32)
    n = len(flat)
    if n < 2:
        raise DataError(f"adaptive_vat_eps: need at least 2 samples, got {n}")
    k = min(k, n - 1)
    if flat.shape[1] > max_dim:
        from sklearn.decomposition import PCA

        flat = PCA(max_dim, svd_solver="randomized", random_state=seed).fit_transform(flat).astype(np.float32)
        flat = np.ascontiguousarray(flat)
    index = faiss.IndexFlatL2(flat.shape[1])
    index.add(flat)
    out = np.empty(n, np.float32)
    for start in range(0, n, batch):
        dist, _ = index.search(flat[start: start + batch], k + 1)  # the sample itself comes first
        out[start: start + batch] = np.sqrt(np.maximum(dist[:, k], 0.0))
    return scale * out


def clustering_scores(labels: np.ndarray, groups: np.ndarray | None, y: np.ndarray | None,
                      prefix: str) -> dict[str, float]:
    """ACC and NMI against ``y`` (when given) and balance, fairness, FWD over ``groups`` (when given),
    from :mod:`dist_fair.eval.metrics` (METHODS.md §7); keys ``<prefix>_acc`` etc."""
    from dist_fair.eval import metrics

    out: dict[str, float] = {}
    if y is not None:
        known = y >= 0
        out[f"{prefix}_acc"] = metrics.accuracy(y[known], labels[known])
        out[f"{prefix}_nmi"] = metrics.nmi(y[known], labels[known])
    if groups is not None:
        out[f"{prefix}_balance"] = metrics.balance(labels, groups)
        out[f"{prefix}_fairness"] = metrics.fairness(labels, groups)
        out[f"{prefix}_fwd"] = metrics.fwd(labels, groups)
    return out


def default_fair_assign() -> Callable[..., Any]:
    """``dist_fair.fair.fair_assign`` (the global fair assignment of METHODS.md §6)."""
    try:
        from dist_fair.fair import fair_assign
    except ImportError as err:
        raise ConfigError("the fair assignment package dist_fair.fair is not available; pass fair_assign=<callable "
                          "(probs, groups, rho=, eps=, method=, top_m=) -> labels or (labels, report)>") from err
    return fair_assign


def call_fair_assign(fair_assign: Callable[..., Any] | None, probs: np.ndarray, groups: np.ndarray, rho: Any = None,
                     eps: float = 0.0, method: str = "auto", top_m: int | None = None) -> tuple[np.ndarray, Any]:
    """Run a fair assignment solver (default :func:`default_fair_assign`) and return ``(labels, report)``.

    The solver is called as ``fair_assign(probs, groups, rho=rho, eps=eps, method=method, top_m=top_m)``
    and may return the labels, ``(labels, report)`` or an object with a ``labels`` attribute."""
    solver = fair_assign or default_fair_assign()
    result = solver(probs, groups, rho=rho, eps=eps, method=method, top_m=top_m)
    report = None
    if isinstance(result, tuple):
        labels, report = result[0], (result[1] if len(result) > 1 else None)
    elif hasattr(result, "labels"):
        labels, report = result.labels, getattr(result, "report", None)
    else:
        labels = result
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.shape[0] != probs.shape[0]:
        raise DataError(f"the fair assignment returned {labels.shape[0]} labels for {probs.shape[0]} samples")
    return labels, report


def _report_dict(report: Any) -> dict[str, Any]:
    """A JSON-friendly view of a solver report (dataclass, dict or anything else)."""
    import dataclasses

    if report is None:
        return {}
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    elif dataclasses.is_dataclass(report) and not isinstance(report, type):
        report = dataclasses.asdict(report)
    if isinstance(report, dict):
        return {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return {"report": str(report)[:200]}


# ----------------------------------------------------------------------------- torch helpers

def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation of ``range(n)`` cut into batches; a last batch of one row is merged into
    the previous one (BatchNorm needs at least two rows)."""
    order = rng.permutation(n)
    chunks = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks[-2] = np.concatenate([chunks[-2], chunks.pop()])
    return chunks


def predict_probs(model: Any, X: Any, device: Any, batch_size: int = 4096) -> np.ndarray:
    """Soft assignments ``y`` ``[N, K]`` (float32) of a deep clustering model, in eval mode."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(X), batch_size):
            xb = X[start: start + batch_size].to(device)
            out.append(model.probs(model(xb)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.n_clusters), np.float32)


def pretrain_autoencoder(X: Any, latent_dim: int, hidden: Sequence[int] = (500, 500, 2000), epochs: int = 50,
                         batch_size: int = 256, lr: float = 1e-3, seed: int = 0, device: str = "cpu",
                         verbose: bool = False) -> Any:
    """DEC's autoencoder ``d-500-500-2000-z`` trained on the mean squared reconstruction error with
    Adam (end to end; METHODS.md §5). ``X``: array ``[N, ...]`` (flattened). Returns the
    :class:`~dist_fair.models.deep_clustering.Autoencoder` (eval mode, on the CPU) with the
    per-epoch losses in its ``history`` attribute."""
    import torch

    from dist_fair.models.deep_clustering import Autoencoder

    data = _as_tensor(X).flatten(1)
    dev = _device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Autoencoder(data.shape[1], latent_dim, hidden).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(epochs):
        total, start = 0.0, time.perf_counter()
        model.train()
        for idx in _batches(len(data), batch_size, rng):
            xb = data[idx].to(dev)
            _, rec = model(xb)
            loss = model.reconstruction_loss(xb, rec)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        history.append({"phase": "autoencoder", "epoch": epoch, "loss": total / len(data),
                        "seconds": time.perf_counter() - start})
        if verbose:
            LOG.info("autoencoder epoch %d: reconstruction %.5f", epoch, total / len(data))
    model.eval()
    model.to("cpu")
    model.history = history
    return model


def _as_tensor(X: Any):
    import torch

    if isinstance(X, torch.Tensor):
        return X.detach().float().cpu()
    array = np.asarray(X)
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise DataError(f"X must be a numeric array, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


# ----------------------------------------------------------------------------- the estimators

class _DeepClusterer(ClusterMixin, BaseEstimator):
    """Shared fit/predict machinery; subclasses set the family and which losses train."""

    _family = "discriminative"   # or "centroid"
    _fair_training = False        # trains with per-epoch fair pseudo-labels
    _needs_groups = False

    # -------------------------------------------------------------- public API
    def fit(self, X: Any, groups: Any = None, y: Any = None) -> "_DeepClusterer":
        """Train on ``X`` (``[N, d]`` features or ``[N, c, h, w]`` images).

        Args:
            X: the samples.
            groups: protected group per sample (any integer or string labels; every distinct value
                is a group). Required for DFDC, FairDEC and Fairoids; optional for DEC and IMSAT
                (then a post-hoc fair assignment and the fairness metrics are recorded).
            y: ground-truth classes, used only for the ACC/NMI records in ``history_`` and
                ``metrics_`` (never for training).
        """
        import torch

        self._check_params()
        for stale in ("input_shape_", "model_"):
            self.__dict__.pop(stale, None)
        data = self._inputs(X)
        n = data.shape[0]
        if n < max(2, self.n_clusters):
            raise DataError(f"{type(self).__name__}: {n} samples cannot form {self.n_clusters} clusters")
        codes = self._group_codes(groups, n)
        y_eval = None if y is None else np.asarray(y).reshape(-1)
        if y_eval is not None and len(y_eval) != n:
            raise DataError(f"y has {len(y_eval)} entries for {n} samples")
        if y_eval is not None and not np.issubdtype(y_eval.dtype, np.integer):
            _, y_eval = np.unique(y_eval, return_inverse=True)
        self._device_ = _device(self.device)
        self.history_: list[dict[str, Any]] = []
        self.n_features_in_ = int(np.prod(data.shape[1:]))
        self.input_shape_ = tuple(int(s) for s in data.shape[1:])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            self._rng = np.random.default_rng(self.random_state)
            self._fit(data, codes, y_eval)
        probs = predict_probs(self.model_, data, self._device_)
        self.labels_ = probs.argmax(axis=1).astype(np.int64)
        self.fair_labels_ = None
        final: dict[str, Any] = clustering_scores(self.labels_, codes, y_eval, "net")
        if codes is not None:
            cached = getattr(self, "_final_fair", None)
            if cached is not None and cached[1] is not None and np.array_equal(cached[0], probs):
                self.fair_labels_, report = cached[1], None
            else:
                self.fair_labels_, report = self._fair(probs, codes)
            final.update(clustering_scores(self.fair_labels_, codes, y_eval, "fair"))
            final.update({f"fair_{k}": v for k, v in _report_dict(report).items() if f"fair_{k}" not in final})
        self.metrics_ = final
        self._final_fair = None
        self.model_.eval()
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Cluster of each sample from the network alone (no protected attribute needed)."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Soft assignments ``y`` ``[N, K]`` from the network."""
        self._check_fitted()
        return predict_probs(self.model_, self._inputs(X), self._device_)

    def fit_predict(self, X: Any, groups: Any = None, y: Any = None) -> np.ndarray:  # type: ignore[override]
        """``fit(X, groups, y).labels_`` (the network's labels; see ``fair_labels_`` for the fair ones)."""
        return self.fit(X, groups, y).labels_

    # -------------------------------------------------------------- checks and inputs
    def _check_params(self) -> None:
        if not isinstance(self.n_clusters, (int, np.integer)) or self.n_clusters < 2:
            raise ConfigError(f"n_clusters must be an integer >= 2, got {self.n_clusters!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < (1 if name == "batch_size" else 0):
                raise ConfigError(f"{name} must be a non-negative integer (batch_size >= 1), got {value!r}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (BatchNorm and the marginal entropy need a batch)")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X, groups) first")

    def _inputs(self, X: Any):
        data = _as_tensor(X)
        if data.dim() < 2:
            raise DataError(f"X must have one row per sample ([N, d] or [N, c, h, w]), got shape {tuple(data.shape)}")
        shape = getattr(self, "image_shape", None)
        if shape is not None and data.dim() == 2:
            if int(np.prod(shape)) != data.shape[1]:
                raise DataError(f"image_shape {tuple(shape)} holds {int(np.prod(shape))} values, X rows have "
                                f"{data.shape[1]}")
            data = data.view(data.shape[0], *shape)
        if hasattr(self, "input_shape_") and tuple(data.shape[1:]) != self.input_shape_:
            raise DataError(f"X samples have shape {tuple(data.shape[1:])}, the model was fitted on {self.input_shape_}")
        if not bool(torch_isfinite(data)):
            raise DataError("X holds NaN or infinite values; clean or impute them first")
        return data

    def _group_codes(self, groups: Any, n: int) -> np.ndarray | None:
        if groups is None:
            if self._needs_groups:
                raise DataError(f"{type(self).__name__} needs the protected attribute: call fit(X, groups) with one "
                                "group label per row")
            self.group_values_ = None
            return None
        values = np.asarray(groups).reshape(-1)
        if len(values) != n:
            raise DataError(f"groups has {len(values)} entries for {n} samples; give one group label per row")
        if np.issubdtype(values.dtype, np.integer) and (values < 0).any():
            raise DataError(f"groups holds negative values ({int((values < 0).sum())} rows); the fair assignment needs "
                            "every sample's group: drop rows with an unknown group or give them a group of their own")
        self.group_values_, codes = np.unique(values, return_inverse=True)
        if len(self.group_values_) < 2 and self._needs_groups:
            raise DataError(f"groups has a single value {self.group_values_.tolist()}; fairness needs >= 2 groups")
        return codes.astype(np.int64)

    def _rho_vector(self) -> list[float] | None:
        """``rho`` as one share per group in the order of ``group_values_`` (a dict maps value -> share)."""
        if self.rho is None:
            return None
        if isinstance(self.rho, dict):
            missing = [v for v in self.group_values_.tolist() if v not in self.rho]
            if missing:
                raise ConfigError(f"rho has no share for group(s) {missing}; give one for every group")
            return [float(self.rho[v]) for v in self.group_values_.tolist()]
        shares = [float(v) for v in self.rho]
        if len(shares) != len(self.group_values_):
            raise ConfigError(f"rho holds {len(shares)} shares for {len(self.group_values_)} groups "
                              f"{self.group_values_.tolist()}; give one per group, in that (sorted) order")
        return shares

    def _fair(self, probs: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, Any]:
        return call_fair_assign(self.fair_assign, probs.astype(np.float64), codes, rho=self._rho_vector(),
                                eps=self.fair_eps, method=self.fair_method, top_m=self.fair_top_m)

    # -------------------------------------------------------------- epoch records
    def _record(self, phase: str, epoch: int, sums: dict[str, float], rows: int, seconds: float,
                probs: np.ndarray | None, codes: np.ndarray | None, y: np.ndarray | None,
                fair_labels: np.ndarray | None = None, report: Any = None) -> dict[str, Any]:
        record: dict[str, Any] = {"phase": phase, "epoch": epoch, "seconds": seconds}
        record.update({k: v / max(rows, 1) for k, v in sums.items()})
        if probs is not None:
            record.update(clustering_scores(probs.argmax(axis=1), codes, y, "net"))
        if fair_labels is not None:
            record.update(clustering_scores(fair_labels, codes, y, "fair"))
            record.update({f"fair_{k}": v for k, v in _report_dict(report).items() if f"fair_{k}" not in record})
        self.history_.append(record)
        if self.verbose:
            shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
            LOG.info("%s %s epoch %d: %s", type(self).__name__, phase, epoch, shown)
        return record

    def _optimizer(self, params: Any, lr: float):
        import torch

        return torch.optim.Adam(params, lr=lr, weight_decay=2.0 * self.alpha)


def torch_isfinite(data: Any) -> bool:
    import torch

    return bool(torch.isfinite(data).all())


# ----------------------------------------------------------------------------- discriminative family

class _Discriminative(_DeepClusterer):
    _family = "discriminative"

    def _build(self):
        from dist_fair.models.backbones import create_backbone
        from dist_fair.models.deep_clustering import IMSATModel

        spec = self.backbone
        shape = self.input_shape_
        if spec == "auto":
            spec = "conv" if len(shape) == 3 and shape[1] == shape[2] and shape[1] >= 16 else "mlp"
        hidden = self.hidden
        if hidden == "auto":
            hidden = (50, 50) if self.n_features_in_ <= 100 else (1200, 1200)
        return IMSATModel(create_backbone(spec, shape, self.n_clusters, hidden=tuple(hidden)), self.n_clusters)

    def _vat_radius(self, data) -> np.ndarray:
        eps = self.vat_eps
        n = data.shape[0]
        if isinstance(eps, str):
            if eps != "auto":
                raise ConfigError(f"vat_eps must be a number, an array with one value per sample or 'auto', got {eps!r}")
            return adaptive_vat_eps(data.numpy(), seed=self.random_state)
        radius = np.asarray(eps, dtype=np.float32)
        if radius.ndim == 0:
            return np.full(n, float(radius), np.float32)
        if radius.shape != (n,):
            raise ConfigError(f"vat_eps holds {radius.size} values for {n} samples; give one per sample or a number")
        return radius

    def _warm_start(self) -> bool:
        source = self.init_model
        if source is None:
            return False
        src_model = getattr(source, "model_", None)
        if src_model is None or getattr(src_model, "family", None) != "discriminative":
            raise ConfigError(f"{type(self).__name__}(init_model=...) takes a fitted IMSAT or DFDC estimator, got "
                              f"{type(source).__name__}")
        if getattr(source, "input_shape_", None) != self.input_shape_ or src_model.n_clusters != self.n_clusters:
            raise ConfigError("init_model was fitted on samples of another shape or with another n_clusters")
        self.model_ = copy.deepcopy(src_model).to(self._device_)
        return True

    def _fit(self, data, codes: np.ndarray | None, y: np.ndarray | None) -> None:
        import torch

        from dist_fair.losses.deep_clustering import fair_cross_entropy, frozen_batchnorm_stats, imsat_mi_loss, vat_loss

        dev = self._device_
        radius = torch.from_numpy(self._vat_radius(data))
        self.vat_eps_ = radius.numpy()
        if not self._warm_start():
            self.model_ = self._build().to(dev)
        model = self.model_
        optimizer = self._optimizer(model.parameters(), self.lr)
        if self._fair_training:  # DFDC: IMSAT epochs first, unless init_model already did them
            pre = 0 if self.init_model is not None else self.pretrain_epochs
        else:
            pre = self.epochs
        fair_epochs = self.epochs if self._fair_training else 0
        probs_all = predict_probs(model, data, dev) if pre == 0 and fair_epochs else None
        fair_np = None
        if probs_all is not None:
            fair_np, _ = self._fair(probs_all, codes)
        for phase, count in (("pretrain" if self._fair_training else "train", pre), ("fair", fair_epochs)):
            for epoch in range(count):
                # Algorithm 5: the fair assignment of ALL samples, computed from y after the previous
                # epoch, is this epoch's pseudo-labels
                fair_labels = torch.from_numpy(fair_np) if phase == "fair" else None
                start = time.perf_counter()
                model.train()
                sums = {"loss": 0.0, "loss_mi": 0.0, "cond_entropy": 0.0, "marg_entropy": 0.0, "loss_vat": 0.0,
                        "loss_fair": 0.0}
                for idx in _batches(data.shape[0], self.batch_size, self._rng):
                    xb = data[idx].to(dev)
                    logits = model(xb)
                    probs = torch.softmax(logits, dim=1)
                    mi, cond, marg = imsat_mi_loss(probs)
                    with frozen_batchnorm_stats(model):
                        aug = vat_loss(model, xb, probs, radius[idx].to(dev), xi=self.vat_xi)
                    loss = cond - self.mu * marg + self.gamma * aug
                    fair = torch.zeros(())
                    if fair_labels is not None:
                        fair = fair_cross_entropy(logits, fair_labels[idx].to(dev))
                        loss = loss + self.beta * fair
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    rows = len(idx)
                    for key, value in (("loss", loss), ("loss_mi", mi), ("cond_entropy", cond),
                                       ("marg_entropy", marg), ("loss_vat", aug), ("loss_fair", fair)):
                        sums[key] += float(value.detach()) * rows
                seconds = time.perf_counter() - start
                probs_all = predict_probs(model, data, dev)
                report = None
                needs_fair = codes is not None  # recorded every epoch; the pseudo-labels of the next one
                if needs_fair:
                    fair_np, report = self._fair(probs_all, codes)
                self._record(phase, epoch, sums, data.shape[0], seconds, probs_all, codes, y,
                             fair_np if needs_fair else None, report)
        self._final_fair = (probs_all, fair_np) if codes is not None and probs_all is not None else None


class IMSAT(_Discriminative):
    """IMSAT (Hu et al. 2017; METHODS.md §5): a network ``f`` with ``y = softmax(f(x))`` trained on
    ``L = mean_i H(y_i) - H(mean_i y_i) + gamma KL(y(x), y(x + t_adv)) + alpha sum ||theta||^2``.

    Args:
        n_clusters: K.
        backbone: ``"auto"`` (the small conv net for square images ``[N, c, s, s]`` with s >= 16,
            else an MLP), ``"mlp"``, ``"conv"`` or ``"timm:<name>"``.
        hidden: MLP hidden widths, or ``"auto"`` (``d-50-50-K`` for d <= 100, else ``d-1200-1200-K``).
        image_shape: reshape flat rows ``[N, c*h*w]`` to images ``(c, h, w)`` (None: use X as given).
        epochs, batch_size, lr: training (Table 6.2: batch 256, lr 2e-4 to 5e-4).
        gamma: weight of the VAT term; alpha: weight decay.
        mu: weight of the marginal entropy: the loss is ``H(Y|X) - mu H(Y) + gamma L_Aug`` (the
            dissertation's eq 6.5: ``mu = 1``; IMSAT's own code uses ``mu = 4`` with ``gamma = 10``).
        vat_eps: VAT radius: a number, one value per sample, or ``"auto"`` (IMSAT's
            ``0.25 x`` distance to the 10th nearest neighbour, :func:`adaptive_vat_eps`).
        vat_xi: finite-difference step of VAT's power iteration (10, as in IMSAT's code; only the
            direction of the resulting gradient is used).
        fair_assign, rho, fair_eps, fair_method, fair_top_m: the fair assignment of METHODS.md §6
            used for ``fair_labels_`` (target shares, flexible fairness, solver).
        init_model: a fitted IMSAT/DFDC to continue from.
        random_state, device, verbose.
    """

    def __init__(self, n_clusters: int = 10, backbone: str = "auto", hidden: Any = "auto",
                 image_shape: Sequence[int] | None = None, epochs: int = 60, batch_size: int = 256, lr: float = 5e-4,
                 gamma: float = 1.0, mu: float = 1.0, alpha: float = 1e-4, vat_eps: Any = "auto", vat_xi: float = 10.0,
                 fair_assign: Callable[..., Any] | None = None, rho: Any = None, fair_eps: float = 0.0,
                 fair_method: str = "auto", fair_top_m: int | None = None, init_model: Any = None,
                 random_state: int = 0, device: str = "cpu", verbose: bool = False) -> None:
        self.n_clusters = n_clusters
        self.backbone = backbone
        self.hidden = hidden
        self.image_shape = image_shape
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.gamma = gamma
        self.mu = mu
        self.alpha = alpha
        self.vat_eps = vat_eps
        self.vat_xi = vat_xi
        self.fair_assign = fair_assign
        self.rho = rho
        self.fair_eps = fair_eps
        self.fair_method = fair_method
        self.fair_top_m = fair_top_m
        self.init_model = init_model
        self.random_state = random_state
        self.device = device
        self.verbose = verbose


class DFDC(_Discriminative):
    """Deep Fair Discriminative Clustering (dissertation ch. 6, Algorithm 5; METHODS.md §5): IMSAT for
    ``pretrain_epochs``, then ``epochs`` epochs of ``L_C + beta L_Fair + gamma L_Aug`` where
    ``L_Fair = -mean_i log y_{i, y_hat_i}`` and the fair assignment ``y_hat`` of all samples is
    recomputed from the current network before each epoch.

    Args: as :class:`IMSAT`, plus ``pretrain_epochs`` and ``beta`` (the fairness weight, Table 6.2:
    4 to 6). ``fit(X, groups)`` needs the protected attribute; ``predict`` does not.
    """

    _fair_training = True
    _needs_groups = True

    def __init__(self, n_clusters: int = 10, backbone: str = "auto", hidden: Any = "auto",
                 image_shape: Sequence[int] | None = None, pretrain_epochs: int = 20, epochs: int = 40,
                 batch_size: int = 256, lr: float = 5e-4, beta: float = 4.0, gamma: float = 1.0, mu: float = 1.0,
                 alpha: float = 1e-4,
                 vat_eps: Any = "auto", vat_xi: float = 10.0, fair_assign: Callable[..., Any] | None = None,
                 rho: Any = None, fair_eps: float = 0.0, fair_method: str = "auto", fair_top_m: int | None = None,
                 init_model: Any = None, random_state: int = 0, device: str = "cpu", verbose: bool = False) -> None:
        self.n_clusters = n_clusters
        self.backbone = backbone
        self.hidden = hidden
        self.image_shape = image_shape
        self.pretrain_epochs = pretrain_epochs
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.beta = beta
        self.gamma = gamma
        self.mu = mu
        self.alpha = alpha
        self.vat_eps = vat_eps
        self.vat_xi = vat_xi
        self.fair_assign = fair_assign
        self.rho = rho
        self.fair_eps = fair_eps
        self.fair_method = fair_method
        self.fair_top_m = fair_top_m
        self.init_model = init_model
        self.random_state = random_state
        self.device = device
        self.verbose = verbose


# ----------------------------------------------------------------------------- centroid family

class _CentroidBased(_DeepClusterer):
    _family = "centroid"
    _fairoids = False

    def _latent(self) -> int:
        return self.n_clusters if self.latent_dim is None else int(self.latent_dim)

    def _make_model(self, encoder):
        from dist_fair.models.deep_clustering import DECModel, FairoidsModel

        if self._fairoids:
            return FairoidsModel(encoder, self.n_clusters, self._latent(), num_groups=len(self.group_values_),
                                 rho=self._rho_vector())
        return DECModel(encoder, self.n_clusters, self._latent())

    def _kmeans_init(self, model, data) -> None:
        import torch
        from sklearn.cluster import KMeans

        model.eval()
        with torch.no_grad():
            codes = torch.cat([model.encode(data[s: s + 4096].to(self._device_)).float().cpu()
                               for s in range(0, data.shape[0], 4096)]).numpy()
        km = KMeans(self.n_clusters, n_init=self.kmeans_n_init, random_state=self.random_state).fit(codes)
        model.set_centroids(km.cluster_centers_)

    def _initial_model(self, data):
        """(model, pretrained_clustering): from init_model, a pre-trained autoencoder, or from scratch."""
        from dist_fair.models.deep_clustering import Autoencoder

        source = self.init_model
        if source is not None and not isinstance(source, Autoencoder):
            src_model = getattr(source, "model_", None)
            if src_model is None or getattr(src_model, "family", None) != "centroid":
                raise ConfigError(f"{type(self).__name__}(init_model=...) takes a fitted DEC, FairDEC or Fairoids "
                                  f"estimator or a pre-trained Autoencoder, got {type(source).__name__}")
            if getattr(source, "input_shape_", None) != self.input_shape_ or src_model.n_clusters != self.n_clusters:
                raise ConfigError("init_model was fitted on samples of another shape or with another n_clusters")
            model = self._make_model(copy.deepcopy(src_model.encoder))
            model.set_centroids(src_model.centroids.detach().cpu())
            return model.to(self._device_), True
        if source is None:
            autoencoder = pretrain_autoencoder(data, self._latent(), self.ae_hidden, epochs=self.ae_epochs,
                                               batch_size=self.batch_size, lr=self.ae_lr, seed=self.random_state,
                                               device=str(self._device_), verbose=self.verbose)
            self.history_.extend(autoencoder.history)
        else:
            autoencoder = source
            if autoencoder.in_dim != self.n_features_in_ or autoencoder.latent_dim != self._latent():
                raise ConfigError(f"init_model: the autoencoder maps {autoencoder.in_dim} -> {autoencoder.latent_dim}, "
                                  f"this fit needs {self.n_features_in_} -> {self._latent()}")
        model = self._make_model(copy.deepcopy(autoencoder.encoder)).to(self._device_)
        self._kmeans_init(model, data)
        return model, False

    def _fit(self, data, codes: np.ndarray | None, y: np.ndarray | None) -> None:
        import torch

        from dist_fair.losses.deep_clustering import (dec_kl_loss, dec_target_distribution, fair_cross_entropy,
                                                      fairoid_loss)

        dev = self._device_
        model, warm = self._initial_model(data)
        self.model_ = model
        optimizer = self._optimizer(model.parameters(), self.lr)
        phases: list[tuple[str, int]] = []
        if self._fair_training:
            phases = [("pretrain", 0 if warm else self.pretrain_epochs), ("fair", self.epochs)]
        else:
            phases = [("fairoids" if self._fairoids else "train", self.epochs)]
        group_t = None if codes is None else torch.from_numpy(codes)
        rho = getattr(model, "rho", None)
        q_all = predict_probs(model, data, dev)
        fair_np = None
        if self._fair_training and phases[0][1] == 0 and self.epochs:
            fair_np, _ = self._fair(q_all, codes)
        for phase, count in phases:
            for epoch in range(count):
                # DEC: the target P over ALL samples from the current Q; Fair-DEC: the fair
                # assignment of ALL samples from the same Q (computed after the previous epoch)
                target = dec_target_distribution(torch.from_numpy(q_all).double()).float()
                fair_t = torch.from_numpy(fair_np) if phase == "fair" else None
                start = time.perf_counter()
                model.train()
                sums = {"loss": 0.0, "loss_kl": 0.0, "loss_fair": 0.0}
                for idx in _batches(data.shape[0], self.batch_size, self._rng):
                    xb = data[idx].to(dev)
                    z, q = model(xb)
                    kl = dec_kl_loss(target[idx].to(dev), q)
                    fair = torch.zeros(())
                    if fair_t is not None:
                        fair = fair_cross_entropy(q, fair_t[idx].to(dev), from_logits=False)
                    elif phase == "fairoids":
                        fair, _ = fairoid_loss(z.float(), q, group_t[idx].to(dev), model.num_groups, rho=rho)
                    loss = kl + self.beta * fair if phase in ("fair", "fairoids") else kl
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    for key, value in (("loss", loss), ("loss_kl", kl), ("loss_fair", fair)):
                        sums[key] += float(value.detach()) * len(idx)
                seconds = time.perf_counter() - start
                previous = q_all.argmax(axis=1)
                q_all = predict_probs(model, data, dev)
                report = None
                needs_fair = codes is not None  # recorded every epoch; Fair-DEC's next pseudo-labels
                if needs_fair:
                    fair_np, report = self._fair(q_all, codes)
                self._record(phase, epoch, sums, data.shape[0], seconds, q_all, codes, y,
                             fair_np if needs_fair else None, report)
                changed = float((q_all.argmax(axis=1) != previous).mean())
                if phase == "train" and self.tol > 0 and changed < self.tol:
                    LOG.info("%s: %.3f%% of labels changed in epoch %d (< tol %.3f%%); stopping", type(self).__name__,
                             100 * changed, epoch, 100 * self.tol)
                    break
        self._final_fair = (q_all, fair_np) if codes is not None else None

    @property
    def cluster_centers_(self) -> np.ndarray:
        """The centroids ``mu`` ``[K, z]`` in the latent space."""
        self._check_fitted()
        return self.model_.centroids.detach().cpu().numpy()

    def transform(self, X: Any) -> np.ndarray:
        """Latent codes ``z = encoder(x)`` ``[N, z]``."""
        import torch

        self._check_fitted()
        data = self._inputs(X)
        self.model_.eval()
        with torch.no_grad():
            return torch.cat([self.model_.encode(data[s: s + 4096].to(self._device_)).float().cpu()
                              for s in range(0, data.shape[0], 4096)]).numpy()


_CENTROID_ARGS_DOC = """
    Args:
        n_clusters: K.
        latent_dim: code size (default K, as DEC).
        ae_hidden: autoencoder widths (DEC: 500, 500, 2000).
        ae_epochs, ae_lr: autoencoder pre-training (Adam, mean squared error).
        epochs, batch_size, lr: clustering phase (Adam).
        alpha: weight decay; kmeans_n_init: k-means restarts for the centroids.
        tol: DEC stops when fewer than this fraction of labels changed in an epoch (0: never).
        fair_assign, rho, fair_eps, fair_method, fair_top_m: the fair assignment of METHODS.md §6.
        init_model: a pre-trained Autoencoder or a fitted DEC-family estimator to start from.
        random_state, device, verbose.
"""


class DEC(_CentroidBased):
    """Deep Embedded Clustering (Xie et al. 2016; METHODS.md §5): autoencoder ``d-500-500-2000-K``
    pre-trained on reconstruction, centroids from k-means on the codes, then ``KL(P || Q)`` with the
    Student-t assignment ``Q`` and the sharpened target ``P`` (recomputed over all samples each epoch).
    """ + _CENTROID_ARGS_DOC

    def __init__(self, n_clusters: int = 10, latent_dim: int | None = None, ae_hidden: Sequence[int] = (500, 500, 2000),
                 ae_epochs: int = 50, ae_lr: float = 1e-3, epochs: int = 30, batch_size: int = 256, lr: float = 1e-4,
                 alpha: float = 0.0, kmeans_n_init: int = 10, tol: float = 0.001,
                 fair_assign: Callable[..., Any] | None = None, rho: Any = None, fair_eps: float = 0.0,
                 fair_method: str = "auto", fair_top_m: int | None = None, init_model: Any = None,
                 random_state: int = 0, device: str = "cpu", verbose: bool = False) -> None:
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.ae_hidden = ae_hidden
        self.ae_epochs = ae_epochs
        self.ae_lr = ae_lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.alpha = alpha
        self.kmeans_n_init = kmeans_n_init
        self.tol = tol
        self.fair_assign = fair_assign
        self.rho = rho
        self.fair_eps = fair_eps
        self.fair_method = fair_method
        self.fair_top_m = fair_top_m
        self.init_model = init_model
        self.random_state = random_state
        self.device = device
        self.verbose = verbose


class FairDEC(_CentroidBased):
    """Fair-DEC (dissertation §6.4.4; METHODS.md §5): DEC for ``pretrain_epochs`` (skipped when
    ``init_model`` is a fitted DEC), then ``epochs`` epochs of ``KL(P || Q) + beta L_Fair`` with
    ``L_Fair = -mean_i log q_{i, y_hat_i}`` and the fair assignment ``y_hat`` of all samples
    recomputed from ``Q`` before each epoch. ``fit(X, groups)`` needs the protected attribute.
    """ + _CENTROID_ARGS_DOC + """        pretrain_epochs: DEC epochs before the fair ones; beta: fairness weight.
"""

    _fair_training = True
    _needs_groups = True

    def __init__(self, n_clusters: int = 10, latent_dim: int | None = None, ae_hidden: Sequence[int] = (500, 500, 2000),
                 ae_epochs: int = 50, ae_lr: float = 1e-3, pretrain_epochs: int = 20, epochs: int = 30,
                 batch_size: int = 256, lr: float = 1e-4, beta: float = 4.0, alpha: float = 0.0, kmeans_n_init: int = 10,
                 tol: float = 0.0, fair_assign: Callable[..., Any] | None = None, rho: Any = None,
                 fair_eps: float = 0.0, fair_method: str = "auto", fair_top_m: int | None = None,
                 init_model: Any = None, random_state: int = 0, device: str = "cpu", verbose: bool = False) -> None:
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.ae_hidden = ae_hidden
        self.ae_epochs = ae_epochs
        self.ae_lr = ae_lr
        self.pretrain_epochs = pretrain_epochs
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.beta = beta
        self.alpha = alpha
        self.kmeans_n_init = kmeans_n_init
        self.tol = tol
        self.fair_assign = fair_assign
        self.rho = rho
        self.fair_eps = fair_eps
        self.fair_method = fair_method
        self.fair_top_m = fair_top_m
        self.init_model = init_model
        self.random_state = random_state
        self.device = device
        self.verbose = verbose


class Fairoids(_CentroidBased):
    """Fairoids (the multi-state seed; METHODS.md §5): DEC's autoencoder and centroids, trained on
    ``KL(P || Q) + beta KL(S || R)``: ``R`` softly assigns each cluster to the fairoids (group means
    of the codes) by a Student-t kernel on their MMD, ``S`` smooths ``R`` towards the target shares
    ``rho`` (uniform by default); see :func:`dist_fair.losses.deep_clustering.fairoid_loss`.
    ``fit(X, groups)`` needs the protected attribute.
    """ + _CENTROID_ARGS_DOC + """        beta: weight of the fairness KL (the seed's lambda).
"""

    _needs_groups = True
    _fairoids = True

    def __init__(self, n_clusters: int = 10, latent_dim: int | None = None, ae_hidden: Sequence[int] = (500, 500, 2000),
                 ae_epochs: int = 50, ae_lr: float = 1e-3, epochs: int = 30, batch_size: int = 256, lr: float = 1e-4,
                 beta: float = 1.0, alpha: float = 0.0, kmeans_n_init: int = 10, tol: float = 0.0,
                 fair_assign: Callable[..., Any] | None = None, rho: Any = None, fair_eps: float = 0.0,
                 fair_method: str = "auto", fair_top_m: int | None = None, init_model: Any = None,
                 random_state: int = 0, device: str = "cpu", verbose: bool = False) -> None:
        self.n_clusters = n_clusters
        self.latent_dim = latent_dim
        self.ae_hidden = ae_hidden
        self.ae_epochs = ae_epochs
        self.ae_lr = ae_lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.beta = beta
        self.alpha = alpha
        self.kmeans_n_init = kmeans_n_init
        self.tol = tol
        self.fair_assign = fair_assign
        self.rho = rho
        self.fair_eps = fair_eps
        self.fair_method = fair_method
        self.fair_top_m = fair_top_m
        self.init_model = init_model
        self.random_state = random_state
        self.device = device
        self.verbose = verbose
