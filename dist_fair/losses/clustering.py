"""Losses of the transformer clusterers (METHODS.md §4): soft Fowlkes-Mallows, purity, the purity
penalty (upper-bound form with a global ``gamma_f``, and the group-aware form) and BCE.

Notation, per anchor i of a batch and token j of its sequence: ``p_ij`` the predicted probability
that neighbour j has the anchor's identity, ``t_ij`` in {0, 1} the ground truth and ``m_ij`` in
{0, 1} whether the token counts (a neighbour that exists and whose identity is known; the anchor's
own token, ``t_i0 = 1``, counts). All sums over j run over counted tokens, and every mean over
anchors i (including ``gamma_f`` and the group means) runs over the anchors with at least one
counted token: an anchor whose identity is unknown has no target, and its ``gamma_i = 0 / eps``
would otherwise pull ``gamma_f`` (and ``mean_i FM_i``) down by the fraction of such anchors:

- ``TP_i = sum_j m_ij p_ij t_ij``, ``P_i = sum_j m_ij p_ij``, ``T_i = sum_j m_ij t_ij``;
- soft Fowlkes-Mallows: ``FM_i = TP_i / sqrt(P_i T_i + eps)``, ``L_FM = 1 - mean_i FM_i``;
- purity: ``gamma_i = TP_i / (P_i + eps)``;
- purity penalty, the paper's upper-bound form (its Eqn 6):
  ``L_pur = mean_i |gamma_i - gamma_f|`` with ``gamma_f`` the mean purity over the GLOBAL batch
  (sum and count all-reduced across the training workers, detached: a target, not a variable);
- group-aware form (its Eqn 4), when the protected group ``g_i`` of each anchor is known at
  training time: per-group mean purity over the global batch ``mu_t = sum_{i: g_i = t} gamma_i /
  |{i: g_i = t}|`` and its *spread*, the mean absolute deviation of the group means from their
  unweighted mean over the groups present in the global batch:
  ``L_grp = (1/T') sum_t |mu_t - mu_bar|``, ``mu_bar = (1/T') sum_t mu_t`` (detached, like
  ``gamma_f``). By the triangle inequality ``|mu_t - c| <= mean_{i in t} |gamma_i - c|``, so with
  ``c = mu_bar`` the group form is bounded by the group-averaged upper-bound form - the gap the
  paper reports between optimising Eqn 6 and Eqn 4;
- BCE: ``-mean_{ij: m_ij} [t_ij log p_ij + (1 - t_ij) log(1 - p_ij)]`` (from logits, stable);
- total: ``L = L_FM + lambda * L_pen + beta * L_BCE``.

Distribution: global quantities go through a ``collective`` (:class:`dist_fair.collective.Collective`;
by default :func:`~dist_fair.collective.default_collective`: the training group's inside one, the
single-process identity outside), so the same code gives the single-process value. Gradients are
averaged over the W workers by the engine (DeepSpeed), which is right for per-anchor means (equal
per-worker batches). The group
means are global: each worker differentiates ``mu_t`` only through its own anchors
(``d mu_t / d gamma_i = 1 / C_t``, C_t the global count), so the group term is multiplied by W
before averaging; the summed gradient is then exactly the single-process gradient.

Empty batches (0 anchors, as in lockstep evaluation) give finite zero losses and still take part
in every collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_fair.collective import Collective, default_collective, global_mean

EPS = 1e-6
PENALTIES = ("none", "upper_bound", "group", "one_sided")


def _collective(collective: Collective | None) -> Collective:
    return default_collective() if collective is None else collective


def soft_counts(probs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(TP_i, P_i, T_i)`` per anchor (each of shape B) from B x L probabilities, targets, mask."""
    probs = probs.float()
    targets = targets.float()
    weight = torch.ones_like(probs) if mask is None else mask.float()
    weighted = probs * weight
    return (weighted * targets).sum(dim=1), weighted.sum(dim=1), (targets * weight).sum(dim=1)


def soft_fowlkes_mallows(tp: torch.Tensor, p: torch.Tensor, t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``FM_i = TP_i / sqrt(P_i T_i + eps)`` per anchor."""
    return tp / torch.sqrt(p * t + eps)


def purity(tp: torch.Tensor, p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``gamma_i = TP_i / (P_i + eps)`` per anchor: positives within the predicted cluster over
    its correlation degree."""
    return tp / (p + eps)


def _mean(values: torch.Tensor) -> torch.Tensor:
    """Mean that is 0 (with a gradient path) for an empty tensor."""
    return values.sum() / max(int(values.numel()), 1)


def purity_penalty(gamma: torch.Tensor, collective: Collective | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-bound form: ``L_pur = mean_i |gamma_i - gamma_f|``, ``gamma_f`` = global mean purity.

    Returns:
        ``(L_pur, gamma_f)``; ``gamma_f`` is detached and identical on every worker (one
        all-reduce of the local sum and count; a worker with no anchors contributes (0, 0)).
    """
    gamma_f = global_purity(gamma, collective)
    return _mean((gamma - gamma_f).abs()), gamma_f


def global_purity(gamma: torch.Tensor, collective: Collective | None = None) -> torch.Tensor:
    """``gamma_f``: the mean purity over the global batch, detached (one all-reduce of the local sum
    and count; 0 when no worker has an anchor)."""
    gamma_f = global_mean(_collective(collective), gamma.detach().double()).to(gamma.dtype)
    if not torch.isfinite(gamma_f):  # no anchor anywhere
        gamma_f = torch.zeros((), dtype=gamma.dtype, device=gamma.device)
    return gamma_f


def one_sided_purity_penalty(gamma: torch.Tensor, collective: Collective | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided form: ``L_os = mean_i max(0, gamma_f - gamma_i)`` with the same global, detached
    ``gamma_f`` as :func:`purity_penalty` (one all-reduce); only anchors purer than ``gamma_f`` are
    left alone. Returns ``(L_os, gamma_f)``."""
    gamma_f = global_purity(gamma, collective)
    return _mean((gamma_f - gamma).clamp(min=0.0)), gamma_f


def group_purity_means(gamma: torch.Tensor, groups: torch.Tensor, num_groups: int,
                       collective: Collective | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean purity over the global batch, ``mu_t``, differentiable through this worker's
    anchors, and the global counts ``C_t``. Anchors with ``groups < 0`` (unknown) are ignored."""
    known = groups >= 0
    index = groups.clamp(min=0).long()
    weight = known.to(gamma.dtype)
    local_sum = torch.zeros(num_groups, dtype=gamma.dtype, device=gamma.device).index_add(0, index, gamma * weight)
    local_count = torch.zeros(num_groups, dtype=torch.float64, device=gamma.device).index_add(
        0, index, weight.double())
    packed = torch.cat([local_sum.detach().double(), local_count])
    total = _collective(collective).all_reduce_sum(packed)
    global_sum = total[:num_groups].to(gamma.dtype)
    counts = total[num_groups:]
    # value = global_sum / C_t; gradient = d(local_sum) / C_t (straight through the other workers)
    means = (global_sum - local_sum.detach() + local_sum) / counts.clamp(min=1).to(gamma.dtype)
    return means, counts


def group_purity_spread(gamma: torch.Tensor, groups: torch.Tensor, num_groups: int,
                        collective: Collective | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-aware form: ``L_grp = (1/T') sum_t |mu_t - mu_bar|`` over the T' groups present in the
    global batch, ``mu_bar`` their unweighted mean (detached).

    Returns:
        ``(L_grp, mu, counts)``: the spread (its true value; see :func:`clustering_loss` for the
        gradient scaling), per-group means (NaN-free; 0 for absent groups) and global counts.
    """
    means, counts = group_purity_means(gamma, groups, num_groups, collective)
    present = counts > 0
    if not bool(present.any()):
        return gamma.sum() * 0.0, means.detach(), counts
    centre = means.detach()[present].mean()
    spread = (means - centre).abs()[present].mean()
    return spread, means.detach(), counts


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``-mean_{ij: m_ij} [t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))]`` (0 when nothing counts)."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    if mask is None:
        return losses.mean() if losses.numel() else losses.sum()
    weight = mask.float()
    return (losses * weight).sum() / weight.sum().clamp(min=1.0)


@dataclass
class LossConfig:
    """Which terms make up the training loss.

    Attributes:
        objective: ``fm`` (soft Fowlkes-Mallows, the Intraformer) or ``bce`` (the Clusformer).
        penalty: ``none``, ``upper_bound`` (Eqn 6, global gamma_f), ``group`` (Eqn 4) or
            ``one_sided`` (only anchors below gamma_f).
        weight: lambda, the penalty weight.
        bce_weight: beta, weight of an extra BCE term with the ``fm`` objective.
        num_groups: groups of the protected attribute (the ``group`` penalty).
    """

    objective: str = "fm"
    penalty: str = "upper_bound"
    weight: float = 1.0
    bce_weight: float = 0.0
    num_groups: int = 0

    def __post_init__(self) -> None:
        from dist_fair.errors import ConfigError

        if self.objective not in ("fm", "bce"):
            raise ConfigError(f"loss objective {self.objective!r}: choose 'fm' or 'bce'")
        if self.penalty not in PENALTIES:
            raise ConfigError(f"config field 'train.penalty': got {self.penalty!r}; choose one of {PENALTIES}")
        if self.penalty == "group" and self.num_groups < 1:
            raise ConfigError("the group-aware purity penalty needs the protected groups of the training anchors "
                              "(train.group_attribute must name an attribute of the shards)")
        if self.weight < 0 or self.bce_weight < 0:
            raise ConfigError("config fields 'train.penalty_weight' and 'train.bce_weight' must be >= 0")


def clustering_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, config: LossConfig,
                    groups: torch.Tensor | None = None, collective: Collective | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss ``L = L_obj + lambda * L_pen + beta * L_BCE`` and detached metrics.

    Args:
        logits: B x L token logits; targets: B x L in {0, 1}; mask: B x L, True where a token counts.
        config: the terms (:class:`LossConfig`).
        groups: B protected group indices (-1 unknown), for the ``group`` penalty.
        collective: global sums/means (default: :func:`~dist_fair.collective.default_collective`).

    Returns:
        ``(loss, metrics)``; metrics hold each term's value, ``gamma_f`` (the global mean purity)
        and the mean FM and purity of the batch. Purity and gamma_f are computed (and all-reduced)
        for every objective, so that all workers call the same collectives.
    """
    coll = _collective(collective)
    probs = torch.sigmoid(logits.float())
    tp, p, t = soft_counts(probs, targets, mask)
    counted = mask.bool().any(dim=1)  # anchors with a target (see the module docstring)
    if not bool(counted.all()):
        tp, p, t = tp[counted], p[counted], t[counted]
        groups = None if groups is None else groups[counted]
    fm = soft_fowlkes_mallows(tp, p, t)
    gamma = purity(tp, p)
    l_fm = 1.0 - _mean(fm) if fm.numel() else fm.sum() * 0.0
    if config.penalty == "one_sided":
        l_pur, gamma_f = one_sided_purity_penalty(gamma, coll)
    else:
        l_pur, gamma_f = purity_penalty(gamma, coll)
    metrics: dict[str, torch.Tensor] = {"fm": _mean(fm).detach(), "purity": _mean(gamma).detach(),
                                        "gamma_f": gamma_f.detach(), "loss_purity": l_pur.detach()}
    if config.objective == "fm":
        loss = l_fm
        metrics["loss_fm"] = l_fm.detach()
    else:
        loss = masked_bce(logits, targets, mask)
        metrics["loss_bce"] = loss.detach()
    if config.penalty in ("upper_bound", "one_sided"):
        loss = loss + config.weight * l_pur
    elif config.penalty == "group":
        if groups is None:
            raise ValueError("clustering_loss: the group penalty needs the anchors' groups")
        spread, _, _ = group_purity_spread(gamma, groups, config.num_groups, coll)
        metrics["loss_group"] = spread.detach()
        loss = loss + config.weight * coll.world_size * spread  # see the module docstring: x W
    if config.objective == "fm" and config.bce_weight > 0:
        bce = masked_bce(logits, targets, mask)
        metrics["loss_bce"] = bce.detach()
        loss = loss + config.bce_weight * bce
    return loss, metrics


__all__ = ["EPS", "PENALTIES", "LossConfig", "soft_counts", "soft_fowlkes_mallows", "purity", "purity_penalty",
           "one_sided_purity_penalty", "global_purity",
           "group_purity_means", "group_purity_spread", "masked_bce", "clustering_loss"]
