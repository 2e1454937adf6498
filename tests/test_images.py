"""dist_fair.data.images: UTKFace (tar files or folder) and <group>/<identity>/*.jpg trees as image shards."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_fair.data.images import (
    IDENTITY_NAMES_FILE, age_bucket_names, jpeg_problem, parse_utkface_name, write_images_shards,
    write_utkface_shards,
)
from dist_fair.data.shards import iter_blocks, load_embeddings, load_labels, read_shard
from dist_fair.errors import DataError, ShardError

LIMIT = 200
RACES = ["White", "Black", "Asian", "Indian", "Other"]


@pytest.fixture(scope="module")
def utk_tar(shared_data) -> Path:
    return shared_data / "utkface" / "UTKFace-00.tar"


@pytest.fixture(scope="module")
def utk_members(utk_tar) -> list[tuple[str, bytes]]:
    """The first LIMIT (file name, bytes) of the tar in file-name order, read independently."""
    with tarfile.open(utk_tar) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: Path(m.name).name)[:LIMIT]
        return [(Path(m.name).name, tar.extractfile(m).read()) for m in members]


@pytest.fixture(scope="module")
def utk_shards(tmp_path_factory, utk_tar):
    out = tmp_path_factory.mktemp("utk") / "shards"
    manifest = write_utkface_shards(out, utk_tar, limit=LIMIT, shard_rows=64, progress=False)
    return out, manifest


def shard_samples(shard_dir: Path) -> list[tuple[bytes, dict]]:
    """(jpg bytes, meta) of every sample of every shard, in file order, read with plain tarfile."""
    samples = []
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            entries = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in entries if n.endswith(".jpg")):
            samples.append((entries[name], json.loads(entries[name[: -len("jpg")] + "meta.json"])))
    return samples


def test_utkface_counts_attributes_and_bytes(utk_shards, utk_members):
    out, manifest = utk_shards
    assert manifest.kind == "images" and manifest.dim is None and manifest.num_samples == LIMIT
    assert [s.samples for s in manifest.shards] == [64, 64, 64, 8]
    assert manifest.attributes == {"race": RACES, "gender": ["male", "female"],
                                   "age": ["0-19", "20-39", "40-59", "60+"]}
    assert manifest.num_identities == 0 and manifest.source["race_unknown"] == 0
    # independent parse of the names: <age>_<gender>_<race>_...
    fields = [name.split("_") for name, _ in utk_members]
    race = np.array([int(f[2]) for f in fields])
    gender = np.array([int(f[1]) for f in fields])
    age = np.array([int(f[0]) for f in fields])
    age_bucket = (age >= 20).astype(int) + (age >= 40) + (age >= 60)
    counts = manifest.group_counts()
    assert counts["race"] == {r: int((race == i).sum()) for i, r in enumerate(RACES)}
    assert counts["gender"] == {"male": int((gender == 0).sum()), "female": int((gender == 1).sum())}
    labels = load_labels(out)
    np.testing.assert_array_equal(labels.attrs["race"], race)
    np.testing.assert_array_equal(labels.attrs["gender"], gender)
    np.testing.assert_array_equal(labels.attrs["age"], age_bucket)
    np.testing.assert_array_equal(labels.identity, np.full(LIMIT, -1))
    samples = shard_samples(out)
    assert [jpg for jpg, _ in samples] == [data for _, data in utk_members]  # copied unchanged, in name order
    assert [meta["id"] for _, meta in samples] == list(range(LIMIT))
    assert [meta["source"] for _, meta in samples] == [f"UTKFace-00.tar:UTKFace/{n}" for n, _ in utk_members]
    ids = np.concatenate([b.ids for b in iter_blocks(out)])
    np.testing.assert_array_equal(ids, np.arange(LIMIT))
    assert read_shard(out, manifest.shards[1].name, with_emb=False).ids.tolist() == list(range(64, 128))
    with pytest.raises(ShardError, match="holds images shards"):
        load_embeddings(out)


def test_utkface_folder_and_unknown_race(tmp_path, utk_members, utk_shards):
    folder = tmp_path / "UTKFace"
    folder.mkdir()
    for name, data in utk_members[:20]:
        (folder / name).write_bytes(data)
    # the 3 real UTKFace files without a race field look like this one
    (folder / "39_1_20170116174525125.jpg.chip.jpg").write_bytes(utk_members[0][1])
    manifest = write_utkface_shards(tmp_path / "out", tmp_path, shard_rows=8, progress=False)
    assert manifest.num_samples == 21 and manifest.source["race_unknown"] == 1
    names = sorted([n for n, _ in utk_members[:20]] + ["39_1_20170116174525125.jpg.chip.jpg"])
    samples = shard_samples(tmp_path / "out")
    assert [meta["source"] for _, meta in samples] == [f"UTKFace/{n}" for n in names]
    labels = load_labels(tmp_path / "out")
    unknown = names.index("39_1_20170116174525125.jpg.chip.jpg")
    assert labels.attrs["race"][unknown] == -1 and labels.attrs["gender"][unknown] == 1
    assert labels.attrs["age"][unknown] == 1
    tar_labels = load_labels(utk_shards[0])
    from_tar = [i for i, n in enumerate(names) if n != names[unknown]]
    np.testing.assert_array_equal(labels.attrs["race"][from_tar], tar_labels.attrs["race"][:20])


def test_utkface_name_parsing_and_age_buckets():
    assert parse_utkface_name("UTKFace/26_1_3_20170119.jpg.chip.jpg") == (26, 1, 3)
    assert parse_utkface_name("61_1_20170109142408075.jpg.chip.jpg") == (61, 1, -1)
    assert parse_utkface_name("55_0_0_20170116232725357jpg.chip.jpg") == (55, 0, 0)
    assert parse_utkface_name("26_2_3_2017.jpg") is None and parse_utkface_name("portrait.jpg") is None
    assert age_bucket_names([20, 40, 60]) == ["0-19", "20-39", "40-59", "60+"]
    assert age_bucket_names([18]) == ["0-17", "18+"]
    with pytest.raises(DataError, match="strictly increasing"):
        age_bucket_names([40, 20])


def test_utkface_bad_names(tmp_path, utk_members):
    (tmp_path / "portrait.jpg").write_bytes(utk_members[0][1])
    (tmp_path / utk_members[1][0]).write_bytes(utk_members[1][1])
    with pytest.raises(DataError, match="portrait.jpg: the name does not follow UTKFace"):
        write_utkface_shards(tmp_path / "out", tmp_path, progress=False)
    manifest = write_utkface_shards(tmp_path / "out", tmp_path, skip_bad=True, progress=False)
    assert manifest.num_samples == 1 and manifest.source["skipped_bad"] == 1


def make_tree(root: Path, utk_members, groups: dict[str, dict[str, int]]) -> list[tuple[str, bytes]]:
    """<root>/<group>/<identity>/NN.jpg from real UTKFace JPEGs; returns (relative name, bytes) in id order."""
    written, k = [], 0
    for group in sorted(groups):
        for identity in sorted(groups[group]):
            (root / group / identity).mkdir(parents=True)
            for j in range(groups[group][identity]):
                data = utk_members[k][1]
                k += 1
                (root / group / identity / f"{j:02d}.jpg").write_bytes(data)
                written.append((f"{group}/{identity}/{j:02d}.jpg", data))
    return written


def test_folder_tree(tmp_path, utk_members):
    groups = {"Caucasian": {"m.03": 2, "m.01": 3}, "African": {"m.07": 4}, "Asian": {"m.02": 1, "m.05": 2}}
    written = make_tree(tmp_path / "faces", utk_members, groups)
    manifest = write_images_shards(tmp_path / "out", tmp_path / "faces", attribute="race", shard_rows=5, progress=False)
    assert manifest.attributes == {"race": ["African", "Asian", "Caucasian"]}
    assert manifest.num_samples == 12 and manifest.num_identities == 5
    assert manifest.group_counts() == {"race": {"African": 4, "Asian": 3, "Caucasian": 5}}
    identity_names = json.loads((tmp_path / "out" / IDENTITY_NAMES_FILE).read_text())
    assert identity_names == ["African/m.07", "Asian/m.02", "Asian/m.05", "Caucasian/m.01", "Caucasian/m.03"]
    labels = load_labels(tmp_path / "out")
    expected_identity = [identity_names.index(name.rsplit("/", 1)[0]) for name, _ in written]
    np.testing.assert_array_equal(labels.identity, expected_identity)
    np.testing.assert_array_equal(labels.attrs["race"], [["African", "Asian", "Caucasian"].index(n.split("/")[0])
                                                         for n, _ in written])
    samples = shard_samples(tmp_path / "out")
    assert [(meta["source"], jpg) for jpg, meta in samples] == written
    # another attribute name, and --limit
    manifest = write_images_shards(tmp_path / "out2", tmp_path / "faces", attribute="ethnicity", limit=5,
                                   progress=False)
    assert list(manifest.attributes) == ["ethnicity"] and manifest.num_samples == 5


def test_folder_tree_errors(tmp_path, utk_members):
    root = tmp_path / "faces"
    make_tree(root, utk_members, {"A": {"p1": 2}, "B": {"p2": 2}})
    (root / "C").mkdir()
    with pytest.raises(DataError, match=r"group folder .*faces/C is empty"):
        write_images_shards(tmp_path / "out", root, progress=False)
    (root / "C" / "p3").mkdir()
    with pytest.raises(DataError, match=r"identity folder .*faces/C/p3 holds no images"):
        write_images_shards(tmp_path / "out", root, progress=False)
    (root / "C" / "p3" / "x.jpg").write_bytes(utk_members[5][1])
    (root / "C" / "loose.jpg").write_bytes(utk_members[5][1])
    with pytest.raises(DataError, match=r"C/loose.jpg: images must sit in identity folders"):
        write_images_shards(tmp_path / "out", root, progress=False)
    (root / "C" / "loose.jpg").unlink()
    with pytest.raises(DataError, match="not found"):
        write_images_shards(tmp_path / "out", tmp_path / "nope", progress=False)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "png", "empty"])
def test_bad_images(tmp_path, utk_members, kind):
    root = tmp_path / "faces"
    make_tree(root, utk_members, {"A": {"p1": 2}, "B": {"p2": 3}})
    good = utk_members[0][1]
    if kind == "truncated":
        bad = good[: len(good) // 2]
    elif kind == "garbage":
        bad = b"\xff\xd8\xff" + bytes(range(256)) * 4
    elif kind == "png":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
        bad = buf.getvalue()
    else:
        bad = b""
    (root / "B" / "p2" / "01.jpg").write_bytes(bad)
    assert jpeg_problem(bad) is not None and jpeg_problem(good) is None
    with pytest.raises(DataError, match=r"image B/p2/01.jpg: .*--skip-bad"):
        write_images_shards(tmp_path / "out", root, shard_rows=2, progress=False)
    manifest = write_images_shards(tmp_path / "out", root, shard_rows=2, skip_bad=True, progress=False)
    assert manifest.num_samples == 4 and manifest.source["skipped_bad"] == 1
    assert manifest.source["bad_files_first"][0].startswith("B/p2/01.jpg: ")
    assert [meta["source"] for _, meta in shard_samples(tmp_path / "out")] == [
        "A/p1/00.jpg", "A/p1/01.jpg", "B/p2/00.jpg", "B/p2/02.jpg"]


def test_header_check_passes_a_truncated_jpeg_that_decode_rejects(utk_members):
    truncated = utk_members[0][1][:3000]
    assert jpeg_problem(truncated, "header") is None
    assert "unreadable JPEG" in jpeg_problem(truncated, "decode")


@pytest.mark.ray
def test_ray_workers_write_identical_shards(tmp_path, ray_cluster, utk_tar, utk_shards):
    one, manifest_one = utk_shards
    manifest_two = write_utkface_shards(tmp_path / "two", utk_tar, limit=LIMIT, shard_rows=64, workers=2,
                                        progress=False)
    assert [(s.name, s.sha256) for s in manifest_two.shards] == [(s.name, s.sha256) for s in manifest_one.shards]
    for shard in manifest_one.shards:
        assert (tmp_path / "two" / shard.name).read_bytes() == (one / shard.name).read_bytes()
    assert manifest_two.to_dict() == manifest_one.to_dict()


def test_utkface_ids_follow_names_across_tars(tmp_path, shared_data):
    tars = [shared_data / "utkface" / "UTKFace-01.tar", shared_data / "utkface" / "UTKFace-00.tar"]
    names = []
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            names += [(Path(m.name).name, f"{tar_path.name}:{m.name}") for m in tar.getmembers() if m.isfile()]
    expected = [source for _, source in sorted(names)[:30]]
    write_utkface_shards(tmp_path / "out", tars, limit=30, shard_rows=16, check="header", progress=False)
    assert [meta["source"] for _, meta in shard_samples(tmp_path / "out")] == expected
    # the tars split the sorted names into ranges: listed first, UTKFace-01.tar still comes second
    assert {s.split(":")[0] for s in expected} == {"UTKFace-00.tar"}


def test_utkface_ids_interleave_folders_by_name(tmp_path, utk_members):
    for k, (name, data) in enumerate(utk_members[:6]):
        folder = tmp_path / ("odd" if k % 2 else "even")
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    write_utkface_shards(tmp_path / "out", [tmp_path / "odd", tmp_path / "even"], progress=False)
    samples = shard_samples(tmp_path / "out")
    assert [jpg for jpg, _ in samples] == [data for _, data in utk_members[:6]]
    assert [meta["source"] for _, meta in samples] == [n for n, _ in utk_members[:6]]


def test_command_line_arguments(tmp_path, utk_tar, utk_members):
    import argparse

    from dist_fair.data.images import add_images_arguments, add_utkface_arguments, run_images, run_utkface

    parser = argparse.ArgumentParser()
    add_utkface_arguments(parser)
    args = parser.parse_args(["--input", str(utk_tar), "--out", str(tmp_path / "utk"), "--limit", "10",
                              "--age-edges", "18,65", "--shard-rows", "4", "--check", "header"])
    manifest = run_utkface(args)
    assert manifest.num_samples == 10 and len(manifest.shards) == 3
    assert manifest.attributes["age"] == ["0-17", "18-64", "65+"] and manifest.source["check"] == "header"
    make_tree(tmp_path / "faces", utk_members, {"G1": {"a": 2}, "G2": {"b": 1}})
    parser = argparse.ArgumentParser()
    add_images_arguments(parser)
    manifest = run_images(parser.parse_args(["--root", str(tmp_path / "faces"), "--out", str(tmp_path / "img"),
                                             "--attribute", "skin"]))
    assert manifest.attributes == {"skin": ["G1", "G2"]} and manifest.shards[0].name == "images-000000.tar"
