"""Starting or joining Ray (DESIGN.md, "Engines and how they start").

``address=None`` starts a private local instance (``ray.init(address="local")``, never attaching
to another Ray started on the machine) with the dashboard off and every port on localhost, unless
``RAY_ADDRESS`` is set; ``"auto"`` or ``"ray://host:10001"`` joins a cluster the user started (``ray up
launch/cluster.yaml`` or ``launch/slurm.sh``). If Ray is already initialised (tests, notebooks)
it is reused as it is (and its workers keep their environment). The driver's
``DIST_FAIR_VERIFY_SHARDS`` (``--no-verify``) is passed to the workers through the job's
``runtime_env``.
"""
from __future__ import annotations

import logging
import os

LOG = logging.getLogger(__name__)

# Variables of the driver that every Ray worker must see (shard checksum verification on/off).
FORWARDED_ENV = ("DIST_FAIR_VERIFY_SHARDS",)


def init_ray(address: str | None = None, num_cpus: int | None = None, include_dashboard: bool = False,
             namespace: str = "dist_fair") -> None:
    """Start or join Ray once per process; later calls are no-ops."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Progress output from Ray Data goes through our own logging; keep the console readable
    # (1 = Ray Data's own progress bars off).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    kwargs: dict = {"namespace": namespace, "log_to_driver": True, "configure_logging": False}
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    if forwarded:  # e.g. --no-verify: the workers read shards with the driver's setting
        kwargs["runtime_env"] = {"env_vars": forwarded}
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]  # the user pointed us at a cluster through Ray's own variable
    if address is None:
        # "local" always starts a private instance; a bare ray.init() would attach to whatever Ray
        # cluster was last started on this machine (another user's job, or a dead test cluster).
        kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                      dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1")
    else:
        kwargs["address"] = address
    LOG.info("starting Ray (%s)", "local instance" if address is None else f"joining {address}")
    ray.init(**kwargs)


def cluster_cpus() -> int:
    """Total CPUs Ray reports for the cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
