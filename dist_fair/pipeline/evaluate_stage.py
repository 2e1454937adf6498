"""The ``evaluate`` stage: every method's labels scored on the same samples (METHODS.md §7).

A job evaluates one or more labelings side by side, e.g. the Intraformer and the kNN baseline on
the same test identities, or a deep clustering network and its fair assignment on all samples.
The report (``report.json``, ``report.md`` opening with the comparison table, ``report.png``
with every method's per-group F when ``eval.plots``) is written into ``<run>/eval/`` and copied
into the run folder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dist_fair.errors import ConfigError
from .stage import JobContext, StageOutcome


@dataclass
class Labeling:
    """A method's labels: its display name and the stage whose folder holds ``labels.npy``."""

    name: str
    stage: StageOutcome


def evaluate_stage(ctx: JobContext, shards: StageOutcome, labelings: Sequence[Labeling],
                   mask_stage: StageOutcome | None, evaluated_on: str, fairness: bool = False,
                   facts: Sequence[str] = ()) -> StageOutcome:
    """Score every labeling on the samples of ``mask_stage.folder/eval_mask.npy`` (all samples
    when ``mask_stage`` is None)."""
    config = ctx.config

    def work(folder: Path) -> dict[str, Any]:
        from dist_fair.data.shards import load_labels
        from dist_fair.eval.report import evaluate_labels, write_job_report
        from dist_fair.faults import kill_point

        labels = load_labels(shards.folder)
        groups = config.eval.groups or list(labels.attribute_names)
        unknown = [g for g in groups if g not in labels.attribute_names]
        if unknown:
            raise ConfigError(f"config field 'eval.groups': unknown attribute(s) {unknown}; the shards have "
                              f"{list(labels.attribute_names)}")
        mask = (np.load(mask_stage.folder / "eval_mask.npy", allow_pickle=False) if mask_stage is not None
                else np.ones(len(labels), bool))
        methods = {}
        for labeling in labelings:
            pred = np.load(labeling.stage.folder / "labels.npy", allow_pickle=False)
            methods[labeling.name] = evaluate_labels(
                pred[mask], labels.identity[mask], groups, attrs={g: labels.attrs[g][mask] for g in groups},
                attribute_names={g: labels.attribute_names[g] for g in groups})
        kill_point("evaluate.scored")
        scope = f"{evaluated_on}: {int(mask.sum())} of {len(mask)} samples"
        extra = {"fairness_view": fairness,
                 "stages": {lab.name: {k: v for k, v in lab.stage.info.items() if k != "grid"} for lab in labelings}}
        write_job_report(methods, folder, title=f"dist_fair report: {config.run_dir}", evaluated_on=scope,
                         fairness=fairness, plots=config.eval.plots, facts=facts, extra=extra)
        first = methods[labelings[0].name].get("identity") or {}
        return {"methods": [lab.name for lab in labelings], "evaluated_samples": int(mask.sum()),
                "pairwise_f": {name: ((r.get("identity") or {}).get("pairwise") or {}).get("f")
                               for name, r in methods.items()},
                "primary_pairwise_f": (first.get("pairwise") or {}).get("f")}

    params = {**asdict(config.eval), "methods": [lab.name for lab in labelings], "fairness": fairness,
              "evaluated_on": evaluated_on, "facts": list(facts)}
    upstream = [shards, *(lab.stage for lab in labelings)] + ([mask_stage] if mask_stage is not None else [])
    return ctx.stage("evaluate", "eval", params, upstream).run(work)


__all__ = ["Labeling", "evaluate_stage"]
