"""The main job end to end on tiny data: report contents, resume after a failure, re-run skips."""
import json

import numpy as np
import pytest

from dist_fair import pipeline
from dist_fair.config import load_config


def _config(run_dir, *extra):
    return load_config(None, [f"run_dir={run_dir}", "data.identities=60", "data.images_per_identity=8",
                              "data.dim=32", "data.workers=1", "knn.k=12", "knn.recall_sample=50", *extra])


def test_run_resume_and_skip(tmp_path, ray_cluster, monkeypatch):
    run_dir = tmp_path / "run"
    config = _config(run_dir)

    calls = {"n": 0}
    real = pipeline.evaluate_stage

    def failing_evaluate(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("killed during evaluation")

    monkeypatch.setattr(pipeline, "evaluate_stage", failing_evaluate)
    with pytest.raises(RuntimeError):
        pipeline.run_job(config)
    assert not (run_dir / "report.json").exists()
    assert not (run_dir / "eval" / "stage.json").exists()
    knn_record = json.loads((run_dir / "knn" / "stage.json").read_text())

    monkeypatch.setattr(pipeline, "evaluate_stage", real)
    outcomes = pipeline.run_job(config)
    assert [o.skipped for o in outcomes] == [True, True, True, False]
    assert json.loads((run_dir / "knn" / "stage.json").read_text()) == knn_record

    report = json.loads((run_dir / "report.json").read_text())
    identity = report["identity"]
    for key in ("pairwise", "bcubed"):
        assert 0.0 < identity[key]["f"] <= 1.0
    assert 0.0 < identity["nmi"] <= 1.0
    race = report["attributes"]["race"]
    assert set(race["per_group"]) == {"African", "Asian", "Caucasian", "Indian"}
    assert race["std"]["pairwise"]["f"] >= 0.0
    assert (run_dir / "report.md").read_text().startswith("# ")
    assert (run_dir / "config.yaml").exists()

    # evaluation only on test identities: the validation identities are excluded
    val_mask = np.load(run_dir / "cluster" / "val_mask.npy")
    assert report["num_samples"] == int((~val_mask).sum())

    again = pipeline.run_job(config)
    assert all(o.skipped for o in again)

    # a changed kNN parameter redoes kNN and everything after it, not the shards
    changed = pipeline.run_job(_config(run_dir, "knn.k=10"))
    assert [o.skipped for o in changed] == [True, False, False, False]
    assert np.load(run_dir / "knn" / "nbrs.npy").shape[1] == 10


def test_fixed_threshold_and_unknown_eval_group(tmp_path, ray_cluster):
    from dist_fair.errors import ConfigError

    config = _config(tmp_path / "r", "cluster.threshold=0.5", "eval.groups=[religion]")
    with pytest.raises(ConfigError, match="eval.groups"):
        pipeline.run_job(config)
    info = json.loads((tmp_path / "r" / "cluster" / "stage.json").read_text())["info"]
    assert info["tau"] == 0.5 and info["chosen_on"] == "config"
