"""dist_fair.data.identity_folders: one folder per person, from folders or tar files, with attribute files."""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dist_fair.data.attribute_files import AttributeFile
from dist_fair.data.identity_folders import (
    MAX_IMAGE_BYTES, add_faces_arguments, run_faces, scan_identity_folders, write_identity_folder_shards,
)
from dist_fair.data.images import IDENTITY_NAMES_FILE
from dist_fair.data.shards import iter_blocks, load_labels
from dist_fair.data.tar_safety import UnsafeTarMemberError
from dist_fair.errors import DataError

# person -> number of images; sorted person order is Ann, Bob, Cid, Dee (and "Bob" < "Bob_Jr")
PEOPLE = {"Bob": 2, "Ann": 3, "Dee": 1, "Cid": 2, "Bob_Jr": 1}


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """``Person/Person_000k.jpg`` -> JPEG bytes, in sorted (person, file) order."""
    out, seed = {}, 0
    for person in sorted(PEOPLE):
        for k in range(1, PEOPLE[person] + 1):
            out[f"{person}/{person}_{k:04d}.jpg"] = jpeg(seed)
            seed += 1
    return out


def make_folder(root: Path, images: dict[str, bytes]) -> Path:
    for rel, data in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def shard_samples(shard_dir: Path) -> list[tuple[bytes, dict]]:
    samples = []
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            entries = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in entries if n.endswith(".jpg")):
            samples.append((entries[name], json.loads(entries[name[: -len("jpg")] + "meta.json"])))
    return samples


def expected_identity(images: dict[str, bytes]) -> list[int]:
    people = sorted(PEOPLE)
    return [people.index(rel.split("/")[0]) for rel in images]


def test_folder_layout_ids_identities_and_bytes(tmp_path, images):
    root = make_folder(tmp_path / "faces", images)
    (root / "README.txt").write_text("not an image")
    (root / "Ann" / "notes.txt").write_text("x")
    (root / "Ann" / ".hidden.jpg").write_bytes(b"junk")
    manifest = write_identity_folder_shards(tmp_path / "out", root, shard_rows=4, progress=False)
    assert manifest.kind == "images" and manifest.num_samples == len(images) == 9
    assert manifest.num_identities == len(PEOPLE) and [s.samples for s in manifest.shards] == [4, 4, 1]
    assert json.loads((tmp_path / "out" / IDENTITY_NAMES_FILE).read_text()) == sorted(PEOPLE)
    samples = shard_samples(tmp_path / "out")
    assert [jpg for jpg, _ in samples] == list(images.values())           # unchanged, (person, file) order
    assert [meta["id"] for _, meta in samples] == list(range(9))
    assert [meta["identity"] for _, meta in samples] == expected_identity(images)
    assert [meta["source"] for _, meta in samples] == list(images)
    assert manifest.attributes == {} and manifest.source["ignored_files"] == 2
    assert sorted(manifest.source["ignored_first"]) == ["Ann/notes.txt", "README.txt"]
    np.testing.assert_array_equal(load_labels(tmp_path / "out").identity, expected_identity(images))


def test_tars_with_a_top_folder_equal_the_folder(tmp_path, images):
    folder = write_identity_folder_shards(tmp_path / "folder", make_folder(tmp_path / "faces", images),
                                          progress=False)
    members = {f"top/{rel}": data for rel, data in images.items()}
    names = list(members)
    # split mid-person (Ann's images in both tars) and list the second tar first: order is by (person, file)
    tars = [make_tar(tmp_path / "b.tar", dict((n, members[n]) for n in names[2:])),
            make_tar(tmp_path / "a.tar", dict((n, members[n]) for n in names[:2]))]
    manifest = write_identity_folder_shards(tmp_path / "tars", tars, progress=False)
    samples = shard_samples(tmp_path / "tars")
    assert [jpg for jpg, _ in samples] == list(images.values())
    assert [m["identity"] for _, m in samples] == [m["identity"] for _, m in shard_samples(tmp_path / "folder")]
    assert samples[0][1]["source"] == "a.tar:top/Ann/Ann_0001.jpg" and samples[2][1]["source"].startswith("b.tar:")
    assert manifest.num_identities == folder.num_identities
    # a folder holding tar files stands for them
    (tmp_path / "tardir").mkdir()
    for t in tars:
        t.rename(tmp_path / "tardir" / t.name)
    scan = scan_identity_folders(tmp_path / "tardir")
    assert scan.file_names == [rel.split("/")[1] for rel in images] and scan.identity_names == sorted(PEOPLE)


def test_selection_min_images_people_limit_limit(tmp_path, images):
    root = make_folder(tmp_path / "faces", images)
    scan = scan_identity_folders(root, min_images=2)
    assert scan.identity_names == ["Ann", "Bob", "Cid"] and len(scan.entries) == 7
    assert [e.identity for e in scan.entries] == [0, 0, 0, 1, 1, 2, 2]
    scan = scan_identity_folders(root, people_limit=2)
    assert scan.identity_names == ["Ann", "Bob"] and scan.persons == ["Ann"] * 3 + ["Bob"] * 2
    scan = scan_identity_folders(root, limit=4)
    assert scan.identity_names == ["Ann", "Bob"] and len(scan.entries) == 4     # only the people kept are named
    with pytest.raises(DataError, match="no person has at least 5 images"):
        scan_identity_folders(root, min_images=5)
    with pytest.raises(DataError, match="limit must be >= 1"):
        scan_identity_folders(root, limit=0)


def test_attributes_joined_and_unknowns_counted(tmp_path, images):
    root = make_folder(tmp_path / "faces", images)
    female = tmp_path / "female.txt"
    female.write_text("Ann_0001.jpg\nAnn_0002.jpg\nAnn_0003.jpg\nCid_0001.jpg\n")
    male = tmp_path / "male.txt"
    male.write_text("Bob_0001.jpg\nBob_0002.jpg\nCid_0001.jpg\nDee_0001.jpg\n")
    race = tmp_path / "race.json"
    race.write_text(json.dumps({"Ann": "b", "Bob": "a,b", "Dee": "a"}))
    files = [AttributeFile("gender", str(female), "list", value="female"),
             AttributeFile("gender", str(male), "list", value="male"), AttributeFile("race", str(race), "json")]
    manifest = write_identity_folder_shards(tmp_path / "out", root, files, progress=False)
    # ids: Ann x3, Bob x2, Bob_Jr, Cid x2, Dee
    labels = load_labels(tmp_path / "out")
    np.testing.assert_array_equal(labels.attrs["gender"], [0, 0, 0, 1, 1, -1, -1, -1, 1])
    np.testing.assert_array_equal(labels.attrs["race"], [1, 1, 1, -1, -1, -1, -1, -1, 0])
    assert manifest.attributes == {"gender": ["female", "male"], "race": ["a", "b"]}
    assert manifest.source["attribute_unknown"] == {"gender": {"missing": 2, "conflicting": 1},
                                                    "race": {"missing": 3, "conflicting": 2}}
    assert manifest.group_counts() == {"gender": {"female": 3, "male": 3}, "race": {"a": 1, "b": 3}}
    samples = shard_samples(tmp_path / "out")
    assert samples[5][1]["attributes"] == {"gender": -1, "race": -1}


def test_layout_errors(tmp_path, images):
    root = make_folder(tmp_path / "flat", {})
    root.mkdir()
    (root / "loose.jpg").write_bytes(jpeg(0))
    with pytest.raises(DataError, match="not inside a person folder"):
        scan_identity_folders(root)
    with pytest.raises(DataError, match="holds no .jpg images"):
        scan_identity_folders(make_folder(tmp_path / "empty", {"a/readme.txt": b"x"}))
    with pytest.raises(DataError, match="not found"):
        scan_identity_folders(tmp_path / "nowhere")
    folder = make_folder(tmp_path / "faces", images)
    tar = make_tar(tmp_path / "dup.tar", {"x/Ann/Ann_0001.jpg": images["Ann/Ann_0001.jpg"]})
    with pytest.raises(DataError, match="Ann/Ann_0001.jpg is in two places"):
        scan_identity_folders([folder, tar])
    gz = tmp_path / "faces.tar.gz"
    with tarfile.open(gz, "w:gz") as archive:
        archive.add(folder / "Ann", arcname="Ann")
    with pytest.raises(DataError, match="not an uncompressed tar file"):
        scan_identity_folders(gz)


def test_bad_image_named_or_skipped(tmp_path, images):
    broken = dict(images)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    broken["Bob/Bob_0002.jpg"] = png.getvalue()
    root = make_folder(tmp_path / "faces", broken)
    with pytest.raises(DataError, match="image Bob/Bob_0002.jpg: not a JPEG"):
        write_identity_folder_shards(tmp_path / "out", root, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest = write_identity_folder_shards(tmp_path / "skip", root, skip_bad=True, progress=False)
    assert manifest.num_samples == 8 and manifest.source["skipped_bad"] == 1


def _forge_size(tar_path: Path, member_index: int, size: int) -> None:
    """Rewrite one header's size field (octal, bytes 124-135) and its checksum, as a forger would."""
    raw = bytearray(tar_path.read_bytes())
    offset = 0
    for _ in range(member_index):
        declared = int(raw[offset + 124: offset + 136].strip(b"\0 ") or b"0", 8)
        offset += 512 + (declared + 511) // 512 * 512
    raw[offset + 124: offset + 136] = f"{size:011o}\0".encode()
    raw[offset + 148: offset + 156] = b" " * 8
    raw[offset + 148: offset + 156] = f"{sum(raw[offset: offset + 512]):06o}\0 ".encode()
    tar_path.write_bytes(bytes(raw))


def _hostile(kind: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo({"absolute": "/etc/Ann/x.jpg", "dotdot": "top/../../Ann/x.jpg"}.get(kind, "top/Ann/y.jpg"))
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "top/Ann/Ann_0001.jpg"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    elif kind == "fifo":
        info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize("kind, reason", [("absolute", "absolute path"), ("dotdot", "'..' path component"),
                                          ("symlink", "symbolic link"), ("hardlink", "hard link"),
                                          ("device", "device entry"), ("fifo", "FIFO")])
def test_hostile_tar_members_refused(tmp_path, images, kind, reason):
    path = tmp_path / "hostile.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        data = images["Ann/Ann_0001.jpg"]
        good = tarfile.TarInfo("top/Ann/Ann_0001.jpg")
        good.size = len(data)
        tar.addfile(good, io.BytesIO(data))
        info = _hostile(kind)
        if info.isfile():
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        else:
            tar.addfile(info)
    with pytest.raises(UnsafeTarMemberError, match=f"tar file {path}: member .*{reason}.*refused. Fix: rebuild"):
        scan_identity_folders(path)


def test_forged_oversized_header_refused(tmp_path, images):
    path = make_tar(tmp_path / "forged.tar", {"top/Ann/Ann_0001.jpg": images["Ann/Ann_0001.jpg"],
                                              "top/Bob/Bob_0001.jpg": images["Bob/Bob_0001.jpg"]})
    _forge_size(path, 1, MAX_IMAGE_BYTES + 1)
    with pytest.raises(UnsafeTarMemberError, match="'top/Bob/Bob_0001.jpg' declares 67,108,865 bytes"):
        scan_identity_folders(path)
    # under the image cap but more than the whole tar file holds
    path = make_tar(tmp_path / "forged2.tar", {"top/Ann/Ann_0001.jpg": images["Ann/Ann_0001.jpg"],
                                               "top/Bob/notes.txt": b"x" * 10})
    _forge_size(path, 1, path.stat().st_size + 1)
    with pytest.raises(UnsafeTarMemberError, match=f"'top/Bob/notes.txt' declares {path.stat().st_size + 1:,} bytes"):
        scan_identity_folders(path)


def test_command_line(tmp_path, images):
    root = make_folder(tmp_path / "faces", images)
    (tmp_path / "gender.csv").write_text("image,gender\nAnn_0001.jpg,f\nDee_0001.jpg,m\n")
    (tmp_path / "race.json").write_text(json.dumps({"Ann": "x"}))
    parser = argparse.ArgumentParser()
    add_faces_arguments(parser)
    assert parser.parse_args(["--input", "x", "--out", "y"]).shard_rows == 1024
    args = parser.parse_args(["--input", str(root), "--out", str(tmp_path / "out"), "--shard-rows", "5",
                              "--attribute", f"gender={tmp_path / 'gender.csv'}",
                              "--attribute", f"race={tmp_path / 'race.json'}", "--attribute",
                              f"tall:yes={tmp_path / 'tall.txt'}", "--people-limit", "4", "--check", "header"])
    (tmp_path / "tall.txt").write_text("Bob\nCid\n")   # person names: auto join by person
    manifest = run_faces(args)
    assert manifest.num_samples == 8 and len(manifest.shards) == 2 and manifest.shards[0].name == "faces-000000.tar"
    assert manifest.attributes == {"gender": ["f", "m"], "race": ["x"], "tall": ["yes"]}
    labels = load_labels(tmp_path / "out")
    np.testing.assert_array_equal(labels.attrs["tall"], [-1, -1, -1, 0, 0, -1, 0, 0])
    np.testing.assert_array_equal(labels.attrs["gender"], [0, -1, -1, -1, -1, -1, -1, -1])
    assert manifest.source["attribute_unknown"]["gender"] == {"missing": 7, "conflicting": 0}
    assert manifest.source["attribute_unmatched_keys"]["gender"] == 1     # Dee is past --people-limit
    assert [f["join"] for f in manifest.source["attribute_files"]] == ["image", "person", "person"]


@pytest.mark.ray
def test_ray_workers_write_identical_shards(tmp_path, ray_cluster, images):
    root = make_folder(tmp_path / "faces", images)
    one = write_identity_folder_shards(tmp_path / "one", root, shard_rows=3, progress=False)
    two = write_identity_folder_shards(tmp_path / "two", root, shard_rows=3, workers=2, progress=False)
    assert [(s.name, s.sha256) for s in two.shards] == [(s.name, s.sha256) for s in one.shards]
    assert two.to_dict() == one.to_dict()
    assert [len(b) for b in iter_blocks(tmp_path / "two")] == [1] * 9
