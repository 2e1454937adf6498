"""Benchmark: ``dist-fair evaluate`` on 5M labels, and the metrics against their references.

Claim (METHODS.md §7, DESIGN.md "Scale targets"): every metric runs on a sparse contingency, so
evaluating 5M samples with ~100K identities and hundreds of thousands of clusters takes seconds and
well under 2 GB, where a dense identity x cluster table would need hundreds of GB.

What it measures, in one run:
1. the CLI process ``dist-fair evaluate --md --plot`` on a 5M-row shard folder (wall time and peak
   RSS via ``/usr/bin/time``; target < 30 s and < 2 GB). The shards are written with the data API
   (``write_embedding_shards``) with ``dim = 2`` float16 embeddings: the evaluate stage never reads
   embeddings, and 5M x 512 would only cost disk and writing time here (it still decodes the tar
   blocks, so shard reading is part of the measured time);
2. in-process timings of each metric at 5M (same labels);
3. references where they fit: sklearn's ``normalized_mutual_info_score`` at 5M and at 100K, and a
   dense-contingency implementation (dense pairwise/BCubed formulas, ``linear_sum_assignment`` on
   the dense table) at 100K samples / 2K identities, with the absolute differences of the values.

Synthetic data: identities uniform over ``--identities`` (about 50 samples each), race = identity
mod 4, random gender, 1% unknown identities and 1% unknown races; the prediction keeps identities
together except for race-dependent splits, 10% of identities merged in pairs, 5% singleton strays
and 2% samples moved to random clusters.

    .venv/bin/python benchmarks/bench_metrics.py [--samples 5000000] [--identities 100000]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, peak_rss_mib, print_table, run_measured, timed, write_results  # noqa: E402

RACES = ["African", "Asian", "Caucasian", "Indian"]
SPLIT_RATE = [0.10, 0.25, 0.05, 0.15]  # per race: share of identities split in two clusters


def synthetic_clustering(n: int, num_ids: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Identities, race, gender and a noisy predicted clustering (see the module docstring)."""
    rng = np.random.default_rng(seed)
    identity = rng.integers(0, num_ids, n)
    race = (identity % 4).astype(np.int16)
    gender = rng.integers(0, 2, n).astype(np.int16)
    pred = identity.copy()
    split = rng.random(num_ids) < np.asarray(SPLIT_RATE)[np.arange(num_ids) % 4]
    pred = np.where(split[identity] & (rng.random(n) < 0.5), pred + num_ids, pred)
    merged = rng.random(num_ids) < 0.10
    partner = rng.integers(0, num_ids, num_ids)
    pred = np.where(merged[identity], partner[identity], pred)
    strays = rng.random(n) < 0.05
    pred[strays] = 3 * num_ids + np.arange(int(strays.sum()))
    moved = rng.random(n) < 0.02
    pred[moved] = rng.integers(0, 2 * num_ids, int(moved.sum()))
    identity[rng.random(n) < 0.01] = -1
    race[rng.random(n) < 0.01] = -1
    return {"identity": identity, "race": race, "gender": gender, "pred": pred}


def dense_reference(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pairwise/BCubed/ACC from the dense R x C contingency (the straightforward implementation)."""
    from scipy.optimize import linear_sum_assignment

    t_values, t_codes = np.unique(true, return_inverse=True)
    p_values, p_codes = np.unique(pred, return_inverse=True)
    dense = np.zeros((t_values.size, p_values.size), dtype=np.int64)
    np.add.at(dense, (t_codes, p_codes), 1)
    n = true.size
    row, col = dense.sum(1), dense.sum(0)
    tk, pk, qk = (dense ** 2).sum() - n, (col ** 2).sum() - n, (row ** 2).sum() - n
    precision, recall = tk / pk, tk / qk
    b_precision = ((dense ** 2) / col[None, :]).sum() / n
    b_recall = ((dense ** 2) / row[:, None]).sum() / n
    r, c = linear_sum_assignment(dense, maximize=True)
    return {
        "pairwise_f": 2 * precision * recall / (precision + recall),
        "bcubed_f": 2 * b_precision * b_recall / (b_precision + b_recall),
        "accuracy": dense[r, c].sum() / n,
        "dense_cells": float(dense.size),
    }


def compare_at_small_size(n: int, num_ids: int) -> list[dict]:
    from sklearn.metrics import normalized_mutual_info_score

    from dist_fair.eval import metrics

    data = synthetic_clustering(n, num_ids, seed=1)
    known = data["identity"] >= 0
    true, pred = data["identity"][known], data["pred"][known]
    rows = []
    (ours_p, ours_b, ours_nmi, ours_acc), t_ours = timed(lambda: (
        metrics.pairwise_fscore(true, pred)[2], metrics.bcubed_fscore(true, pred)[2],
        metrics.nmi(true, pred), metrics.accuracy(true, pred)))
    ref, t_ref = timed(lambda: dense_reference(true, pred))
    ref_nmi, t_sk = timed(lambda: normalized_mutual_info_score(true, pred))
    rows.append({"samples": n, "task": "pairwise F + BCubed F + NMI + ACC", "impl": "dist_fair (sparse)",
                 "seconds": t_ours, "value": ours_acc, "abs_diff": None})
    rows.append({"samples": n, "task": "pairwise F + BCubed F + ACC", "impl":
                 f"dense contingency + linear_sum_assignment ({int(ref['dense_cells']):,} cells)",
                 "seconds": t_ref, "value": ref["accuracy"],
                 "abs_diff": max(abs(ours_p - ref["pairwise_f"]), abs(ours_b - ref["bcubed_f"]),
                                 abs(ours_acc - ref["accuracy"]))})
    (nmi_ours, t_nmi) = timed(lambda: metrics.nmi(true, pred))
    rows.append({"samples": n, "task": "NMI", "impl": "dist_fair", "seconds": t_nmi, "value": nmi_ours,
                 "abs_diff": None})
    rows.append({"samples": n, "task": "NMI", "impl": "sklearn normalized_mutual_info_score", "seconds": t_sk,
                 "value": ref_nmi, "abs_diff": abs(ref_nmi - ours_nmi)})
    return rows


def in_process_timings(data: dict[str, np.ndarray]) -> tuple[list[dict], dict]:
    from sklearn.metrics import normalized_mutual_info_score

    from dist_fair.eval import metrics
    from dist_fair.eval.contingency import contingency_table
    from dist_fair.eval.report import evaluate_labels

    n = data["pred"].size
    known = data["identity"] >= 0
    true, pred = data["identity"][known], data["pred"][known]
    has_race = data["race"] >= 0
    rows = []

    def add(task, fn, impl="dist_fair"):
        value, seconds = timed(fn)
        rows.append({"samples": n, "task": task, "impl": impl, "seconds": seconds,
                     "value": value if isinstance(value, float) else None, "abs_diff": None})
        return value

    table = add("sparse contingency (identity x cluster)", lambda: contingency_table(true, pred))
    rows[-1]["value"] = float(table.nnz)
    add("pairwise F", lambda: metrics.pairwise_from_contingency(table)[2])
    add("BCubed F", lambda: metrics.bcubed_from_contingency(table)[2])
    ours_nmi = add("NMI", lambda: metrics.nmi_from_contingency(table))
    add("ACC (sparse matching)", lambda: metrics.accuracy_from_contingency(table))
    add("balance + fairness + FWD (race)", lambda: (
        metrics.balance(data["pred"][has_race], data["race"][has_race]),
        metrics.fairness(data["pred"][has_race], data["race"][has_race]),
        metrics.fwd(data["pred"][has_race], data["race"][has_race]))[2])
    add("per-group scores (race)", lambda: metrics.per_group_scores(
        data["identity"][known & has_race], data["pred"][known & has_race], data["race"][known & has_race],
        RACES)["std"]["pairwise"]["f"])
    report = add("evaluate_labels (all, 2 attributes; abs_diff vs CLI F)", lambda: evaluate_labels(
        data["pred"], data["identity"], attrs={"race": data["race"], "gender": data["gender"]},
        attribute_names={"race": RACES, "gender": ["male", "female"]}))
    sk_nmi = add("NMI", lambda: normalized_mutual_info_score(true, pred), impl="sklearn normalized_mutual_info_score")
    rows[-1]["abs_diff"] = abs(sk_nmi - ours_nmi)
    return rows, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5_000_000)
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--small-samples", type=int, default=100_000)
    parser.add_argument("--small-identities", type=int, default=2_000)
    parser.add_argument("--workdir", default=None, help="where the shard folder goes (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the shard folder")
    args = parser.parse_args()

    from dist_fair.data.shards import write_embedding_shards

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_metrics_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        data, t_gen = timed(lambda: synthetic_clustering(args.samples, args.identities))
        print(f"generated {args.samples:,} labels in {t_gen:.1f} s")
        shard_dir = workdir / "shards"
        emb = np.zeros((args.samples, 2), dtype=np.float16)
        _, t_write = timed(lambda: write_embedding_shards(
            shard_dir, emb, data["identity"], {"race": data["race"], "gender": data["gender"]},
            {"race": RACES, "gender": ["male", "female"]}, shard_rows=262_144, dtype="float16"))
        del emb
        print(f"wrote the shard folder (dim 2, float16) in {t_write:.1f} s")
        pred_path = workdir / "labels.npy"
        np.save(pred_path, data["pred"])
        out = workdir / "report.json"
        cli = run_measured([sys.executable, "-m", "dist_fair.cli", "evaluate", "--shards", str(shard_dir),
                            "--pred", str(pred_path), "--out", str(out), "--md", "--plot"])
        if cli["returncode"] != 0:
            print("dist-fair evaluate failed", file=sys.stderr)
            return 1
        import json

        cli_report = json.loads(out.read_text())
        for suffix in (".json", ".md", ".png"):
            shutil.copyfile(out.with_suffix(suffix), RESULTS / f"bench_metrics_report{suffix}")
        rows.append({"samples": args.samples, "task": "dist-fair evaluate --md --plot (CLI process)",
                     "impl": "dist_fair", "seconds": cli["wall_s"], "peak_rss_mib": cli["peak_rss_mib"],
                     "value": cli_report["identity"]["pairwise"]["f"], "abs_diff": None})
        timing_rows, report = in_process_timings(data)
        rows += timing_rows
        rows[-2]["abs_diff"] = abs(report["identity"]["pairwise"]["f"] - cli_report["identity"]["pairwise"]["f"])
        del data
        rows += compare_at_small_size(args.small_samples, args.small_identities)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(rows, title=f"bench_metrics: evaluation at {args.samples:,} samples "
                            f"(~{args.identities:,} identities) and references")
    ident = report["identity"]
    race = report["attributes"]["race"]
    summary = {
        "cli_wall_s": cli["wall_s"], "cli_peak_rss_mib": cli["peak_rss_mib"],
        "targets": {"wall_s": 30, "peak_rss_mib": 2048},
        "shard_write_s": t_write, "in_process_peak_rss_mib": peak_rss_mib(),
        "num_clusters": report["num_clusters"], "num_identities": ident["num_identities"],
        "metrics": {"pairwise_f": ident["pairwise"]["f"], "bcubed_f": ident["bcubed"]["f"], "nmi": ident["nmi"],
                    "accuracy": ident["accuracy"], "race_balance": race["balance"], "race_fwd": race["fwd"],
                    "race_pairwise_f_mean": race["mean"]["pairwise"]["f"],
                    "race_pairwise_f_std": race["std"]["pairwise"]["f"]},
        "dense_table_bytes_at_scale": report["num_clusters"] * ident["num_identities"] * 8,
        "note": "shards written with dim=2 float16 embeddings (evaluate reads labels only)",
    }
    print(f"\nCLI: {cli['wall_s']:.1f} s, peak RSS {cli['peak_rss_mib']:.0f} MiB (targets 30 s, 2048 MiB); "
          f"a dense identity x cluster table would need {summary['dense_table_bytes_at_scale'] / 2**30:.0f} GiB")
    write_results("bench_metrics", rows, {"summary": summary})
    _plot(rows, args.samples)
    return 0


def _plot(rows: list[dict], samples: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    picked = [r for r in rows if r["samples"] == samples]
    fig = Figure(figsize=(9, 0.45 * len(picked) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"{r['task']} [{r['impl'].split(' ')[0]}]" for r in picked]
    ax.barh(range(len(picked)), [r["seconds"] for r in picked], color="tab:blue")
    ax.set_yticks(range(len(picked)), labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"evaluation at {samples:,} samples")
    fig.tight_layout()
    fig.savefig(RESULTS / "bench_metrics.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
