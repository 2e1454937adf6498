"""``dist-fair fair-assign`` (dist_fair.fair.cli)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dist_fair.cli import main
from dist_fair.fair import fair_assign

from test_fair_assign import instance


def test_cli_writes_labels_and_report(tmp_path, capsys):
    probs, groups = instance(200, 6, 3, seed=9)
    np.save(tmp_path / "P.npy", probs)
    np.save(tmp_path / "G.npy", groups)
    out = tmp_path / "out" / "labels.npy"
    code = main(["fair-assign", "--probs", str(tmp_path / "P.npy"), "--groups", str(tmp_path / "G.npy"),
                 "--out", str(out), "--eps", "0.1"])
    assert code == 0
    labels = np.load(out, allow_pickle=False)
    expected = fair_assign(probs, groups, eps=0.1)
    assert labels.dtype == np.int64 and np.array_equal(labels, expected.labels)
    report = json.loads((tmp_path / "out" / "labels.report.json").read_text())
    assert report["objective"] == pytest.approx(expected.report.objective)
    assert report["balance_after"] >= report["balance_before"] and report["certified"] is True
    assert report["samples_changed"] == int((labels != probs.argmax(1)).sum())
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["labels"] == str(out)
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_cli_methods_and_rho(tmp_path):
    probs, groups = instance(120, 4, 2, seed=4)
    np.save(tmp_path / "P.npy", probs)
    np.save(tmp_path / "G.npy", groups)
    objectives = []
    for method in ("lp", "exact", "auction"):
        out = tmp_path / f"{method}.npy"
        assert main(["fair-assign", "--probs", str(tmp_path / "P.npy"), "--groups", str(tmp_path / "G.npy"),
                     "--out", str(out), "--method", method, "--rho", "0.5,0.5", "--eps", "0.3"]) == 0
        objectives.append(json.loads((tmp_path / f"{method}.report.json").read_text())["objective"])
    assert objectives == pytest.approx([objectives[0]] * 3, rel=1e-6)


def test_cli_errors_are_one_line(tmp_path, capsys):
    probs, groups = instance(50, 4, 2, seed=1)
    np.save(tmp_path / "P.npy", probs)
    np.save(tmp_path / "G.npy", groups[:-1])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    base = ["fair-assign", "--out", str(tmp_path / "l.npy")]
    assert main(base + ["--probs", str(tmp_path / "missing.npy"), "--groups", str(tmp_path / "G.npy")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--probs", str(tmp_path / "P.npy"), "--groups", str(tmp_path / "G.npy")]) == 1
    assert "--groups: expected shape (50,)" in capsys.readouterr().err
    assert main(base + ["--probs", str(tmp_path / "obj.npy"), "--groups", str(tmp_path / "G.npy")]) == 1
    assert "not a plain .npy" in capsys.readouterr().err
    assert not (tmp_path / "l.npy").exists()


@pytest.mark.ray
def test_cli_two_ray_workers_equal_one_process(ray_cluster, tmp_path):
    probs, groups = instance(150, 5, 3, seed=12)
    np.save(tmp_path / "P.npy", probs)
    np.save(tmp_path / "G.npy", groups)
    args = ["fair-assign", "--probs", str(tmp_path / "P.npy"), "--groups", str(tmp_path / "G.npy"), "--eps", "0.05"]
    assert main(args + ["--out", str(tmp_path / "one.npy")]) == 0
    assert main(args + ["--out", str(tmp_path / "two.npy"), "--workers", "2"]) == 0
    assert np.array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))
    report = json.loads((tmp_path / "two.report.json").read_text())
    assert report["workers"] == 2 and report["certified"] is True
    assert main(args + ["--out", str(tmp_path / "x.npy"), "--workers", "2", "--method", "lp"]) == 1


def test_cli_eps_of_one_and_more(tmp_path):
    """Issue 16: --eps 5 (also 1, 1.5, 2) ended in an IndexError; now it agrees with --method exact."""
    probs, groups = instance(150, 5, 3, seed=8)
    np.save(tmp_path / "P.npy", probs)
    np.save(tmp_path / "G.npy", groups)
    for eps in ("1", "1.5", "2", "5"):
        objectives = []
        for method in ("auto", "exact"):
            out = tmp_path / f"{method}-{eps}.npy"
            assert main(["fair-assign", "--probs", str(tmp_path / "P.npy"), "--groups", str(tmp_path / "G.npy"),
                         "--out", str(out), "--eps", eps, "--method", method]) == 0
            objectives.append(json.loads((tmp_path / f"{method}-{eps}.report.json").read_text())["objective"])
        assert objectives[0] == pytest.approx(objectives[1], rel=1e-9)


@pytest.mark.parametrize("damage", ["scaled", "zero"])
def test_cli_refuses_rows_that_do_not_sum_to_one(tmp_path, capsys, damage):
    probs, groups = instance(80, 4, 2, seed=3)
    bad = probs.copy()
    if damage == "scaled":
        bad[[5, 17]] *= 1.7
    else:
        bad[[5, 17]] = 0.0
    np.save(tmp_path / "P.npy", bad)
    np.save(tmp_path / "G.npy", groups)
    out = tmp_path / "l.npy"
    base = ["fair-assign", "--probs", str(tmp_path / "P.npy"), "--groups", str(tmp_path / "G.npy"), "--out", str(out)]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert "2 of 80 rows do not sum to 1" in err and "row 5 sums to" in err and "row 17" in err
    assert "--normalize" in err and not out.exists()
    if damage == "scaled":  # --normalize: the same labels as the true probabilities
        assert main(base + ["--normalize"]) == 0
        assert np.array_equal(np.load(out), fair_assign(probs, groups).labels)
    else:  # nothing to normalise
        assert main(base + ["--normalize"]) == 1
        assert "cannot be normalised" in capsys.readouterr().err and not out.exists()


def test_library_refuses_unnormalised_rows():
    from dist_fair.errors import DataError

    probs, groups = instance(60, 3, 2, seed=2)
    with pytest.raises(DataError, match="row 7 sums to 1.7"):
        fair_assign(np.where(np.arange(60)[:, None] == 7, probs * 1.7, probs), groups)
    fair_assign(probs.astype(np.float32), groups)  # float32 rounding is fine
