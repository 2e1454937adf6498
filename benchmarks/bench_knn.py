"""Claim (issue 7): dist_fair builds the k = 80 kNN graph of BUPT-style 512-d embeddings on Ray with
known recall, as fast as single-process faiss with the same index (1 worker at most 1.15 x its
time), and at 1M x 512 reaches same-identity recall >= 0.98 and recall@80 >= 0.90 within 15 minutes
and 8 GB.

Side by side in one run, for every index configuration:
- single-process faiss (the reference): load the shards, normalise, train/add the same index with
  the same parameters (same nlist, training size, seed), search every sample at once, save;
- dist_fair (`build_knn_graph`, a local Ray instance) with 1 and 2 index actors (workers).
Each runs in a fresh process, one after the other. Reported: wall time of the whole process
(Python and Ray start included); CPU seconds of the run's process tree (the fair cost measure when
the machine is shared) and of the processes doing the work (faiss: the process; dist_fair: the
driver plus the index actors, i.e. without Ray's own daemons); the graph time (dist_fair:
knn.json's total minus Ray start and its own recall check); peak memory summed over the run's
process tree (driver, Ray's daemons and workers, sampled every 0.2 s; other programs on the
machine are not counted), and the same minus an idle Ray instance; recall@k against exact search
and same-identity recall (of the neighbours in a sample's exact top-k that share its identity, the
fraction found) on one fixed random sample of queries; dist_fair's own recall from knn.json; the
machine's 1-minute load average before and after each run (the machine may be shared: timings
under different load are not comparable).
Results are written after every run; --resume skips runs already in the results file.

Data: `generate_synthetic_shards` (preset balanced, 46 images per identity on average, fp16
shards), kept under benchmarks/results/tmp/ between runs. Ground truth: exact inner-product top-k
of the sampled queries against every sample (faiss.knn), computed once per data set.

Usage:
    python benchmarks/bench_knn.py --n 200000                       # ivfpq_fs, ivf, hnsw at 200K
    python benchmarks/bench_knn.py --n 1000000 --indexes hnsw --workers 1 --no-reference --name bench_knn_1m
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, print_table, write_results  # noqa: E402

TMP = RESULTS / "tmp"

#: index configurations benchmarked (KNNConfig fields); the defaults of KNNConfig otherwise.
CONFIGS: dict[str, dict[str, Any]] = {
    "flat": {"index": "flat"},
    "ivf": {"index": "ivf", "nprobe": 16},
    "ivf64": {"index": "ivf", "nprobe": 64},
    "hnsw": {"index": "hnsw", "hnsw_m": 32, "ef_construction": 80, "ef_search": 128},
    "ivfpq": {"index": "ivfpq", "nprobe": 16, "pq_m": 64, "rerank": 4},
    "ivfpq64": {"index": "ivfpq", "nprobe": 64, "pq_m": 64, "rerank": 4},
    "ivfpq_fs_nosym": {"index": "ivfpq_fs", "symmetrize": False},
    "hnsw256": {"index": "hnsw", "hnsw_m": 32, "ef_construction": 80, "ef_search": 256},
    "ivf2048": {"index": "ivf", "nlist": 2048, "nprobe": 32},
    "ivf2048_48": {"index": "ivf", "nlist": 2048, "nprobe": 48},
    # FAISS' 4-bit PQ fast-scan with exact re-ranking, at its defaults (dim/2 sub-quantizers,
    # nprobe 256, rerank 8: dist_fair.knn.indexes.KIND_DEFAULTS)
    "ivfpq_fs": {"index": "ivfpq_fs"},
    "ivfpq_fs_r5": {"index": "ivfpq_fs", "rerank": 5},
}


class TreeSampler:
    """Peak summed RSS and total CPU time (user + system) of a process and all its descendants (the
    run's driver, Ray's daemons and workers), sampled every ``interval`` seconds. Only this tree is
    counted: other programs on a shared machine are not. CPU time is the load-independent cost
    measure on a busy machine (a process's last < ``interval`` seconds before it exits are missed)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.cpu: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except self.psutil.Error:
                procs = []
            for proc in procs:
                try:
                    with proc.oneshot():
                        total += proc.memory_info().rss
                        times = proc.cpu_times()
                        self.cpu[(proc.pid, proc.create_time())] = times.user + times.system
                except self.psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def stop(self) -> tuple[float, float]:
        """Stop sampling; ``(peak MiB, CPU seconds)``."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20, sum(self.cpu.values())


# --------------------------------------------------------------------------- the two runners (child processes)

def run_faiss(shards: Path, out: Path, cfg: dict[str, Any], k: int, timed_queries: int = 0,
              sample_ids: np.ndarray | None = None) -> dict[str, Any]:
    """Single-process faiss, plain calls, with the parameters dist_fair would use for one shard.
    With ``timed_queries`` > 0 only that many random queries are searched (timed; the time for all
    N is extrapolated linearly - per-query cost is constant for these indexes) plus the recall
    sample (untimed), whose neighbours go to ``sample_nbrs.npy``."""
    import faiss

    from dist_fair.config import KNNConfig
    from dist_fair.data.shards import load_embeddings
    from dist_fair.knn.indexes import IndexSpec, resolve_params

    times: dict[str, float] = {}
    t = time.perf_counter()
    x = load_embeddings(shards)
    faiss.normalize_L2(x)
    times["load_s"] = time.perf_counter() - t
    n, d = x.shape
    config = KNNConfig(k=k, **cfg)
    p = resolve_params(IndexSpec.from_config(config), n, d)
    ip = faiss.METRIC_INNER_PRODUCT
    if config.index == "flat":
        index = faiss.IndexFlatIP(d)
    elif config.index == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, p["nlist"], ip)
    elif config.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, p["hnsw_m"], ip)
        index.hnsw.efConstruction = p["ef_construction"]
    elif config.index == "ivfpq":
        index = faiss.IndexRefineFlat(faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, p["nlist"], p["pq_m"], p["nbits"], ip))
    else:  # ivfpq_fs
        index = faiss.IndexRefineFlat(faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(d), d, p["nlist"], p["pq_m"],
                                                               p["nbits"], ip))
    t = time.perf_counter()
    if "train_size" in p:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed, ivf.cp.niter = config.seed + 1234, 20
        rows = np.sort(np.random.default_rng(config.seed).choice(n, size=p["train_size"], replace=False))
        index.train(x[rows])
        ivf.nprobe = p["nprobe"]
    times["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index.add(x)
    times["add_s"] = time.perf_counter() - t
    if config.index == "hnsw":
        index.hnsw.efSearch = max(p["ef_search"], k)
    if config.index in ("ivfpq", "ivfpq_fs"):
        index.k_factor = float(p["rerank"])
    if timed_queries > 0 and timed_queries < n:
        rows = np.sort(np.random.default_rng(config.seed + 7).choice(n, size=timed_queries, replace=False))
        t = time.perf_counter()
        index.search(np.ascontiguousarray(x[rows]), k)
        times["search_s"] = (time.perf_counter() - t) * n / timed_queries
        times["search_extrapolated_from"] = float(timed_queries)
        _, sample_nbrs = index.search(np.ascontiguousarray(x[sample_ids]), k)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "sample_nbrs.npy", sample_nbrs.astype(np.int64))
        times["write_s"] = 0.0
        times["graph_s"] = sum(v for key, v in times.items() if key != "search_extrapolated_from")
        return {"timings": times, "params": p, "work_cpu_s": None}
    t = time.perf_counter()
    sims, nbrs = index.search(x, k)
    times["search_s"] = time.perf_counter() - t
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "nbrs.npy", nbrs.astype(np.int64))
    np.save(out / "sims.npy", sims)
    times["write_s"] = time.perf_counter() - t
    times["graph_s"] = sum(times.values())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"timings": times, "params": p, "work_cpu_s": usage.ru_utime + usage.ru_stime}


def run_dist(shards: Path, out: Path, cfg: dict[str, Any], k: int, workers: int, recall_sample: int) -> dict[str, Any]:
    from dist_fair.config import KNNConfig
    from dist_fair.knn import build_knn_graph
    from dist_fair.ray_runtime import init_ray

    t = time.perf_counter()
    init_ray()
    ray_s = time.perf_counter() - t
    result = build_knn_graph(shards, out, KNNConfig(k=k, workers=workers, recall_sample=recall_sample, **cfg),
                             resume=False, progress=False)
    times = dict(result.timings)
    times["ray_init_s"] = ray_s
    times["graph_s"] = times["total_s"] - times.get("recall_s", 0.0)
    actors = result.info.get("actors") or []
    work_cpu = result.info.get("driver_cpu_s", 0.0) + sum(a.get("cpu_s") or 0.0 for a in actors)
    return {"timings": times, "recall_at_k": result.recall_at_k, "same_identity_recall": result.same_identity_recall,
            "actors": actors, "driver_peak_rss_mib": result.info.get("driver_peak_rss_mib"), "work_cpu_s": work_cpu}


# --------------------------------------------------------------------------- parent

def ensure_shards(n: int, dim: int, seed: int) -> Path:
    from dist_fair.data.synthetic import generate_synthetic_shards

    folder = TMP / f"knn_shards_{n}_{dim}_{seed}"
    if not (folder / "manifest.json").is_file():
        generate_synthetic_shards(folder, preset="balanced", identities=max(2, round(n / 46)), images_per_identity=46.0,
                                  dim=dim, seed=seed, workers=2, progress=False)
    return folder


def ground_truth(shards: Path, k: int, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled query ids, their exact top-k (inner product of normalised embeddings) and all identities."""
    cache = shards / f".gt_k{k}_m{sample}_s{seed}.npz"
    from dist_fair.data.shards import load_labels

    identity = load_labels(shards).identity
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            return data["ids"], data["exact"], identity
    import faiss

    from dist_fair.data.shards import load_embeddings
    from dist_fair.knn.recall import sample_query_ids

    x = load_embeddings(shards)
    faiss.normalize_L2(x)
    ids = sample_query_ids(x.shape[0], sample, seed)
    _, exact = faiss.knn(x[ids], x, k, metric=faiss.METRIC_INNER_PRODUCT)
    np.savez(cache, ids=ids, exact=exact)
    return ids, exact, identity


def measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float, float]:
    """Run ``cmd``; return the completed process, wall seconds, peak MiB and CPU seconds of its
    process tree."""
    start = time.perf_counter()
    # RAY_ADDRESS=local: a private Ray instance per run (ray.init() without an address would join the
    # latest Ray cluster started on this machine, e.g. another program's).
    env = {**os.environ, "TQDM_DISABLE": "1", "RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "local")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    peak, cpu = sampler.stop()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall, peak, cpu


def idle_ray_mib() -> float:
    """Peak tree memory of a Python process that starts the local Ray instance, runs 2 tasks, idles."""
    code = ("import time; from dist_fair.ray_runtime import init_ray; init_ray(); "
            "import ray; ray.get([ray.remote(lambda: 1).remote() for _ in range(2)]); time.sleep(3)")
    return measured([sys.executable, "-c", code])[2]


def child(args: argparse.Namespace, runner: str, name: str, workers: int, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", runner, "--config", name, "--workers-one", str(workers),
           "--shards", str(args.shards_dir), "--out-one", str(out), "--k", str(args.k),
           "--recall-sample", str(args.recall_sample), "--reference-queries", str(args.reference_queries),
           "--seed", str(args.seed)]
    proc, wall, peak, cpu = measured(cmd)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        return {"failed": True, "wall_s": wall, "peak_mem_mib": peak, "cpu_s": cpu}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(wall_s=wall, peak_mem_mib=peak, cpu_s=cpu)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="target samples (identities = n / 46)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=80)
    parser.add_argument("--indexes", default="ivfpq_fs,ivf,hnsw", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--workers", default="1,2", help="dist_fair worker counts")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the single-process faiss run (only the absolute targets are checked)")
    parser.add_argument("--recall-sample", type=int, default=1000)
    parser.add_argument("--reference-queries", type=int, default=0,
                        help="time the single-process faiss search on this many random queries and extrapolate "
                             "to all N (0 = search all; at 1M x 512 faiss' IVF search alone takes over an hour)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="bench_knn", help="results file stem")
    parser.add_argument("--keep-outputs", action="store_true")
    parser.add_argument("--resume", action="store_true", help="skip runs already in results/<name>.json")
    # child mode
    parser.add_argument("--child", choices=["faiss", "dist"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--workers-one", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--out-one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        cfg = CONFIGS[args.config]
        if args.child == "faiss":
            sample = None
            if args.reference_queries:
                sample = ground_truth(Path(args.shards), args.k, args.recall_sample, args.seed)[0]
            res = run_faiss(Path(args.shards), Path(args.out_one), cfg, args.k, args.reference_queries, sample)
        else:
            res = run_dist(Path(args.shards), Path(args.out_one), cfg, args.k, args.workers_one, args.recall_sample)
        print(json.dumps(res, default=float))
        return

    TMP.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    args.shards_dir = ensure_shards(args.n, args.dim, args.seed)
    from dist_fair.data.shards import read_manifest
    from dist_fair.knn.recall import recall_at_k, same_identity_recall

    manifest = read_manifest(args.shards_dir)
    print(f"data: {manifest.num_samples} x {manifest.dim} ({manifest.num_identities} identities) "
          f"in {args.shards_dir} [{time.perf_counter() - t:.0f} s]", flush=True)
    t = time.perf_counter()
    sample_ids, exact, identity = ground_truth(args.shards_dir, args.k, args.recall_sample, args.seed)
    print(f"ground truth: exact top-{args.k} of {sample_ids.size} queries [{time.perf_counter() - t:.0f} s]",
          flush=True)
    idle = idle_ray_mib()
    title = f"kNN graph, k={args.k}, {manifest.num_samples} x {manifest.dim} BUPT-style (balanced), recall on " \
            f"{sample_ids.size} queries"
    extra = {"title": title, "idle_ray_peak_MiB": round(idle), "k": args.k,
             "configs": CONFIGS, "recall_sample": int(sample_ids.size)}
    rows: list[dict[str, Any]] = []
    previous = RESULTS / f"{args.name}.json"
    if args.resume and previous.is_file():
        rows = [r for r in json.loads(previous.read_text())["rows"] if r.get("n") == manifest.num_samples
                and not r.get("failed")]
    for name in args.indexes.split(","):
        reference: dict[str, Any] | None = None
        runs = [] if args.no_reference else [("faiss", 1)]
        runs += [("dist", int(w)) for w in args.workers.split(",")]
        for runner, workers in runs:
            label = "faiss, 1 process" if runner == "faiss" else f"dist_fair, {workers} worker(s)"
            done = [r for r in rows if r["index"] == name and r["runner"] == label]
            if done:
                reference = done[0] if runner == "faiss" else reference
                continue
            out = TMP / f"out_{args.n}_{name}_{runner}{workers}"
            shutil.rmtree(out, ignore_errors=True)
            load_before = os.getloadavg()[0]
            res = child(args, runner, name, workers, out)
            row: dict[str, Any] = {"index": name, "params": json.dumps(CONFIGS[name])[1:-1].replace('"', ""),
                                   "runner": label,
                                   "n": manifest.num_samples}
            if res.get("failed"):
                row.update(wall_s=round(res["wall_s"], 1), failed=True)
                rows.append(row)
                continue
            tm = res["timings"]
            if (out / "sample_nbrs.npy").is_file():
                nbrs = np.load(out / "sample_nbrs.npy")
            else:
                nbrs = np.load(out / "nbrs.npy", mmap_mode="r")[sample_ids]
            row.update(wall_s=round(res["wall_s"], 1), cpu_s=round(res["cpu_s"], 1),
                       work_cpu_s=round(res.get("work_cpu_s") or float("nan"), 1), graph_s=round(tm["graph_s"], 1),
                       load_s=round(tm.get("load_s", 0), 1),
                       train_add_s=round(tm.get("train_s", 0) + tm.get("add_s", 0), 1),
                       search_s=round(tm.get("search_s", 0), 1), peak_mem_MiB=round(res["peak_mem_mib"]),
                       search_timed_on=int(tm.get("search_extrapolated_from", manifest.num_samples)),
                       peak_mem_minus_idle_ray_MiB=round(res["peak_mem_mib"] - idle) if runner == "dist" else None,
                       recall_at_k=round(recall_at_k(nbrs, exact), 4),
                       same_identity_recall=round(
                           same_identity_recall(nbrs, exact, sample_ids, identity) or float("nan"), 4),
                       knn_json_recall_at_k=None if runner == "faiss" else round(res["recall_at_k"], 4),
                       load_avg_1min=f"{load_before:.1f}->{os.getloadavg()[0]:.1f}")
            if runner == "faiss":
                reference = row
            elif reference is not None:
                row["graph_vs_faiss"] = round(row["graph_s"] / reference["graph_s"], 3)
                row["wall_vs_faiss"] = round(row["wall_s"] / reference["wall_s"], 3)
                row["cpu_vs_faiss"] = round(row["cpu_s"] / reference["cpu_s"], 3)
                if reference.get("work_cpu_s") == reference.get("work_cpu_s"):  # not NaN
                    row["work_cpu_vs_faiss"] = round(row["work_cpu_s"] / reference["work_cpu_s"], 3)
                if reference.get("search_timed_on", manifest.num_samples) < manifest.num_samples:
                    for key in ("wall_vs_faiss", "cpu_vs_faiss"):  # the reference did not search every query
                        row.pop(key, None)
            rows.append(row)
            print_table([row])
            write_results(args.name, rows, extra)  # after every run: a long benchmark keeps what it measured
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)
    print_table(rows, title)
    print(f"\nidle local Ray instance (same sampler): {idle:.0f} MiB")
    write_results(args.name, rows, extra)


if __name__ == "__main__":
    main()
