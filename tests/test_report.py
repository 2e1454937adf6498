"""dist_fair.eval.report: which samples each part of the report uses, and the written files."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dist_fair.errors import DataError
from dist_fair.eval import metrics
from dist_fair.eval.report import evaluate_labels, render_markdown, write_report

RACES = ["African", "Asian", "Caucasian", "Indian"]


def make_labels(seed: int = 0, n: int = 1500):
    rng = np.random.default_rng(seed)
    identity = rng.integers(0, 80, n)
    pred = np.where(rng.random(n) < 0.25, rng.integers(0, 200, n), identity * 7 - 3)
    race = (identity % 4).astype(np.int16)
    gender = rng.integers(0, 2, n).astype(np.int16)
    identity[rng.random(n) < 0.05] = -1
    race[rng.random(n) < 0.05] = -1
    return pred, identity, {"race": race, "gender": gender}, {"race": RACES, "gender": ["male", "female"]}


@pytest.mark.parametrize("seed", [0, 1])
def test_report_values_use_the_right_samples(seed):
    pred, identity, attrs, names = make_labels(seed)
    report = evaluate_labels(pred, identity, attrs=attrs, attribute_names=names)
    known = identity != -1
    ident = report["identity"]
    assert report["num_samples"] == pred.size
    assert report["num_clusters"] == np.unique(pred[pred >= 0]).size + int((pred < 0).sum())  # noise: singletons
    assert ident["num_samples"] == known.sum() and ident["num_unknown_identity"] == (~known).sum()
    assert tuple(ident["pairwise"].values()) == pytest.approx(metrics.pairwise_fscore(identity[known], pred[known]))
    assert tuple(ident["bcubed"].values()) == pytest.approx(metrics.bcubed_fscore(identity[known], pred[known]))
    fresh = np.where(pred < 0, pred.max() + 1 + np.cumsum(pred < 0), pred)  # each negative label its own cluster
    assert ident["nmi"] == pytest.approx(normalized_mutual_info_score(identity[known], fresh[known]), abs=1e-9)
    assert ident["accuracy"] == pytest.approx(metrics.accuracy(identity[known], pred[known]))

    race = attrs["race"]
    entry = report["attributes"]["race"]
    has_group = race != -1
    assert entry["num_unknown_group"] == (~has_group).sum()
    assert entry["group_counts"] == {n: int(np.sum(race == t)) for t, n in enumerate(RACES)}
    assert entry["balance"] == pytest.approx(metrics.balance(pred[has_group], race[has_group]))
    assert entry["fairness"] == pytest.approx(metrics.fairness(pred[has_group], race[has_group]))
    assert entry["fwd"] == pytest.approx(metrics.fwd(pred[has_group], race[has_group]))
    both = has_group & known
    expected = metrics.per_group_scores(identity[both], pred[both], race[both], RACES)
    assert list(entry["per_group"]) == RACES
    for name in RACES:
        assert entry["per_group"][name]["num_samples"] == np.sum(both & (race == RACES.index(name)))
        assert entry["per_group"][name]["pairwise"] == pytest.approx(expected["groups"][name]["pairwise"])
        assert entry["per_group"][name]["bcubed"] == pytest.approx(expected["groups"][name]["bcubed"])
    f = [entry["per_group"][name]["pairwise"]["f"] for name in RACES]
    assert entry["mean"]["pairwise"]["f"] == pytest.approx(np.mean(f))
    assert entry["std"]["pairwise"]["f"] == pytest.approx(np.std(f))
    notes = " ".join(report["notes"])
    assert "unknown identity" in notes and "race:" in notes and "unknown group" in notes
    json.dumps(report, allow_nan=False)  # plain JSON, no NaN


def test_labels_object_and_group_selection():
    pred, identity, attrs, names = make_labels()
    labels = SimpleNamespace(identity=identity, attrs=attrs, attribute_names=names)
    from_object = evaluate_labels(pred, labels, groups=["gender"])
    from_arrays = evaluate_labels(pred, identity, ["gender"], attrs=attrs, attribute_names=names)
    assert list(from_object["attributes"]) == ["gender"]
    assert from_object == from_arrays
    with pytest.raises(DataError, match=r"'age' is not among the protected attributes \['gender', 'race'\]"):
        evaluate_labels(pred, labels, groups=["age"])


def test_unknown_identities_and_absent_groups():
    pred = np.array([0, 0, 1, 1, 2, 2])
    identity = np.full(6, -1)
    race = np.array([0, 1, 0, 1, 0, -1], dtype=np.int16)
    report = evaluate_labels(pred, identity, attrs={"race": race}, attribute_names={"race": RACES})
    assert report["identity"] is None
    entry = report["attributes"]["race"]
    assert entry["absent_groups"] == ["Caucasian", "Indian"]
    assert entry["balance"] == 0.0  # cluster 2 holds only African samples among the known groups
    assert entry["fwd"] == pytest.approx(metrics.fwd(pred[:5], race[:5]))
    assert entry["per_group"] is None
    assert any("No sample has a known identity" in n for n in report["notes"])
    assert any("Caucasian" in n and "no samples" in n for n in report["notes"])
    text = render_markdown(report, "t")
    assert "No per-group quality" in text and "No sample has a known identity." in text


def test_bad_inputs():
    pred, identity, attrs, names = make_labels()
    with pytest.raises(DataError, match=r"attrs\['race'\] has 10"):
        evaluate_labels(pred, identity, attrs={"race": attrs["race"][:10]}, attribute_names=names)
    bad = attrs["race"].copy()
    bad[7] = 4
    with pytest.raises(DataError, match=r"sample 7 has group value 4 .* names only 4 groups"):
        evaluate_labels(pred, identity, attrs={"race": bad}, attribute_names=names)
    with pytest.raises(DataError, match=r"pred: labels must have an integer dtype"):
        evaluate_labels(pred.astype(float), identity)


def test_write_report_files(tmp_path):
    pred, identity, attrs, names = make_labels()
    report = evaluate_labels(pred, identity, attrs=attrs, attribute_names=names)
    written = write_report(report, tmp_path / "out", "My run")
    assert set(written) == {"json", "markdown", "plot"}
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == json.loads(json.dumps(report))
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.startswith("# My run")
    assert "| pairwise | " in text and "## Protected attribute: race" in text
    assert f"| {report['identity']['pairwise']['f']:.4f} |" in text
    for name in RACES + ["**mean**", "**std**"]:
        assert f"| {name} |" in text
    png = (tmp_path / "out" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "out" / "report.png")
    assert image.ndim == 3 and image.shape[0] > 300
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md", "report.png"]


def test_no_plot_without_per_group_scores(tmp_path):
    report = evaluate_labels(np.array([0, 1, 1]), np.array([0, 1, 1]))
    written = write_report(report, tmp_path, "no groups")
    assert set(written) == {"json", "markdown"}
    assert not (tmp_path / "report.png").exists()
