"""The job: which stages run for ``train.model`` (its registry family) and in what order.

- no model (``train.model=none``): shards -> knn -> cluster (kNN similarities) -> evaluate;
- sequence models (intraformer, clusformer): shards -> knn -> sequences -> train -> infer ->
  cluster (edge probabilities) and baseline (kNN similarities, same split) -> evaluate both on the
  test identities;
- deep models (dec, imsat, dfdc, fair_dec, fairoids): shards -> train -> predict -> [fair_assign
  when ``fair.enabled``] -> evaluate the network's labels (and the fair assignment) on all samples.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from dist_fair.errors import ConfigError
from dist_fair.io_atomic import atomic_write_text
from .stage import JobContext, StageOutcome

LOG = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "report.md", "report.png")


def _family(config) -> str:
    if config.train.model == "none":
        return "none"
    from dist_fair.model_registry import get_model

    family = get_model(config.train.model).family
    if family == "probe":
        raise ConfigError("config field 'train.model': 'probe' is the engine's test workload, not a clustering "
                          "method; `dist-fair train` trains it, `dist-fair run` needs a clustering model")
    return family


def _check(config, family: str) -> None:
    if config.fair.enabled and family != "deep":
        raise ConfigError(f"config field 'fair.enabled': the fair_assign stage takes soft assignments (N x K) of a deep "
                          f"clustering model; train.model={config.train.model!r} predicts "
                          f"{'edges' if family == 'sequence' else 'no soft assignments'} - set fair.enabled=false or "
                          "choose dec, imsat, dfdc, fair_dec or fairoids")


def _stages(ctx: JobContext) -> None:
    from .data_stage import shards_stage
    from .decode_stage import baseline_stage, cluster_stage
    from .evaluate_stage import Labeling, evaluate_stage
    from .graph_stage import knn_stage

    config = ctx.config
    family = _family(config)
    _check(config, family)
    shards = shards_stage(ctx)
    if family == "deep":
        from .deep_stages import deep_train_stage, fair_assign_stage, predict_stage

        trained = deep_train_stage(ctx, shards)
        predicted = predict_stage(ctx, shards, trained)
        labelings = [Labeling(f"{config.train.model} (network)", predicted)]
        if config.fair.enabled:
            labelings.append(Labeling(f"{config.train.model} + fair assignment", fair_assign_stage(ctx, shards, predicted)))
        evaluate_stage(ctx, shards, labelings, None, "all samples (deep clustering is unsupervised)", fairness=True)
        return
    knn = knn_stage(ctx, shards)
    if family == "sequence":
        from .sequence_stages import infer_stage, sequence_train_stage, sequences_stage

        seqs = sequences_stage(ctx, shards, knn)
        trained = sequence_train_stage(ctx, seqs, knn)
        inferred = infer_stage(ctx, seqs, knn, trained)
        model = cluster_stage(ctx, shards, knn, seqs, inferred)
        baseline = baseline_stage(ctx, shards, knn, seqs)
        seq_len = int(config.train.seq_len or config.knn.k)
        evaluate_stage(ctx, shards, [Labeling(config.train.model, model), Labeling("kNN baseline", baseline)], model,
                       "the test identities (neither trained on nor used to choose a decoding parameter)",
                       facts=[f"Both methods decode the same {seq_len} nearest neighbours of every sample with "
                              f"cluster.method={config.cluster.method}; each chooses its parameter on the same "
                              "validation identities (the model on edge probabilities, the baseline on cosine "
                              "similarities)."])
        return
    cluster = cluster_stage(ctx, shards, knn)
    evaluate_stage(ctx, shards, [Labeling("kNN baseline", cluster)], cluster,
                   "every identity but the validation identities used to choose the threshold")


def with_absolute_paths(config):
    """``config`` with ``run_dir``, ``data.shards`` and ``data.path`` made absolute (from the
    working directory): Ray Train workers and Ray tasks run in folders of their own, so a relative
    path would name another file there."""
    import dataclasses

    data = config.data
    data = dataclasses.replace(data, **{name: str(Path(getattr(data, name)).resolve())
                                        for name in ("shards", "path") if getattr(data, name)})
    return dataclasses.replace(config, run_dir=str(Path(config.run_dir).resolve()), data=data)


def run_job(config, fresh: bool = False) -> list[StageOutcome]:
    """Run every stage of the job described by ``config`` (skipping completed ones); the report
    files are copied into the run folder."""
    from dist_fair.ray_runtime import init_ray

    config = with_absolute_paths(config)
    run_dir = Path(config.run_dir)
    _check(config, _family(config))  # fail before anything starts
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.yaml")
    init_ray(address=config.ray.address, num_cpus=config.ray.num_cpus, include_dashboard=config.ray.include_dashboard,
             namespace=config.ray.namespace)
    ctx = JobContext(config, run_dir, fresh=fresh)
    for name in REPORT_FILES:  # never leave a report that does not describe this run's output
        (run_dir / name).unlink(missing_ok=True)
    _stages(ctx)
    evaluated = ctx.outcomes[-1]
    for name in REPORT_FILES:
        if (evaluated.folder / name).exists():
            shutil.copyfile(evaluated.folder / name, run_dir / name)
    atomic_write_text(run_dir / "stages.json", json.dumps(
        [{"stage": o.name, "folder": str(o.folder), "skipped": o.skipped, "seconds": round(o.seconds, 2)}
         for o in ctx.outcomes], indent=2) + "\n")
    return ctx.outcomes


def plan_job(config) -> list[StageOutcome]:
    """The stages ``run_job`` would run, each marked complete (would be skipped) or not; runs nothing."""
    config = with_absolute_paths(config)
    ctx = JobContext(config, Path(config.run_dir), plan=True)
    _stages(ctx)
    return ctx.outcomes





def prepare_training_inputs(config, run_dir: str | Path):
    """The stages before ``train`` for ``train.model`` (shards; for sequence models also knn and
    sequences), run or reused in ``run_dir``, as the :class:`~dist_fair.model_registry.TaskInputs`
    of its task builder (``dist-fair train``)."""
    from dist_fair.model_registry import TaskInputs
    from .data_stage import shards_stage

    config = with_absolute_paths(config)
    run_dir = Path(run_dir).resolve()
    ctx = JobContext(config, run_dir)
    family = _family(config) if config.train.model != "probe" else "probe"
    shards = shards_stage(ctx)
    if family != "sequence":
        return TaskInputs(run_dir=run_dir, shards=shards.folder)
    from .graph_stage import knn_stage
    from .sequence_stages import sequences_stage

    knn = knn_stage(ctx, shards)
    seqs = sequences_stage(ctx, shards, knn)
    return TaskInputs(run_dir=run_dir, shards=shards.folder, knn=knn.folder, sequences=seqs.folder)
__all__ = ["run_job", "plan_job", "prepare_training_inputs", "REPORT_FILES"]
