"""``dist-fair evaluate``: score predicted cluster labels against a shard folder's labels.

    dist-fair evaluate --shards DIR --pred labels.npy [--group race ...] --out report.json [--md] [--plot]
                       [--no-verify]

``labels.npy`` holds one integer cluster id per sample, in manifest id order (row i is sample i);
a negative id (-1, the noise label of DBSCAN / HDBSCAN) makes that sample a singleton cluster
(METHODS.md §7). The shard files are checked against their manifest sha256 first (``--no-verify``
skips it).
The report (METHODS.md §7) goes to ``--out``; ``--md`` and ``--plot`` add ``<out stem>.md`` and
``<out stem>.png`` next to it. Only the standard library is imported at module level.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dist_fair.verify_option import add_no_verify_argument, apply_no_verify

HELP = "score predicted cluster labels: pairwise/BCubed F, NMI, ACC, per-group F, balance, fairness, FWD"
DESCRIPTION = (
    "Evaluate a clustering (labels.npy: one integer cluster id per sample, in manifest id order) "
    "against the identities and protected attributes stored in a shard folder. Samples with unknown "
    "identity (-1) are left out of the identity metrics, samples with unknown group (-1) out of that "
    "attribute's metrics. A negative predicted cluster id (-1 = noise of DBSCAN / HDBSCAN) makes that "
    "sample its own singleton cluster."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, metavar="DIR", help="shard folder (with manifest.json)")
    parser.add_argument("--pred", required=True, metavar="FILE",
                        help="labels.npy: integer cluster id per sample, in manifest id order")
    parser.add_argument("--group", action="append", default=None, metavar="NAME",
                        help="protected attribute to evaluate (repeatable; default: every attribute)")
    parser.add_argument("--out", default="report.json", metavar="FILE", help="report JSON path")
    parser.add_argument("--md", action="store_true", help="also write the Markdown report next to --out")
    parser.add_argument("--plot", action="store_true", help="also write the per-group F bar chart (PNG) next to --out")
    parser.add_argument("--title", default=None, help="report title (default: from the file names)")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="skip ACC (Hungarian matching), the slowest metric on very large inputs")
    add_no_verify_argument(parser)


def load_predictions(path: str | Path, num_samples: int, shard_dir: str | Path) -> Any:
    """Load ``labels.npy`` and check it holds ``num_samples`` integer cluster ids.

    Raises:
        DataError: missing or unreadable file, pickled/object data, wrong shape or length, a
            non-integer dtype or NaN; the message names the file and the fix.
    """
    import numpy as np

    from dist_fair.errors import DataError

    path = Path(path)
    fix = f"save one integer cluster id per sample in manifest id order: np.save('{path.name}', labels.astype(np.int64))"
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass the labels.npy written by the cluster stage ({fix})")
    try:
        pred = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataError(f"{path}: not a plain .npy array ({err}); pickled or object arrays are refused - {fix}") from err
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({err}); {fix}") from err
    if not isinstance(pred, np.ndarray):
        if hasattr(pred, "close"):
            pred.close()
        raise DataError(f"{path}: is an .npz archive, not a single .npy array; {fix}")
    if pred.ndim != 1:
        raise DataError(f"{path}: has shape {pred.shape}, expected ({num_samples},); {fix}")
    if pred.dtype.kind == "f" and np.isnan(pred).any():
        first = int(np.flatnonzero(np.isnan(pred))[0])
        raise DataError(f"{path}: contains NaN (first at sample {first}); every sample needs a cluster id - give "
                        f"unassigned samples their own singleton ids; {fix}")
    if pred.dtype.kind not in "iu":
        raise DataError(f"{path}: dtype {pred.dtype} is not an integer type; {fix}")
    if pred.shape[0] != num_samples:
        raise DataError(f"{path}: holds {pred.shape[0]} labels but shard folder {shard_dir} has {num_samples} "
                        f"samples; {fix}")
    return pred


def main(args: argparse.Namespace) -> int:
    import time

    from dist_fair.data.shards import load_labels, read_manifest
    from dist_fair.errors import DataError
    from dist_fair.eval.report import evaluate_labels, write_report_files
    from dist_fair.faults import kill_point

    apply_no_verify(args)
    start = time.perf_counter()
    manifest = read_manifest(args.shards)
    if args.group:
        unknown = [g for g in args.group if g not in manifest.attributes]
        if unknown:
            raise DataError(f"--group {', '.join(unknown)}: shard folder {args.shards} has no such protected "
                            f"attribute; available: {', '.join(manifest.attributes) or '(none)'}")
    pred = load_predictions(args.pred, manifest.num_samples, args.shards)
    labels = load_labels(args.shards)
    report = evaluate_labels(pred, labels.identity, args.group, attrs=labels.attrs,
                             attribute_names=labels.attribute_names, with_accuracy=not args.no_accuracy)
    report["inputs"] = {"shards": str(args.shards), "pred": str(args.pred),
                        "noise_samples": int((pred < 0).sum()) if pred.dtype.kind == "i" else 0,
                        "seconds": round(time.perf_counter() - start, 3)}
    kill_point("evaluate.scored")  # fault injection (dist_fair.faults): scored, no report written yet
    out = Path(args.out)
    title = args.title or f"Evaluation of {Path(args.pred).name} on {Path(args.shards).name}"
    written = write_report_files(
        report, out, title,
        markdown_path=out.with_suffix(".md") if args.md else None,
        plot_path=out.with_suffix(".png") if args.plot else None,
    )
    print(_summary(report))
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


def _summary(report: dict[str, Any]) -> str:
    lines = [f"{report['num_samples']} samples, {report['num_clusters']} clusters"]
    ident = report["identity"]
    if ident is not None:
        acc = f", ACC {ident['accuracy']:.4f}" if "accuracy" in ident else ""
        lines.append(f"pairwise F {ident['pairwise']['f']:.4f}, BCubed F {ident['bcubed']['f']:.4f}, "
                     f"NMI {ident['nmi']:.4f}{acc}")
    for attr, entry in report["attributes"].items():
        if entry["balance"] is None:
            lines.append(f"{attr}: no sample with a known group")
            continue
        per_group = ""
        if entry["per_group"]:
            per_group = (", pairwise F per group " + ", ".join(f"{n} {g['pairwise']['f']:.4f}"
                                                              for n, g in entry["per_group"].items())
                         + f" (mean {entry['mean']['pairwise']['f']:.4f}, std {entry['std']['pairwise']['f']:.4f})")
        lines.append(f"{attr}: balance {entry['balance']:.4f}, fairness {entry['fairness']:.4f}, "
                     f"FWD {entry['fwd']:.4f}{per_group}")
    return "\n".join(lines)
