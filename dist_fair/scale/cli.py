"""``dist-fair scale``: a scaling study - sizes x workers x pipeline stages on Ray.

    dist-fair scale --out DIR [--sizes 10000,30000,100000,300000] [--workers 1,2] [--stages all]
                    [--shards DIR] [--nodes 2 | --address ADDR] [--results PREFIX] [--report-only]

Every cell (one stage at one size on W workers) is measured - wall s, CPU s of the driver and the
Ray session's processes, their peak summed RSS, samples/s - and cached in ``--out``; a rerun
skips finished cells. The report (``<results>.csv/.json/.md/.png``) fits ``t = a N^b`` per stage
with a 95% interval of b, gives the parallel efficiency t1 / (W tW) and extrapolates to
``--extrapolate`` sizes (default 5M and 10M) with the model stated. Only the standard library is
imported at module level.
"""
from __future__ import annotations

import argparse
import json
import time

HELP = "scaling study: sizes x workers x stages, cached cells, fitted exponents, efficiency, extrapolation"
DESCRIPTION = (
    "Measure how every pipeline stage (shards, knn, sequences, one Intraformer training epoch, inference, "
    "decoding, fair assignment, evaluation) scales with the number of samples and of Ray workers, on the "
    "built-in BUPT-style generator or the first N samples of your own shard folder. Cells are cached and "
    "resumable; the report fits t = a N^b per stage (least squares in log-log, t-based 95% interval), gives "
    "the parallel efficiency and extrapolates to larger N. --nodes 2 runs the grid on a simulated 2-node Ray "
    "cluster on this machine, --address on a real one."
)


def _ints(text: str) -> list[int]:
    try:
        return [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dist_fair.scale.stages import STAGES, ScaleSettings

    d = ScaleSettings()
    parser.add_argument("--out", required=True, metavar="DIR", help="study folder (cached cells and stage outputs)")
    parser.add_argument("--sizes", type=_ints, default=[10_000, 30_000, 100_000, 300_000],
                        help="sample counts, comma-separated")
    parser.add_argument("--workers", type=_ints, default=[1, 2], help="worker counts, comma-separated")
    parser.add_argument("--stages", default="all", help=f"comma-separated subset of {','.join(STAGES)} (their "
                        "inputs are added), or all")
    parser.add_argument("--shards", default=None, metavar="DIR",
                        help="use the first N samples of this embedding shard folder instead of the generator")
    parser.add_argument("--nodes", type=int, default=1, help="> 1: a simulated Ray cluster of this many nodes here")
    parser.add_argument("--cpus-per-node", type=int, default=None,
                        help="CPUs per (simulated) node; default: this machine's CPUs / nodes")
    parser.add_argument("--address", default=None, help="join this Ray cluster (auto, host:6379, ray://host:10001)")
    parser.add_argument("--results", default=None, metavar="PREFIX",
                        help="report files <PREFIX>.csv/.json/.md/.png (default: <out>/scale)")
    parser.add_argument("--extrapolate", type=_ints, default=[5_000_000, 10_000_000], help="sizes to extrapolate to")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the cached cells")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dim", type=int, default=d.dim, help="generator: embedding dimension")
    parser.add_argument("--images", type=float, default=None,
                        help=f"generator: mean images per identity (default: {d.images_per_identity:g} for a classic "
                             "preset, the preset's own table for realistic: LFW's long tail, about 2.3)")
    parser.add_argument("--preset", default=d.preset, choices=["balanced", "global", "skewed", "realistic"],
                        help="generator: a classic race mix, or realistic (calibrated on LFW; 128-d)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data, training and k-means")
    parser.add_argument("--shard-rows", type=int, default=d.shard_rows, help="rows per shard file")
    parser.add_argument("--group-attribute", default=d.group_attribute,
                        help="protected attribute for the training penalty and the fair assignment")
    parser.add_argument("--k", type=int, default=d.k, help="kNN neighbours per sample (the sample included)")
    parser.add_argument("--index", default=d.index, help="kNN index kind (dist-fair knn --index)")
    parser.add_argument("--recall-sample", type=int, default=d.recall_sample, help="kNN recall check queries")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="Intraformer tokens per sequence (<= --k)")
    parser.add_argument("--width", type=int, default=d.width, help="Intraformer width")
    parser.add_argument("--layers", type=int, default=d.layers, help="Intraformer layers")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="training global batch")
    parser.add_argument("--deepspeed", default=d.deepspeed, help="DeepSpeed config name (launch/deepspeed/)")
    parser.add_argument("--clusters", type=int, default=d.clusters, help="fair assignment: clusters K")
    parser.add_argument("--fair-eps", type=float, default=d.fair_eps, help="fair assignment tolerance")
    parser.add_argument("--decode-tau", type=float, default=d.decode_tau, help="cluster: edge probability threshold")


def settings_from_args(args: argparse.Namespace):  # -> ScaleSettings
    from dist_fair.scale.stages import ScaleSettings

    images = args.images if args.images is not None else \
        (None if args.preset == "realistic" else ScaleSettings.images_per_identity)
    return ScaleSettings(dim=args.dim, images_per_identity=images, preset=args.preset, seed=args.seed,
                         shard_rows=args.shard_rows, user_shards=args.shards, group_attribute=args.group_attribute,
                         k=args.k, index=args.index, recall_sample=args.recall_sample, seq_len=args.seq_len,
                         width=args.width, layers=args.layers, batch_size=args.batch_size, deepspeed=args.deepspeed,
                         decode_tau=args.decode_tau, clusters=args.clusters, fair_eps=args.fair_eps)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dist_fair.scale.report import write_report
    from dist_fair.scale.stages import STAGES, with_dependencies
    from dist_fair.scale.sweep import Study, run_sweep

    settings = settings_from_args(args)
    if args.shards is not None:
        settings = type(settings)(**{**settings.fingerprint(), "user_shards": str(Path(args.shards).resolve())})
    stages = list(STAGES) if args.stages == "all" else with_dependencies([s.strip() for s in args.stages.split(",")])
    started = time.perf_counter()
    if args.report_only:
        outcome = {"records": Study(args.out, settings).records(args.sizes, args.workers, stages), "ran": [],
                   "ray": None}
    else:
        outcome = run_sweep(args.out, args.sizes, args.workers, stages, settings, address=args.address,
                            nodes=args.nodes, cpus_per_node=args.cpus_per_node, progress=not args.no_progress)
    import os

    from dist_fair.scale.report import analyse

    meta = {"title": f"Scaling study: {', '.join(stages)}", "sizes": args.sizes, "workers": args.workers,
            "stages": stages, "settings": settings.fingerprint(), "ray": outcome.get("ray"),
            "machine_note": f"{os.cpu_count()} CPUs on the driver's machine; 1-minute load average at the end "
                            f"{os.getloadavg()[0]:.1f} (other programs share the CPUs)",
            "sweep_wall_s": round(time.perf_counter() - started, 1), "ran_now": len(outcome["ran"])}
    prefix = args.results or str(Path(args.out) / "scale")
    paths = write_report(prefix, outcome["records"], meta, args.extrapolate)
    analysis = analyse(outcome["records"], args.extrapolate)
    print(json.dumps({"cells": len(outcome["records"]), "ran": len(outcome["ran"]),
                      "skipped": len(outcome.get("skipped", [])), "files": {k: str(v) for k, v in paths.items()},
                      "fits": [{k: f.get(k) for k in ("stage", "workers", "b", "b_low", "b_high")}
                               for f in analysis["fits"]]}, indent=2))
    return 0
