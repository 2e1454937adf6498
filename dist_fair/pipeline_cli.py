"""``dist-fair run``: the whole job (shards -> knn -> [train] -> cluster -> evaluate).

With no options it runs the built-in BUPT-style data set on this machine in a few minutes and
writes ``report.json`` and ``report.md`` into the run folder. Completed stages are skipped on a
re-run, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json

HELP = "run the whole job (shards, kNN graph, clustering, evaluation) and write a report"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML job config (sections ray, data, knn, cluster, train, fair, eval; see launch/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set knn.k=40 --set data.identities=2000 (repeatable)")
    parser.add_argument("--run-dir", default=None, help="run folder (overrides run_dir of the config)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or ray://host:10001); default: a private local instance")
    parser.add_argument("--fresh", action="store_true", help="redo every stage even if its output is complete")


def main(args: argparse.Namespace) -> int:
    from dist_fair.config import load_config
    from dist_fair.pipeline import run_job

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    config = load_config(args.config, overrides)
    outcomes = run_job(config, fresh=args.fresh)
    for outcome in outcomes:
        state = "skipped (complete)" if outcome.skipped else f"{outcome.seconds:7.1f} s"
        print(f"  {outcome.name:<9} {state:<20} {outcome.folder}")
    report = outcomes[-1].folder / "report.json"
    if report.exists():
        summary = json.loads(report.read_text())
        print(f"report: {report.parent.parent / 'report.md'}")
        identity = summary.get("identity") or {}
        for key in ("pairwise", "bcubed"):
            if isinstance(identity.get(key), dict):
                print(f"  {key:<9} F = {identity[key]['f']:.4f}")
        for attr, block in (summary.get("attributes") or {}).items():
            mean = ((block or {}).get("mean") or {}).get("pairwise")
            std = ((block or {}).get("std") or {}).get("pairwise")
            if mean and std:
                print(f"  {attr:<9} per-group pairwise F: mean {mean['f']:.4f}, std {std['f']:.4f}")
    return 0
