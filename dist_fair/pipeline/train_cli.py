"""``dist-fair train``: train the model named by ``train.model`` on Ray Train + DeepSpeed.

The stages the model trains on (shards; kNN graph and sequences for the sequence models) are run
or reused through the pipeline's Stage helper first, which is why this command lives in the
pipeline package; the model's task comes from its registry entry (``dist_fair/model_registry.py``).

Only the standard library is imported at module level (``dist-fair --help`` stays fast); torch,
Ray and DeepSpeed are imported when training starts.
"""
from __future__ import annotations

import argparse

from dist_fair.job_options import add_job_arguments, job_from_args
from dist_fair.verify_option import add_no_verify_argument, apply_no_verify

HELP = "train a model (train.model) on Ray Train workers with DeepSpeed"
DESCRIPTION = (
    "Train the model named by train.model on train.workers Ray Train workers, each running a DeepSpeed "
    "engine (ZeRO configuration train.deepspeed from dist_fair/configs/deepspeed/, linked as launch/deepspeed/). "
    "The data stages it needs are run or reused first (shards; kNN and sequences for the sequence models). "
    "Outputs go to RUN_DIR/train/: "
    "metrics.jsonl (history), model.pt (weights), summary.json, ray/ (checkpoints). A killed run resumes "
    "from its last checkpoint when started again with the same --run-dir; a finished run is skipped. "
    "train.model=probe is a built-in MLP probe (embeddings -> identity); intraformer/clusformer train on kNN "
    "sequences, dec/imsat/dfdc/fair_dec/fairoids on the embeddings (any data.source; hyper-parameters in the "
    "deep section, protected attribute train.group_attribute). `dist-fair run` also predicts and evaluates."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--force", action="store_true", help="discard a previous training run in the run folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the history is still written)")
    parser.add_argument("--build-ops", action="store_true",
                        help="only compile DeepSpeed's CPU op into the environment's cache (once, about 40 s) and exit")

    add_no_verify_argument(parser)


def main(args: argparse.Namespace) -> int:
    apply_no_verify(args)
    from pathlib import Path

    if args.build_ops:
        from dist_fair.train.deepspeed_env import build_cpu_ops, extensions_dir

        built = build_cpu_ops()
        print(f"DeepSpeed CPU ops ready in {extensions_dir()}: {', '.join(built) or 'none needed'}")
        return 0

    from dist_fair.train.task import check_trainable

    job = job_from_args(args)
    run_dir = Path(job.run_dir).expanduser().resolve()
    check_trainable(job.train.model)  # fails fast, before Ray starts, for models not built yet

    from dist_fair.ray_runtime import init_ray
    from dist_fair.train.engine import fit

    init_ray(address=job.ray.address, num_cpus=job.ray.num_cpus,
             include_dashboard=job.ray.include_dashboard, namespace=job.ray.namespace)
    from dist_fair.model_registry import create_task
    from .job import prepare_training_inputs

    task = create_task(job, prepare_training_inputs(job, run_dir))  # the stages before train, run or reused
    try:
        result = fit(task, job.train, run_dir, progress=not args.no_progress, force=args.force)
    finally:
        if (run_dir / "train").is_dir():
            job.save(run_dir / "train" / "config.yaml")  # the job as this command ran it
    shown = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    status = "already complete (skipped)" if result.skipped else "done"
    print(f"train {task.name}: {status}; " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    print(f"model: {result.model_path}\nhistory: {result.train_dir / 'metrics.jsonl'}")
    return 0
