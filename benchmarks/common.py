"""Shared plumbing for the benchmark scripts: machine description, peak memory, result tables.

Each benchmark compares dist_fair with its reference side by side in one run, prints a table and
writes ``benchmarks/results/<name>.csv`` and ``<name>.json`` (rows plus the machine they ran on);
plots go next to them as PNG.
"""
from __future__ import annotations

import csv
import math
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and library versions."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    for module in ("numpy", "torch", "faiss", "ray", "deepspeed", "ot", "scipy"):
        try:
            info[f"{module}_version"] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - optional in a given benchmark
            pass
    return info


def peak_rss_mib() -> float:
    """Peak resident memory of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a command under ``/usr/bin/time -v``; return wall seconds and peak RSS (MiB) of the
    process tree's largest member, plus the exit code."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    peak_kib = 0
    for line in proc.stderr.splitlines():
        if "Maximum resident set size" in line:
            peak_kib = int(line.split(":")[1])
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    return {"wall_s": wall, "peak_rss_mib": peak_kib / 1024.0, "returncode": proc.returncode}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def print_table(rows: Sequence[dict[str, Any]], title: str = "") -> None:
    if not rows:
        return
    cols = list(rows[0].keys())
    for row in rows[1:]:
        cols += [c for c in row if c not in cols]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols}
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in cols))


def write_results(name: str, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Write ``results/<name>.csv`` and ``results/<name>.json`` (rows, machine, extra)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with open(RESULTS / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    payload = {"benchmark": name, "machine": machine_info(), "rows": list(rows), **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return RESULTS / f"{name}.csv"


def paired_differences(diff: Sequence[float], resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Summary of paired per-seed differences ``d_s = a_s - b_s``: their mean, wins (d > 0) / losses
    / ties, an exact two-sided sign test (ties dropped: p = min(1, 2 P[Bin(n, 1/2) <= min(w, l)]))
    and a bootstrap 95 % interval of the mean difference (seeds resampled with replacement)."""
    import numpy as np

    d = np.asarray(diff, dtype=np.float64)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(0, min(wins, losses) + 1)) / 2 ** n if n else 1.0
    boot = d[np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))].mean(axis=1) if d.size \
        else np.zeros(1)
    return {"per_seed_diff": d.tolist(), "mean_diff": float(d.mean()) if d.size else float("nan"),
            "wins": wins, "losses": losses, "ties": int(d.size - n), "sign_test_p": float(min(1.0, 2 * tail)),
            "bootstrap95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}
