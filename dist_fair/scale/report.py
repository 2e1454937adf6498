"""What a scaling study reports: per-cell table (CSV), fits, efficiency and extrapolation (JSON,
Markdown) and a log-log plot of time against N with the fitted lines (PNG).

Per stage and worker count, :func:`dist_fair.scale.fit.fit_power_law` on the cells' (samples,
wall seconds); per stage, size and W > 1 the parallel efficiency ``t_1 / (W t_W)``; per stage and
worker count the extrapolated wall time at each ``extrapolate_to`` size with its 95% prediction
interval. Every number written is a measurement of this run or labelled as a model's output.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from dist_fair.errors import DataError
from dist_fair.scale.fit import fit_power_law, parallel_efficiency
from dist_fair.scale.stages import PARALLEL_STAGES, STAGES

LOG = logging.getLogger(__name__)

MODEL = ("wall time t = a N^b per stage and worker count, fitted by ordinary least squares of ln t on ln N "
         "over the measured sizes; the 95% interval of b uses Student's t with n - 2 degrees of freedom; "
         "the extrapolation is a N0^b with the 95% prediction interval of a new observation in log space "
         "(it assumes the same machine, load and per-stage algorithm beyond the measured range)")
CSV_COLUMNS = ["stage", "n", "n_target", "workers", "nodes", "wall_s", "cpu_s", "peak_rss_mib", "throughput_per_s",
               "processes", "load_avg_1min", "started"]


def analyse(records: Sequence[dict[str, Any]], extrapolate_to: Sequence[int] = (5_000_000, 10_000_000)
            ) -> dict[str, Any]:
    """Fits, efficiencies and extrapolations of a study's records."""
    fits: list[dict[str, Any]] = []
    extrapolation: list[dict[str, Any]] = []
    stages = [s for s in STAGES if any(r["stage"] == s for r in records)]
    workers = sorted({int(r["workers"]) for r in records})
    for stage in stages:
        for w in workers:
            rows = sorted((r for r in records if r["stage"] == stage and r["workers"] == w), key=lambda r: r["n"])
            entry: dict[str, Any] = {"stage": stage, "workers": w, "points": len(rows),
                                     "sizes": [r["n"] for r in rows]}
            if len({r["n"] for r in rows}) < 2 or any(r["wall_s"] <= 0 for r in rows):
                entry["note"] = "fewer than two sizes: no fit"
                fits.append(entry)
                continue
            fit = fit_power_law([r["n"] for r in rows], [r["wall_s"] for r in rows])
            entry.update(a=fit.a, b=round(fit.b, 4), b_low=None if fit.b_low is None else round(fit.b_low, 4),
                         b_high=None if fit.b_high is None else round(fit.b_high, 4),
                         b_se=None if fit.b_se is None else round(fit.b_se, 4),
                         r2=None if fit.r2 is None else round(fit.r2, 4))
            if all(r["cpu_s"] > 0 for r in rows):  # CPU seconds: the load-independent cost on a shared machine
                cpu_fit = fit_power_law([r["n"] for r in rows], [r["cpu_s"] for r in rows])
                entry.update(b_cpu=round(cpu_fit.b, 4),
                             b_cpu_low=None if cpu_fit.b_low is None else round(cpu_fit.b_low, 4),
                             b_cpu_high=None if cpu_fit.b_high is None else round(cpu_fit.b_high, 4))
            fits.append(entry)
            for n0 in extrapolate_to:
                interval = fit.prediction_interval(n0)
                extrapolation.append({"stage": stage, "workers": w, "n": int(n0), "wall_s": round(fit.predict(n0), 1),
                                      "low_s": None if interval is None else round(interval[0], 1),
                                      "high_s": None if interval is None else round(interval[1], 1),
                                      "from_sizes": f"{min(entry['sizes'])}-{max(entry['sizes'])}"})
    efficiency: list[dict[str, Any]] = []
    one = {(r["stage"], r["n"]): r for r in records if r["workers"] == 1}
    for r in records:
        if r["workers"] > 1 and (r["stage"], r["n"]) in one:
            base = one[(r["stage"], r["n"])]
            efficiency.append({"stage": r["stage"], "n": r["n"], "workers": r["workers"],
                               "t1_s": base["wall_s"], "tW_s": r["wall_s"],
                               "efficiency": round(parallel_efficiency(base["wall_s"], r["wall_s"], r["workers"]), 3),
                               "parallel_stage": r["stage"] in PARALLEL_STAGES})
    totals = []
    for w in workers:
        for n in sorted({r["n_target"] for r in records if r["workers"] == w}):
            mine = [r for r in records if r["workers"] == w and r["n_target"] == n]
            totals.append({"n_target": n, "workers": w, "stages": len(mine), "wall_s": round(sum(r["wall_s"] for r in mine), 1),
                           "cpu_s": round(sum(r["cpu_s"] for r in mine), 1),
                           "peak_rss_mib": round(max(r["peak_rss_mib"] for r in mine), 1)})
    return {"model": MODEL, "fits": fits, "efficiency": efficiency, "extrapolation": extrapolation, "totals": totals}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def render_markdown(records: Sequence[dict[str, Any]], analysis: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# {meta.get('title', 'Scaling study')}", ""]
    for key in ("machine_note", "ray", "settings_note"):
        if meta.get(key):
            lines += [f"{key.replace('_', ' ')}: {meta[key]}", ""]
    lines += ["## Cells", "", *_table(records, CSV_COLUMNS), "",
              f"CPU s and peak RSS: {records[0]['cpu_scope'] if records else ''}.", "",
              "## Fitted exponents (t = a N^b; b, a: wall time; b_cpu: the same fit of the CPU seconds)", "",
              *_table(analysis["fits"], ["stage", "workers", "points", "b", "b_low", "b_high", "r2", "a", "b_cpu",
                                         "b_cpu_low", "b_cpu_high"]), "",
              "(N of the train stage = its training anchors; of every other stage = the samples.)", "",
              "## Parallel efficiency t1 / (W tW)", "",
              *_table(analysis["efficiency"], ["stage", "n", "workers", "t1_s", "tW_s", "efficiency", "parallel_stage"]),
              "", "(single-process stages: the efficiency only shows the noise and load of the machine.)", "",
              "## Totals per cell (all stages)", "", *_table(analysis["totals"], ["n_target", "workers", "stages", "wall_s",
                                                                                  "cpu_s", "peak_rss_mib"]), "",
              "## Extrapolation (a model, not a measurement)", "", f"Model: {analysis['model']}.", "",
              *_table(analysis["extrapolation"], ["stage", "workers", "n", "wall_s", "low_s", "high_s", "from_sizes"]),
              ""]
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], analysis: dict[str, Any]) -> bytes | None:
    """Log-log wall time against N per stage, one colour per worker count, fitted lines dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        LOG.warning("matplotlib missing: no scaling plot")
        return None
    import numpy as np

    stages = [s for s in STAGES if any(r["stage"] == s for r in records)]
    if not stages:
        return None
    cols = min(4, len(stages))
    rows_ = (len(stages) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.3 * rows_), squeeze=False)
    fits = {(f["stage"], f["workers"]): f for f in analysis["fits"] if "b" in f}
    for ax, stage in zip(axes.ravel(), stages):
        for i, w in enumerate(sorted({r["workers"] for r in records})):
            pts = sorted((r["n"], r["wall_s"]) for r in records if r["stage"] == stage and r["workers"] == w)
            if not pts:
                continue
            colour = f"C{i}"
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o", color=colour, label=f"W={w}")
            fit = fits.get((stage, w))
            if fit:
                grid = np.geomspace(pts[0][0], pts[-1][0], 20)
                ci = "" if fit["b_low"] is None else f" [{fit['b_low']:.2f}, {fit['b_high']:.2f}]"
                ax.loglog(grid, fit["a"] * grid ** fit["b"], "--", color=colour, label=f"b={fit['b']:.2f}{ci}")
        ax.set_title(stage)
        ax.set_xlabel("samples N")
        ax.set_ylabel("wall s")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.ravel()[len(stages):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(prefix: str | Path, records: Sequence[dict[str, Any]], meta: dict[str, Any],
                 extrapolate_to: Sequence[int] = (5_000_000, 10_000_000)) -> dict[str, Path]:
    """``<prefix>.csv`` (cells), ``.json`` (cells, fits, efficiency, extrapolation, meta), ``.md``
    and ``.png``, each written atomically. Returns the paths written."""
    from dist_fair.io_atomic import atomic_path, atomic_write_json

    if not records:
        raise DataError("scale: no finished cells to report; run the sweep first")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    analysis = analyse(records, extrapolate_to)
    paths = {ext: Path(f"{prefix}.{ext}") for ext in ("csv", "json", "md", "png")}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS + ["parts", "info"], extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({**r, "parts": json.dumps(r.get("parts", {})), "info": json.dumps(r.get("info", {}))})
    with atomic_path(paths["csv"]) as tmp:
        Path(tmp).write_text(text.getvalue(), encoding="utf-8")
    atomic_write_json(paths["json"], {**meta, **analysis, "cells": list(records)})
    with atomic_path(paths["md"]) as tmp:
        Path(tmp).write_text(render_markdown(records, analysis, meta), encoding="utf-8")
    image = plot(records, analysis)
    if image is not None:
        with atomic_path(paths["png"]) as tmp:
            Path(tmp).write_bytes(image)
    else:
        paths.pop("png")
    return paths
