"""``dist-fair evaluate`` end to end on a real shard folder (written with the data API)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dist_fair.cli import main as cli_main
from dist_fair.data.shards import write_embedding_shards
from dist_fair.eval.report import evaluate_labels

RACES = ["African", "Asian", "Caucasian", "Indian"]
N = 700


@pytest.fixture(scope="module")
def shard_case(tmp_path_factory):
    rng = np.random.default_rng(0)
    identity = rng.integers(0, 60, N)
    race = (identity % 4).astype(np.int16)
    race[rng.random(N) < 0.05] = -1
    gender = rng.integers(0, 2, N).astype(np.int16)
    identity[rng.random(N) < 0.05] = -1
    emb = rng.standard_normal((N, 4)).astype(np.float32)
    shard_dir = tmp_path_factory.mktemp("shards")
    write_embedding_shards(shard_dir, emb, identity, {"race": race, "gender": gender},
                           {"race": RACES, "gender": ["male", "female"]}, shard_rows=256, block_rows=100)
    pred = np.where(rng.random(N) < 0.2, rng.integers(0, 150, N), identity + 1000).astype(np.int32)
    return shard_dir, pred, identity, {"race": race, "gender": gender}


def run_cli(*argv: str) -> int:
    return cli_main(["evaluate", *map(str, argv)])


def test_evaluate_end_to_end(shard_case, tmp_path, capsys):
    shard_dir, pred, identity, attrs = shard_case
    np.save(tmp_path / "labels.npy", pred)
    out = tmp_path / "reports" / "eval.json"
    assert run_cli("--shards", shard_dir, "--pred", tmp_path / "labels.npy", "--out", out, "--md", "--plot") == 0
    report = json.loads(out.read_text())
    expected = evaluate_labels(pred, identity, attrs=attrs,
                               attribute_names={"race": RACES, "gender": ["male", "female"]})
    report.pop("inputs")
    assert report == json.loads(json.dumps(expected))
    assert (out.with_suffix(".md")).read_text().startswith("# Evaluation of labels.npy")
    assert (out.with_suffix(".png")).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert f"pairwise F {expected['identity']['pairwise']['f']:.4f}" in printed
    assert "race: balance" in printed and "Caucasian" in printed


def test_group_selection_and_defaults(shard_case, tmp_path):
    shard_dir, pred, _, _ = shard_case
    np.save(tmp_path / "labels.npy", pred.astype(np.uint16))
    out = tmp_path / "r.json"
    assert run_cli("--shards", shard_dir, "--pred", tmp_path / "labels.npy", "--out", out,
                   "--group", "gender", "--no-accuracy") == 0
    report = json.loads(out.read_text())
    assert list(report["attributes"]) == ["gender"]
    assert "accuracy" not in report["identity"]
    assert not out.with_suffix(".md").exists() and not out.with_suffix(".png").exists()


@pytest.mark.parametrize("case, message", [
    ("short", r"holds 699 labels but shard folder .* has 700 samples"),
    ("float", r"dtype float64 is not an integer type"),
    ("nan", r"contains NaN \(first at sample 3\)"),
    ("object", r"pickled or object arrays are refused"),
    ("matrix", r"has shape \(350, 2\), expected \(700,\)"),
    ("missing", r"file not found"),
])
def test_bad_prediction_files(shard_case, tmp_path, capsys, case, message):
    shard_dir, pred, _, _ = shard_case
    path = tmp_path / "labels.npy"
    if case == "short":
        np.save(path, pred[:-1])
    elif case == "float":
        np.save(path, pred.astype(np.float64))
    elif case == "nan":
        bad = pred.astype(np.float64)
        bad[3] = np.nan
        np.save(path, bad)
    elif case == "object":
        np.save(path, pred.astype(object), allow_pickle=True)
    elif case == "matrix":
        np.save(path, pred.reshape(350, 2))
    assert run_cli("--shards", shard_dir, "--pred", path, "--out", tmp_path / "r.json") == 1
    err = capsys.readouterr().err
    assert "dist-fair evaluate: error:" in err and "labels.npy" in err
    assert "np.save('labels.npy', labels.astype(np.int64))" in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "r.json").exists()


def test_unknown_group_name(shard_case, tmp_path, capsys):
    shard_dir, pred, _, _ = shard_case
    np.save(tmp_path / "labels.npy", pred)
    assert run_cli("--shards", shard_dir, "--pred", tmp_path / "labels.npy", "--group", "age",
                   "--out", tmp_path / "r.json") == 1
    err = capsys.readouterr().err
    assert "--group age" in err and "available: race, gender" in err


def test_command_module_imports_only_the_standard_library():
    code = ("import sys, dist_fair.eval.cli, dist_fair.eval; "
            "heavy = [m for m in ('numpy', 'scipy', 'matplotlib', 'torch') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    help_text = subprocess.run([sys.executable, "-m", "dist_fair.cli", "evaluate", "--help"],
                               check=True, capture_output=True, text=True).stdout
    assert "--pred" in help_text and "--group" in help_text


def _flip_identity_byte(shard_dir, shard_index=0):
    import tarfile

    from dist_fair.data.shards import read_manifest

    path = shard_dir / read_manifest(shard_dir).shards[shard_index].name
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(".identity.npy"))
    data = bytearray(path.read_bytes())
    data[member.offset_data + 200] ^= 0x01  # inside the int64 identities, past the .npy header
    path.write_bytes(bytes(data))
    return path


def test_flipped_byte_in_identity_fails(shard_case, tmp_path, capsys):
    """Issue 16: a flipped byte in identity.npy used to change the metrics with exit code 0."""
    import shutil

    source, pred, _, _ = shard_case
    shard_dir = tmp_path / "shards"
    shutil.copytree(source, shard_dir)
    victim = _flip_identity_byte(shard_dir)
    np.save(tmp_path / "labels.npy", pred)
    out = tmp_path / "r.json"
    assert run_cli("--shards", shard_dir, "--pred", tmp_path / "labels.npy", "--out", out) == 1
    err = capsys.readouterr().err
    assert f"{victim.name}: sha256 mismatch" in err and "rewrite it" in err and not out.exists()
    assert run_cli("--shards", shard_dir, "--pred", tmp_path / "labels.npy", "--out", out, "--no-verify") == 0
    assert out.exists()


def test_noise_labels_are_singletons_end_to_end(shard_case, tmp_path):
    shard_dir, pred, identity, attrs = shard_case
    noisy = pred.astype(np.int64)
    noisy[np.random.default_rng(1).random(N) < 0.3] = -1
    np.save(tmp_path / "labels.npy", noisy)
    out = tmp_path / "r.json"
    assert run_cli("--shards", shard_dir, "--pred", tmp_path / "labels.npy", "--out", out) == 0
    report = json.loads(out.read_text())
    fresh = noisy.copy()  # reference: each -1 relabelled as a fresh cluster id
    fresh[noisy < 0] = noisy.max() + 1 + np.arange((noisy < 0).sum())
    expected = evaluate_labels(fresh, identity, attrs=attrs,
                               attribute_names={"race": RACES, "gender": ["male", "female"]})
    assert report["inputs"]["noise_samples"] == int((noisy < 0).sum())
    report.pop("inputs")
    assert report == json.loads(json.dumps(expected))
    assert report["num_clusters"] == np.unique(noisy[noisy >= 0]).size + (noisy < 0).sum()
