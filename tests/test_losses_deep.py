"""dist_fair.losses.deep_clustering against hand-computed small cases and independent references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr
from scipy.stats import entropy as scipy_entropy

from dist_fair.losses import deep_clustering as L


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ----------------------------------------------------------------------------- DEC

def test_student_t_assignment_by_hand():
    z = t([[0.0, 0.0], [1.0, 0.0]])
    centroids = t([[1.0, 0.0], [0.0, 2.0]])
    q = L.student_t_assignment(z, centroids, alpha=1.0)
    # sample 0: distances^2 1 and 4 -> kernels 1/2, 1/5; sample 1: 0 and 5 -> 1, 1/6
    np.testing.assert_allclose(q.numpy(), [[0.5 / 0.7, 0.2 / 0.7], [1 / (1 + 1 / 6), (1 / 6) / (1 + 1 / 6)]], rtol=1e-12)
    q2 = L.student_t_assignment(z, centroids, alpha=2.0)
    k = np.array([(1 + 1 / 2) ** -1.5, (1 + 4 / 2) ** -1.5])
    np.testing.assert_allclose(q2[0].numpy(), k / k.sum(), rtol=1e-12)


def test_dec_target_distribution_by_hand():
    q = t([[0.6, 0.4], [0.2, 0.8]])
    p = L.dec_target_distribution(q)
    f = [0.8, 1.2]
    row0 = np.array([0.36 / f[0], 0.16 / f[1]])
    row1 = np.array([0.04 / f[0], 0.64 / f[1]])
    np.testing.assert_allclose(p.numpy(), [row0 / row0.sum(), row1 / row1.sum()], rtol=1e-12)
    assert not p.requires_grad
    # an external cluster mass (e.g. all-reduced over workers) replaces the batch column sums
    p_ext = L.dec_target_distribution(q, cluster_mass=t([1.0, 1.0]))
    np.testing.assert_allclose(p_ext[0].numpy(), np.array([0.36, 0.16]) / 0.52, rtol=1e-12)


def test_dec_kl_loss_matches_scipy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=6)
    q = rng.dirichlet(np.ones(4), size=6)
    expected = rel_entr(p, q).sum(axis=1).mean()
    assert L.dec_kl_loss(t(p), t(q)).item() == pytest.approx(expected, rel=1e-12)
    assert L.dec_kl_loss(t(p), t(p)).item() == pytest.approx(0.0, abs=1e-12)
    # zero target entries contribute 0 (0 log 0 = 0)
    assert L.dec_kl_loss(t([[1.0, 0.0]]), t([[0.5, 0.5]])).item() == pytest.approx(math.log(2), rel=1e-12)


# ----------------------------------------------------------------------------- IMSAT

def test_imsat_mi_loss_by_hand():
    loss, cond, marg = L.imsat_mi_loss(t([[1.0, 0.0], [0.0, 1.0]]))
    assert cond.item() == pytest.approx(0.0, abs=1e-9)
    assert marg.item() == pytest.approx(math.log(2))
    assert loss.item() == pytest.approx(-math.log(2))
    loss, cond, marg = L.imsat_mi_loss(t([[0.5, 0.5], [0.5, 0.5]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(1)
    y = rng.dirichlet(np.ones(5), size=7)
    loss, cond, marg = L.imsat_mi_loss(t(y))
    expected_cond = np.mean([scipy_entropy(row) for row in y])
    expected_marg = scipy_entropy(y.mean(axis=0))
    assert cond.item() == pytest.approx(expected_cond, rel=1e-12)
    assert marg.item() == pytest.approx(expected_marg, rel=1e-12)
    assert loss.item() == pytest.approx(expected_cond - expected_marg, rel=1e-12)
    # a given marginal (e.g. over the global batch) replaces the batch mean
    _, _, marg = L.imsat_mi_loss(t(y), mean_probs=t([0.2] * 5))
    assert marg.item() == pytest.approx(math.log(5))


def test_l2_penalty_by_hand():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    frozen = torch.tensor([10.0])
    assert L.l2_penalty([a, b, frozen], alpha=0.5).item() == pytest.approx(0.5 * (1 + 4 + 9))


def _linear_softmax_hessian(W: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Hessian in t of KL(p(x) || p(x + t)) at t = 0 for logits = W x: W^T (diag(p) - p p^T) W."""
    logits = W @ x
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return W.T @ (np.diag(p) - np.outer(p, p)) @ W


def test_vat_power_iteration_finds_the_dominant_eigenvector():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((4, 6))
    x = rng.standard_normal((3, 6))
    forward = lambda inputs: inputs @ torch.from_numpy(W).T  # noqa: E731
    probs = torch.softmax(forward(torch.from_numpy(x)), dim=1)
    gen = torch.Generator().manual_seed(0)
    t_adv = L.vat_perturbation(forward, torch.from_numpy(x), probs, eps=0.5, xi=1e-4, power_iterations=30,
                               generator=gen)
    for i in range(3):
        vals, vecs = np.linalg.eigh(_linear_softmax_hessian(W, x[i]))
        top = vecs[:, -1]
        direction = t_adv[i].numpy() / np.linalg.norm(t_adv[i].numpy())
        assert abs(direction @ top) == pytest.approx(1.0, abs=1e-4)
        assert np.linalg.norm(t_adv[i].numpy()) == pytest.approx(0.5, rel=1e-9)


def test_vat_direction_raises_the_kl_more_than_random_directions():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    eps = 0.3
    with torch.no_grad():
        probs = torch.softmax(net(x), dim=1)

    def kl_at(perturbation):
        with torch.no_grad():
            return L.kl_rows(probs, torch.softmax(net(x + perturbation), dim=1))

    random_kls = []
    for seed in range(50):
        d = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        random_kls.append(kl_at(eps * d / d.norm(dim=1, keepdim=True)))
    random_kls = torch.stack(random_kls)
    # one power iteration (VAT, IMSAT): far above a random direction of the same norm on average
    t_adv = L.vat_perturbation(net, x, probs, eps=eps, xi=1e-3, power_iterations=1,
                               generator=torch.Generator().manual_seed(1))
    adversarial = kl_at(t_adv)
    assert adversarial.mean() > 2.5 * random_kls.mean()
    assert (adversarial > random_kls.median(dim=0).values).double().mean() >= 0.9
    # a few more iterations: above every one of the 50 random directions, for every sample
    t_5 = L.vat_perturbation(net, x, probs, eps=eps, xi=1e-3, power_iterations=5,
                             generator=torch.Generator().manual_seed(1))
    assert bool((kl_at(t_5) > random_kls.max(dim=0).values).all())
    # per-sample eps: row norms follow it
    eps_rows = torch.linspace(0.1, 1.0, 20, dtype=torch.float64)
    t_rows = L.vat_perturbation(net, x, probs, eps=eps_rows, xi=1e-3)
    np.testing.assert_allclose(t_rows.norm(dim=1).numpy(), eps_rows.numpy(), rtol=1e-9)
    # the loss is the mean KL at the adversarial point, differentiable in the network
    loss = L.vat_loss(net, x, probs, eps=eps, xi=1e-3, generator=torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(adversarial.mean().item(), rel=1e-9)
    loss.backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_vat_does_not_move_batchnorm_running_stats():
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    net.train()
    x = torch.randn(16, 4)
    before = net[1].running_mean.clone()
    with L.frozen_batchnorm_stats(net):
        L.vat_loss(net, x, torch.softmax(net(x), dim=1).detach(), eps=1.0)
    assert torch.equal(net[1].running_mean, before)
    assert net[1].track_running_stats
    net(x)
    assert not torch.equal(net[1].running_mean, before)


# ----------------------------------------------------------------------------- DFDC / Fair-DEC

def test_fair_cross_entropy_by_hand():
    logits = t([[0.0, math.log(3.0)], [math.log(4.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 1, -1])
    # row 0: softmax (1/4, 3/4), label 1 -> -log 3/4; row 1: (4/5, 1/5), label 1 -> -log 1/5; row 2 ignored
    expected = -(math.log(0.75) + math.log(0.2)) / 2
    assert L.fair_cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    probs = torch.softmax(logits, dim=1)
    assert L.fair_cross_entropy(probs, labels, from_logits=False).item() == pytest.approx(expected, rel=1e-12)
    assert L.fair_cross_entropy(logits, torch.tensor([-1, -1, -1])).item() == 0.0


# ----------------------------------------------------------------------------- Fairoids

def test_group_and_soft_cluster_means_match_numpy():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((9, 3))
    groups = np.array([0, 1, 1, 0, 2, -1, 0, 1, 1])
    phi, counts = L.group_means(t(z), torch.tensor(groups), num_groups=4)
    for g in range(3):
        np.testing.assert_allclose(phi[g].numpy(), z[groups == g].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(phi[3].numpy(), 0.0)
    assert counts.tolist() == [3, 4, 1, 0]
    q = rng.dirichlet(np.ones(2), size=9)
    mu, mass = L.soft_cluster_means(t(z), t(q))
    for k in range(2):
        np.testing.assert_allclose(mu[k].numpy(), (q[:, k:k + 1] * z).sum(0) / q[:, k].sum(), rtol=1e-12)
    np.testing.assert_allclose(mass.numpy(), q.sum(0), rtol=1e-12)


def test_mmd_linear_equals_brute_force_mmd_with_linear_kernel():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((12, 3))
    cluster = rng.integers(0, 2, size=12)
    group = rng.integers(0, 2, size=12)
    q = np.eye(2)[cluster]
    mu, _ = L.soft_cluster_means(t(z), t(q))
    phi, _ = L.group_means(t(z), torch.tensor(group), 2)
    mmd2 = L.mmd_linear(mu, phi).numpy()
    for k in range(2):
        for g in range(2):
            a, b = z[cluster == k], z[group == g]
            brute = (a @ a.T).mean() + (b @ b.T).mean() - 2 * (a @ b.T).mean()
            assert mmd2[k, g] == pytest.approx(brute, rel=1e-9, abs=1e-12)


def test_fairoid_assignment_and_smoothing_target_by_hand():
    mmd2 = t([[1.0, 4.0], [0.0, 0.0]])
    r = L.fairoid_assignment(mmd2, alpha=1.0)
    np.testing.assert_allclose(r[0].numpy(), [0.5 / 0.7, 0.2 / 0.7], rtol=1e-12)
    np.testing.assert_allclose(r[1].numpy(), [0.5, 0.5], rtol=1e-12)
    # absent groups get r = 0
    r3 = L.fairoid_assignment(t([[1.0, 4.0, 0.0]]), present=torch.tensor([True, True, False]))
    np.testing.assert_allclose(r3[0].numpy(), [0.5 / 0.7, 0.2 / 0.7, 0.0], rtol=1e-12)
    # smoothing target: reflection about uniform shares; the fixed point is r = rho
    s = L.fairoid_smoothing_target(t([[0.8, 0.2], [0.5, 0.5]]), eps=0.0)
    np.testing.assert_allclose(s.numpy(), [[0.2, 0.8], [0.5, 0.5]], rtol=1e-12)
    rho = t([0.25, 0.75])
    s = L.fairoid_smoothing_target(t([[0.25, 0.75], [0.5, 0.5]]), rho=rho, eps=0.0)
    w = np.array([0.25 ** 2 / 0.5, 0.75 ** 2 / 0.5])
    np.testing.assert_allclose(s.numpy(), [[0.25, 0.75], w / w.sum()], rtol=1e-12)
    s3 = L.fairoid_smoothing_target(r3, eps=0.0)
    w = np.array([1 / (0.5 / 0.7), 1 / (0.2 / 0.7)])
    np.testing.assert_allclose(s3[0].numpy(), [*(w / w.sum()), 0.0], rtol=1e-12)


def test_fairoid_kl_loss_by_hand_and_its_gradient_evens_out_the_distances():
    s = t([[0.2, 0.8]])
    r = t([[0.8, 0.2]])
    expected = 0.2 * math.log(0.2 / 0.8) + 0.8 * math.log(0.8 / 0.2)
    assert L.fairoid_kl_loss(s, r).item() == pytest.approx(expected, rel=1e-12)
    # one cluster mean between two fairoids, closer to fairoid 0: gradient descent on the loss
    # moves it towards equal distance
    fairoids = t([[0.0, 0.0], [4.0, 0.0]])
    mu = t([[1.0, 1.0]]).requires_grad_(True)
    gap_before = None
    for _ in range(200):
        r = L.fairoid_assignment(L.mmd_linear(mu, fairoids))
        loss = L.fairoid_kl_loss(L.fairoid_smoothing_target(r), r)
        if gap_before is None:
            gap_before = abs(r[0, 0].item() - r[0, 1].item())
        loss.backward()
        with torch.no_grad():
            mu -= 0.5 * mu.grad
            mu.grad.zero_()
    r = L.fairoid_assignment(L.mmd_linear(mu, fairoids))
    assert abs(r[0, 0].item() - r[0, 1].item()) < 0.05 * gap_before
    assert mu[0, 0].item() == pytest.approx(2.0, abs=0.05)


def test_fairoid_loss_on_a_batch():
    rng = np.random.default_rng(5)
    z = t(rng.standard_normal((10, 2))).requires_grad_(True)
    q = L.student_t_assignment(z, t([[0.0, 0.0], [1.0, 1.0]]))
    groups = torch.tensor([0, 1] * 5)
    loss, r = L.fairoid_loss(z, q, groups, num_groups=2)
    assert loss.item() > 0 and r.shape == (2, 2)
    np.testing.assert_allclose(r.sum(dim=1).detach().numpy(), 1.0, rtol=1e-12)
    loss.backward()
    assert z.grad.abs().sum() > 0
    single, _ = L.fairoid_loss(z, q, torch.zeros(10, dtype=torch.long), num_groups=2)
    assert single.item() == 0.0
