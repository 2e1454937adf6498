"""dist_fair.data.features: .npy / .npz / .bin+.meta embeddings as L2-normalised embedding shards."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dist_fair.data.attribute_files import AttributeFile
from dist_fair.data.features import (
    add_features_arguments, bad_rows, load_features, npz_array, open_embeddings, person_of_image_name,
    read_label_lines, run_features, write_feature_shards,
)
from dist_fair.data.images import IDENTITY_NAMES_FILE
from dist_fair.data.shards import iter_blocks, load_embeddings, load_labels
from dist_fair.errors import DataError

N, DIM = 300, 24


@pytest.fixture(scope="module")
def emb() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N, DIM)).astype(np.float32) * 3.0


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 40, N)


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def test_npy_round_trip_normalised(tmp_path, emb, labels):
    np.save(tmp_path / "x.npy", emb)
    np.save(tmp_path / "y.npy", labels)
    manifest = write_feature_shards(tmp_path / "out", tmp_path / "x.npy", labels=tmp_path / "y.npy", shard_rows=128,
                                    block_rows=50, progress=False)
    assert manifest.kind == "embeddings" and manifest.dim == DIM and manifest.dtype == "float32"
    assert [s.samples for s in manifest.shards] == [128, 128, 44] and manifest.num_identities == len(set(labels))
    got = load_embeddings(tmp_path / "out")
    np.testing.assert_allclose(got, unit(emb), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(load_labels(tmp_path / "out").identity, labels)
    assert [len(b) for b in iter_blocks(tmp_path / "out")][:3] == [50, 50, 28]
    assert manifest.source["normalised"] == "l2" and not (tmp_path / "out" / IDENTITY_NAMES_FILE).exists()
    assert isinstance(open_embeddings(tmp_path / "x.npy").open(), np.memmap)


def test_float16_and_float64_inputs(tmp_path, emb):
    np.save(tmp_path / "x64.npy", emb.astype(np.float64))
    write_feature_shards(tmp_path / "out", tmp_path / "x64.npy", dtype="float16", progress=False)
    np.testing.assert_allclose(load_embeddings(tmp_path / "out"), unit(emb), atol=2e-3)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(emb))
    write_feature_shards(tmp_path / "f", tmp_path / "fortran.npy", progress=False)
    np.testing.assert_allclose(load_embeddings(tmp_path / "f"), unit(emb), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_keys_names_groups(tmp_path, emb, compressed):
    rng = np.random.default_rng(2)
    people = np.array(["Zoe", "Al", "Bea"])[rng.integers(0, 3, N)]
    names = np.array([f"{p}_{i:04d}.jpg" for i, p in enumerate(people)])
    skin = np.array(["dark", "light", ""])[rng.integers(0, 3, N)]
    age = rng.integers(-1, 3, N)
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "f.npz", vectors=emb, names=names, skin=skin, age=age, person=people)
    if not compressed:
        assert isinstance(npz_array(tmp_path / "f.npz", "vectors"), np.memmap)
    manifest = write_feature_shards(tmp_path / "out", tmp_path / "f.npz", names_key="names",
                                    group_keys={"skin": "skin", "age_group": "age"}, progress=False)
    np.testing.assert_allclose(load_embeddings(tmp_path / "out"), unit(emb), rtol=1e-6, atol=1e-7)  # the only 2-D
    lab = load_labels(tmp_path / "out")
    # identity = person part of the names, numbered in sorted person order
    assert json.loads((tmp_path / "out" / IDENTITY_NAMES_FILE).read_text()) == ["Al", "Bea", "Zoe"]
    np.testing.assert_array_equal(lab.identity, np.searchsorted(["Al", "Bea", "Zoe"], people))
    assert manifest.attributes == {"skin": ["dark", "light"], "age_group": ["0", "1", "2"]}
    np.testing.assert_array_equal(lab.attrs["skin"], np.where(skin == "", -1, skin == "light"))
    np.testing.assert_array_equal(lab.attrs["age_group"], age)
    assert manifest.source["attribute_unknown"]["skin"] == {"missing": int((skin == "").sum()), "conflicting": 0}
    assert manifest.source["attribute_unknown"]["age_group"]["missing"] == int((age < 0).sum())
    # string identity labels from a key win over the names
    features = load_features(tmp_path / "f.npz", emb_key="vectors", label_key="person", names_key="names")
    assert features.identity_names == ["Al", "Bea", "Zoe"]
    np.testing.assert_array_equal(features.identity, np.searchsorted(["Al", "Bea", "Zoe"], people))


def test_npz_names_join_attribute_files(tmp_path, emb):
    names = np.array([f"P{i % 7}_{i:04d}.jpg" for i in range(N)])
    np.savez(tmp_path / "f.npz", emb=emb, names=names)
    (tmp_path / "g.json").write_text(json.dumps({"P0": "a", "P1": "b", "P2": "a,b"}))
    (tmp_path / "t.txt").write_text("P3_0003.jpg\nP3_0010.jpg\n")
    files = [AttributeFile("g", str(tmp_path / "g.json"), "json"),
             AttributeFile("tall", str(tmp_path / "t.txt"), "list", value="yes")]
    manifest = write_feature_shards(tmp_path / "out", tmp_path / "f.npz", names_key="names", attribute_files=files,
                                    limit=100, progress=False)
    assert manifest.num_samples == 100
    lab = load_labels(tmp_path / "out")
    person = np.arange(100) % 7
    np.testing.assert_array_equal(lab.attrs["g"], np.select([person == 0, person == 1], [0, 1], -1))
    np.testing.assert_array_equal(np.nonzero(lab.attrs["tall"] == 0)[0], [3, 10])
    assert manifest.source["attribute_unknown"]["g"] == {"missing": int((person > 2).sum()),
                                                         "conflicting": int((person == 2).sum())}
    with pytest.raises(DataError, match="--names-key"):
        load_features(tmp_path / "f.npz", attribute_files=files)


def test_bin_meta_learn_to_cluster_layout(tmp_path, emb, labels):
    (tmp_path / "features").mkdir()
    (tmp_path / "labels").mkdir()
    emb.astype("<f4").tofile(tmp_path / "features" / "part1_test.bin")
    (tmp_path / "labels" / "part1_test.meta").write_text("".join(f"{v}\n" for v in labels))
    manifest = write_feature_shards(tmp_path / "out", tmp_path / "features" / "part1_test.bin", dim=DIM,
                                    progress=False)
    np.testing.assert_allclose(load_embeddings(tmp_path / "out"), unit(emb), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(load_labels(tmp_path / "out").identity, labels)
    assert manifest.source["labels"].endswith("labels/part1_test.meta")
    # beside the .bin wins; no .meta at all: identities unknown
    (tmp_path / "features" / "part1_test.meta").write_text("".join(f"{v + 1}\n" for v in labels))
    features = load_features(tmp_path / "features" / "part1_test.bin", dim=DIM)
    np.testing.assert_array_equal(features.identity, labels + 1)
    # an identity column given: the .meta beside the .bin is not used
    (tmp_path / "who.csv").write_text("who\n" + "".join(f"p{v % 3}\n" for v in labels))
    features = load_features(tmp_path / "features" / "part1_test.bin", dim=DIM, attributes_csv=tmp_path / "who.csv",
                             csv_identity="who")
    assert features.identity_names == ["p0", "p1", "p2"] and "labels" not in features.source
    np.testing.assert_array_equal(features.identity, labels % 3)
    emb.astype("<f4").tofile(tmp_path / "alone.bin")
    assert (load_features(tmp_path / "alone.bin", dim=DIM).identity == -1).all()


def test_attribute_csv_one_row_per_embedding(tmp_path, emb):
    rng = np.random.default_rng(3)
    race = np.array(["Asian", "Black", "White", ""])[rng.integers(0, 4, N)]
    person = rng.integers(0, 9, N)
    lines = ["id,race,gender,person"] + [f"{i},{r},{'m' if i % 3 else 'f'},{p}" for i, (r, p) in
                                         enumerate(zip(race, person))]
    (tmp_path / "attrs.csv").write_text("\n".join(lines) + "\n")
    np.save(tmp_path / "x.npy", emb)
    manifest = write_feature_shards(tmp_path / "out", tmp_path / "x.npy", attributes_csv=tmp_path / "attrs.csv",
                                    csv_attributes=["race", "gender"], csv_identity="person", progress=False)
    assert manifest.attributes == {"race": ["Asian", "Black", "White"], "gender": ["f", "m"]}
    lab = load_labels(tmp_path / "out")
    np.testing.assert_array_equal(lab.attrs["race"], [["Asian", "Black", "White"].index(r) if r else -1 for r in race])
    np.testing.assert_array_equal(lab.attrs["gender"], (np.arange(N) % 3 != 0).astype(int))
    np.testing.assert_array_equal(lab.identity, person)            # integer labels kept as they are
    assert manifest.source["attribute_unknown"]["race"]["missing"] == int((race == "").sum())
    (tmp_path / "short.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=f"short.csv: {N - 1} data rows, the embeddings have {N}"):
        load_features(tmp_path / "x.npy", attributes_csv=tmp_path / "short.csv", csv_attributes=["race"])


def test_command_line(tmp_path, emb, labels):
    emb.astype("<f4").tofile(tmp_path / "x.bin")
    (tmp_path / "x.meta").write_text("".join(f"{v}\n" for v in labels))
    parser = argparse.ArgumentParser()
    add_features_arguments(parser)
    args = parser.parse_args(["--input", str(tmp_path / "x.bin"), "--dim", str(DIM), "--out", str(tmp_path / "out"),
                              "--shard-rows", "100", "--limit", "250", "--prefix", "ltc"])
    manifest = run_features(args)
    assert [s.name for s in manifest.shards] == ["ltc-000000.tar", "ltc-000001.tar", "ltc-000002.tar"]
    np.testing.assert_allclose(load_embeddings(tmp_path / "out"), unit(emb[:250]), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(load_labels(tmp_path / "out").identity, labels[:250])
    np.savez(tmp_path / "g.npz", emb=emb, sex=np.arange(N) % 2)
    args = parser.parse_args(["--input", str(tmp_path / "g.npz"), "--group-key", "sex", "--out", str(tmp_path / "g")])
    assert run_features(args).attributes == {"sex": ["0", "1"]}


def test_bin_dim_and_meta_checked(tmp_path, emb, labels):
    emb.astype("<f4").tofile(tmp_path / "x.bin")
    with pytest.raises(DataError, match=r"x.bin: 28,800 bytes is not a whole number of float32 rows of dim 7 "
                                        r"\(28 bytes each; 16 bytes left over\)"):
        open_embeddings(tmp_path / "x.bin", dim=7)
    with pytest.raises(DataError, match="pass its dimension"):
        open_embeddings(tmp_path / "x.bin")
    (tmp_path / "x.meta").write_text("".join(f"{v}\n" for v in labels[:-1]))
    with pytest.raises(DataError, match=f"label file .*x.meta: {N - 1} rows, the embeddings have {N}"):
        load_features(tmp_path / "x.bin", dim=DIM)
    # dim 12 divides the size but gives twice the rows: the .meta count catches it
    (tmp_path / "x.meta").write_text("".join(f"{v}\n" for v in labels))
    with pytest.raises(DataError, match=f"{N} rows, the embeddings have {2 * N}"):
        load_features(tmp_path / "x.bin", dim=12)
    (tmp_path / "x.meta").write_text("1\n2\nthree\n")
    with pytest.raises(DataError, match=r"x.meta, line 3: label 'three' is not an integer"):
        read_label_lines(tmp_path / "x.meta")
    np.save(tmp_path / "y.npy", emb)
    with pytest.raises(DataError, match="rows have 24 dims, --dim says 32"):
        open_embeddings(tmp_path / "y.npy", dim=32)


def test_nan_inf_and_zero_rows_refused_with_row_numbers(tmp_path, emb):
    bad = emb.copy()
    bad[[5, 17, 40]] = np.nan
    bad[120, 3] = np.inf
    bad[200, 0] = -np.inf
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DataError, match=r"bad.npy: 5 rows contain NaN or Inf \(rows 5, 17, 40, 120, 200\)"):
        write_feature_shards(tmp_path / "out", tmp_path / "bad.npy", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    many = emb.copy()
    many[::20] = np.nan
    many[7] = 0.0
    found = bad_rows(many, chunk_rows=16)   # chunks do not change the answer
    assert found["NaN or Inf"] == (list(range(0, 200, 20)), 15) and found["all zeros"] == ([7], 1)
    np.save(tmp_path / "many.npy", many)
    with pytest.raises(DataError, match=r"15 rows contain NaN or Inf \(rows 0, 20, .*, 180, \.\.\.\); "
                                        r"1 rows contain all zeros \(rows 7\)"):
        write_feature_shards(tmp_path / "out", tmp_path / "many.npy", progress=False)


def test_bad_files_refused(tmp_path, emb):
    np.savez(tmp_path / "f.npz", emb=emb, other=emb)
    with pytest.raises(DataError, match=r"no array 'labels'; the file holds \['emb', 'other'\]"):
        load_features(tmp_path / "f.npz", label_key="labels")
    np.savez(tmp_path / "two.npz", a=emb, b=emb)
    with pytest.raises(DataError, match="which array holds the embeddings.*--emb-key"):
        open_embeddings(tmp_path / "two.npz")
    # object arrays (pickles) are refused, never unpickled
    objects = np.empty(3, dtype=object)
    objects[:] = [{"a": 1}, [2], "x"]
    np.save(tmp_path / "obj.npy", objects, allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy: holds Python objects"):
        open_embeddings(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", emb=emb, names=objects)
    with pytest.raises(DataError, match="array 'names': holds Python objects"):
        load_features(tmp_path / "obj.npz", names_key="names")
    np.savez_compressed(tmp_path / "objc.npz", emb=emb, labels=objects)
    with pytest.raises(DataError, match="holds Python objects"):
        load_features(tmp_path / "objc.npz", label_key="labels")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(DataError, match="unknown embedding file type '.txt'"):
        open_embeddings(tmp_path / "x.txt")
    np.save(tmp_path / "flat.npy", emb[0])
    with pytest.raises(DataError, match=r"must be a 2-D array \(rows x dim\), got shape \(24,\)"):
        open_embeddings(tmp_path / "flat.npy")
    np.save(tmp_path / "x.npy", emb)
    with pytest.raises(DataError, match="name arrays inside an .npz"):
        load_features(tmp_path / "x.npy", label_key="y")
    np.save(tmp_path / "neg.npy", np.full(N, -3))
    with pytest.raises(DataError, match="row 0 has label -3"):
        load_features(tmp_path / "x.npy", labels=tmp_path / "neg.npy")
    np.savez(tmp_path / "floats.npz", emb=emb, g=np.linspace(0, 1, N))
    with pytest.raises(DataError, match="integers or strings.*got floats"):
        load_features(tmp_path / "floats.npz", group_keys={"g": "g"})


def test_person_of_image_name():
    assert person_of_image_name("AJ_Cook_0001.jpg") == "AJ_Cook"
    assert person_of_image_name("lfw/Abc_De/Abc_De_0002.jpg") == "Abc_De"
    assert person_of_image_name("n000002\\0001_01.jpg") == "n000002"
    with pytest.raises(DataError, match="row 4: image name 'face.jpg' names no person"):
        person_of_image_name("face.jpg", 4)


@pytest.mark.ray
def test_ray_workers_map_the_file_themselves(tmp_path, ray_cluster, emb, labels):
    emb.astype("<f4").tofile(tmp_path / "x.bin")
    (tmp_path / "x.meta").write_text("".join(f"{v}\n" for v in labels))
    one = write_feature_shards(tmp_path / "one", tmp_path / "x.bin", dim=DIM, shard_rows=64, progress=False)
    two = write_feature_shards(tmp_path / "two", tmp_path / "x.bin", dim=DIM, shard_rows=64, workers=2,
                               progress=False)
    assert [(s.name, s.sha256) for s in two.shards] == [(s.name, s.sha256) for s in one.shards]
