"""dist_fair.deep.task: deep fair clustering trained through the engine (Ray Train + DeepSpeed) on two
workers of the simulated two-node cluster.

DFDC (one engine run, in-memory arrays) and Fair-DEC (autoencoder run + clustering run, from
WebDataset shards as in a pipeline stage; marked slow) on small synthetic data where
plain clustering is unfair. Checked: both workers train and the loss goes down; after every epoch
the fair assignment of ALL samples is computed and recorded; the distributed metrics of the
network's labels and of the fair assignment equal the single-process metrics of the exported
model's predictions and of the fair assignment solved here in one process.
"""
from __future__ import annotations

import numpy as np
import pytest

from dist_fair.config import TrainConfig

N, DIM = 480, 6


def unfair_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, N)
    g = (rng.random(N) < 0.3).astype(np.int64)
    x = rng.normal(size=(N, DIM)) * 0.6
    x[:, 0] += 3 * y
    x[:, 1] += 5 * g
    return {"ids": np.arange(N, dtype=np.int64), "emb": x.astype(np.float32), "identity": y.astype(np.int64),
            "attr_group": g}


def best_balance(arrays: dict[str, np.ndarray]) -> float:
    """The balance of exactly proportional clusters: smallest over largest group."""
    sizes = np.bincount(arrays["attr_group"])
    return sizes.min() / sizes.max()


def local_scores(model, arrays, options):
    """Single-process reference: the exported model's labels and the fair assignment of its y."""
    import torch

    from dist_fair.deep.estimators import call_fair_assign, clustering_scores

    model.eval()
    with torch.no_grad():
        probs = model.probs(model(torch.from_numpy(arrays["emb"]))).numpy()
    labels = probs.argmax(axis=1)
    fair, _ = call_fair_assign(None, probs.astype(np.float64), arrays["attr_group"], rho=options.fair.rho,
                               eps=options.fair.eps, method=options.fair.method, top_m=options.fair.top_m)
    groups, identity = arrays["attr_group"], arrays["identity"]
    return {**clustering_scores(labels, groups, identity, "net"), **clustering_scores(fair, groups, identity, "fair")}


def check_run(result, arrays, options, epochs):
    from dist_fair.deep.task import make_model
    from dist_fair.train.checkpoint import load_model_weights

    cluster = result.phases["cluster"]
    start = cluster.events("start")[0]
    assert start["world_size"] == 2
    records = cluster.events("epoch")
    assert [r["epoch"] for r in records] == list(range(epochs))
    for record in records:
        for key in ("net_acc", "net_nmi", "net_balance", "net_fairness", "net_fwd"):
            assert f"hook_{key}" in record
    setup = cluster.events("setup")
    assert setup and "hook_net_acc" not in setup[0] and "net_acc" in setup[0]
    # the distributed metrics equal the single-process ones on the exported model
    model = make_model(options, DIM, "cluster")
    model.load_state_dict({k: v.float() for k, v in load_model_weights(result.model_path).items()})
    reference = local_scores(model, arrays, options)
    final = result.metrics
    for key, value in reference.items():
        assert final[key] == pytest.approx(value, abs=1e-9), key
    return records


@pytest.mark.ray
def test_dfdc_trains_on_two_workers_with_a_global_fair_assignment(ray_cluster, tmp_path):
    from dist_fair.deep.task import DeepOptions, train_deep

    arrays = unfair_arrays()
    options = DeepOptions(method="dfdc", n_clusters=2, attribute="group", num_groups=2, hidden=(16, 16),
                          pretrain_epochs=2, vat_eps=0.5, beta=4.0)
    train = TrainConfig(model="dfdc", deepspeed="zero2_cpu", workers=2, placement="SPREAD", epochs=5, batch_size=64,
                        lr=5e-3, log_every=4, seed=0)
    result = train_deep(options, arrays, train, tmp_path, progress=False)
    records = check_run(result, arrays, options, 5)
    # the fair assignment of all N samples is recomputed after every epoch once it is needed
    # (epochs 1.. feed the fair epochs 2..4) and is as fair as the rounding allows
    best = best_balance(arrays)
    for record in records[1:]:
        assert record["hook_fair_balance"] > best - 0.02 and record["hook_fair_fairness"] > 0.9
    assert "loss_fair" not in records[0] and records[-1]["loss_fair"] > 0
    # the loss goes down within each phase (the fair term is added from epoch 2 on)
    assert records[1]["loss"] < records[0]["loss"]
    assert records[-1]["loss"] < records[2]["loss"]
    # fairness training makes the network itself fairer than the IMSAT epochs left it
    assert records[-1]["hook_net_balance"] > records[1]["hook_net_balance"]


@pytest.mark.ray
@pytest.mark.slow
def test_fair_dec_trains_on_two_workers_from_shards(ray_cluster, tmp_path):
    from dist_fair.deep.task import DeepOptions, train_deep

    from dist_fair.data.shards import write_embedding_shards

    arrays = unfair_arrays(1)
    # the shard path of a pipeline stage: two WebDataset shards, one per worker
    shards = tmp_path / "shards"
    write_embedding_shards(shards, arrays["emb"], arrays["identity"], {"group": arrays["attr_group"]},
                           {"group": ["a", "b"]}, shard_rows=N // 2, block_rows=64)
    options = DeepOptions(method="fair_dec", n_clusters=2, attribute="group", num_groups=2, ae_hidden=(32, 32),
                          pretrain_epochs=1, beta=4.0)
    train = TrainConfig(model="fair_dec", deepspeed="zero1_cpu", workers=2, placement="SPREAD", epochs=4,
                        batch_size=64, lr=1e-3, log_every=4, seed=0)
    ae_train = TrainConfig(model="fair_dec", deepspeed="zero1_cpu", workers=2, placement="SPREAD", epochs=3,
                           batch_size=64, lr=1e-3, log_every=4, seed=0)
    result = train_deep(options, str(shards), train, tmp_path / "run", ae_train=ae_train, progress=False)
    ae_epochs = result.phases["autoencoder"].events("epoch")
    assert len(ae_epochs) == 3 and ae_epochs[-1]["loss"] < ae_epochs[0]["loss"]
    records = check_run(result, arrays, options, 4)
    assert all(r["hook_fair_balance"] > best_balance(arrays) - 0.02 for r in records)
    assert records[-1]["hook_net_fwd"] < records[0]["hook_net_fwd"]  # the network gets fairer
