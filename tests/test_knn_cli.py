"""``dist-fair knn`` (dist_fair.knn.cli): same graph as the library call, clear errors, local Ray instance."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dist_fair.data.shards import write_embedding_shards
from dist_fair.knn import load_knn_graph


def brute_force_nbrs(x: np.ndarray, k: int) -> np.ndarray:
    x64 = x.astype(np.float64)
    x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
    sims = (x64 @ x64.T).astype(np.float32)
    key = -sims.astype(np.float64)
    np.fill_diagonal(key, -np.inf)
    n = x.shape[0]
    return np.lexsort((np.broadcast_to(np.arange(n), (n, n)), key), axis=1)[:, :k]


@pytest.fixture()
def shards(tmp_path):
    x = np.random.default_rng(3).standard_normal((150, 8)).astype(np.float32)
    x[20:24] = x[2]
    write_embedding_shards(tmp_path / "shards", x, identity=np.arange(150) // 3, shard_rows=60)
    return tmp_path / "shards", x


@pytest.mark.ray
def test_cli_builds_the_exact_graph_on_the_cluster(ray_cluster, shards, tmp_path, capsys):
    from dist_fair.cli import main

    folder, x = shards
    rc = main(["knn", "--shards", str(folder), "--out", str(tmp_path / "knn"), "--k", "7", "--index", "flat",
               "--workers", "2", "--cpus-per-worker", "1", "--query-block", "40", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 150 and summary["index"] == "flat" and summary["workers"] == 2
    nbrs, _ = load_knn_graph(tmp_path / "knn")
    np.testing.assert_array_equal(nbrs, brute_force_nbrs(x, 7))
    # a complete output is reused; bad arguments are one-line errors with exit code 1
    assert main(["knn", "--shards", str(folder), "--out", str(tmp_path / "knn"), "--k", "7", "--index", "flat",
                 "--workers", "2", "--cpus-per-worker", "1", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is True
    assert main(["knn", "--shards", str(folder), "--out", str(tmp_path / "e"), "--k", "999", "--no-progress"]) == 1
    assert "fewer than k=999" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_a_fresh_local_ray_instance(shards, tmp_path):
    folder, x = shards
    cmd = [sys.executable, "-m", "dist_fair.cli", "knn", "--shards", str(folder), "--out", str(tmp_path / "knn"),
           "--k", "5", "--index", "hnsw", "--workers", "2", "--recall-sample", "50", "--no-progress"]
    # RAY_ADDRESS=local: a private instance, not the latest Ray cluster started on this machine
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["workers"] == 2 and 0.5 <= summary["recall_at_k"] <= 1.0, summary
    nbrs, _ = load_knn_graph(tmp_path / "knn")
    assert (nbrs[:, 0] == np.arange(150)).all()


@pytest.mark.ray
def test_cli_refuses_a_flipped_byte_in_emb(ray_cluster, shards, tmp_path, capsys):
    """Issue 16: one flipped byte inside emb.npy used to give exit 0 and a wrong graph."""
    import tarfile

    from dist_fair.cli import main
    from dist_fair.data.shards import read_manifest

    folder, _ = shards
    victim = folder / read_manifest(folder).shards[1].name
    with tarfile.open(victim) as tar:
        member = next(m for m in tar if m.name.endswith(".emb.npy"))
    data = bytearray(victim.read_bytes())
    data[member.offset_data + 200] ^= 0x01
    victim.write_bytes(bytes(data))
    rc = main(["knn", "--shards", str(folder), "--out", str(tmp_path / "knn"), "--k", "7", "--index", "flat",
               "--workers", "1", "--cpus-per-worker", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{victim.name}: sha256 mismatch" in err and "rewrite it" in err
    assert not (tmp_path / "knn" / "knn.json").exists()
