"""dist_fair.losses.clustering: hand-computed cases, a NumPy reference, masking and gradients
(single process: the collective is the identity; the 2-worker equality is in test_intraformer_train)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_fair.errors import ConfigError
from dist_fair.losses.clustering import (EPS, LossConfig, clustering_loss, group_purity_spread, masked_bce,
                                         one_sided_purity_penalty, purity, purity_penalty, soft_counts,
                                         soft_fowlkes_mallows)

# two anchors, four tokens each; the last token of anchor b is masked out
PROBS = torch.tensor([[1.0, 0.5, 0.5, 0.0], [1.0, 0.25, 0.75, 0.5]], dtype=torch.float64)
TARGETS = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True, True], [True, True, True, False]])


def test_soft_counts_fm_and_purity_by_hand():
    tp, p, t = soft_counts(PROBS, TARGETS, MASK)
    # a: TP = 1 + 0.5 = 1.5, P = 2, T = 2;  b: TP = 1 + 0.75 = 1.75, P = 1 + 0.25 + 0.75 = 2, T = 2
    assert tp.tolist() == pytest.approx([1.5, 1.75])
    assert p.tolist() == pytest.approx([2.0, 2.0])
    assert t.tolist() == pytest.approx([2.0, 2.0])
    fm = soft_fowlkes_mallows(tp, p, t)
    assert fm.tolist() == pytest.approx([1.5 / np.sqrt(4 + EPS), 1.75 / np.sqrt(4 + EPS)])  # 0.75, 0.875
    gamma = purity(tp, p)
    assert gamma.tolist() == pytest.approx([1.5 / (2 + EPS), 1.75 / (2 + EPS)])


def test_purity_penalty_by_hand_and_detached_reference():
    gamma = torch.tensor([0.75, 0.875, 0.5, 1.0], requires_grad=True)
    loss, gamma_f = purity_penalty(gamma)
    assert float(gamma_f) == pytest.approx(0.78125)  # (0.75 + 0.875 + 0.5 + 1) / 4
    assert float(loss.detach()) == pytest.approx((0.03125 + 0.09375 + 0.28125 + 0.21875) / 4)
    loss.backward()
    # gamma_f is a constant: d/d gamma_i |gamma_i - gamma_f| / B = sign(gamma_i - gamma_f) / B
    assert gamma.grad.tolist() == pytest.approx([-0.25, 0.25, -0.25, 0.25])


def test_one_sided_penalty_by_hand_only_anchors_below_gamma_f():
    gamma = torch.tensor([0.75, 0.875, 0.5, 1.0], requires_grad=True)
    loss, gamma_f = one_sided_purity_penalty(gamma)
    assert float(gamma_f) == pytest.approx(0.78125)
    # only 0.75 and 0.5 lie below gamma_f: (0.03125 + 0.28125) / 4
    assert float(loss.detach()) == pytest.approx((0.03125 + 0.28125) / 4)
    loss.backward()
    assert gamma.grad.tolist() == pytest.approx([-0.25, 0.0, -0.25, 0.0])


def test_one_sided_total_loss_matches_numpy_reference():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, 8)) * 2
    targets = (rng.random((6, 8)) < 0.4).astype(float)
    targets[:, 0] = 1.0
    mask = np.ones((6, 8), bool)
    p = 1 / (1 + np.exp(-logits))
    tp, psum, t = (p * targets).sum(1), p.sum(1), targets.sum(1)
    fm = tp / np.sqrt(psum * t + EPS)
    gamma = tp / (psum + EPS)
    expected = 1 - fm.mean() + 0.6 * np.maximum(0.0, gamma.mean() - gamma).mean()
    loss, metrics = clustering_loss(torch.tensor(logits), torch.tensor(targets), torch.tensor(mask),
                                    LossConfig(objective="fm", penalty="one_sided", weight=0.6))
    assert float(loss) == pytest.approx(expected, rel=1e-6)  # the loss computes in float32
    assert float(metrics["gamma_f"]) == pytest.approx(gamma.mean(), rel=1e-6)
    both, _ = clustering_loss(torch.tensor(logits), torch.tensor(targets), torch.tensor(mask),
                              LossConfig(objective="fm", penalty="upper_bound", weight=0.6))
    assert float(both) > float(loss)  # the two-sided form also charges the anchors above gamma_f


def test_group_spread_by_hand():
    gamma = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 2, -1])  # the last anchor's group is unknown: ignored
    spread, means, counts = group_purity_spread(gamma, groups, num_groups=4)
    # mu = (0.8, 0.5, 0.3), group 3 absent; centre 1.6 / 3; spread = mean |mu_t - centre|
    centre = 1.6 / 3
    expected = (abs(0.8 - centre) + abs(0.5 - centre) + abs(0.3 - centre)) / 3
    assert float(spread) == pytest.approx(expected)
    assert means[:3].tolist() == pytest.approx([0.8, 0.5, 0.3])
    assert counts.tolist() == [2, 1, 1, 0]


def test_group_spread_gradient_matches_direct_formula():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.2, 1.0, 12)
    groups = torch.from_numpy(rng.integers(0, 3, 12))
    gamma = torch.tensor(values, requires_grad=True)
    spread, _, _ = group_purity_spread(gamma, groups, 3)
    spread.backward()
    reference = torch.tensor(values, requires_grad=True)
    mu = torch.stack([reference[groups == g].mean() for g in range(3)])
    direct = (mu - mu.detach().mean()).abs().mean()
    direct.backward()
    assert float(spread.detach()) == pytest.approx(float(direct.detach()))
    assert np.allclose(gamma.grad.numpy(), reference.grad.numpy())


def _numpy_reference(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray, lam: float, beta: float) -> float:
    p = 1 / (1 + np.exp(-logits))
    w = mask.astype(float)
    tp, pp, tt = (p * w * targets).sum(1), (p * w).sum(1), (targets * w).sum(1)
    fm = tp / np.sqrt(pp * tt + EPS)
    gamma = tp / (pp + EPS)
    pur = np.abs(gamma - gamma.mean()).mean()
    bce = -(w * (targets * np.log(p) + (1 - targets) * np.log(1 - p))).sum() / w.sum()
    return 1 - fm.mean() + lam * pur + beta * bce


def test_total_loss_matches_numpy_reference_and_ignores_masked_tokens():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 8))
    targets = (rng.random((6, 8)) < 0.4).astype(float)
    targets[:, 0] = 1.0
    mask = rng.random((6, 8)) < 0.8
    mask[:, 0] = True
    config = LossConfig(objective="fm", penalty="upper_bound", weight=0.7, bce_weight=0.3)
    loss, metrics = clustering_loss(torch.tensor(logits), torch.tensor(targets), torch.tensor(mask), config)
    assert float(loss) == pytest.approx(_numpy_reference(logits, targets, mask, 0.7, 0.3), rel=1e-6)
    # masked tokens may hold anything: the loss does not change
    noisy = logits.copy()
    noisy[~mask] = rng.normal(size=(~mask).sum()) * 50
    again, _ = clustering_loss(torch.tensor(noisy), torch.tensor(targets), torch.tensor(mask), config)
    assert float(again) == pytest.approx(float(loss))
    assert set(metrics) >= {"fm", "purity", "gamma_f", "loss_fm", "loss_purity", "loss_bce"}


def test_bce_matches_sklearn_log_loss():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 6))
    targets = (rng.random((5, 6)) < 0.5).astype(float)
    mask = rng.random((5, 6)) < 0.7
    p = 1 / (1 + np.exp(-logits))
    expected = log_loss(targets[mask], p[mask], labels=[0, 1])
    assert float(masked_bce(torch.tensor(logits), torch.tensor(targets), torch.tensor(mask))) == pytest.approx(expected)


def test_clusformer_objective_is_bce_and_penalty_options():
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(size=(4, 5)))
    targets = torch.tensor((rng.random((4, 5)) < 0.5).astype(float))
    mask = torch.ones(4, 5, dtype=torch.bool)
    loss, metrics = clustering_loss(logits, targets, mask, LossConfig(objective="bce", penalty="none"))
    assert float(loss) == pytest.approx(float(masked_bce(logits, targets, mask)))
    assert "gamma_f" in metrics  # logged (and all-reduced) for every objective
    groups = torch.tensor([0, 1, 1, 0])
    plain, _ = clustering_loss(logits, targets, mask, LossConfig(penalty="none"))
    grouped, m = clustering_loss(logits, targets, mask, LossConfig(penalty="group", weight=2.0, num_groups=2), groups)
    assert float(grouped) == pytest.approx(float(plain) + 2.0 * float(m["loss_group"]))
    with pytest.raises(ConfigError, match="group"):
        LossConfig(penalty="group", num_groups=0)
    with pytest.raises(ConfigError, match="train.penalty"):
        LossConfig(penalty="eqn5")


def test_empty_batch_gives_finite_zero_loss():
    empty = torch.zeros((0, 5))
    loss, metrics = clustering_loss(empty.clone().requires_grad_(), empty, empty.bool(),
                                    LossConfig(penalty="group", num_groups=2), torch.zeros(0, dtype=torch.long))
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    loss.backward()
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("penalty", ["none", "upper_bound", "group", "one_sided"])
def test_anchors_without_a_counted_token_change_nothing(penalty):
    """An anchor of unknown identity (every token masked) has no purity: it must not pull gamma_f,
    the FM mean or the group means down (its gamma would be 0 / eps = 0)."""
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 7)) * 3
    targets = (rng.random((6, 7)) < 0.5).astype(float)
    targets[:, 0] = 1.0
    mask = rng.random((6, 7)) < 0.8
    mask[:, 0] = True
    groups = np.array([0, 1, 2, 0, 1, 2])
    mask[[2, 4]] = False  # two anchors with unknown identity
    keep = mask.any(axis=1)
    config = LossConfig(objective="fm", penalty=penalty, weight=0.9, bce_weight=0.2, num_groups=3)

    def run(rows):
        x = torch.tensor(logits[rows], requires_grad=True)
        loss, metrics = clustering_loss(x, torch.tensor(targets[rows]), torch.tensor(mask[rows]), config,
                                        torch.tensor(groups[rows]))
        loss.backward()
        return float(loss.detach()), metrics, x.grad.numpy()

    full_loss, full_metrics, full_grad = run(np.arange(6))
    kept_loss, kept_metrics, kept_grad = run(np.nonzero(keep)[0])
    assert full_loss == pytest.approx(kept_loss, rel=1e-12)
    assert float(full_metrics["gamma_f"]) == pytest.approx(float(kept_metrics["gamma_f"]), rel=1e-12)
    assert np.allclose(full_grad[keep], kept_grad) and not full_grad[~keep].any()
    if penalty == "upper_bound":  # the NumPy reference on the labelled anchors only
        assert kept_loss == pytest.approx(_numpy_reference(logits[keep], targets[keep], mask[keep], 0.9, 0.2))
