"""``dist-fair fair-assign``: the global fair assignment of saved soft assignments (METHODS.md §6).

Reads ``--probs`` (an ``(N, K)`` float array, ``.npy``) and ``--groups`` (``(N,)`` integers 0..T-1),
writes the labels (``(N,)`` int64) to ``--out`` and a JSON report (objective, duality gap, samples
changed, balance before and after, ...) next to it as ``<out stem>.report.json``; both atomically.
Only the standard library is imported at module level.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "fair assignment closest to saved soft assignments (probs.npy, groups.npy -> labels.npy)"
DESCRIPTION = (
    "Solve the global fair assignment (dissertation eqs 6.8-6.11): the labels closest to the soft "
    "assignments in --probs such that every cluster keeps its size and holds each protected group in "
    "proportion rho (population proportions by default; within a factor 1 +- eps when --eps > 0). "
    "Writes labels.npy and <stem>.report.json next to it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--probs", required=True, help="(N, K) soft assignments, .npy (no pickles)")
    parser.add_argument("--groups", required=True, help="(N,) protected group per sample, integers 0..T-1, .npy")
    parser.add_argument("--out", required=True, help="output labels .npy")
    parser.add_argument("--eps", type=float, default=0.0, help="fairness tolerance (0 = exact proportions)")
    parser.add_argument("--rho", default=None,
                        help="target proportions per group, comma separated (default: population proportions)")
    parser.add_argument("--method", default="auto", choices=["auto", "auction", "exact", "lp"],
                        help="solver: auction (scalable, certified), exact (network simplex), lp (HiGHS)")
    parser.add_argument("--top-m", type=int, default=None, help="candidate clusters per sample (default: all)")
    parser.add_argument("--workers", type=int, default=1,
                        help="Ray actors sharing the samples (scalable solver only; 1 = solve in this process). "
                             "Only O(T K) numbers per round cross the network; the labels equal the 1-worker ones")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join with --workers > 1 (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--report", default=None, help="report path (default: <out stem>.report.json)")
    parser.add_argument("--normalize", action="store_true",
                        help="divide each row of --probs by its sum first (default: rows that do not sum to 1 "
                             "are an error naming them; all-zero rows are an error either way)")


def _load(path: str, what: str):
    import numpy as np

    from dist_fair.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"--{what}: file {p} does not exist")
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as err:
        raise DataError(f"--{what}: {p} is not a plain .npy array ({err}); save it with np.save") from err
    except OSError as err:
        raise DataError(f"--{what}: cannot read {p}: {err}") from err


def _normalized(probs):
    """Rows of ``probs`` divided by their sums; all-zero (or non-positive-sum) rows are an error."""
    import numpy as np

    from dist_fair.errors import DataError

    if probs.dtype.kind != "f":
        raise DataError(f"--probs: expected floating-point probabilities, got dtype {probs.dtype}")
    sums = probs.sum(axis=1, dtype=np.float64)
    empty = np.flatnonzero(~(sums > 0))
    if empty.size:
        raise DataError(f"--probs: {empty.size} rows sum to {sums[empty[0]]:.6g} and cannot be normalised "
                        f"(first rows: {empty[:10].tolist()}); every sample needs some probability mass")
    return (probs / sums[:, None]).astype(probs.dtype, copy=False)


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from dist_fair.errors import DataError
    from dist_fair.fair.assign import fair_assign
    from dist_fair.faults import kill_point
    from dist_fair.io_atomic import atomic_save_npy, atomic_write_json

    probs = _load(args.probs, "probs")
    groups = _load(args.groups, "groups")
    if probs.ndim != 2:
        raise DataError(f"--probs: expected a 2-D (samples x clusters) array, got shape {probs.shape}")
    if groups.ndim != 1 or groups.shape[0] != probs.shape[0]:
        raise DataError(f"--groups: expected shape ({probs.shape[0]},) to match --probs {probs.shape}, "
                        f"got {groups.shape}")
    if args.normalize:
        probs = _normalized(probs)
    rho = None
    if args.rho:
        try:
            rho = [float(v) for v in args.rho.split(",")]
        except ValueError as err:
            raise DataError(f"--rho: expected comma-separated numbers, got {args.rho!r}") from err
    out = Path(args.out)
    report_path = Path(args.report) if args.report else out.with_name(out.stem + ".report.json")
    if args.workers < 1:
        raise DataError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1:
        if args.method not in ("auto", "auction"):
            raise DataError(f"--workers {args.workers} runs the scalable solver; --method {args.method} solves in "
                            f"one process (use --method auto, or --workers 1)")
        from dist_fair.fair.distributed import fair_assign_ray
        from dist_fair.ray_runtime import init_ray

        init_ray(args.address)
        result = fair_assign_ray(probs, groups, rho=rho, eps=args.eps, top_m=args.top_m, num_workers=args.workers)
    else:
        result = fair_assign(probs, groups, rho=rho, eps=args.eps, method=args.method, top_m=args.top_m)
    kill_point("fair_assign.solved")  # fault injection (dist_fair.faults): solved, nothing written yet
    atomic_save_npy(out, result.labels.astype(np.int64))
    report = result.report.to_dict()
    report.update({"probs": str(args.probs), "groups": str(args.groups), "labels": str(out)})
    atomic_write_json(report_path, report)
    r = result.report
    gap = "n/a" if r.gap is None else f"{r.gap:.3g}"
    print(json.dumps({"labels": str(out), "report": str(report_path), "objective": round(r.objective, 6),
                      "gap": gap, "samples_changed": r.samples_changed,
                      "balance_before": round(r.balance_before, 4), "balance_after": round(r.balance_after, 4),
                      "seconds": round(r.seconds, 3)}))
    return 0
