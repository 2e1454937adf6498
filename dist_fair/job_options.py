"""The options that name a job on the command line, shared by ``dist-fair run`` and ``dist-fair
train``: ``--config``, ``--set``, ``--run-dir`` and ``--address`` (standard library only at import,
so the CLI modules can import it at module level)."""
from __future__ import annotations

import argparse
from typing import Any


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML job config (sections ray, data, knn, cluster, train, fair, eval; see "
                             "launch/configs/); defaults for every field not given")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set knn.k=40 --set train.workers=2 (repeatable)")
    parser.add_argument("--run-dir", default=None, help="run folder (overrides run_dir of the config)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or ray://host:10001); default: ray.address of the config, "
                             "else a private local instance")


def job_from_args(args: argparse.Namespace) -> Any:
    """The :class:`dist_fair.config.JobConfig` the options name: the config file (or the built-in
    defaults), then every ``--set``, then ``--run-dir`` and ``--address`` as ``run_dir`` and
    ``ray.address`` overrides."""
    from dist_fair.config import load_config

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    return load_config(args.config, overrides)
