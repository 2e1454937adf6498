"""Losses of the deep (fair) clustering methods of METHODS.md §5, as plain functions over tensors.

Notation: a batch of n samples, K clusters, T protected groups; ``z`` latent codes ``[n, d]``,
``q``/``y`` soft assignments ``[n, K]`` (rows sum to 1), ``logits`` the network outputs before the
softmax. Logarithms are natural. Nothing here knows about Ray or DeepSpeed: the distributed
training code passes global quantities (e.g. the global mean assignment) in as arguments.

- DEC (Xie et al. 2016; METHODS.md §5): Student-t assignment, sharpened target, ``KL(P || Q)``.
- IMSAT (Hu et al. 2017; dissertation eqs 6.4-6.7): ``L_C = mean_i H(y_i) - H(mean_i y_i)``
  (+ ``alpha sum_l ||theta_l||^2``), and VAT's ``L_Aug = KL(y(x), y(x + t_adv))``.
- DFDC / Fair-DEC (dissertation eq 6.12): cross-entropy to the fair assignment ``y_hat``.
- Fairoids (multi-state seed, §4): an MMD-based Student-t kernel between clusters and fairoids
  (group means), a smoothing target, and ``KL(S || R)``.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

LOG = logging.getLogger(__name__)

#: Floor inside logarithms of probabilities (a probability of exactly 0 would give -inf).
TINY = 1e-12

__all__ = [
    "TINY", "entropy", "kl_rows", "student_t_assignment", "dec_target_distribution", "dec_kl_loss",
    "imsat_mi_loss", "l2_penalty", "vat_perturbation", "vat_loss", "fair_cross_entropy",
    "group_means", "soft_cluster_means", "mmd_linear", "fairoid_assignment",
    "fairoid_smoothing_target", "fairoid_kl_loss", "fairoid_loss", "frozen_batchnorm_stats",
]


# ----------------------------------------------------------------------------- building blocks

def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy ``H(p) = -sum_j p_j log p_j`` along ``dim`` (``0 log 0 = 0``)."""
    return -(probs * torch.log(probs.clamp_min(TINY))).sum(dim=dim)


def kl_rows(target: Tensor, probs: Tensor) -> Tensor:
    """Row-wise ``KL(target_i || probs_i) = sum_j t_ij (log t_ij - log p_ij)`` (``0 log 0 = 0``)."""
    log_ratio = torch.log(target.clamp_min(TINY)) - torch.log(probs.clamp_min(TINY))
    return torch.where(target > 0, target * log_ratio, torch.zeros_like(target)).sum(dim=-1)


# ----------------------------------------------------------------------------- DEC

def student_t_assignment(z: Tensor, centroids: Tensor, alpha: float = 1.0) -> Tensor:
    """DEC's soft assignment (METHODS.md §5): a Student-t kernel with ``alpha`` degrees of freedom,

    ``q_ij = (1 + ||z_i - mu_j||^2 / alpha)^(-(alpha + 1) / 2) / sum_j' (same for j')``.

    Args:
        z: latent codes ``[n, d]``.
        centroids: cluster centres ``mu`` ``[K, d]``.
        alpha: degrees of freedom (DEC uses 1).

    Returns:
        ``q`` ``[n, K]``, rows summing to 1.
    """
    sq_dist = torch.cdist(z, centroids).pow(2) if z.shape[0] else z.new_zeros(0, centroids.shape[0])
    # in log space: -(alpha+1)/2 * log(1 + d/alpha), normalised with a softmax (no underflow)
    return torch.softmax(-(alpha + 1.0) / 2.0 * torch.log1p(sq_dist / alpha), dim=1)


def dec_target_distribution(q: Tensor, cluster_mass: Tensor | None = None) -> Tensor:
    """DEC's sharpened self-training target (METHODS.md §5), without gradient:

    ``p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j')`` with ``f_j = sum_i q_ij``.

    Args:
        q: soft assignments ``[n, K]``.
        cluster_mass: ``f`` ``[K]`` when it comes from elsewhere (e.g. summed over all workers or
            over the whole data set); default the column sums of ``q``.

    Returns:
        ``p`` ``[n, K]`` (detached), rows summing to 1.
    """
    q = q.detach()
    f = q.sum(dim=0) if cluster_mass is None else cluster_mass.detach().to(q)
    weight = q.pow(2) / f.clamp_min(TINY)
    return weight / weight.sum(dim=1, keepdim=True).clamp_min(TINY)


def dec_kl_loss(p: Tensor, q: Tensor) -> Tensor:
    """``KL(P || Q) = (1/n) sum_i sum_j p_ij log(p_ij / q_ij)`` (METHODS.md §5); 0 for n = 0."""
    if q.shape[0] == 0:
        return q.sum() * 0.0
    return kl_rows(p, q).mean()


# ----------------------------------------------------------------------------- IMSAT

def imsat_mi_loss(probs: Tensor, mean_probs: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """IMSAT's clustering loss without weight decay (dissertation eq 6.5; METHODS.md §5):

    ``L_C = (1/n) sum_i H(y_i) - H(ybar)`` with ``ybar = (1/n) sum_i y_i``; ``-L_C`` is the
    mutual information ``I(X; Y) = H(Y) - H(Y|X)`` of eq 6.4. Minimising it makes every
    prediction confident (low conditional entropy) and the clusters balanced (high marginal entropy).

    Args:
        probs: ``y = softmax(f(x))`` ``[n, K]``.
        mean_probs: ``ybar`` ``[K]`` when computed elsewhere (e.g. over the global batch of all
            workers, with the gradient flowing through this worker's share); default the batch mean.

    Returns:
        ``(L_C, H(Y|X), H(Y))``.
    """
    if probs.shape[0] == 0:
        zero = probs.sum() * 0.0
        return zero, zero, zero
    conditional = entropy(probs).mean()
    ybar = probs.mean(dim=0) if mean_probs is None else mean_probs
    marginal = entropy(ybar)
    return conditional - marginal, conditional, marginal


def l2_penalty(parameters: Iterable[Tensor], alpha: float) -> Tensor:
    """``alpha * sum_l ||theta_l||^2`` (the weight-decay term of eq 6.5).

    Its gradient is ``2 alpha theta``: the same update as ``torch.optim.Adam(weight_decay=2 alpha)``,
    which is how the estimators apply it (cheaper than adding it to the loss).
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return torch.zeros(())
    return alpha * sum(p.pow(2).sum() for p in params)


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers in training mode normalise with the batch statistics but do
    not update their running averages (VAT's extra forward passes must not move them)."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            saved.append((module, module.track_running_stats))
            module.track_running_stats = False
    try:
        yield
    finally:
        for module, track in saved:
            module.track_running_stats = track


def _unit_rows(t: Tensor) -> Tensor:
    """Each sample's perturbation scaled to L2 norm 1 (over all its non-batch dimensions)."""
    norm = t.flatten(1).norm(dim=1).clamp_min(TINY)
    return t / norm.view(-1, *([1] * (t.dim() - 1)))


def vat_perturbation(forward: Callable[[Tensor], Tensor], x: Tensor, probs: Tensor, eps: float | Tensor,
                     xi: float = 1.0, power_iterations: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """VAT's adversarial perturbation (dissertation eq 6.6; METHODS.md §5):

    ``t_adv = argmax_{||t|| <= eps} KL(y(x) || y(x + t))``, approximated as in Miyato et al.: the
    KL's second-order expansion is ``t^T H t / 2`` (``H`` its Hessian at ``t = 0``, where its
    gradient vanishes), so the maximiser is ``eps`` times ``H``'s dominant eigenvector, found by
    power iteration on finite differences: ``d <- normalise(grad_t KL(y(x) || y(x + xi d)))``
    starting from a random ``d``; ``t_adv = eps * d``.

    Args:
        forward: ``x -> logits``; run in training mode it should not update BatchNorm statistics
            (see :func:`frozen_batchnorm_stats`).
        x: inputs ``[n, ...]``.
        probs: ``y(x)`` ``[n, K]`` (treated as a constant).
        eps: perturbation norm: a number or one value per sample ``[n]``.
        xi: finite-difference step of the power iteration.
        power_iterations: number of power-iteration steps (1 in VAT and IMSAT).
        generator: random generator for the starting direction.

    Returns:
        ``t_adv`` with the shape of ``x`` (detached); row norms ``eps``.
    """
    target = probs.detach()
    d = _unit_rows(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if generator is not None
                   else torch.randn_like(x))
    for _ in range(power_iterations):
        d = (xi * d).requires_grad_(True)
        with torch.enable_grad():
            divergence = kl_rows(target, torch.softmax(forward(x.detach() + d), dim=1)).sum()
            (grad,) = torch.autograd.grad(divergence, d)
        d = _unit_rows(grad.detach())
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 1:
        eps_t = eps_t.view(-1, *([1] * (x.dim() - 1)))
    return (eps_t * d).detach()


def vat_loss(forward: Callable[[Tensor], Tensor], x: Tensor, probs: Tensor, eps: float | Tensor, xi: float = 1.0,
             power_iterations: int = 1, generator: torch.Generator | None = None,
             power_forward: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Self-augmentation loss ``L_Aug = (1/n) sum_i KL(y(x_i) || y(x_i + t_adv_i))`` (eq 6.7 as a
    mean; METHODS.md §5) with ``t_adv`` from :func:`vat_perturbation`; ``y(x)`` is a constant target,
    the gradient flows through the perturbed branch. 0 for an empty batch.

    ``power_forward`` (default ``forward``) is the network used for the power iteration, e.g. the
    same function with detached parameters so that the iteration's backward pass touches no
    parameter (a DeepSpeed engine would treat it as the step's backward)."""
    if x.shape[0] == 0:
        return probs.sum() * 0.0
    t_adv = vat_perturbation(power_forward or forward, x, probs, eps, xi=xi, power_iterations=power_iterations,
                             generator=generator)
    return kl_rows(probs.detach(), torch.softmax(forward(x + t_adv), dim=1)).mean()


# ----------------------------------------------------------------------------- DFDC / Fair-DEC

def fair_cross_entropy(outputs: Tensor, fair_labels: Tensor, from_logits: bool = True) -> Tensor:
    """The fairness loss of DFDC and Fair-DEC (dissertation eq 6.12, with the sign that makes it a
    loss; METHODS.md §5): the cross-entropy between the fair assignment ``y_hat`` and ``y``,

    ``L_Fair = -(1/n) sum_i log y_{i, y_hat_i}``.

    Rows whose fair label is negative (no fair assignment, e.g. unknown group) are left out; 0 when
    none is left.

    Args:
        outputs: logits ``[n, K]`` (``from_logits``) or probabilities ``y``.
        fair_labels: ``y_hat`` as cluster indices ``[n]`` (int).
    """
    known = fair_labels >= 0
    if not bool(known.any()):
        return outputs.sum() * 0.0
    log_probs = torch.log_softmax(outputs, dim=1) if from_logits else torch.log(outputs.clamp_min(TINY))
    picked = log_probs[known].gather(1, fair_labels[known].long().unsqueeze(1)).squeeze(1)
    return -picked.mean()


# ----------------------------------------------------------------------------- Fairoids

def group_means(z: Tensor, groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Fairoids: the mean latent code of each protected group, ``phi_t = mean_{i in G_t} z_i``.

    Rows with a negative group (unknown) are ignored.

    Returns:
        ``(phi [T, d], counts [T])``; the row of a group absent from ``z`` is 0 (its count is 0).
    """
    known = groups >= 0
    z_known, g_known = z[known], groups[known].long()
    sums = z.new_zeros(num_groups, z.shape[1]).index_add(0, g_known, z_known)
    counts = torch.bincount(g_known, minlength=num_groups).to(z.dtype)
    return sums / counts.clamp_min(1.0).unsqueeze(1), counts


def soft_cluster_means(z: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Empirical cluster centres from soft memberships: ``mu_k = sum_i q_ik z_i / sum_i q_ik``.

    Returns:
        ``(mu [K, d], mass [K] = sum_i q_ik)``.
    """
    mass = q.sum(dim=0)
    return (q.t() @ z) / mass.clamp_min(TINY).unsqueeze(1), mass


def mmd_linear(cluster_means: Tensor, fairoids: Tensor) -> Tensor:
    """Squared maximum mean discrepancy with the linear kernel between each cluster's and each
    group's empirical distribution of latent codes: ``MMD^2(C_k, G_t) = ||mu_k - phi_t||^2``
    (the multi-state seed's eq 5; the kernel mean embedding of a linear kernel is the mean).

    Returns:
        ``[K, T]`` squared distances.
    """
    return torch.cdist(cluster_means, fairoids).pow(2)


def fairoid_assignment(mmd2: Tensor, alpha: float = 1.0, present: Tensor | None = None) -> Tensor:
    """The seed's eq 8: clusters softly assigned to fairoids by a Student-t kernel on the MMD,

    ``r_kt = (1 + MMD^2(C_k, G_t) / alpha)^(-(alpha + 1) / 2) / sum_t' (same for t')``.

    Fairness asks every cluster to be equally far from every fairoid, i.e. ``r_k`` uniform (or equal
    to the population shares).

    Args:
        mmd2: ``[K, T]`` from :func:`mmd_linear`.
        alpha: degrees of freedom.
        present: optional bool ``[T]``: groups to include (others get ``r = 0``), e.g. the groups
            present in a mini-batch.

    Returns:
        ``r`` ``[K, T]``, rows summing to 1 over the included groups.
    """
    logits = -(alpha + 1.0) / 2.0 * torch.log1p(mmd2 / alpha)
    if present is not None:
        logits = logits.masked_fill(~present.bool().unsqueeze(0), float("-inf"))
    return torch.softmax(logits, dim=1)


def fairoid_smoothing_target(r: Tensor, rho: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """The smoothing self-training target of Fairoids (seed §4.3.2; METHODS.md §5), without gradient.

    DEC sharpens its target (``q^2 / f``); the fairness target goes the other way, towards the
    population shares ``rho`` (uniform by default). The seed's formula was lost in extraction; we use
    the target that reflects ``r`` about ``rho`` in ratio:

    ``s_kt = (rho_t^2 / (r_kt + eps)) / sum_t' (rho_t'^2 / (r_kt' + eps))``,

    so a group closer to cluster k than its share (``r_kt > rho_t``) gets a target below its share and
    vice versa; the fixed point is ``r_k = rho`` exactly, and ``eps`` (small) keeps the target finite
    when ``r_kt -> 0``. For small deviations ``r = rho + delta`` the target is ``rho - delta``, i.e.
    KL(S || R) pulls ``r`` to ``rho`` twice as hard as the plain target ``s = rho``.

    Args:
        r: ``[K, T]`` from :func:`fairoid_assignment`; groups with ``r = 0`` in every row (absent)
            get target 0.
        rho: target shares ``[T]`` (default uniform over the groups present).
        eps: numerical floor.
    """
    r = r.detach()
    present = (r > 0).any(dim=0)
    if rho is None:
        rho_t = present.to(r.dtype)
    else:
        rho_t = rho.detach().to(r) * present.to(r.dtype)
    rho_t = rho_t / rho_t.sum().clamp_min(TINY)
    weight = torch.where(present.unsqueeze(0), rho_t.pow(2).unsqueeze(0) / (r + eps).clamp_min(TINY),
                         torch.zeros_like(r))
    return weight / weight.sum(dim=1, keepdim=True).clamp_min(TINY)


def fairoid_kl_loss(s: Tensor, r: Tensor) -> Tensor:
    """Fairness loss of Fairoids: ``KL(S || R) = (1/K) sum_k sum_t s_kt log(s_kt / r_kt)``."""
    return kl_rows(s, r).mean()


def fairoid_loss(z: Tensor, q: Tensor, groups: Tensor, num_groups: int, rho: Tensor | None = None,
                 alpha: float = 1.0, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The whole Fairoids fairness term on one batch: fairoids and soft cluster means from the batch
    (differentiable), ``r`` over the groups present in it, the smoothing target ``s``, ``KL(S||R)``.

    Returns:
        ``(loss, r)``; the loss is 0 when fewer than two groups are present.
    """
    fairoids, counts = group_means(z, groups, num_groups)
    present = counts > 0
    if int(present.sum()) < 2:
        return z.sum() * 0.0, z.new_zeros(q.shape[1], num_groups)
    means, _ = soft_cluster_means(z, q)
    r = fairoid_assignment(mmd_linear(means, fairoids), alpha=alpha, present=present)
    s = fairoid_smoothing_target(r, rho=rho, eps=eps)
    return fairoid_kl_loss(s, r), r
