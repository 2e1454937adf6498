"""dist_fair.deep.estimators (and the backbones/modules they train): the scikit-learn-style API of
DEC, IMSAT, DFDC, FairDEC and Fairoids on small synthetic data, with the real fair assignment.

The data set makes plain clustering unfair: two classes along one axis, two protected groups
(30% / 70%) along another, larger one, so the base methods tend to cluster by group.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_fair.errors import ConfigError, DataError

torch.set_num_threads(1)


def unfair_blobs(seed: int = 0, n: int = 800) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    g = (rng.random(n) < 0.3).astype(np.int64)
    X = rng.normal(size=(n, 6)) * 0.6
    X[:, 0] += 3 * y
    X[:, 1] += 5 * g
    return X.astype(np.float32), g, y


def assert_proportional(labels: np.ndarray, groups: np.ndarray) -> None:
    """Every cluster holds floor or ceil of |C_j| rho_t members of group t (METHODS.md §6)."""
    rho = np.bincount(groups) / len(groups)
    for j in np.unique(labels):
        members = groups[labels == j]
        for t, share in enumerate(rho):
            target = len(members) * share
            assert np.floor(target) - 1e-9 <= (members == t).sum() <= np.ceil(target) + 1e-9


@pytest.fixture(scope="module")
def blobs():
    return unfair_blobs()


@pytest.fixture(scope="module")
def fitted_imsat(blobs):
    from dist_fair import IMSAT

    X, g, y = blobs
    return IMSAT(n_clusters=2, epochs=8, batch_size=64, vat_eps=0.5, random_state=0).fit(X, g, y=y)


@pytest.fixture(scope="module")
def fitted_dec(blobs):
    from dist_fair import DEC

    X, g, y = blobs
    return DEC(n_clusters=2, ae_hidden=(32, 32), ae_epochs=10, epochs=5, batch_size=64, lr=1e-3,
               random_state=0).fit(X, g, y=y)


# ----------------------------------------------------------------------------- API

def test_package_exports_are_lazy():
    import subprocess
    import sys

    code = ("import sys, dist_fair; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules; "
            "from dist_fair import DEC, IMSAT, DFDC, FairDEC, Fairoids; print(DFDC.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DFDC"


def test_fit_predict_api(blobs, fitted_imsat):
    X, g, y = blobs
    model = fitted_imsat
    assert model.labels_.shape == (len(X),) and set(np.unique(model.labels_)) <= {0, 1}
    np.testing.assert_array_equal(model.predict(X), model.labels_)  # no protected attribute needed
    proba = model.predict_proba(X[:10])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert model.fair_labels_.shape == (len(X),)
    assert_proportional(model.fair_labels_, g)
    # one record per epoch with losses and the metrics of the network's labels
    assert [h["epoch"] for h in model.history_] == list(range(8))
    for key in ("loss", "loss_mi", "loss_vat", "net_acc", "net_nmi", "net_balance", "net_fairness", "net_fwd"):
        assert key in model.history_[-1]
    for key in ("net_acc", "net_nmi", "net_balance", "net_fairness", "net_fwd", "fair_acc", "fair_nmi",
                "fair_balance", "fair_fairness", "fair_fwd"):
        assert key in model.metrics_
    from dist_fair.eval.metrics import accuracy, balance

    assert model.metrics_["net_acc"] == pytest.approx(accuracy(y, model.labels_))
    assert model.metrics_["fair_balance"] == pytest.approx(balance(model.fair_labels_, g))
    # the base method learns something: clearly better than chance on the classes
    assert model.metrics_["net_acc"] > 0.75


def test_fit_predict_returns_labels_and_sklearn_clone_works(blobs):
    from sklearn.base import clone

    from dist_fair import IMSAT

    X, g, y = blobs
    est = IMSAT(n_clusters=2, epochs=1, batch_size=128, vat_eps=0.5, random_state=3)
    labels = est.fit_predict(X, g)
    np.testing.assert_array_equal(labels, est.labels_)
    copy = clone(est)
    assert copy.get_params() == est.get_params() and not hasattr(copy, "labels_")
    again = copy.fit(X, g)  # same seed, same data: the same result
    np.testing.assert_array_equal(again.labels_, labels)
    assert "metrics_" in dir(again) and "net_acc" not in again.metrics_  # no y given: no ACC


def test_string_groups_and_no_groups(blobs):
    from dist_fair import IMSAT

    X, g, _ = blobs
    names = np.array(["female", "male"])[g]
    model = IMSAT(n_clusters=2, epochs=1, batch_size=128, vat_eps=0.5).fit(X, names)
    assert model.group_values_.tolist() == ["female", "male"]
    assert_proportional(model.fair_labels_, g)
    shares = {"female": float(np.mean(g == 0)), "male": float(np.mean(g == 1))}
    with_rho = IMSAT(n_clusters=2, epochs=1, batch_size=128, vat_eps=0.5, rho=shares, fair_eps=0.1).fit(X, names)
    assert with_rho.metrics_["fair_fairness"] >= 0.9 - 1e-9  # within eps = 10% of the target shares
    with pytest.raises(ConfigError, match="no share"):
        IMSAT(n_clusters=2, epochs=0, vat_eps=0.5, rho={"female": 1.0}).fit(X, names)
    plain = IMSAT(n_clusters=2, epochs=1, batch_size=128, vat_eps=0.5).fit(X)
    assert plain.fair_labels_ is None and "net_balance" not in plain.metrics_


def test_input_errors(blobs):
    from sklearn.exceptions import NotFittedError

    from dist_fair import DFDC, IMSAT, Fairoids

    X, g, _ = blobs
    with pytest.raises(DataError, match="needs the protected attribute"):
        DFDC(n_clusters=2, pretrain_epochs=0, epochs=1).fit(X)
    with pytest.raises(DataError, match="needs the protected attribute"):
        Fairoids(n_clusters=2).fit(X)
    with pytest.raises(DataError, match="one group label per row"):
        DFDC(n_clusters=2).fit(X, g[:-1])
    with pytest.raises(DataError, match="unknown group"):
        DFDC(n_clusters=2).fit(X, np.where(g == 0, -1, 1))
    with pytest.raises(NotFittedError):
        IMSAT().predict(X)
    with pytest.raises(ConfigError, match="n_clusters"):
        IMSAT(n_clusters=1).fit(X)
    with pytest.raises(DataError, match="NaN"):
        IMSAT(n_clusters=2, epochs=1).fit(np.where(X > 2, np.nan, X))
    model = IMSAT(n_clusters=2, epochs=1, batch_size=128, vat_eps=0.5).fit(X)
    with pytest.raises(DataError, match="fitted on"):
        model.predict(X[:, :4])


# ----------------------------------------------------------------------------- fairness training

def test_dfdc_learns_a_fairer_network_than_imsat(blobs, fitted_imsat):
    from dist_fair import DFDC

    X, g, y = blobs
    dfdc = DFDC(n_clusters=2, pretrain_epochs=4, epochs=6, batch_size=64, vat_eps=0.5, random_state=0).fit(X, g, y=y)
    assert fitted_imsat.metrics_["net_balance"] < 0.05  # the base method clusters (mostly) by group
    assert dfdc.metrics_["net_balance"] > 0.3           # the optimum is 0.3 / 0.7 = 0.43
    assert dfdc.metrics_["net_acc"] > 0.9
    assert_proportional(dfdc.fair_labels_, g)
    phases = [h["phase"] for h in dfdc.history_]
    assert phases == ["pretrain"] * 4 + ["fair"] * 6
    # after each epoch the fair assignment of ALL samples is recorded (it is the next epoch's target)
    for record in dfdc.history_[3:]:
        assert record["fair_balance"] >= 0.4 and record["fair_fairness"] > 0.95
    # warm start from the fitted IMSAT: only the fair epochs run
    warm = DFDC(n_clusters=2, epochs=3, batch_size=64, vat_eps=0.5, init_model=fitted_imsat).fit(X, g, y=y)
    assert [h["phase"] for h in warm.history_] == ["fair"] * 3
    assert warm.metrics_["net_balance"] > fitted_imsat.metrics_["net_balance"]


def test_fair_dec_and_fairoids_are_fairer_than_dec(blobs, fitted_dec):
    from dist_fair import FairDEC, Fairoids
    from dist_fair.models.deep_clustering import Autoencoder

    X, g, y = blobs
    dec = fitted_dec
    assert dec.cluster_centers_.shape == (2, 2) and dec.transform(X[:5]).shape == (5, 2)
    assert dec.history_[0]["phase"] == "autoencoder"
    fair_dec = FairDEC(n_clusters=2, epochs=12, batch_size=64, lr=1e-3, init_model=dec).fit(X, g, y=y)
    assert [h["phase"] for h in fair_dec.history_] == ["fair"] * 12
    assert fair_dec.metrics_["net_fwd"] < dec.metrics_["net_fwd"] - 0.1  # FWD: lower is fairer
    assert_proportional(fair_dec.fair_labels_, g)
    # Fairoids from the same pre-trained autoencoder (rebuilt from DEC's encoder weights)
    autoencoder = Autoencoder(X.shape[1], 2, (32, 32))
    autoencoder.encoder.load_state_dict(dec.model_.encoder.state_dict())
    fairoids = Fairoids(n_clusters=2, ae_hidden=(32, 32), epochs=8, batch_size=64, lr=1e-3, beta=4.0,
                        init_model=autoencoder).fit(X, g, y=y)
    assert fairoids.metrics_["net_fwd"] < dec.metrics_["net_fwd"] - 0.1
    assert [h["phase"] for h in fairoids.history_] == ["fairoids"] * 8
    assert all(h["loss_fair"] >= 0 for h in fairoids.history_)


def test_init_model_must_match(blobs, fitted_dec, fitted_imsat):
    from dist_fair import DFDC, FairDEC

    X, g, _ = blobs
    with pytest.raises(ConfigError, match="IMSAT or DFDC"):
        DFDC(n_clusters=2, epochs=1, init_model=fitted_dec).fit(X, g)
    with pytest.raises(ConfigError, match="DEC, FairDEC or Fairoids"):
        FairDEC(n_clusters=2, epochs=1, init_model=fitted_imsat).fit(X, g)
    with pytest.raises(ConfigError, match="n_clusters"):
        FairDEC(n_clusters=3, epochs=1, init_model=fitted_dec).fit(X, g)


def test_adaptive_vat_eps_matches_brute_force():
    from scipy.spatial.distance import cdist

    from dist_fair.deep.estimators import adaptive_vat_eps

    rng = np.random.default_rng(7)
    X = rng.normal(size=(200, 5)).astype(np.float32)
    eps = adaptive_vat_eps(X, k=10, scale=0.25)
    dist = np.sort(cdist(X, X), axis=1)[:, 10]  # column 0 is the sample itself
    np.testing.assert_allclose(eps, 0.25 * dist, rtol=1e-4)


# ----------------------------------------------------------------------------- backbones and modules

def test_small_conv_net_is_the_dissertation_architecture():
    from dist_fair.models.backbones import SmallConvNet, create_backbone

    net = create_backbone("conv", (1, 28, 28), 10)
    assert isinstance(net, SmallConvNet)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 8, (5, 5)), (8, 4, (5, 5))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 2
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 2
    assert net.head.in_features == 4 * 4 * 4 and net.head.out_features == 10
    x = torch.randn(3, 1, 28, 28)
    net.eval()
    np.testing.assert_allclose(net(x).detach().numpy(), net(x.view(3, -1)).detach().numpy(), rtol=1e-6)
    with pytest.raises(ConfigError, match="square images"):
        create_backbone("conv", (784,), 10)


def test_mlp_and_timm_backbones():
    from dist_fair.models.backbones import MLP, create_backbone

    mlp = create_backbone("mlp", (14,), 2, hidden=(50, 50))
    assert isinstance(mlp, MLP)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [50, 50, 2]
    assert mlp(torch.randn(4, 14)).shape == (4, 2)
    net = create_backbone("timm:test_resnet", (1, 28, 28), 10)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="timm has no model"):
        create_backbone("timm:no_such_model_xyz", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("transformer", (3, 32, 32), 10)


def test_imsat_estimator_with_timm_backbone_on_images():
    from dist_fair import IMSAT

    rng = np.random.default_rng(0)
    images = rng.random((64, 1, 28, 28)).astype(np.float32)
    model = IMSAT(n_clusters=3, backbone="timm:test_resnet", epochs=1, batch_size=32, vat_eps=1.0).fit(images)
    assert model.predict(images).shape == (64,)
    flat = IMSAT(n_clusters=3, backbone="conv", image_shape=(1, 28, 28), epochs=1, batch_size=32,
                 vat_eps=1.0).fit(images.reshape(64, -1))
    assert flat.predict(images.reshape(64, -1)).shape == (64,)


def test_dec_model_centroids_are_a_buffer_plus_a_trained_offset():
    from dist_fair.losses.deep_clustering import student_t_assignment
    from dist_fair.models.backbones import MLP
    from dist_fair.models.deep_clustering import Autoencoder, DECModel

    model = DECModel(MLP(4, (8,), 2, batchnorm=False), n_clusters=3, latent_dim=2)
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    model.set_centroids(centres)
    assert "centroid_init" in dict(model.named_buffers())
    assert [n for n, _ in model.named_parameters() if "centroid" in n] == ["centroid_delta"]
    torch.testing.assert_close(model.centroids, centres)
    x = torch.randn(5, 4)
    z, q = model(x)
    torch.testing.assert_close(q, student_t_assignment(z, centres))
    auto = Autoencoder(6, 2, (16, 8))
    z, rec = auto(torch.randn(3, 6))
    assert z.shape == (3, 2) and rec.shape == (3, 6)
