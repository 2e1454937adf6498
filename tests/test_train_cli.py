"""dist-fair train: configuration errors before anything heavy starts; light commands never import
DeepSpeed; the op cache goes into the virtual environment."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dist_fair.cli import main


@pytest.mark.parametrize("model, message", [("dfdc", "is registered but its task module"),
                                            ("none", "choose a model to train")])
def test_untrainable_models_fail_fast_with_a_clear_error(model, message, capsys, tmp_path, monkeypatch):
    import dataclasses

    from dist_fair import model_registry as registry

    # pretend dfdc's module is not there: the error must say so, and list what is registered
    broken = dataclasses.replace(registry.get_model("dfdc"), task_builder="dist_fair.not_a_module:build")
    monkeypatch.setitem(registry._REGISTRY, "dfdc", broken)
    code = main(["train", "--run-dir", str(tmp_path), "--set", f"train.model={model}"])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and "probe" in err
    assert not (tmp_path / "train").exists()


def test_every_configurable_model_is_registered():
    from dist_fair.config import TrainConfig
    from dist_fair.errors import ConfigError
    from dist_fair.model_registry import model_names

    with pytest.raises(ConfigError) as info:
        TrainConfig(model="?")
    choices = {m.strip(" '") for m in str(info.value).split("choose one of", 1)[1].split(",")}
    assert choices - {"none"} == set(model_names())


def test_bad_override_is_a_config_error(capsys, tmp_path):
    assert main(["train", "--run-dir", str(tmp_path), "--set", "train.workers=0"]) == 1
    assert "train.workers" in capsys.readouterr().err


def test_commands_that_do_not_train_do_not_import_deepspeed():
    light = ("import sys; import dist_fair.train, dist_fair.pipeline.train_cli, dist_fair.train.task, "
             "dist_fair.train.deepspeed_env; print(sorted(m for m in ('deepspeed', 'torch', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    whole_cli = "import sys; import dist_fair.cli as c; c.build_parser(); print('deepspeed' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", whole_cli], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_deepspeed_env_caches_ops_in_the_environment(monkeypatch):
    from dist_fair.train import deepspeed_env

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    changed = deepspeed_env.prepare_deepspeed_env(use_gpu=False)
    assert os.environ["DS_ACCELERATOR"] == "cpu" and changed["DS_ACCELERATOR"] == "cpu"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")  # a user's choice wins
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert deepspeed_env.prepare_deepspeed_env(use_gpu=False) == {}
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"


@pytest.mark.ray
def test_train_command_runs_the_probe_on_synthetic_shards(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # reports consumed faster
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")  # a loaded machine starts slowly
    from dist_fair.train.progress import read_metrics

    args = ["train", "--run-dir", str(tmp_path), "--no-progress", "--set", "train.model=probe",
            "--set", "data.preset=balanced", "--set", "data.identities=40", "--set", "data.images_per_identity=6", "--set", "data.dim=16",
            "--set", "train.epochs=2", "--set", "train.batch_size=32", "--set", "train.lr=3e-3",
            "--set", "train.hidden=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train probe: done" in out and "eval_accuracy" in out
    assert (tmp_path / "shards" / "manifest.json").is_file()  # the pipeline's shards stage wrote the data
    assert (tmp_path / "train" / "model.pt").is_file() and (tmp_path / "train" / "config.yaml").is_file()
    epochs = [r for r in read_metrics(tmp_path / "train" / "metrics.jsonl") if r["event"] == "epoch"]
    assert len(epochs) == 2 and epochs[1]["eval_loss"] < epochs[0]["eval_loss"]
    assert main(args) == 0  # a finished run is skipped
    assert "already complete" in capsys.readouterr().out
