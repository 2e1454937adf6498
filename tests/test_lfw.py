"""dist_fair.data.lfw on the real LFW (../shared/data/lfw): counts of data/README.md, ids in the order of
lfw_dlib128.npz, gender and race joined from the side files, image and descriptor shards."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dist_fair.cli import main as cli_main
from dist_fair.data.images import IDENTITY_NAMES_FILE
from dist_fair.data.lfw import lfw_attributes_for_names, scan_lfw, write_lfw_descriptor_shards
from dist_fair.data.shards import load_embeddings, load_labels

LIMIT = 40


@pytest.fixture(scope="module")
def lfw_dir(shared_data) -> Path:
    return shared_data / "lfw"


@pytest.fixture(scope="module")
def lfw(lfw_dir):
    return scan_lfw(lfw_dir)


@pytest.fixture(scope="module")
def side_files(lfw_dir):
    """The side files read independently: female and male image names, person -> race string."""
    female = (lfw_dir / "lfw_female_names.txt").read_text().split()
    male = (lfw_dir / "lfw_male_names.txt").read_text().split()
    race = json.loads((lfw_dir / "lfw_race_dict.json").read_text())
    return female, male, race


def test_counts_match_the_readme(lfw, side_files):
    female, male, race = side_files
    assert len(lfw.entries) == 13_233 and len(lfw.identity_names) == 5_749
    assert len(female) == 2_967 and len(male) == 10_268
    per_person = Counter(lfw.scan.persons)
    assert sum(1 for c in per_person.values() if c >= 2) == 1_680
    assert sum(c for c in per_person.values() if c >= 2) == 9_164
    assert sum(1 for c in per_person.values() if c >= 5) == 423
    assert sum(1 for c in per_person.values() if c >= 10) == 158
    assert lfw.attributes.unknown["gender"] == {"missing": 3, "conflicting": 5}
    assert lfw.attributes.names["gender"] == ["female", "male"]
    gender = lfw.attributes.codes["gender"]
    assert int((gender == 0).sum()) == 2_967 - 5 and int((gender == 1).sum()) == 10_268 - 5
    assert lfw.attributes.unmatched_keys == {"gender": 0, "race": 0}
    # race: 866 people (3,610 images); the multi-label ones are conflicting
    labelled = np.isin(lfw.scan.persons, list(race))
    assert int(labelled.sum()) == 3_610
    multi = {p for p, v in race.items() if "," in v}
    assert len(multi) == 91
    conflicting = sum(per_person[p] for p in multi)
    assert lfw.attributes.unknown["race"] == {"missing": 13_233 - 3_610, "conflicting": conflicting}
    codes = lfw.attributes.codes["race"]
    caucasian = lfw.attributes.names["race"].index("caucasian")
    single_caucasian = [p for p, v in race.items() if v == "caucasian"]
    assert len(single_caucasian) == 672
    assert int((codes == caucasian).sum()) == sum(per_person[p] for p in single_caucasian)


def test_gender_and_race_per_image_equal_an_independent_join(lfw, side_files):
    female, male, race = side_files
    female, male = set(female), set(male)
    for position in range(0, 13_233, 97):
        name, person = lfw.file_names[position], lfw.scan.persons[position]
        expected = {(True, False): 0, (False, True): 1}.get((name in female, name in male), -1)
        assert lfw.attributes.codes["gender"][position] == expected
        value = race.get(person)
        expected = -1 if value is None or "," in value else lfw.attributes.names["race"].index(value)
        assert lfw.attributes.codes["race"][position] == expected


def test_ids_follow_the_tar_order_and_the_descriptor_rows(lfw, lfw_dir):
    members = []
    for tar_path in sorted(lfw_dir.glob("lfw-deepfunneled-*.tar")):
        with tarfile.open(tar_path) as tar:
            members += [m.name for m in tar.getmembers() if m.isfile()]
    assert [e.name.split(":", 1)[1] for e in lfw.entries] == members
    names = np.load(lfw_dir / "lfw_dlib128.npz", allow_pickle=False)["names"]
    assert lfw.file_names == names.tolist()
    assert [lfw.identity_names[e.identity] for e in lfw.entries] == lfw.scan.persons
    assert lfw.identity_names == sorted(set(lfw.scan.persons))


def test_min_images_and_multi_label_first(lfw_dir, side_files):
    _, _, race = side_files
    scan = scan_lfw(lfw_dir, min_images=2, multi_label="first")
    assert len(scan.entries) == 9_164 and len(scan.identity_names) == 1_680
    assert scan.attributes.unknown["race"]["conflicting"] == 0
    first = {p: v.split(",")[0] for p, v in race.items()}
    names = scan.attributes.names["race"]
    got = {p: names[c] for p, c in zip(scan.scan.persons, scan.attributes.codes["race"]) if p in first}
    assert got == {p: first[p] for p in got}


def test_attributes_for_descriptor_names_equal_the_image_join(lfw, lfw_dir):
    names = np.load(lfw_dir / "lfw_dlib128.npz", allow_pickle=False)["names"]
    joined = lfw_attributes_for_names(names, lfw_dir)
    for attribute in ("gender", "race"):
        np.testing.assert_array_equal(joined.codes[attribute], lfw.attributes.codes[attribute])
    assert joined.unknown == lfw.attributes.unknown and joined.names == lfw.attributes.names


def test_command_line_writes_real_image_shards(tmp_path, lfw, lfw_dir):
    out = tmp_path / "lfw"
    assert cli_main(["shards", "lfw", "--input", str(lfw_dir), "--out", str(out), "--limit", str(LIMIT),
                     "--shard-rows", "16"]) == 0
    samples = []
    for shard in sorted(out.glob("lfw-*.tar")):
        with tarfile.open(shard) as tar:
            entries = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        samples += [(entries[n], json.loads(entries[n[:-3] + "meta.json"]))
                    for n in sorted(entries) if n.endswith(".jpg")]
    assert len(samples) == LIMIT
    originals = {}
    for entry in lfw.entries[:LIMIT]:
        with tarfile.open(entry.path) as tar:
            originals[entry.name] = tar.extractfile(entry.member).read()
    assert [jpg for jpg, _ in samples] == [originals[e.name] for e in lfw.entries[:LIMIT]]
    assert [meta["identity"] for _, meta in samples] == [e.identity for e in lfw.entries[:LIMIT]]
    assert [meta["attributes"] for _, meta in samples] == [e.attrs for e in lfw.entries[:LIMIT]]
    manifest = json.loads((out / "manifest.json").read_text())
    people = sorted(set(lfw.scan.persons[:LIMIT]))
    assert json.loads((out / IDENTITY_NAMES_FILE).read_text()) == people
    assert manifest["num_identities"] == len(people) and len(manifest["shards"]) == 3
    assert manifest["source"]["source"] == "lfw" and manifest["source"]["limit"] == LIMIT
    unknown = manifest["source"]["attribute_unknown"]
    assert unknown["gender"]["missing"] + unknown["gender"]["conflicting"] == int(
        (lfw.attributes.codes["gender"][:LIMIT] < 0).sum())


def test_descriptor_shards_normalised_with_identity_and_attributes(tmp_path, lfw, lfw_dir):
    manifest = write_lfw_descriptor_shards(tmp_path / "dlib", lfw_dir, shard_rows=4096)
    data = np.load(lfw_dir / "lfw_dlib128.npz", allow_pickle=False)
    emb = data["emb"].astype(np.float64)
    np.testing.assert_allclose(load_embeddings(tmp_path / "dlib"), emb / np.linalg.norm(emb, axis=1, keepdims=True),
                               rtol=1e-6, atol=1e-7)
    labels = load_labels(tmp_path / "dlib")
    np.testing.assert_array_equal(labels.identity, [e.identity for e in lfw.entries])
    for attribute in ("gender", "race"):
        np.testing.assert_array_equal(labels.attrs[attribute], lfw.attributes.codes[attribute])
    assert manifest.num_samples == 13_233 and manifest.num_identities == 5_749 and manifest.dim == 128
    assert manifest.source["no_face"] == int(data["no_face"].sum()) == 67
    assert manifest.source["no_face_ids"] == np.nonzero(data["no_face"])[0].tolist()
    assert json.loads((tmp_path / "dlib" / IDENTITY_NAMES_FILE).read_text()) == lfw.identity_names
    assert manifest.source["attribute_unknown"]["gender"] == {"missing": 3, "conflicting": 5}


def test_command_line_descriptors_and_refusals(tmp_path, lfw_dir, capsys):
    out = tmp_path / "dlib"
    assert cli_main(["shards", "lfw", "--input", str(lfw_dir), "--descriptors", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "embeddings" and manifest["num_samples"] == 13_233
    assert [s["name"] for s in manifest["shards"]][:2] == ["lfw-dlib128-000000.tar", "lfw-dlib128-000001.tar"]
    assert cli_main(["shards", "lfw", "--input", str(lfw_dir), "--descriptors", "--limit", "5",
                     "--out", str(tmp_path / "x")]) == 1
    assert "--limit, --people-limit, --min-images and --skip-bad apply to images only" in capsys.readouterr().err
    assert cli_main(["shards", "lfw", "--input", str(tmp_path), "--out", str(tmp_path / "y")]) == 1
    assert "neither lfw-deepfunneled-*.tar nor a lfw-deepfunneled/ folder found" in capsys.readouterr().err


def test_extracted_folder_equals_the_tars(tmp_path, lfw, lfw_dir):
    import shutil

    with tarfile.open(lfw_dir / "lfw-deepfunneled-00.tar") as tar:
        for entry in lfw.entries[:12]:
            target = tmp_path / entry.member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(entry.member).read())
    for name in ("lfw_female_names.txt", "lfw_male_names.txt", "lfw_race_dict.json"):
        shutil.copy(lfw_dir / name, tmp_path / name)
    extracted = scan_lfw(tmp_path)
    assert extracted.file_names == lfw.file_names[:12]
    assert [e.identity for e in extracted.entries] == [e.identity for e in lfw.entries[:12]]
    assert [e.attrs for e in extracted.entries] == [e.attrs for e in lfw.entries[:12]]
    assert extracted.entries[0].member is None and extracted.entries[0].name == f"{lfw.scan.persons[0]}/AJ_Cook_0001.jpg"
