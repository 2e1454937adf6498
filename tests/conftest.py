"""Shared fixtures. Ray is started once per test session, as a simulated two-node cluster
(``ray.cluster_utils.Cluster``): every Ray test therefore also exercises the multi-node path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as module ``name`` (benchmarks are scripts, not a package;
    their own ``common`` import needs the folder on sys.path, their dataclasses the module in
    sys.modules)."""
    import importlib.util
    import sys

    folder = ROOT / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the project. Tests that need it skip when it is absent, except under
    ``CI=true``: CI runs beside a copy of shared/, so a missing folder there is a failure, never a
    silent skip."""
    if not SHARED_DATA.is_dir():
        message = f"real data sets not found at {SHARED_DATA} (expected ../shared/data beside the project)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true, so this fails instead of skipping", pytrace=False)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _keep_shard_verification_setting():
    """A CLI run in process with ``--no-verify`` turns checksum verification off for the whole
    process (``DIST_FAIR_VERIFY_SHARDS``); a real command exits afterwards, a test must not leak it
    into the next test."""
    from dist_fair.data.shards import VERIFY_ENV

    before = os.environ.get(VERIFY_ENV)
    yield
    if before is None:
        os.environ.pop(VERIFY_ENV, None)
    else:
        os.environ[VERIFY_ENV] = before


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster simulated on this machine (2 logical CPUs per node), started once.

    Yields the ``ray.cluster_utils.Cluster``; ``ray`` is initialised and connected to it.
    """
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "resources": {"node_head": 1}},
    )
    cluster.add_node(num_cpus=2, resources={"node_worker": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="dist_fair_tests", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
