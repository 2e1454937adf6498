"""The evaluation report: metrics overall and per protected attribute, written as JSON, Markdown
and a PNG bar chart (DESIGN.md, "[evaluate]"; METHODS.md §7).

``evaluate_labels`` takes plain arrays (so it does not depend on the data package): predicted
clusters, ground-truth identities and, per protected attribute, group indices with their names.
``-1`` means unknown, in identities and in groups:

- identity metrics (pairwise, BCubed, NMI, ACC) use the samples whose identity is known;
- an attribute's fairness metrics (balance, fairness, FWD) use the samples whose group for that
  attribute is known (identity does not matter there);
- an attribute's per-group quality uses the samples whose identity and group are both known.

The report says how many samples each part excluded.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dist_fair.errors import DataError
from dist_fair.eval import metrics
from dist_fair.eval.contingency import (check_labels, check_same_length, contingency_from_codes,
                                        noise_as_singletons, relabel)
from dist_fair.io_atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

LOG = logging.getLogger(__name__)

UNKNOWN = -1
_SCORES = ("precision", "recall", "f")


def _scores(values: tuple[float, float, float]) -> dict[str, float]:
    return {name: float(v) for name, v in zip(_SCORES, values)}


def _identity_metrics(pred_codes: np.ndarray, identity: np.ndarray, with_accuracy: bool) -> dict[str, Any] | None:
    known = identity != UNKNOWN
    if not known.any():
        return None
    true_codes, true_values = relabel(identity[known])
    cluster_codes, cluster_values = relabel(pred_codes[known])
    table = contingency_from_codes(true_codes, true_values.size, cluster_codes, cluster_values.size)
    out: dict[str, Any] = {
        "num_samples": int(known.sum()),
        "num_unknown_identity": int((~known).sum()),
        "num_identities": int(true_values.size),
        "num_clusters": int(cluster_values.size),
        "pairwise": _scores(metrics.pairwise_from_contingency(table)),
        "bcubed": _scores(metrics.bcubed_from_contingency(table)),
        "nmi": metrics.nmi_from_contingency(table),
    }
    if with_accuracy:
        out["accuracy"] = metrics.accuracy_from_contingency(table)
    return out


def _attribute_metrics(attr: str, values: np.ndarray, names: Sequence[str], pred_codes: np.ndarray,
                       identity: np.ndarray) -> dict[str, Any]:
    values = check_labels(values, f"attrs[{attr!r}]")
    known = values != UNKNOWN
    bad = known & ((values < 0) | (values >= len(names)))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(f"attrs[{attr!r}]: sample {first} has group value {int(values[first])} but "
                        f"attribute {attr!r} names only {len(names)} groups (0..{len(names) - 1}); use -1 "
                        f"for unknown or add the missing names to attribute_names[{attr!r}]")
    counts = np.bincount(values[known].astype(np.int64), minlength=len(names))
    out: dict[str, Any] = {
        "group_names": list(names),
        "num_samples": int(known.sum()),
        "num_unknown_group": int((~known).sum()),
        "group_counts": {name: int(c) for name, c in zip(names, counts)},
        "absent_groups": [name for name, c in zip(names, counts) if c == 0],
    }
    if not known.any():
        out.update(num_clusters=0, balance=None, fairness=None, fwd=None, per_group=None, mean=None, std=None,
                   per_group_num_samples=0)
        return out
    cluster_codes, cluster_values = relabel(pred_codes[known])
    group_codes, group_values = relabel(values[known])
    table = contingency_from_codes(cluster_codes, cluster_values.size, group_codes, group_values.size)
    out["num_clusters"] = int(cluster_values.size)
    out["balance"] = metrics.balance_from_table(table)
    out["fairness"] = metrics.fairness_from_table(table)
    out["fwd"] = metrics.fwd_from_table(table)
    both = known & (identity != UNKNOWN)
    out["per_group_num_samples"] = int(both.sum())
    if both.any():
        scores = metrics.per_group_scores(identity[both], pred_codes[both], values[both], list(names))
        out["per_group"] = scores["groups"]
        out["mean"], out["std"] = scores["mean"], scores["std"]
    else:
        out["per_group"] = out["mean"] = out["std"] = None
    return out


def evaluate_labels(pred: Any, labels: Any, groups: Sequence[str] | None = None, *,
                    attrs: Mapping[str, Any] | None = None,
                    attribute_names: Mapping[str, Sequence[str]] | None = None,
                    with_accuracy: bool = True) -> dict[str, Any]:
    """All METHODS.md §7 metrics of a predicted clustering, overall and per protected attribute.

    Args:
        pred: predicted cluster id per sample (any integers; every non-negative value is a
            cluster, every negative entry (noise) a singleton cluster of its own).
        labels: the identity per sample (int array, -1 = unknown), or any object with
            ``identity``, ``attrs`` and ``attribute_names`` (e.g. ``dist_fair.data.shards.Labels``),
            in which case ``attrs`` / ``attribute_names`` default to its own.
        groups: attributes to evaluate (default: all in ``attrs``).
        attrs: attribute name -> group index per sample (-1 = unknown).
        attribute_names: attribute name -> group names (index t names group t); default
            ``["0", "1", ...]`` up to the largest value.
        with_accuracy: also compute ACC (Hungarian matching; the slowest metric on huge inputs).

    Returns:
        A JSON-serialisable dict: ``num_samples``, ``num_clusters``, ``identity`` (overall pairwise
        and BCubed P/R/F, NMI, ACC; None when no identity is known), ``attributes`` (per attribute:
        group counts, balance, fairness, FWD, per-group scores with mean and population std), and
        ``notes`` saying which samples each part excluded.

    Raises:
        DataError: wrong lengths, non-integer labels, unknown attribute names or group values.
    """
    if hasattr(labels, "identity"):
        attrs = getattr(labels, "attrs", {}) if attrs is None else attrs
        attribute_names = getattr(labels, "attribute_names", {}) if attribute_names is None else attribute_names
        identity = labels.identity
    else:
        identity = labels
    pred = noise_as_singletons(check_labels(pred, "pred"))  # METHODS.md §7: each -1 its own cluster
    identity = check_labels(identity, "identity")
    attrs = dict(attrs or {})
    names_by_attr = {a: list(v) for a, v in (attribute_names or {}).items()}
    check_same_length(pred=pred, identity=identity, **{f"attrs[{a!r}]": np.asarray(v) for a, v in attrs.items()})
    selected = list(attrs) if groups is None else list(groups)
    for attr in selected:
        if attr not in attrs:
            raise DataError(f"group attribute {attr!r} is not among the protected attributes "
                            f"{sorted(attrs)}; pick one of those")
    pred_codes, pred_values = relabel(pred)
    report: dict[str, Any] = {
        "num_samples": int(pred.size),
        "num_clusters": int(pred_values.size),
        "identity": _identity_metrics(pred_codes, identity, with_accuracy),
        "attributes": {},
    }
    for attr in selected:
        values = np.asarray(attrs[attr])
        names = names_by_attr.get(attr)
        if names is None:
            largest = int(values.max()) if values.size else -1
            names = [str(t) for t in range(max(largest + 1, 1))]
        LOG.info("evaluate: attribute %s", attr)
        report["attributes"][attr] = _attribute_metrics(attr, values, names, pred_codes, identity)
    report["notes"] = _notes(report)
    return report


def _notes(report: dict[str, Any]) -> list[str]:
    notes = []
    ident = report["identity"]
    if ident is None:
        notes.append("No sample has a known identity: identity metrics and per-group quality are not computed.")
    elif ident["num_unknown_identity"]:
        notes.append(f"{ident['num_unknown_identity']} samples with unknown identity (-1) are excluded from the "
                     f"identity metrics and the per-group quality scores.")
    for attr, entry in report["attributes"].items():
        if entry["num_unknown_group"]:
            notes.append(f"{attr}: {entry['num_unknown_group']} samples with unknown group (-1) are excluded from "
                         f"this attribute's metrics.")
        if entry["absent_groups"]:
            notes.append(f"{attr}: groups {entry['absent_groups']} have no samples; balance, fairness and FWD "
                         f"consider only the groups present.")
    if report["attributes"]:
        notes.append("Balance, fairness and FWD use every sample whose group is known (identity not needed); "
                     "per-group quality uses the samples whose identity and group are both known.")
    notes.append("Pairwise F uses the face-clustering convention (P = tk/pk, R = tk/qk), not the geometric FMI; "
                 "std across groups is the population std (ddof = 0); FWD is lower-is-fairer, balance and "
                 "fairness higher-is-fairer (METHODS.md section 7).")
    return notes


# --------------------------------------------------------------------------- rendering
def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: dict[str, Any], title: str = "Evaluation report") -> str:
    """The report as readable Markdown: an overall table, then per attribute a fairness table and a
    per-group quality table with mean and std rows."""
    lines = [f"# {title}", "",
             f"{report['num_samples']} samples in {report['num_clusters']} predicted clusters.", ""]
    ident = report["identity"]
    lines += ["## Overall clustering quality", ""]
    if ident is None:
        lines += ["No sample has a known identity.", ""]
    else:
        rows = [
            ["pairwise", ident["pairwise"]["precision"], ident["pairwise"]["recall"], ident["pairwise"]["f"]],
            ["BCubed", ident["bcubed"]["precision"], ident["bcubed"]["recall"], ident["bcubed"]["f"]],
        ]
        lines += _table(["metric", "precision", "recall", "F"], rows) + [""]
        extra = [["NMI", ident["nmi"]]]
        if "accuracy" in ident:
            extra.append(["ACC", ident["accuracy"]])
        extra += [["samples evaluated", ident["num_samples"]], ["identities", ident["num_identities"]],
                  ["clusters", ident["num_clusters"]]]
        lines += _table(["metric", "value"], extra) + [""]
    for attr, entry in report["attributes"].items():
        lines += [f"## Protected attribute: {attr}", ""]
        lines += _table(["balance (higher fairer)", "fairness (higher fairer)", "FWD (lower fairer)", "clusters",
                         "samples"],
                        [[entry["balance"], entry["fairness"], entry["fwd"], entry["num_clusters"],
                          entry["num_samples"]]]) + [""]
        if entry["per_group"]:
            rows = []
            for name, g in entry["per_group"].items():
                rows.append([name, g["num_samples"], g["pairwise"]["precision"], g["pairwise"]["recall"],
                             g["pairwise"]["f"], g["bcubed"]["precision"], g["bcubed"]["recall"], g["bcubed"]["f"]])
            for stat in ("mean", "std"):
                s = entry[stat]
                rows.append([f"**{stat}**", "", s["pairwise"]["precision"], s["pairwise"]["recall"],
                             s["pairwise"]["f"], s["bcubed"]["precision"], s["bcubed"]["recall"], s["bcubed"]["f"]])
            lines += _table(["group", "samples", "pairwise P", "pairwise R", "pairwise F", "BCubed P",
                             "BCubed R", "BCubed F"], rows) + [""]
        else:
            lines += ["No per-group quality: no sample has both a known identity and a known group.", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def plot_per_group_f(report: dict[str, Any], title: str = "Per-group F-score") -> bytes | None:
    """PNG bytes of a bar chart: per attribute, pairwise and BCubed F of each group with the mean
    as a dashed line; None when no attribute has per-group scores. Uses the Agg canvas directly,
    so it never touches the global matplotlib backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    attrs = [(a, e) for a, e in report["attributes"].items() if e.get("per_group")]
    if not attrs:
        return None
    fig = Figure(figsize=(max(5.0, 2.2 + 1.2 * max(len(e["per_group"]) for _, e in attrs)), 3.6 * len(attrs)))
    FigureCanvasAgg(fig)
    for index, (attr, entry) in enumerate(attrs):
        ax = fig.add_subplot(len(attrs), 1, index + 1)
        names = list(entry["per_group"])
        x = np.arange(len(names))
        for offset, family, label, color in ((-0.2, "pairwise", "pairwise F", "tab:blue"),
                                             (0.2, "bcubed", "BCubed F", "tab:orange")):
            heights = [entry["per_group"][n][family]["f"] for n in names]
            ax.bar(x + offset, heights, width=0.4, label=label, color=color)
            ax.axhline(entry["mean"][family]["f"], color=color, linestyle="--", linewidth=1)
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("F-score")
        std = entry["std"]["pairwise"]["f"]
        ax.set_title(f"{attr}: pairwise F mean {entry['mean']['pairwise']['f']:.3f}, std {std:.3f}")
        ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_report_files(report: dict[str, Any], json_path: str | Path, title: str = "Evaluation report",
                       markdown_path: str | Path | None = None,
                       plot_path: str | Path | None = None) -> dict[str, Path]:
    """Write the report as JSON and, when their paths are given, Markdown and PNG (each atomically).

    Returns:
        The paths written, by kind (``json``, ``markdown``, ``plot``); ``plot`` is left out when
        there are no per-group scores to draw.
    """
    written = {"json": Path(json_path)}
    atomic_write_json(json_path, report)
    if markdown_path is not None:
        atomic_write_text(markdown_path, render_markdown(report, title))
        written["markdown"] = Path(markdown_path)
    if plot_path is not None:
        png = plot_per_group_f(report, title)
        if png is None:
            LOG.info("no per-group scores: %s not drawn", plot_path)
        else:
            atomic_write_bytes(plot_path, png)
            written["plot"] = Path(plot_path)
    return written


def write_report(report: dict[str, Any], out_dir: str | Path, title: str = "Evaluation report") -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` (per-group F bars) into ``out_dir``."""
    out_dir = Path(out_dir)
    return write_report_files(report, out_dir / "report.json", title, out_dir / "report.md", out_dir / "report.png")


# --------------------------------------------------------------------------- several methods
def comparison_rows(methods: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in order): overall pairwise / BCubed F, NMI, ACC and, per attribute, the
    per-group pairwise F mean and std (population) and balance, fairness, FWD. Missing values are None."""
    rows = []
    for name, report in methods.items():
        ident = report.get("identity") or {}
        row: dict[str, Any] = {"method": name,
                               "pairwise_f": (ident.get("pairwise") or {}).get("f"),
                               "bcubed_f": (ident.get("bcubed") or {}).get("f"),
                               "nmi": ident.get("nmi"), "accuracy": ident.get("accuracy"), "attributes": {}}
        for attr, entry in (report.get("attributes") or {}).items():
            row["attributes"][attr] = {
                "f_mean": ((entry.get("mean") or {}).get("pairwise") or {}).get("f"),
                "f_std": ((entry.get("std") or {}).get("pairwise") or {}).get("f"),
                "balance": entry.get("balance"), "fairness": entry.get("fairness"), "fwd": entry.get("fwd")}
        rows.append(row)
    return rows


def render_comparison(methods: Mapping[str, dict[str, Any]], fairness: bool = False) -> list[str]:
    """The comparison table as Markdown lines: method x overall pairwise F, BCubed F and, per
    attribute, per-group pairwise F mean and std; with ``fairness`` also NMI, ACC and per attribute
    balance, fairness and FWD (the deep fair clustering view, METHODS.md §7)."""
    rows = comparison_rows(methods)
    attrs = list(dict.fromkeys(a for r in rows for a in r["attributes"]))
    header = ["method", "pairwise F", "BCubed F"] + (["NMI", "ACC"] if fairness else [])
    for attr in attrs:
        header += [f"{attr}: per-group F mean", f"{attr}: F std"]
        if fairness:
            header += [f"{attr}: balance", f"{attr}: fairness", f"{attr}: FWD"]
    body = []
    for r in rows:
        line = [r["method"], r["pairwise_f"], r["bcubed_f"]] + ([r["nmi"], r["accuracy"]] if fairness else [])
        for attr in attrs:
            a = r["attributes"].get(attr, {})
            line += [a.get("f_mean"), a.get("f_std")]
            if fairness:
                line += [a.get("balance"), a.get("fairness"), a.get("fwd")]
        body.append(line)
    return _table(header, body)


def render_job_markdown(methods: Mapping[str, dict[str, Any]], title: str, evaluated_on: str = "",
                        fairness: bool = False, facts: Sequence[str] = ()) -> str:
    """The job's report: the comparison table of every method first, then each method's full
    report (overall table, per attribute fairness and per-group quality)."""
    lines = [f"# {title}", ""]
    if evaluated_on:
        lines += [f"Evaluated on {evaluated_on}.", ""]
    lines += ["## Comparison", ""] + render_comparison(methods, fairness) + [""]
    lines += [f"- {fact}" for fact in facts] + ([""] if facts else [])
    for name, report in methods.items():
        body = render_markdown(report, title=name).splitlines()
        lines += ["#" + body[0]] + ["#" + line if line.startswith("## ") else line for line in body[1:]]
    return "\n".join(lines)


def plot_per_group_f_by_method(methods: Mapping[str, dict[str, Any]], title: str = "Per-group pairwise F") -> bytes | None:
    """PNG bytes: per attribute, the pairwise F of each group for every method side by side, each
    method's mean as a dashed line in its colour; None when no method has per-group scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    attrs = list(dict.fromkeys(a for r in methods.values() for a, e in (r.get("attributes") or {}).items()
                               if e.get("per_group")))
    if not attrs:
        return None
    names = list(methods)
    width = 0.8 / max(len(names), 1)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    groups_of = {a: list(dict.fromkeys(g for r in methods.values()
                                       for g in ((r.get("attributes") or {}).get(a, {}).get("per_group") or {})))
                 for a in attrs}
    fig = Figure(figsize=(max(6.0, 2.5 + 1.3 * max(len(g) for g in groups_of.values())), 3.8 * len(attrs)))
    FigureCanvasAgg(fig)
    for index, attr in enumerate(attrs):
        ax = fig.add_subplot(len(attrs), 1, index + 1)
        groups = groups_of[attr]
        x = np.arange(len(groups))
        subtitle = []
        for m, name in enumerate(names):
            entry = (methods[name].get("attributes") or {}).get(attr) or {}
            per_group = entry.get("per_group") or {}
            colour = colours[m % len(colours)]
            heights = [per_group[g]["pairwise"]["f"] if g in per_group else 0.0 for g in groups]
            ax.bar(x - 0.4 + width * (m + 0.5), heights, width=width, color=colour, label=name)
            if entry.get("mean"):
                mean, std = entry["mean"]["pairwise"]["f"], entry["std"]["pairwise"]["f"]
                ax.axhline(mean, color=colour, linestyle="--", linewidth=1)
                subtitle.append(f"{name}: mean {mean:.3f}, std {std:.3f}")
        ax.set_xticks(x, groups)
        low = min((methods[n].get("attributes") or {}).get(attr, {}).get("per_group", {}).get(g, {})
                  .get("pairwise", {}).get("f", 1.0) for n in names for g in groups)
        ax.set_ylim(max(0.0, low - 0.1) if low > 0.5 else 0.0, 1.0)
        ax.set_ylabel("pairwise F")
        ax.set_title(f"{attr}: " + "; ".join(subtitle), fontsize="small")
        ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_job_report(methods: Mapping[str, dict[str, Any]], out_dir: str | Path, title: str, *,
                     evaluated_on: str = "", fairness: bool = False, plots: bool = True,
                     facts: Sequence[str] = (), extra: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the job's ``report.json`` (the first method's report at the top level, plus
    ``methods``, ``comparison`` and ``extra``), ``report.md`` (comparison first) and, with ``plots``,
    ``report.png`` (per-group F of every method) into ``out_dir``."""
    out_dir = Path(out_dir)
    primary = next(iter(methods))
    payload = {**methods[primary], "method": primary, "methods": dict(methods), "comparison": comparison_rows(methods),
               "evaluated_on": evaluated_on, **(extra or {})}
    written = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    atomic_write_json(written["json"], payload)
    atomic_write_text(written["markdown"], render_job_markdown(methods, title, evaluated_on, fairness, facts))
    if plots:
        png = plot_per_group_f_by_method(methods, title)
        if png is not None:
            atomic_write_bytes(out_dir / "report.png", png)
            written["plot"] = out_dir / "report.png"
    return written
