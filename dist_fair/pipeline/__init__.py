"""The main job: stages glued together through files (DESIGN.md, "The job, as data flows").

``run_job(config)`` runs the stages ``train.model`` needs (:mod:`dist_fair.pipeline.job`);
``plan_job(config)`` lists them with their state. Every stage goes through one helper,
:class:`dist_fair.pipeline.stage.Stage`, which owns fingerprinting (settings + the fingerprints of
the stages it reads; shards by content digest), skipping complete stages and resuming or clearing
partial ones. Modules, one job each:

- ``stage.py``: the Stage helper, ``StageOutcome``, ``JobContext``;
- ``data_stage.py``: ``shards`` (synth, digits, table, or external shards);
- ``graph_stage.py``: ``knn``;
- ``sequence_stages.py``: ``sequences``, ``train``, ``infer`` of the Intraformer / Clusformer;
- ``decode_stage.py``: ``cluster`` and ``baseline`` (global decoding);
- ``deep_stages.py``: ``train``, ``predict``, ``fair_assign`` of the deep (fair) clustering models;
- ``evaluate_stage.py``: ``evaluate`` (every method's labels on the same samples, one report);
- ``job.py``: which stages run for which model, ``run_job``, ``plan_job``;
- ``train_cli.py``: ``dist-fair train`` (runs or reuses the stages before ``train``, then trains).

Nothing but the command line (``dist_fair/pipeline_cli.py``, ``dist_fair/pipeline/train_cli.py``) imports
this package.
"""
from __future__ import annotations

from .job import plan_job, run_job
from .stage import StageOutcome

__all__ = ["run_job", "plan_job", "StageOutcome"]
