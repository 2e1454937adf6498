"""ray_runtime.init_ray: what it asks Ray for (captured, no Ray started), and the cluster file's Ray flags."""
from pathlib import Path

import pytest
import yaml

from dist_fair import ray_runtime

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.fixture()
def captured(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    return calls


def test_local_instance_is_private_without_dashboard_and_progress_bars(captured, monkeypatch):
    import os

    monkeypatch.delenv("DIST_FAIR_VERIFY_SHARDS", raising=False)
    ray_runtime.init_ray()
    (kwargs,) = captured
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    assert kwargs["dashboard_host"] == "127.0.0.1" and "runtime_env" not in kwargs
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"  # the comment says: Ray Data's bars off


def test_no_verify_reaches_the_workers(captured, monkeypatch):
    from dist_fair.data.shards import VERIFY_ENV, set_shard_verification

    monkeypatch.setenv(VERIFY_ENV, "1")
    set_shard_verification(False)
    ray_runtime.init_ray(address="auto")
    (kwargs,) = captured
    assert kwargs["address"] == "auto"
    assert kwargs["runtime_env"] == {"env_vars": {VERIFY_ENV: "0"}}


def test_cluster_head_starts_without_dashboard():
    config = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--include-dashboard=false" in head
