"""The kill harness end to end: every stage killed with SIGKILL at its named point
(``dist_fair.faults``), then run again; the rerun finishes and its outputs equal those of an
uninterrupted run. The commands run as a user runs them (``python -m dist_fair.cli ...`` in a
subprocess with its own private Ray instance), so a kill takes the whole process down."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_fair.faults import KILL_AT_ENV, KILL_ONCE_ENV

ROOT = Path(__file__).resolve().parents[1]
KILLED = (-signal.SIGKILL, 128 + signal.SIGKILL)


def dist_fair(*args: str, kill: str | None = None, once: Path | None = None, cwd: Path = ROOT,
              timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (KILL_AT_ENV, KILL_ONCE_ENV)}
    env.update(RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu")
    if kill:
        env[KILL_AT_ENV] = kill
    if once:
        env[KILL_ONCE_ENV] = str(once)
    return subprocess.run([sys.executable, "-m", "dist_fair.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    return done


def killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode in KILLED, (f"expected a SIGKILL, got exit {done.returncode}\n"
                                       f"stderr:\n{done.stderr[-3000:]}")


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (relative name -> bytes), without the receipts' timing fields."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = path.read_bytes()
    return out


def manifest_shards(folder: Path) -> list[tuple[str, int, str]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [(s["name"], s["samples"], s["sha256"]) for s in manifest["shards"]]


SYNTH = ("shards", "synth", "--identities", "60", "--images-per-identity", "8", "--dim", "16", "--seed", "3",
         "--shard-rows", "120", "--block-rows", "40")


@pytest.fixture(scope="module")
def reference_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "shards"
    ok(dist_fair(*SYNTH, "--out", str(out)))
    return out


def test_shards_killed_after_a_shard_resumes_with_identical_shards(reference_shards, tmp_path):
    out = tmp_path / "shards"
    killed(dist_fair(*SYNTH, "--out", str(out), kill="shards.shard_written@2"))
    assert not (out / "manifest.json").exists(), "a killed write must not leave a manifest"
    again = ok(dist_fair(*SYNTH, "--out", str(out)))
    assert "already complete" in again.stderr  # the finished shards were kept, not rewritten
    assert manifest_shards(out) == manifest_shards(reference_shards)
    for name, _, _ in manifest_shards(out):
        assert (out / name).read_bytes() == (reference_shards / name).read_bytes()


@pytest.mark.ray
def test_shards_with_one_ray_writer_killed_finish_in_the_same_run(reference_shards, tmp_path):
    out = tmp_path / "shards"
    marker = tmp_path / "killed"
    ok(dist_fair(*SYNTH, "--out", str(out), "--workers", "2", kill="shards.shard_written", once=marker))
    assert marker.is_file(), "no Ray writer was killed"
    assert manifest_shards(out) == manifest_shards(reference_shards)


def _graph(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(folder / "nbrs.npy", allow_pickle=False), np.load(folder / "sims.npy", allow_pickle=False))


def test_knn_killed_after_a_query_block_rebuilds_the_same_graph(reference_shards, tmp_path):
    args = ("knn", "--shards", str(reference_shards), "--k", "8", "--query-block", "100", "--no-progress")
    ok(dist_fair(*args, "--out", str(tmp_path / "reference")))
    out = tmp_path / "knn"
    killed(dist_fair(*args, "--out", str(out), kill="knn.block_searched@2"))
    assert not (out / "nbrs.npy").exists(), "a killed kNN build must not leave a graph that looks complete"
    ok(dist_fair(*args, "--out", str(out)))
    ref_nbrs, ref_sims = _graph(tmp_path / "reference")
    nbrs, sims = _graph(out)
    np.testing.assert_array_equal(nbrs, ref_nbrs)
    np.testing.assert_array_equal(sims, ref_sims)


def _soft_assignments(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(6, 0.4), 3000)
    groups = np.where(rng.random(3000) < 0.5, probs.argmax(1) % 3, rng.integers(0, 3, 3000))
    np.save(tmp_path / "P.npy", probs)
    np.save(tmp_path / "G.npy", groups)
    return tmp_path / "P.npy", tmp_path / "G.npy"


def test_fair_assign_killed_after_solving_writes_nothing_and_reruns_equal(tmp_path):
    probs, groups = _soft_assignments(tmp_path)
    args = ("fair-assign", "--probs", str(probs), "--groups", str(groups), "--eps", "0.05")
    ok(dist_fair(*args, "--out", str(tmp_path / "reference.npy")))
    out = tmp_path / "labels.npy"
    killed(dist_fair(*args, "--out", str(out), kill="fair_assign.solved"))
    assert not out.exists() and not list(tmp_path.glob("labels*.json"))
    ok(dist_fair(*args, "--out", str(out)))
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "reference.npy"))


def test_evaluate_killed_after_scoring_writes_no_report_and_reruns_equal(reference_shards, tmp_path):
    manifest = json.loads((reference_shards / "manifest.json").read_text())
    n = manifest["num_samples"]
    np.save(tmp_path / "pred.npy", np.random.default_rng(1).integers(0, 40, n))
    args = ("evaluate", "--shards", str(reference_shards), "--pred", str(tmp_path / "pred.npy"), "--md")
    ok(dist_fair(*args, "--out", str(tmp_path / "reference.json")))
    out = tmp_path / "report.json"
    killed(dist_fair(*args, "--out", str(out), kill="evaluate.scored"))
    assert not out.exists() and not out.with_suffix(".md").exists()
    ok(dist_fair(*args, "--out", str(out)))
    report, reference = json.loads(out.read_text()), json.loads((tmp_path / "reference.json").read_text())
    for drop in ("inputs",):  # paths and seconds differ by design
        report.pop(drop, None)
        reference.pop(drop, None)
    assert report == reference


@pytest.fixture(scope="module")
def lfw_images(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lfw") / "images"
    ok(dist_fair("shards", "lfw", "--input", str(shared_data / "lfw"), "--limit", "8", "--shard-rows", "4",
                 "--out", str(out)))
    return out


def _embeddings(folder: Path) -> np.ndarray:
    from dist_fair.data.shards import load_embeddings

    return load_embeddings(folder)


def test_embed_killed_after_a_shard_resumes_with_the_same_embeddings(lfw_images, tmp_path):
    args = ("embed", "--model", "dlib-resnet", "--shards", str(lfw_images))
    ok(dist_fair(*args, "--out", str(tmp_path / "reference")))
    out = tmp_path / "emb"
    killed(dist_fair(*args, "--out", str(out), kill="embed.shard_written@1"))
    assert not (out / "manifest.json").exists()
    ok(dist_fair(*args, "--out", str(out)))
    assert manifest_shards(out) == manifest_shards(tmp_path / "reference")
    np.testing.assert_array_equal(_embeddings(out), _embeddings(tmp_path / "reference"))


# The main job (Intraformer on 2 Ray Train workers, inference on Ray), tiny sizes, through `dist-fair run`.
MAIN_TINY = ["data.preset=balanced", "data.identities=80", "data.images_per_identity=8", "data.dim=32", "data.workers=1", "knn.k=16",
             "knn.recall_sample=0", "train.seq_len=12", "train.epochs=2", "train.batch_size=32", "train.width=16",
             "train.heads=2", "train.sub_clusters=3", "train.log_every=5", "cluster.infer_rows_per_task=200"]


def _run_job(run_dir: Path, kill: str | None = None, once: Path | None = None) -> subprocess.CompletedProcess:
    args = ["run", "--run-dir", str(run_dir)] + [a for s in MAIN_TINY for a in ("--set", s)]
    return dist_fair(*args, kill=kill, once=once, timeout=900)


def _job_outputs(run_dir: Path) -> tuple[np.ndarray, dict]:
    labels = np.load(run_dir / "cluster" / "labels.npy", allow_pickle=False)
    report = json.loads((run_dir / "report.json").read_text())
    return labels, {k: report[k] for k in ("identity", "groups") if k in report}


@pytest.fixture(scope="module")
def uninterrupted_job(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("job") / "run"
    ok(_run_job(run_dir))
    return run_dir


def _same_result(run_dir: Path, reference: Path) -> None:
    labels, report = _job_outputs(run_dir)
    reference_labels, reference_report = _job_outputs(reference)
    np.testing.assert_array_equal(labels, reference_labels)
    assert report == reference_report


@pytest.mark.slow
def test_main_job_killed_in_the_driver_resumes_to_the_same_result(uninterrupted_job, tmp_path):
    """The driver killed while the kNN graph is being built: the rerun keeps the finished shards
    stage and ends with the uninterrupted run's labels and report."""
    run_dir = tmp_path / "run"
    killed(_run_job(run_dir, kill="knn.block_searched"))
    assert not (run_dir / "report.json").exists()
    again = ok(_run_job(run_dir))
    assert "skipped" in again.stderr  # the shards stage finished before the kill and is not redone
    _same_result(run_dir, uninterrupted_job)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["train.step@3", "infer.task_done@1"])
def test_main_job_with_a_ray_worker_killed_finishes_with_the_same_result(point, uninterrupted_job, tmp_path):
    """One Ray Train worker (or one inference task's worker) killed once: Ray Train restarts the
    worker group from its last checkpoint (Ray retries the task) and the same run finishes with the
    uninterrupted run's labels and report."""
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    ok(_run_job(run_dir, kill=point, once=marker))
    assert marker.is_file(), f"nothing was killed at {point}"
    _same_result(run_dir, uninterrupted_job)
