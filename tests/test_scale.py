"""Scaling studies (dist_fair.scale): the power-law fit against scipy and against a known exponent,
the efficiency and extrapolation tables, resumable cells, and the grid run through --address on
the simulated two-node cluster."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_fair.errors import ConfigError, DataError
from dist_fair.scale.fit import fit_power_law, parallel_efficiency
from dist_fair.scale.report import analyse, write_report
from dist_fair.scale.stages import ScaleSettings, with_dependencies

ROOT = Path(__file__).resolve().parents[1]


def synthetic_timings(b: float, a: float = 3e-6, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(1e4, 1e6, 7).round()
    return sizes, a * sizes ** b * np.exp(noise * rng.standard_normal(sizes.size))


def test_fit_recovers_a_known_exponent_and_matches_scipy():
    from scipy import stats

    sizes, seconds = synthetic_timings(1.25)
    fit = fit_power_law(sizes, seconds)
    ref = stats.linregress(np.log(sizes), np.log(seconds))
    assert fit.b == pytest.approx(ref.slope, rel=1e-12)
    assert fit.b_se == pytest.approx(ref.stderr, rel=1e-10)
    assert math.log(fit.a) == pytest.approx(ref.intercept, rel=1e-10)
    assert fit.r2 == pytest.approx(ref.rvalue ** 2, rel=1e-10)
    assert fit.b_low < 1.25 < fit.b_high and abs(fit.b - 1.25) < 0.05
    half = stats.t.ppf(0.975, sizes.size - 2) * ref.stderr
    assert (fit.b_low, fit.b_high) == pytest.approx((ref.slope - half, ref.slope + half), rel=1e-10)
    assert fit.predict(5e6) == pytest.approx(math.exp(ref.intercept) * 5e6 ** ref.slope, rel=1e-10)
    low, high = fit.prediction_interval(5e6)
    assert low < fit.predict(5e6) < high and low < 3e-6 * 5e6 ** 1.25 < high


def test_exponent_interval_has_its_nominal_coverage():
    """Over 400 noisy synthetic studies the 95% interval covers the true b about 95% of the time."""
    covered = 0
    for seed in range(400):
        sizes, seconds = synthetic_timings(0.8, noise=0.2, seed=seed)
        fit = fit_power_law(sizes, seconds)
        covered += fit.b_low <= 0.8 <= fit.b_high
    assert 0.92 <= covered / 400 <= 0.98, covered


def test_fit_edge_cases_and_errors():
    exact = fit_power_law([10, 1000], [1.0, 100.0])  # two points: exact line, no interval
    assert exact.b == pytest.approx(1.0) and exact.b_low is None and exact.prediction_interval(1e4) is None
    with pytest.raises(DataError, match="positive"):
        fit_power_law([10, 100, 1000], [1.0, 0.0, 3.0])
    with pytest.raises(DataError, match="two distinct sizes"):
        fit_power_law([10, 10], [1.0, 2.0])
    with pytest.raises(DataError, match="same length"):
        fit_power_law([10, 100], [1.0])
    assert parallel_efficiency(10.0, 6.0, 2) == pytest.approx(10 / 12)
    with pytest.raises(DataError):
        parallel_efficiency(10.0, 6.0, 0)


def _record(stage, n, workers, wall):
    return {"stage": stage, "n": n, "n_target": n, "workers": workers, "nodes": 1, "wall_s": wall, "cpu_s": wall,
            "peak_rss_mib": 100.0, "throughput_per_s": n / wall, "processes": 3, "cpu_scope": "test",
            "load_avg_1min": "0->0", "started": "", "parts": {}, "info": {}}


def test_analysis_tables_and_report_files(tmp_path):
    sizes = [10_000, 30_000, 100_000, 300_000]
    records = [_record("knn", n, 1, 1e-4 * n ** 1.5) for n in sizes]
    records += [_record("knn", n, 2, 0.6e-4 * n ** 1.5) for n in sizes]
    records += [_record("cluster", n, 1, 2e-5 * n) for n in sizes]
    out = analyse(records, [5_000_000])
    knn1 = next(f for f in out["fits"] if f["stage"] == "knn" and f["workers"] == 1)
    assert knn1["b"] == pytest.approx(1.5, abs=1e-9) and knn1["b_low"] == pytest.approx(1.5, abs=1e-6)
    eff = [e for e in out["efficiency"] if e["stage"] == "knn"]
    assert len(eff) == 4 and all(e["efficiency"] == pytest.approx(1 / 1.2, abs=1e-3) for e in eff)
    ext = next(e for e in out["extrapolation"] if e["stage"] == "cluster")
    assert ext["n"] == 5_000_000 and ext["wall_s"] == pytest.approx(2e-5 * 5e6, rel=1e-6)
    assert "a N^b" in out["model"]
    paths = write_report(tmp_path / "scale_test", records, {"title": "t"}, [5_000_000])
    assert set(paths) == {"csv", "json", "md", "png"} and all(p.is_file() for p in paths.values())
    payload = json.loads(paths["json"].read_text())
    assert len(payload["cells"]) == 12 and payload["fits"] and "Extrapolation" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DataError, match="no finished cells"):
        write_report(tmp_path / "empty", [], {})


def test_settings_and_stage_validation():
    assert with_dependencies(["evaluate"]) == ["shards", "knn", "sequences", "train", "infer", "cluster", "evaluate"]
    assert with_dependencies(["fair_assign"]) == ["shards", "fair_assign"]
    with pytest.raises(ConfigError, match="unknown stage"):
        with_dependencies(["embed"])
    with pytest.raises(ConfigError, match="--seq-len 50 exceeds --k 40"):
        ScaleSettings(seq_len=50, k=40)
    with pytest.raises(ConfigError, match="--index"):
        ScaleSettings(index="annoy")


TINY = dict(dim=16, k=10, seq_len=8, index="flat", recall_sample=0, shard_rows=256, clusters=4)


def test_cli_maps_the_realistic_preset_to_its_own_images_table():
    import argparse

    from dist_fair.scale.cli import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--out", "x"]
    assert settings_from_args(parser.parse_args(base)).images_per_identity == 46.0
    realistic = settings_from_args(parser.parse_args(base + ["--preset", "realistic"]))
    assert realistic.preset == "realistic" and realistic.images_per_identity is None
    assert settings_from_args(parser.parse_args(base + ["--preset", "realistic", "--images", "8"])).images_per_identity == 8


@pytest.mark.ray
def test_realistic_preset_cell_draws_lfws_long_tail(ray_cluster, tmp_path):
    from dist_fair.data.shards import load_labels
    from dist_fair.scale.sweep import run_sweep

    settings = ScaleSettings(**{**TINY, "dim": 128, "preset": "realistic", "images_per_identity": None})
    out = run_sweep(tmp_path / "study", [3000], [1], ["shards"], settings, progress=False)
    record = out["records"][0]
    assert abs(record["n"] - 3000) < 300  # identities = n / the table's mean (about 2.3 images per identity)
    counts = np.unique(load_labels(tmp_path / "study" / "work" / "n3000-w1" / "shards").identity,
                       return_counts=True)[1]
    assert (counts == 1).mean() > 0.4 and counts.max() > 20  # LFW's tail: most people have one image, a few many


@pytest.mark.ray
def test_resumed_sweep_skips_finished_cells(ray_cluster, tmp_path):
    from dist_fair.scale.sweep import run_sweep

    settings = ScaleSettings(**TINY)
    first = run_sweep(tmp_path / "study", [300, 600], [1], ["knn"], settings, progress=False)
    assert first["ran"] == ["shards-n300-w1", "shards-n600-w1", "knn-n300-w1", "knn-n600-w1"]
    assert {(r["stage"], r["workers"]) for r in first["records"]} == {("shards", 1), ("knn", 1)}
    knn600 = next(r for r in first["records"] if r["stage"] == "knn" and r["n_target"] == 600)
    assert knn600["n"] > 300 and knn600["wall_s"] > 0 and knn600["cpu_s"] > 0 and knn600["peak_rss_mib"] > 0
    cells = tmp_path / "study" / "cells"
    stamps = {p.name: p.stat().st_mtime_ns for p in cells.iterdir()}
    again = run_sweep(tmp_path / "study", [300, 600], [1], ["knn"], settings, progress=False)
    assert again["ran"] == [] and len(again["skipped"]) == 4 and again["ray"] is None  # Ray not even needed
    assert {p.name: p.stat().st_mtime_ns for p in cells.iterdir()} == stamps
    # an upstream cell redone invalidates what was built on it: shards n300 gone -> shards + knn n300 rerun
    (cells / "shards-n300-w1.json").unlink()
    third = run_sweep(tmp_path / "study", [300, 600], [1], ["knn"], settings, progress=False)
    assert third["ran"] == ["shards-n300-w1", "knn-n300-w1"]
    # other settings: nothing reused
    fourth = run_sweep(tmp_path / "study", [300], [1], ["shards"], ScaleSettings(**{**TINY, "dim": 8}),
                       progress=False)
    assert fourth["ran"] == ["shards-n300-w1"]


@pytest.mark.ray
def test_grid_runs_through_address_on_the_simulated_two_node_cluster(ray_cluster, tmp_path):
    """`dist-fair scale --address` in its own process joins the test cluster (2 nodes); the kNN
    index actors of the 2-worker cells land on both nodes; the report files are written."""
    out, prefix = tmp_path / "study", tmp_path / "report" / "scale_tiny"
    cmd = [sys.executable, "-m", "dist_fair.cli", "scale", "--out", str(out), "--sizes", "300,600",
           "--workers", "1,2", "--stages", "knn", "--address", ray_cluster.address,
           "--results", str(prefix), "--no-progress", "--dim", "16", "--k", "10", "--seq-len", "8",
           "--index", "flat", "--recall-sample", "0", "--shard-rows", "128", "--clusters", "4"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["cells"] == summary["ran"] == 2 * 2 * 2  # sizes x workers x (shards, knn)
    payload = json.loads(Path(f"{prefix}.json").read_text())
    assert payload["ray"]["nodes"] == 2 and payload["ray"]["address"] == ray_cluster.address
    knn2 = [c for c in payload["cells"] if c["stage"] == "knn" and c["workers"] == 2]
    assert knn2 and all(c["nodes"] == 2 for c in knn2)
    assert {e["stage"] for e in payload["efficiency"]} == {"shards", "knn"}
    assert {(f["stage"], f["workers"]) for f in payload["fits"]} == {(s, w) for s in ("shards", "knn") for w in (1, 2)}
    graph = json.loads((out / "work" / "n600-w2" / "knn" / "knn.json").read_text())
    assert graph["num_nodes"] == 2 and graph["workers"] == 2
    for ext in ("csv", "md", "png"):
        assert Path(f"{prefix}.{ext}").is_file()
