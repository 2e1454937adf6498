"""``dist-fair run``: the whole job for ``train.model``.

With no options it runs the main job on this machine in a few minutes: the built-in BUPT-style
data set -> kNN graph -> the Intraformer with the purity penalty trained on 2 Ray Train workers
with DeepSpeed ZeRO-1 -> edge inference on Ray -> global decoding, beside the kNN baseline decoded
on the same test identities -> ``report.md`` / ``report.json`` / ``report.png`` in the run folder.
``train.model`` dec, imsat, dfdc, fair_dec or fairoids run the deep (fair) clustering stages
instead (train -> predict -> optional fair_assign -> evaluate). Completed stages are skipped on a
re-run, so a killed run resumes where it stopped; ``--plan`` lists the stages and which are complete.
"""
from __future__ import annotations

import argparse
import json

from dist_fair.job_options import add_job_arguments, job_from_args
from dist_fair.verify_option import add_no_verify_argument, apply_no_verify

HELP = "run the whole job (shards, kNN graph, training, clustering, evaluation) and write a report"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--fresh", action="store_true", help="redo every stage even if its output is complete")
    parser.add_argument("--plan", action="store_true",
                        help="only print the stages this config runs and which are already complete; run nothing")

    add_no_verify_argument(parser)


def main(args: argparse.Namespace) -> int:
    apply_no_verify(args)
    from dist_fair.pipeline import run_job

    config = job_from_args(args)
    if args.plan:
        from dist_fair.pipeline import plan_job

        print(f"plan of {config.run_dir} (train.model={config.train.model}):")
        for outcome in plan_job(config):
            state = "complete (skipped)" if outcome.complete else "to run"
            print(f"  {outcome.name:<11} {state:<20} {outcome.folder}")
        return 0
    outcomes = run_job(config, fresh=args.fresh)
    for outcome in outcomes:
        state = "skipped (complete)" if outcome.skipped else f"{outcome.seconds:7.1f} s"
        print(f"  {outcome.name:<11} {state:<20} {outcome.folder}")
    report = outcomes[-1].folder / "report.json"
    if report.exists():
        summary = json.loads(report.read_text())
        print(f"report: {report.parent.parent / 'report.md'}")
        for row in summary.get("comparison") or []:
            line = f"  {row['method']:<28}"
            for key, label in (("pairwise_f", "pairwise F"), ("bcubed_f", "BCubed F"), ("accuracy", "ACC"),
                               ("nmi", "NMI")):
                if isinstance(row.get(key), float):
                    line += f" {label} {row[key]:.4f}"
            print(line)
            for attr, block in (row.get("attributes") or {}).items():
                parts = []
                if isinstance(block.get("f_mean"), float):
                    parts.append(f"per-group pairwise F mean {block['f_mean']:.4f}, std {block['f_std']:.4f}")
                if summary.get("fairness_view") and isinstance(block.get("balance"), float):
                    parts.append(f"balance {block['balance']:.4f}, FWD {block['fwd']:.4f}")
                if parts:
                    print(f"    {attr:<10} " + "; ".join(parts))
    return 0
