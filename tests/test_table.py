"""dist_fair.data.table: CSV tables (Adult, Bank) as embedding shards, checked against pandas + sklearn."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from dist_fair.data.shards import load_embeddings, load_labels
from dist_fair.data.table import load_table, read_table, write_table_shards
from dist_fair.errors import DataError

ROWS = 500
ADULT_NUMERIC = ["age", "final-weight", "education-num", "capital-gain", "capital-loss", "hours-per-week"]


@pytest.fixture(scope="module")
def adult(shared_data):
    return shared_data / "tabular" / "adult.csv"


@pytest.fixture(scope="module")
def adult_frame(adult):
    return pd.read_csv(adult, skipinitialspace=True, na_values=["?"], nrows=ROWS)


def test_adult_default_features_match_sklearn(adult, adult_frame):
    data = load_table(adult, "sex", "income", limit=ROWS)
    assert data.feature_names == ADULT_NUMERIC
    expected = StandardScaler().fit_transform(adult_frame[ADULT_NUMERIC].to_numpy(np.float64))
    assert data.emb.dtype == np.float32 and data.emb.shape == (ROWS, 6)
    np.testing.assert_allclose(data.emb, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.mean, adult_frame[ADULT_NUMERIC].mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(data.std, adult_frame[ADULT_NUMERIC].std(ddof=0).to_numpy(), rtol=1e-12)
    assert data.attribute_names == {"sex": ["Female", "Male"]}
    np.testing.assert_array_equal(data.attrs["sex"], (adult_frame["sex"] == "Male").to_numpy().astype(np.int16))
    assert data.identity_names == ["<=50K", ">50K"]
    np.testing.assert_array_equal(data.identity, (adult_frame["income"] == ">50K").to_numpy().astype(np.int64))


def test_one_hot_drop_missing_matches_sklearn(adult, adult_frame):
    columns = ["age", "workclass", "occupation", "hours-per-week"]
    data = load_table(adult, ["sex", "race"], "income", features=columns, one_hot=True, drop_missing=True,
                      limit=ROWS)
    kept = adult_frame.dropna(subset=columns)
    assert len(data.dropped_lines) == ROWS - len(kept) > 0
    encoder = OneHotEncoder(sparse_output=False).fit(kept[["workclass"]])
    occupation = OneHotEncoder(sparse_output=False).fit(kept[["occupation"]])
    raw = np.hstack([kept[["age"]].to_numpy(float), encoder.transform(kept[["workclass"]]),
                     occupation.transform(kept[["occupation"]]), kept[["hours-per-week"]].to_numpy(float)])
    np.testing.assert_allclose(data.emb, StandardScaler().fit_transform(raw), rtol=1e-5, atol=1e-5)
    assert data.feature_names == (["age"] + [f"workclass={c}" for c in encoder.categories_[0]]
                                  + [f"occupation={c}" for c in occupation.categories_[0]] + ["hours-per-week"])
    assert data.attribute_names["race"] == sorted(kept["race"].unique())
    codes = {name: i for i, name in enumerate(data.attribute_names["race"])}
    np.testing.assert_array_equal(data.attrs["race"], kept["race"].map(codes).to_numpy())
    # lines are 1-based file lines: header is line 1, data row i is line i + 2
    dropped_rows = sorted(set(range(ROWS)) - set(kept.index))
    assert data.dropped_lines == [r + 2 for r in dropped_rows]


def test_bank_semicolons_and_shards_round_trip(tmp_path, shared_data):
    bank = shared_data / "tabular" / "bank.csv"
    frame = pd.read_csv(bank, sep=";", nrows=ROWS)
    manifest = write_table_shards(tmp_path / "bank", bank, "marital", label="y", limit=ROWS, shard_rows=128,
                                  block_rows=50)
    numeric = [c for c in frame.columns if frame[c].dtype.kind in "if"]
    assert manifest.kind == "embeddings" and manifest.dim == len(numeric) == 7 and manifest.dtype == "float32"
    assert manifest.num_samples == ROWS and [s.samples for s in manifest.shards] == [128, 128, 128, 116]
    assert manifest.attributes == {"marital": ["divorced", "married", "single"]}
    assert manifest.group_counts()["marital"] == frame["marital"].value_counts().to_dict()
    assert manifest.source["sep"] == ";" and manifest.source["features"] == numeric
    assert manifest.source["identity_names"] == ["no", "yes"] and manifest.num_identities == 2
    emb = load_embeddings(tmp_path / "bank")
    np.testing.assert_allclose(emb, StandardScaler().fit_transform(frame[numeric].to_numpy(float)), atol=1e-5)
    labels = load_labels(tmp_path / "bank")
    np.testing.assert_array_equal(labels.identity, (frame["y"] == "yes").to_numpy().astype(np.int64))
    names = manifest.attributes["marital"]
    np.testing.assert_array_equal(labels.attrs["marital"], frame["marital"].map(names.index).to_numpy())


def test_missing_protected_and_label_become_unknown(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("x,y,group,label\n1,2,b,10\n3,4,,9\n5,6,a,\n7,8,?,9\n")
    data = load_table(csv, "group", "label", standardize=False)
    np.testing.assert_array_equal(data.emb, [[1, 2], [3, 4], [5, 6], [7, 8]])
    assert data.attribute_names == {"group": ["a", "b"]}
    np.testing.assert_array_equal(data.attrs["group"], [1, -1, 0, -1])
    assert data.identity_names == ["9", "10"]            # numeric values sort as numbers
    np.testing.assert_array_equal(data.identity, [1, 0, -1, 0])
    assert data.missing_counts == {"group": 2, "label": 1}
    manifest = write_table_shards(tmp_path / "out", csv, "group", label="label", standardize=False)
    assert manifest.source["missing"] == {"group": 2, "label": 1}
    assert manifest.group_counts() == {"group": {"a": 1, "b": 1}}
    np.testing.assert_array_equal(load_labels(tmp_path / "out").attrs["group"], [1, -1, 0, -1])


def test_constant_column_becomes_zeros(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("x,c,g\n1,5,a\n2,5,b\n3,5,a\n")
    data = load_table(csv, "g")
    np.testing.assert_allclose(data.emb[:, 1], 0.0)
    np.testing.assert_allclose(data.emb[:, 0], [-np.sqrt(1.5), 0, np.sqrt(1.5)], rtol=1e-6)


def test_bad_input_errors(tmp_path, adult):
    with pytest.raises(DataError, match=r"no column 'gender'; available columns: \['age', 'workclass'"):
        load_table(adult, "gender", limit=10)
    with pytest.raises(DataError, match="no column 'salary'"):
        load_table(adult, "sex", label="salary", limit=10)
    with pytest.raises(DataError, match="line 29 .*data row 27.*'workclass' is missing.*--drop-missing"):
        load_table(adult, "sex", features=["age", "workclass"], one_hot=True, limit=ROWS)
    with pytest.raises(DataError, match="'workclass' is not numeric .*'State-gov'.*--one-hot"):
        load_table(adult, "sex", features=["age", "workclass"], limit=10)
    with pytest.raises(DataError, match="both the label and a protected"):
        load_table(adult, "sex", label="sex", limit=10)
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,g\n1,2,x\n3,nan,y\n4,inf,x\n")
    with pytest.raises(DataError, match="line 3 .*'b' is missing"):
        load_table(csv, "g")
    infinite = tmp_path / "inf.csv"
    infinite.write_text("a,b,g\n1,2,x\n3,5,y\n4,inf,x\n")
    with pytest.raises(DataError, match="line 4 .*'b' is not a finite number \\('inf'\\)"):
        load_table(infinite, "g")
    short = tmp_path / "short.csv"
    short.write_text("a,b,g\n1,2,x\n3,y\n")
    with pytest.raises(DataError, match="line 3: 2 fields, the header has 3"):
        read_table(short)
    with pytest.raises(DataError, match="no data rows"):
        (tmp_path / "empty.csv").write_text("a,b\n")
        read_table(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "nope.csv")


def test_drop_missing_keeps_order_and_counts(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("a,g\n1,x\n?,y\n3,x\n,y\n5,y\n")
    manifest = write_table_shards(tmp_path / "out", csv, "g", drop_missing=True, standardize=False)
    assert manifest.num_samples == 3 and manifest.source["dropped_rows"] == 2
    assert manifest.source["dropped_lines_first"] == [3, 5]
    np.testing.assert_array_equal(load_embeddings(tmp_path / "out")[:, 0], [1, 3, 5])
    np.testing.assert_array_equal(load_labels(tmp_path / "out").attrs["g"], [0, 0, 1])


def test_command_line_arguments(tmp_path, adult):
    import argparse

    from dist_fair.data.table import add_table_arguments, run_table

    parser = argparse.ArgumentParser()
    add_table_arguments(parser)
    args = parser.parse_args(["--path", str(adult), "--protected", "sex,race", "--label", "income",
                              "--features", "age,education-num", "--limit", "100", "--out", str(tmp_path / "t"),
                              "--shard-rows", "40", "--no-standardize"])
    manifest = run_table(args)
    assert manifest.dim == 2 and manifest.num_samples == 100 and len(manifest.shards) == 3
    assert list(manifest.attributes) == ["sex", "race"] and manifest.source["standardize"] is False
    assert load_embeddings(tmp_path / "t")[0].tolist() == [39.0, 13.0]


def test_a_non_number_in_a_numeric_column_is_an_error_not_a_dropped_feature(tmp_path):
    """Issue 16: one 'abc' cell used to drop the whole feature column (3 features became 2, exit 0)."""
    csv = tmp_path / "t.csv"
    csv.write_text("x,y,z,g\n1,2,3,a\n4,abc,6,b\n7,8,9,a\n10,11,12,b\n")
    with pytest.raises(DataError, match=r"t.csv, line 3 \(data row 1\), column 'y': value 'abc' is not a number, "
                                        r"but 3 of the column's 4 values are.*--exclude y.*--one-hot"):
        load_table(csv, "g")
    from dist_fair.cli import main

    out = tmp_path / "out"
    assert main(["shards", "table", "--path", str(csv), "--protected", "g", "--out", str(out)]) == 1
    assert not (out / "manifest.json").exists()
    data = load_table(csv, "g", exclude=["y"])
    assert data.feature_names == ["x", "z"]


def test_categorical_columns_left_out_are_recorded(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("x,colour,g\n1,red,a\n2,blue,b\n3,red,a\n")
    manifest = write_table_shards(tmp_path / "out", csv, "g")
    assert manifest.source["features"] == ["x"] and manifest.source["skipped_columns"] == ["colour"]
    assert manifest.source["warnings"] == []


def test_single_group_protected_column_warns(tmp_path, caplog):
    csv = tmp_path / "t.csv"
    csv.write_text("x,y,g\n1,2,a\n3,4,a\n5,6,a\n")
    with caplog.at_level("WARNING", logger="dist_fair.data.table"):
        manifest = write_table_shards(tmp_path / "out", csv, "g")
    assert "protected column 'g' has a single group ('a')" in caplog.text
    assert len(manifest.source["warnings"]) == 1 and "single group" in manifest.source["warnings"][0]
