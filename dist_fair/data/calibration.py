"""Calibrating the synthetic face generator on real embeddings (METHODS.md §2; issue 14).

What is matched, per protected group t (e.g. gender) of a labelled reference set (rows with an
unknown group or identity are dropped first; an identity is a (person, group) pair):

- ``S_t``: the cosine similarity of every same-identity pair (i < j) - each pair counts once, as in
  pairwise F (METHODS.md §7), so people with many images weigh more;
- ``M_t``: per sample, its nearest different-identity similarity ``max_{j: id_j != id_i} x_i . x_j``
  over ALL reference samples of other identities (any group), computed exactly by numpy matrix
  products in row blocks (O(N^2 d) time, O(block N) memory: a reference of LFW's size takes a second);
- ``n_t``: the images-per-identity table (count -> number of people, single-image people included);
- ``r``: the mean over group pairs of ``cos(m_t, m_t')``, m_t the mean embedding of group t;
- ``P``: the participation ratio ``(tr C)^2 / tr(C^2)`` of the covariance C of the identity means
  (identities with >= 2 images, each group's mean of them subtracted): how many directions the
  identities really spread over (LFW's dlib descriptors: far fewer than 128). Scale-free, so it
  does not depend on the crowding; it sets how fast near impostors thin out (reported: the medians
  ``M^(j)`` of the j-th nearest different-identity similarity, j = 1, 2, 5, 10).

The generative model (the one :mod:`dist_fair.data.synthetic` draws from; ``d`` = dimension):

- group mean directions ``mu_t = sqrt(r) e_0 + sqrt(1 - r) e_{1+t}``, e orthonormal, so
  ``mu_t . mu_t' = r``;
- identity c of group t: ``centre_c = normalise(kappa_t mu_t + u_c)``, u_c uniform on the unit
  sphere of a random m-dimensional subspace (``identity_dim`` m <= d);
  ``kappa_t`` (crowding) sets how close the group's identities sit: centre cosines are about
  ``kappa^2 / (1 + kappa^2)`` give or take ``1 / ((1 + kappa^2) sqrt(d))``;
- image i: ``x_i = normalise(centre_c + s_i g_i / sqrt(d))``, g_i ~ N(0, I_d),
  ``s_i = spread_t * exp(dispersion_t * z_i)``, z_i ~ N(0, 1); the cosine of two images of one
  identity is about ``1 / sqrt((1 + s_i^2)(1 + s_j^2))``;
- images per identity: stratified quantiles of ``n_t``.

Identifiability and the fit (all searches use fixed random numbers, so the objectives are
deterministic):

1. ``(spread_t, dispersion_t)`` from ``S_t`` alone. By rotation invariance of g, the cosine of two
   images of one identity does not depend on the centre, hence not on kappa, r or d's other
   parameters: simulate ``P`` pairs ``normalise(e_1 + s_a g_a / sqrt(d))`` . ``normalise(e_1 + s_b
   g_b / sqrt(d))`` and minimise ``sum_p (Q_p(sim) - Q_p(S_t))^2`` over the percentiles
   p = 5, 10, ..., 95 by Nelder-Mead in ``(log spread, log dispersion)`` (median <-> spread,
   width <-> dispersion), started at ``spread = sqrt(1 / median - 1)``.
2. ``m``, ``kappa_t`` and ``r`` from P, ``M_t`` and the group-mean cosine, given step 1: a
   *replica* of the reference - the same groups and the same images per identity, drawn from the
   model at dimension d - is simulated. (a) log m ([log 2, log d], m rounded) is bisected on the
   sign of ``P^replica - P^reference`` with kappa and r held: P is scale-free, so the crowding moves
   it only through the ratio of image noise to identity spread. (b) With m held, every
   ``kappa_t`` (log space, [0.02, 50]) and r ([0, 0.999]) is bisected at once on the sign of
   ``mean_p (Q_p(M_t^replica) - Q_p(M_t))`` and of ``r^replica - r^reference``: impostor
   similarities sit around ``kappa^2 / (1 + kappa^2)`` and fluctuate like
   ``1 / ((1 + kappa^2) sqrt(m))``, so M_t rises with kappa_t; the group-mean cosine rises with
   r; the groups are only weakly coupled (a group's nearest impostor is rarely in another group).
   (a) and (b) alternate for ``ROUNDS`` rounds, later rounds in brackets narrowed around the
   previous answer (m x/ 2, kappa x/ 1.3, r +- 0.03).

Because ``M_t`` grows with the number of impostors, kappa is an intrinsic parameter only through
the replica: generating at another size keeps kappa and lets the nearest-impostor similarity move
as it would for more (or fewer) people. The fitted values depend on d (image noise and the
impostor fluctuations scale with it), so a preset stores one fit per dimension.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize

from dist_fair.data.synthetic import identity_basis, identity_images, world_means
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

#: Percentiles matched by the fit.
FIT_PERCENTILES = tuple(range(5, 96, 5))
#: Percentiles reported (and checked by the tests).
REPORT_QUANTILES = (5, 25, 50, 75, 95)
KAPPA_RANGE = (0.02, 50.0)
COSINE_RANGE = (0.0, 0.999)
#: Rounds of (a) the identity_dim bisection and (b) the joint crowding / group-cosine bisection; later
#: rounds search brackets narrowed around the previous answer.
ROUNDS = 2


# --------------------------------------------------------------------------- statistics

def same_identity_similarities(emb: np.ndarray, identity: np.ndarray) -> np.ndarray:
    """Cosine of every same-identity pair (i < j), float64 of float32 products (``emb`` unit rows)."""
    order = np.argsort(identity, kind="stable")
    ids = identity[order]
    bounds = np.flatnonzero(np.diff(ids)) + 1
    parts = []
    for rows in np.split(order, bounds):
        if rows.size > 1:
            block = np.asarray(emb[rows], np.float32)
            sims = block @ block.T
            parts.append(sims[np.triu_indices(rows.size, 1)].astype(np.float64))
    return np.concatenate(parts) if parts else np.zeros(0)


def nearest_impostors(emb: np.ndarray, identity: np.ndarray, k: int = 1, block: int = 2048) -> np.ndarray:
    """Per sample, its ``k`` largest different-identity similarities in decreasing order (``-inf``
    where there are fewer); exact up to float32 rounding, O(block N) memory."""
    x = np.ascontiguousarray(emb, np.float32)
    k = min(k, x.shape[0])
    out = np.empty((x.shape[0], k), np.float64)
    for start in range(0, x.shape[0], block):
        sims = x[start:start + block] @ x.T
        sims[identity[start:start + block, None] == identity[None, :]] = -np.inf
        if k == 1:
            out[start:start + block, 0] = sims.max(axis=1)
        else:
            top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
            out[start:start + block] = -np.sort(-top, axis=1)
    return out


def nearest_impostor_similarities(emb: np.ndarray, identity: np.ndarray, block: int = 2048) -> np.ndarray:
    """Per sample, ``max_{j: id_j != id_i} x_i . x_j`` (``-inf`` when every sample shares its identity)."""
    return nearest_impostors(emb, identity, 1, block)[:, 0]


#: The impostor ranks j whose medians of M^(j) are reported.
IMPOSTOR_RANKS = (1, 2, 5, 10)


def identity_participation_ratio(emb: np.ndarray, identity: np.ndarray, groups: np.ndarray) -> float:
    """``P = (tr C)^2 / tr(C^2)``, C the covariance of the means of identities with >= 2 images, each
    group's mean of those means subtracted (scale-free: an isotropic spread over m directions gives m)."""
    ids, inverse, counts = np.unique(identity, return_inverse=True, return_counts=True)
    sums = np.zeros((ids.size, emb.shape[1]))
    np.add.at(sums, inverse, np.asarray(emb, np.float64))
    group_of = np.zeros(ids.size, np.int64)
    group_of[inverse] = groups
    keep = counts >= 2
    means, group_of = sums[keep] / counts[keep, None], group_of[keep]
    for t in np.unique(group_of):
        means[group_of == t] -= means[group_of == t].mean(axis=0)
    cov = means.T @ means
    return float(np.trace(cov) ** 2 / np.square(cov).sum())


def mean_group_cosine(emb: np.ndarray, groups: np.ndarray, num_groups: int) -> float | None:
    """Mean over group pairs of the cosine between the groups' mean embeddings (None for one group)."""
    if num_groups < 2:
        return None
    means = np.stack([np.asarray(emb[groups == t], np.float64).mean(axis=0) for t in range(num_groups)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    cos = means @ means.T
    return float(cos[np.triu_indices(num_groups, 1)].mean())


def images_table(identity: np.ndarray) -> tuple[list[int], list[int]]:
    """``(counts, people)``: how many identities have each number of images."""
    _, per_identity = np.unique(identity, return_counts=True)
    counts, people = np.unique(per_identity, return_counts=True)
    return counts.tolist(), people.tolist()


@dataclass
class Reference:
    """A labelled reference set reduced to what the fit needs (rows of known group and identity)."""

    names: list[str]
    emb: np.ndarray              # (N, d) float32, unit rows
    identity: np.ndarray         # (N,) dense codes of (person, group)
    groups: np.ndarray           # (N,) 0..T-1
    same: list[np.ndarray] = field(default_factory=list)      # per group, S_t
    impostor: list[np.ndarray] = field(default_factory=list)  # per group, M_t
    group_cosine: float | None = None
    impostor_ranks: list[float] = field(default_factory=list)  # medians of M^(j), j in IMPOSTOR_RANKS
    participation: float = 0.0
    dropped_rows: int = 0

    @property
    def num_groups(self) -> int:
        return len(self.names)

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Per identity (in code order): its group and its number of images."""
        counts = np.bincount(self.identity)
        group_of = np.zeros(counts.size, np.int64)
        group_of[self.identity] = self.groups
        return group_of, counts


def prepare_reference(emb: np.ndarray, identity: np.ndarray, groups: np.ndarray, names: Sequence[str]) -> Reference:
    """Drop rows with unknown group (< 0) or identity (< 0), L2-normalise, code identities as
    (person, group) and compute S_t, M_t and the group-mean cosine."""
    emb = np.asarray(emb)
    identity, groups = np.asarray(identity, np.int64), np.asarray(groups, np.int64)
    if emb.ndim != 2 or emb.shape[0] != identity.shape[0] or identity.shape != groups.shape:
        raise DataError(f"reference: embeddings {emb.shape}, identities {identity.shape} and groups {groups.shape} "
                        "must have one row per sample")
    if groups.size and groups.max() >= len(names):
        raise DataError(f"reference: group code {groups.max()} has no name (names {list(names)})")
    keep = (groups >= 0) & (identity >= 0)
    x = np.asarray(emb[keep], np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise DataError("reference: an embedding has zero norm or a non-finite value; remove that sample")
    x = (x / norms).astype(np.float32)
    pairs = identity[keep] * len(names) + groups[keep]
    _, codes = np.unique(pairs, return_inverse=True)
    ref = Reference(names=list(names), emb=x, identity=codes.astype(np.int64), groups=groups[keep],
                    dropped_rows=int((~keep).sum()))
    top = nearest_impostors(ref.emb, ref.identity, IMPOSTOR_RANKS[-1])
    impostor = top[:, 0]
    ref.impostor_ranks = _rank_medians(top)
    ref.participation = identity_participation_ratio(ref.emb, ref.identity, ref.groups)
    for t, name in enumerate(ref.names):
        rows = ref.groups == t
        n_ids = np.unique(ref.identity[rows]).size
        same = same_identity_similarities(ref.emb[rows], ref.identity[rows])
        if n_ids < 2 or same.size == 0:
            raise DataError(f"reference group {name!r} has {n_ids} identities and {same.size} same-identity pairs; "
                            "the fit needs at least 2 identities and 1 pair per group (merge or drop the group)")
        if not np.all(np.isfinite(impostor[rows])):
            raise DataError(f"reference group {name!r}: a sample has no sample of another identity")
        ref.same.append(same)
        ref.impostor.append(impostor[rows])
    ref.group_cosine = mean_group_cosine(ref.emb, ref.groups, ref.num_groups)
    LOG.info("reference: %d samples, %d identities, groups %s (%d rows of unknown group/identity dropped)",
             ref.emb.shape[0], np.unique(ref.identity).size, ref.names, ref.dropped_rows)
    return ref


def _rank_medians(top: np.ndarray) -> list[float]:
    return [round(float(np.median(top[:, j - 1])), 4) for j in IMPOSTOR_RANKS]


# --------------------------------------------------------------------------- simulation

def simulate_same_pairs(spread: float, dispersion: float, dim: int, pairs: int = 20000, seed: int = 0,
                        draws: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Cosines of ``pairs`` same-identity image pairs of the model (centre e_1, see step 1)."""
    gauss, z = draws if draws is not None else same_pair_draws(dim, pairs, seed)
    scale = (spread * np.exp(dispersion * z) / np.sqrt(dim)).astype(np.float32)
    x = gauss * scale[..., None]
    x[..., 0] += 1.0
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    return (x[0] * x[1]).sum(axis=1, dtype=np.float64)


def same_pair_draws(dim: int, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 23, dim])
    return rng.standard_normal((2, pairs, dim), dtype=np.float32), rng.standard_normal((2, pairs))


def replica(group_of: np.ndarray, counts: np.ndarray, crowding: Sequence[float], spread: Sequence[float],
            dispersion: Sequence[float], group_cosine: float, dim: int, seed: int = 0,
            identity_dim: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings, identity and group of a model draw with the given per-identity plan (the same
    per-identity random streams as the generator: ``(seed, 13, identity)``)."""
    means = world_means(seed, dim, len(crowding), group_cosine)
    basis = identity_basis(seed, dim, identity_dim)
    embs = [identity_images(np.random.default_rng([seed, 13, j]), means[t], crowding[t], spread[t], dispersion[t],
                            int(n), basis) for j, (t, n) in enumerate(zip(group_of.tolist(), counts.tolist()))]
    identity = np.repeat(np.arange(counts.size), counts)
    return np.concatenate(embs), identity, np.repeat(group_of, counts)


# --------------------------------------------------------------------------- fitting

def fit_spread(target: np.ndarray, dim: int, pairs: int = 20000, seed: int = 0) -> tuple[float, float, float]:
    """Step 1: ``(spread, dispersion, rms)`` matching the FIT_PERCENTILES of the same-identity
    similarities ``target`` (rms = root mean square percentile error)."""
    goal = np.percentile(target, FIT_PERCENTILES)
    draws = same_pair_draws(dim, pairs, seed)

    def loss(params: np.ndarray) -> float:
        sims = simulate_same_pairs(np.exp(params[0]), np.exp(params[1]), dim, draws=draws)
        return float(np.square(np.percentile(sims, FIT_PERCENTILES) - goal).sum())

    median = float(np.clip(np.median(target), 0.01, 0.999))
    start = np.array([np.log(np.sqrt(1.0 / median - 1.0)), np.log(0.2)])
    result = minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-10, "maxiter": 400})
    spread, dispersion = float(np.exp(result.x[0])), float(np.exp(result.x[1]))
    if dispersion < 1e-3:
        dispersion = 0.0
    return spread, dispersion, float(np.sqrt(result.fun / len(FIT_PERCENTILES)))


@dataclass
class GroupFit:
    name: str
    crowding: float
    spread: float
    dispersion: float
    identities: int
    samples: int
    same_pairs: int
    images: tuple[list[int], list[int]]
    same_real: list[float]
    same_fit: list[float]
    impostor_real: list[float]
    impostor_fit: list[float]

    def max_error(self) -> float:
        return float(max(np.max(np.abs(np.subtract(self.same_real, self.same_fit))),
                         np.max(np.abs(np.subtract(self.impostor_real, self.impostor_fit)))))


@dataclass
class DimFit:
    dim: int
    group_cosine: float
    group_cosine_real: float | None
    group_cosine_fit: float | None
    groups: list[GroupFit]
    identity_dim: int | None = None
    participation_real: float = 0.0
    participation_fit: float = 0.0
    impostor_ranks_real: list[float] = field(default_factory=list)
    impostor_ranks_fit: list[float] = field(default_factory=list)

    def by_name(self) -> dict[str, GroupFit]:
        return {g.name: g for g in self.groups}


def _quantiles(values: np.ndarray, percentiles: Sequence[int] = REPORT_QUANTILES) -> list[float]:
    return [round(float(v), 4) for v in np.percentile(values, percentiles)]


def fit_dimension(ref: Reference, dim: int, seed: int = 0, pairs: int = 20000, iterations: int = 12,
                  fit_identity_dim: bool = True) -> DimFit:
    """Steps 1 and 2 of the module docstring at dimension ``dim`` (``fit_identity_dim=False``: m = d,
    identity directions uniform on the whole sphere)."""
    group_of, counts = ref.plan()
    spreads, dispersions = [], []
    for t, name in enumerate(ref.names):
        spread, dispersion, rms = fit_spread(ref.same[t], dim, pairs, seed)
        LOG.info("dim %d group %s: spread %.4f dispersion %.4f (same-identity percentile rms %.4f)",
                 dim, name, spread, dispersion, rms)
        spreads.append(spread)
        dispersions.append(dispersion)
    goals = [np.percentile(m, FIT_PERCENTILES) for m in ref.impostor]
    fit_cosine = ref.group_cosine is not None
    kappa = np.full(ref.num_groups, 2.0)
    r = 0.5 if fit_cosine else 0.0
    m = max(2, dim // 4) if fit_identity_dim else None

    def draw(kappa_: np.ndarray, r_: float, m_: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return replica(group_of, counts, kappa_, spreads, dispersions, r_, dim, seed, m_)

    for round_ in range(ROUNDS):
        # (a) m from P, crowding and r held: P is scale-free, so it barely depends on them
        if fit_identity_dim:
            m_lo, m_hi = ((np.log(2.0), np.log(float(dim))) if round_ == 0 else
                          (max(np.log(2.0), np.log(m) - np.log(2.0)), min(np.log(float(dim)), np.log(m) + np.log(2.0))))
            for _ in range(iterations):
                m = int(np.clip(round(float(np.exp((m_lo + m_hi) / 2))), 2, dim))
                emb, identity, groups = draw(kappa, r, m)
                if identity_participation_ratio(emb, identity, groups) < ref.participation:
                    m_lo = np.log(m)
                else:
                    m_hi = np.log(m)
            m = int(np.clip(round(float(np.exp((m_lo + m_hi) / 2))), 2, dim))
        # (b) every kappa_t and r at once, m held (the groups are only weakly coupled)
        if round_ == 0:
            lo, hi = np.full(ref.num_groups, np.log(KAPPA_RANGE[0])), np.full(ref.num_groups, np.log(KAPPA_RANGE[1]))
            r_lo, r_hi = COSINE_RANGE
        else:
            lo, hi = np.log(kappa) - np.log(1.3), np.log(kappa) + np.log(1.3)
            r_lo, r_hi = max(COSINE_RANGE[0], r - 0.03), min(COSINE_RANGE[1], r + 0.03)
        for step in range(iterations):
            kappa = np.exp((lo + hi) / 2)
            r = (r_lo + r_hi) / 2 if fit_cosine else 0.0
            emb, identity, groups = draw(kappa, r, m)
            impostor = nearest_impostor_similarities(emb, identity)
            for t in range(ref.num_groups):
                above = np.mean(np.percentile(impostor[groups == t], FIT_PERCENTILES) - goals[t]) > 0
                hi[t], lo[t] = (np.log(kappa[t]), lo[t]) if above else (hi[t], np.log(kappa[t]))
            if fit_cosine:
                if mean_group_cosine(emb, groups, ref.num_groups) > ref.group_cosine:
                    r_hi = r
                else:
                    r_lo = r
            LOG.debug("dim %d round %d step %d: crowding %s, r %.4f, identity_dim %s", dim, round_, step,
                      np.round(kappa, 4), r, m)
        kappa = np.exp((lo + hi) / 2)
        r = (r_lo + r_hi) / 2 if fit_cosine else 0.0
    emb, identity, groups = replica(group_of, counts, kappa, spreads, dispersions, r, dim, seed, m)
    top = nearest_impostors(emb, identity, IMPOSTOR_RANKS[-1])
    impostor = top[:, 0]
    fits = []
    for t, name in enumerate(ref.names):
        rows = groups == t
        same = same_identity_similarities(emb[rows], identity[rows])
        real_rows = ref.groups == t
        fits.append(GroupFit(
            name=name, crowding=round(float(kappa[t]), 5), spread=round(spreads[t], 5),
            dispersion=round(dispersions[t], 5), identities=int(np.unique(ref.identity[real_rows]).size),
            samples=int(real_rows.sum()), same_pairs=int(ref.same[t].size),
            images=images_table(ref.identity[real_rows]), same_real=_quantiles(ref.same[t]), same_fit=_quantiles(same),
            impostor_real=_quantiles(ref.impostor[t]), impostor_fit=_quantiles(impostor[rows])))
        LOG.info("dim %d group %s: crowding %.4f; max quantile error %.4f", dim, name, kappa[t], fits[-1].max_error())
    participation = identity_participation_ratio(emb, identity, groups)
    LOG.info("dim %d: identity_dim %s (participation ratio %.2f, reference %.2f), impostor-rank medians %s "
             "(reference %s)", dim, m, participation, ref.participation, _rank_medians(top), ref.impostor_ranks)
    return DimFit(dim=dim, group_cosine=round(float(r), 5), group_cosine_real=ref.group_cosine,
                  group_cosine_fit=mean_group_cosine(emb, groups, ref.num_groups), groups=fits, identity_dim=m,
                  participation_real=round(ref.participation, 3), participation_fit=round(participation, 3),
                  impostor_ranks_real=list(ref.impostor_ranks), impostor_ranks_fit=_rank_medians(top))


def calibrate(emb: np.ndarray, identity: np.ndarray, groups: np.ndarray, names: Sequence[str],
              dims: Sequence[int] | None = None, seed: int = 0, pairs: int = 20000,
              iterations: int = 12, fit_identity_dim: bool = True) -> dict[int, DimFit]:
    """The fit at every dimension of ``dims`` (default: the reference's own dimension)."""
    ref = prepare_reference(emb, identity, groups, names)
    dims = list(dims or [ref.emb.shape[1]])
    return {int(d): fit_dimension(ref, int(d), seed, pairs, iterations, fit_identity_dim) for d in dims}


# --------------------------------------------------------------------------- presets

def identity_shares(fit: DimFit) -> dict[str, float]:
    total = sum(g.identities for g in fit.groups)
    return {g.name: g.identities / total for g in fit.groups}


def preset_from_fits(fits: dict[int, DimFit], name: str, attribute: str, reference: str,
                     default_dim: int | None = None) -> dict[str, Any]:
    """A preset (see :mod:`dist_fair.data.presets`) whose tables are keyed by the fitted groups' names
    (genders or races of the generator), with the fit report under ``calibration``."""
    from dist_fair.data.synthetic import GENDERS, RACES

    first = fits[min(fits)]
    names = [g.name for g in first.groups]
    expected = GENDERS if attribute == "gender" else RACES
    if sorted(names) != sorted(expected):
        raise DataError(f"a preset fitted on {attribute!r} needs the groups {expected}, the reference has {names}; "
                        "rename groups to the generator's names (--rename) or calibrate on another attribute")
    preset: dict[str, Any] = {"name": name, "default_dim": int(default_dim or min(fits)), "dims": {}}
    for dim, fit in sorted(fits.items()):
        preset["dims"][int(dim)] = {
            "crowding": {g.name: g.crowding for g in fit.groups},
            "spread": {g.name: g.spread for g in fit.groups},
            "dispersion": {g.name: g.dispersion for g in fit.groups},
            "group_cosine": fit.group_cosine,
            "identity_dim": fit.identity_dim,
        }
    shares = identity_shares(first)
    if attribute == "gender":
        preset["gender_mix"] = {k: round(v, 9) for k, v in shares.items()}
    else:
        preset["mix"] = {k: round(v, 9) for k, v in shares.items()}
    preset["images_table"] = {g.name: {"counts": g.images[0], "people": g.images[1]} for g in first.groups}
    preset["calibration"] = calibration_report(fits, attribute, reference)
    return preset


def calibration_report(fits: dict[int, DimFit], attribute: str, reference: str) -> dict[str, Any]:
    """The fit's numbers: per dim and group, real vs fitted REPORT_QUANTILES of S_t and M_t."""
    return {
        "reference": reference, "attribute": attribute, "quantiles": list(REPORT_QUANTILES),
        "fits": {int(dim): {
            "group_cosine_real": None if fit.group_cosine_real is None else round(fit.group_cosine_real, 5),
            "group_cosine_fit": None if fit.group_cosine_fit is None else round(fit.group_cosine_fit, 5),
            "identity_dim": fit.identity_dim, "participation_ratio_real": fit.participation_real,
            "participation_ratio_fit": fit.participation_fit, "impostor_ranks": list(IMPOSTOR_RANKS),
            "impostor_rank_medians_real": fit.impostor_ranks_real,
            "impostor_rank_medians_fit": fit.impostor_ranks_fit,
            "groups": {g.name: {"identities": g.identities, "samples": g.samples, "same_pairs": g.same_pairs,
                                "same_identity_real": g.same_real, "same_identity_fit": g.same_fit,
                                "nearest_impostor_real": g.impostor_real, "nearest_impostor_fit": g.impostor_fit,
                                "max_quantile_error": round(g.max_error(), 4)}
                       for g in fit.groups}} for dim, fit in sorted(fits.items())},
    }


def preset_yaml(preset: dict[str, Any], comments: dict[str, Sequence[str]] | None = None,
                header: Sequence[str] = ()) -> str:
    """YAML text of a preset, each top-level key preceded by its comment lines."""
    import yaml

    lines = [f"# {line}".rstrip() for line in header]
    for key, value in preset.items():
        for line in (comments or {}).get(key, ()):
            lines.append(f"# {line}".rstrip())
        flow = None if isinstance(value, (dict, list)) else False
        lines.append(yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=flow, width=110).rstrip())
    return "\n".join(lines) + "\n"


__all__ = ["FIT_PERCENTILES", "REPORT_QUANTILES", "IMPOSTOR_RANKS", "same_identity_similarities",
           "nearest_impostors", "nearest_impostor_similarities", "identity_participation_ratio",
           "mean_group_cosine", "images_table", "Reference", "prepare_reference", "simulate_same_pairs", "replica",
           "fit_spread", "GroupFit", "DimFit", "fit_dimension", "calibrate", "preset_from_fits",
           "calibration_report", "preset_yaml"]
