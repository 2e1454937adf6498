"""The job through ``dist-fair run`` on tiny data: the baseline job (resume after a failure,
re-runs skip, --plan), the main job (Intraformer beside the kNN baseline on the same test
identities) and every deep clustering model of the registry (train -> predict -> fair_assign)."""
import json
import logging
import sys

import numpy as np
import pytest

from dist_fair.config import load_config
from dist_fair.pipeline import plan_job, run_job

TINY = ["data.preset=balanced", "data.identities=60", "data.images_per_identity=8", "data.dim=32", "data.workers=1", "knn.k=12",
        "knn.recall_sample=50"]


def _baseline(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", "train.model=none", *TINY, *extra])


@pytest.fixture(scope="module")
def ray_by_value(ray_cluster):
    """Ray workers cannot import test modules: pickle this one by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray_cluster


def test_run_resume_skip_and_plan(tmp_path, ray_cluster, monkeypatch, capsys):
    import dist_fair.pipeline.evaluate_stage as evaluate_module

    run_dir = tmp_path / "run"
    config = _baseline(run_dir)
    assert [(o.name, o.complete) for o in plan_job(config)] == [("shards", False), ("knn", False), ("cluster", False),
                                                                 ("evaluate", False)]
    real = evaluate_module.evaluate_stage

    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("killed during evaluation")

    monkeypatch.setattr(evaluate_module, "evaluate_stage", failing_evaluate)
    with pytest.raises(RuntimeError):
        run_job(config)
    assert not (run_dir / "report.json").exists()
    assert not (run_dir / "eval" / "stage.json").exists()
    knn_record = json.loads((run_dir / "knn" / "stage.json").read_text())

    monkeypatch.setattr(evaluate_module, "evaluate_stage", real)
    assert [o.complete for o in plan_job(config)] == [True, True, True, False]
    outcomes = run_job(config)
    assert [(o.name, o.skipped) for o in outcomes] == [("shards", True), ("knn", True), ("cluster", True),
                                                        ("evaluate", False)]
    assert json.loads((run_dir / "knn" / "stage.json").read_text()) == knn_record

    report = json.loads((run_dir / "report.json").read_text())
    identity = report["identity"]
    for key in ("pairwise", "bcubed"):
        assert 0.0 < identity[key]["f"] <= 1.0
    race = report["attributes"]["race"]
    assert set(race["per_group"]) == {"African", "Asian", "Caucasian", "Indian"}
    assert [row["method"] for row in report["comparison"]] == ["kNN baseline"]
    assert (run_dir / "report.md").read_text().startswith("# ")
    assert (run_dir / "config.yaml").exists()
    val_mask = np.load(run_dir / "cluster" / "val_mask.npy")
    assert report["num_samples"] == int((~val_mask).sum())  # the validation identities are excluded

    assert all(o.skipped for o in run_job(config))
    assert all(o.complete for o in plan_job(config))
    from dist_fair.cli import main

    assert main(["run", "--plan", "--set", "train.model=none", "--run-dir", str(run_dir)] +
                [a for s in TINY + ["knn.k=10"] for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed[1:]] == [["shards", "complete"], ["knn", "to"], ["cluster", "to"],
                                                         ["evaluate", "to"]]
    # a changed kNN parameter redoes kNN and everything after it, not the shards
    changed = _baseline(run_dir, "knn.k=10")
    assert [o.complete for o in plan_job(changed)] == [True, False, False, False]
    assert [o.skipped for o in run_job(changed)] == [True, False, False, False]
    assert np.load(run_dir / "knn" / "nbrs.npy").shape[1] == 10


def test_fixed_threshold_and_unknown_eval_group(tmp_path, ray_cluster):
    from dist_fair.errors import ConfigError

    config = _baseline(tmp_path / "r", "cluster.threshold=0.5", "eval.groups=[religion]")
    with pytest.raises(ConfigError, match="eval.groups"):
        run_job(config)
    info = json.loads((tmp_path / "r" / "cluster" / "stage.json").read_text())["info"]
    assert info["tau"] == 0.5 and info["chosen_on"] == "config"


def test_fair_assignment_needs_soft_assignments(tmp_path):
    from dist_fair.errors import ConfigError

    with pytest.raises(ConfigError, match="fair.enabled"):
        run_job(load_config(None, [f"run_dir={tmp_path}", "fair.enabled=true", *TINY]))
    assert not (tmp_path / "shards").exists()


MAIN_TINY = [*TINY, "knn.k=16", "knn.recall_sample=0", "train.seq_len=12", "train.epochs=2", "train.batch_size=32",
             "train.width=16", "train.heads=2", "train.sub_clusters=3", "train.log_every=5",
             "cluster.infer_rows_per_task=200", "data.identities=80"]


@pytest.mark.ray
def test_main_job_trains_the_intraformer_beside_the_baseline(tmp_path, ray_by_value, caplog, capsys):
    """``dist-fair run`` with the defaults (tiny sizes only): the Intraformer on 2 Ray Train workers
    with ZeRO-1, the kNN baseline decoded on the same test identities, one comparison report."""
    from dist_fair.cli import main
    from dist_fair.data.shards import load_labels
    from dist_fair.models.sequences import TEST

    run_dir = tmp_path / "run"
    args = ["run", "--run-dir", str(run_dir)] + [a for s in MAIN_TINY for a in ("--set", s)]
    with caplog.at_level(logging.INFO):
        assert main(args) == 0
    log = caplog.text
    assert "trained on 2 Ray Train worker(s)" in log and "DeepSpeed ZeRO stage 1" in log
    assert "intraformer: epoch 1/2  loss" in log and "intraformer: epoch 2/2  loss" in log
    printed = capsys.readouterr().out
    assert "intraformer" in printed and "kNN baseline" in printed

    stages = json.loads((run_dir / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["shards", "knn", "sequences", "train", "infer", "cluster", "baseline",
                                            "evaluate"]
    train_info = json.loads((run_dir / "train" / "stage.json").read_text())["info"]
    losses = train_info["loss_per_epoch"]
    assert len(losses) == 2 and losses[1] < losses[0]
    report = json.loads((run_dir / "report.json").read_text())
    split = np.load(run_dir / "sequences" / "split.npy")
    assert [r["method"] for r in report["comparison"]] == ["intraformer", "kNN baseline"]
    identity = load_labels(run_dir / "shards").identity
    for name in ("intraformer", "kNN baseline"):  # both on the same test identities
        assert report["methods"][name]["num_samples"] == int((split == TEST).sum())
        assert report["methods"][name]["identity"]["num_identities"] == len(np.unique(identity[split == TEST]))
    assert (np.load(run_dir / "baseline" / "eval_mask.npy") == (split == TEST)).all()
    for row in report["comparison"]:
        assert 0 < row["pairwise_f"] <= 1 and 0 < row["bcubed_f"] <= 1
        assert row["attributes"]["race"]["f_std"] >= 0
    markdown = (run_dir / "report.md").read_text()
    assert markdown.index("## Comparison") < markdown.index("## intraformer") < markdown.index("## kNN baseline")
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    baseline_info = json.loads((run_dir / "baseline" / "stage.json").read_text())["info"]
    assert baseline_info["scores"] == "cosine similarities" and baseline_info["evaluated_samples"] == int((split == TEST).sum())

    # eval.plots=false: only the evaluation is redone, and no plot is left behind
    assert main(args + ["--set", "eval.plots=false"]) == 0
    again = json.loads((run_dir / "stages.json").read_text())
    assert [s["skipped"] for s in again] == [True] * 7 + [False]
    assert not (run_dir / "report.png").exists() and not (run_dir / "eval" / "report.png").exists()


DEEP_TINY = ["data.preset=balanced", "data.identities=6", "data.images_per_identity=30", "data.dim=16", "data.workers=1",
             "data.shard_rows=96", "data.block_rows=48", "train.epochs=3", "train.batch_size=64", "train.log_every=2",
             "deep.pretrain_epochs=1", "deep.hidden=[16]", "deep.ae_hidden=[16, 16]", "deep.ae_epochs=2",
             "deep.ae_lr=0.003", "deep.vat_eps=0.5", "deep.kmeans_sample=500", "fair.enabled=true",
             "train.group_attribute=gender", "train.lr=0.003"]


def _deep_params():
    from dist_fair.model_registry import model_names

    return [pytest.param(m, marks=() if m == "dfdc" else pytest.mark.slow) for m in model_names("deep")]


@pytest.mark.ray
@pytest.mark.parametrize("model", _deep_params())
def test_every_deep_model_runs_through_dist_fair_run(model, tmp_path, ray_by_value, capsys):
    """shards -> train (2 workers, ZeRO-1) -> predict on Ray -> fair_assign -> evaluate; DFDC and
    Fair-DEC recompute the fair assignment after every epoch; the fair labels are fairer."""
    from dist_fair.cli import main
    from dist_fair.data.shards import load_labels

    run_dir = tmp_path / "run"
    extra = ["fair.workers=2"] if model == "dfdc" else []
    args = ["run", "--run-dir", str(run_dir), "--set", f"train.model={model}"] + [
        a for s in DEEP_TINY + extra for a in ("--set", s)]
    assert main(args) == 0
    stages = json.loads((run_dir / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["shards", "train", "predict", "fair_assign", "evaluate"]
    probs = np.load(run_dir / "predict" / "probs.npy")
    labels = load_labels(run_dir / "shards")
    assert probs.shape == (len(labels), 6) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (np.load(run_dir / "predict" / "labels.npy") == probs.argmax(axis=1)).all()
    train_info = json.loads((run_dir / "train" / "stage.json").read_text())["info"]
    assert len(train_info["loss_per_epoch"]) == 3
    history = [json.loads(line) for line in (run_dir / "train" / "cluster" / "train" / "metrics.jsonl").read_text()
               .splitlines()]
    epochs = [r for r in history if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    if model in ("dfdc", "fair_dec"):  # the fairness loss from epoch pretrain_epochs=1 on
        assert "loss_fair" not in epochs[0] and all(r["loss_fair"] > 0 for r in epochs[1:])
        assert all("hook_fair_balance" in r for r in epochs)
    report = json.loads((run_dir / "report.json").read_text())
    net, fair = (report["methods"][f"{model} (network)"], report["methods"][f"{model} + fair assignment"])
    assert report["num_samples"] == len(labels)  # deep clustering: every sample
    for method in (net, fair):
        assert 0 <= method["identity"]["accuracy"] <= 1 and 0 <= method["identity"]["nmi"] <= 1
    # fair.eps = 0: every cluster holds each gender in the population proportion, rounded (METHODS.md §6)
    gender = labels.attrs["gender"].astype(np.int64)
    rho = np.bincount(gender) / len(gender)
    fair_labels = np.load(run_dir / "fair_assign" / "labels.npy")
    for cluster in np.unique(fair_labels):
        counts = np.bincount(gender[fair_labels == cluster], minlength=len(rho))
        size = counts.sum()
        assert (counts >= np.floor(size * rho) - 1e-9).all() and (counts <= np.ceil(size * rho) + 1e-9).all()
    assert fair["attributes"]["gender"]["balance"] >= net["attributes"]["gender"]["balance"]
    assert fair["attributes"]["gender"]["fwd"] <= net["attributes"]["gender"]["fwd"] + 1e-9
    fair_info = json.loads((run_dir / "fair_assign" / "stage.json").read_text())["info"]
    assert fair_info["attribute"] == "gender" and fair_info["workers"] == (2 if model == "dfdc" else 1)
    assert "balance" in (run_dir / "report.md").read_text()
    assert all(o.complete for o in plan_job(load_config(None, [f"run_dir={run_dir}", f"train.model={model}",
                                                               *DEEP_TINY, *extra])))
