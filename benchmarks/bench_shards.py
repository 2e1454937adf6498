"""Claim: `dist-fair shards synth` writes 1M x 512 BUPT-style embeddings in bounded memory (< 2 GB),
and block shards beat one-tar-entry-per-row shards on size, write and read speed.

Side by side in one run:
- `dist-fair shards synth` (1M x 512, fp16) with 1 writer (in process) and 2 writers (Ray tasks):
  wall time, rows/s, MB/s, peak memory of every process of the run (driver + Ray workers, sampled);
- reading the result back with `iter_blocks` (rows/s);
- the reference: the same rows written one sample per row (`emb.npy` + `meta.json`, webdataset's
  ShardWriter) and read back with webdataset, on a 100K-row subset (the naive layout is measured
  on fewer rows; rates are per row).

Usage: python benchmarks/bench_shards.py [--rows 1000000] [--dim 512] [--naive-rows 100000]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TreeMemorySampler:
    """Peak summed RSS of a process and all its descendants (a local Ray instance's GCS, raylet and
    workers are descendants of the driver), sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except self.psutil.Error:
                break
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except self.psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_tree(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; return the completed process, wall seconds and peak tree RSS (MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    with TreeMemorySampler(proc.pid) as mem:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), wall, mem.peak / 2**20


def run_synth(out: Path, identities: int, dim: int, workers: int) -> dict:
    cmd = [sys.executable, "-m", "dist_fair.cli", "shards", "synth", "--identities", str(identities), "--dim", str(dim),
           "--workers", str(workers), "--out", str(out), "--seed", "0"]
    proc, wall, peak = run_tree(cmd)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    size = sum(p.stat().st_size for p in out.glob("*.tar"))
    return {"wall_s": wall, "rows": summary["samples"], "bytes": size, "peak_mem_mib": peak}


def ray_idle_baseline() -> float:
    """Peak summed RSS (MiB) of an idle local Ray instance started the way the CLI starts it."""
    code = ("import time; from dist_fair.ray_runtime import init_ray; init_ray(); "
            "import ray; ray.get([ray.remote(lambda: 1).remote() for _ in range(2)]); time.sleep(3)")
    proc, _, peak = run_tree([sys.executable, "-c", code])
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return peak


def read_blocks(folder: Path) -> tuple[int, float]:
    from dist_fair.data.shards import iter_blocks

    start = time.perf_counter()
    rows = sum(len(b) for b in iter_blocks(folder))
    return rows, time.perf_counter() - start


def naive_write_read(folder: Path, block_folder: Path, rows: int) -> dict:
    """The reference layout: one tar sample per row, via webdataset's ShardWriter."""
    import webdataset as wds

    from dist_fair.data.shards import iter_blocks

    folder.mkdir(parents=True, exist_ok=True)
    taken = 0
    start = time.perf_counter()
    with wds.ShardWriter(str(folder / "naive-%06d.tar"), maxcount=65536, verbose=0) as sink:
        for block in iter_blocks(block_folder):
            emb = block.emb.astype(np.float16)
            for i in range(len(block)):
                if taken >= rows:
                    break
                buf = io.BytesIO()
                np.save(buf, emb[i], allow_pickle=False)
                meta = {"id": int(block.ids[i]), "identity": int(block.identity[i]),
                        "race": int(block.attrs["race"][i])}
                sink.write({"__key__": f"{int(block.ids[i]):09d}", "emb.npy": buf.getvalue(),
                            "meta.json": json.dumps(meta).encode()})
                taken += 1
            if taken >= rows:
                break
    write_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.glob("*.tar"))
    start = time.perf_counter()
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s):
        np.load(io.BytesIO(sample["emb.npy"]), allow_pickle=False)
        json.loads(sample["meta.json"])
        count += 1
    read_s = time.perf_counter() - start
    return {"rows": taken, "write_s": write_s, "read_s": read_s, "bytes": size, "read_rows": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="target samples (identities = rows / 46)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--naive-rows", type=int, default=100_000)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed after)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_shards_"))
    identities = max(2, round(args.rows / 46))
    rows = []
    ray_baseline = ray_idle_baseline()
    try:
        for workers in (1, 2):
            out = work / f"synth-w{workers}"
            res = run_synth(out, identities, args.dim, workers)
            read_rows, read_s = read_blocks(out)
            rows.append({"layout": "blocks (dist_fair)", "writer": f"shards synth, {workers} writer(s)",
                         "rows": res["rows"], "write_s": round(res["wall_s"], 1),
                         "write_rows_per_s": round(res["rows"] / res["wall_s"]),
                         "write_MB_per_s": round(res["bytes"] / 2**20 / res["wall_s"], 1),
                         "tar_MB": round(res["bytes"] / 2**20), "bytes_per_row": round(res["bytes"] / res["rows"]),
                         "read_rows_per_s": round(read_rows / read_s),
                         "peak_mem_MiB": round(res["peak_mem_mib"])})
            if workers == 2:
                same = [json.loads((work / f"synth-w{w}" / "manifest.json").read_text())["shards"] for w in (1, 2)]
                rows[-1]["peak_mem_minus_idle_ray_MiB"] = round(res["peak_mem_mib"] - ray_baseline)
                rows[-1]["identical_to_1_writer"] = [s["sha256"] for s in same[0]] == [s["sha256"] for s in same[1]]
            else:
                shutil.rmtree(work / "naive", ignore_errors=True)
                naive = naive_write_read(work / "naive", out, args.naive_rows)
                rows.append({"layout": "one entry per row (reference)", "writer": "webdataset ShardWriter, 1 process",
                             "rows": naive["rows"], "write_s": round(naive["write_s"], 1),
                             "write_rows_per_s": round(naive["rows"] / naive["write_s"]),
                             "write_MB_per_s": round(naive["bytes"] / 2**20 / naive["write_s"], 1),
                             "tar_MB": round(naive["bytes"] / 2**20),
                             "bytes_per_row": round(naive["bytes"] / naive["rows"]),
                             "read_rows_per_s": round(naive["read_rows"] / naive["read_s"]), "peak_mem_MiB": None})
                shutil.rmtree(work / "naive", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, f"shards synth: {args.rows} x {args.dim} (fp16) vs one-entry-per-row reference")
    in_process = rows[0]["peak_mem_MiB"] < 2048
    with_ray = rows[-1]["peak_mem_minus_idle_ray_MiB"] < 2048
    print(f"\nidle local Ray instance (same sampler): {ray_baseline:.0f} MiB")
    print(f"target: peak memory < 2 GB for 1M x {args.dim}: 1 writer (all processes) -> "
          f"{'met' if in_process else 'NOT met'}; 2 Ray writers above an idle Ray -> {'met' if with_ray else 'NOT met'}")
    write_results("bench_shards", rows, {"target_peak_mem_under_2GB_one_writer": in_process,
                                         "target_peak_mem_under_2GB_ray_writers_above_idle_ray": with_ray,
                                         "idle_ray_peak_MiB": round(ray_baseline), "rows_requested": args.rows,
                                         "dim": args.dim})


if __name__ == "__main__":
    main()
