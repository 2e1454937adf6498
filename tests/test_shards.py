"""Shard writing and reading: round trip, partitions, streams, resume, and bad input."""
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from dist_fair.data import shards as S
from dist_fair.data.schema import Manifest
from dist_fair.errors import DataError, ShardError

NAMES = {"race": ["A", "B", "C", "D"]}


@pytest.fixture()
def arrays():
    rng = np.random.default_rng(0)
    n = 2500
    return (rng.standard_normal((n, 8)).astype(np.float32), rng.integers(0, 50, n),
            {"race": rng.integers(-1, 4, n).astype(np.int16)})


@pytest.fixture()
def folder(tmp_path, arrays):
    emb, ident, attrs = arrays
    S.write_embedding_shards(tmp_path / "s", emb, ident, attrs, NAMES, shard_rows=700, block_rows=256)
    return tmp_path / "s"


def test_round_trip_and_manifest(folder, arrays):
    emb, ident, attrs = arrays
    manifest = Manifest.load(folder)
    assert manifest.num_samples == 2500 and manifest.dim == 8 and len(manifest.shards) == 4
    assert [s.samples for s in manifest.shards] == [700, 700, 700, 400]
    counts = manifest.group_counts()["race"]
    assert counts == {name: int((attrs["race"] == i).sum()) for i, name in enumerate(NAMES["race"])}
    assert np.array_equal(S.load_embeddings(folder), emb)
    labels = S.load_labels(folder)
    assert np.array_equal(labels.identity, ident) and np.array_equal(labels.attrs["race"], attrs["race"])
    assert all(len(s.sha256) == 64 for s in manifest.shards)
    list(S.iter_blocks(folder, verify=True))
    one = S.read_shard(folder, manifest.shards[1].name)
    assert np.array_equal(one.ids, np.arange(700, 1400)) and np.array_equal(one.emb, emb[700:1400])


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_exactly_once_partition(folder, world):
    manifest = Manifest.load(folder)
    parts = [S.shards_for_worker(manifest, r, world) for r in range(world)]
    flat = sorted(n for p in parts for n in p)
    assert flat == sorted(s.name for s in manifest.shards)
    ids = np.concatenate([b.ids for r in range(world) for b in S.stream_blocks(folder, r, world)] or [np.zeros(0)])
    assert sorted(ids.tolist()) == list(range(2500))


def test_resampled_stream_is_endless_shuffled_and_stays_in_share(folder):
    manifest = Manifest.load(folder)
    mine = set(S.shards_for_worker(manifest, 1, 2))
    stream = S.stream_blocks(folder, 1, 2, resampled=True, seed=3)
    blocks = [next(stream) for _ in range(20)]  # more blocks than the share holds
    assert {b.shard for b in blocks} <= mine
    assert any(not np.all(np.diff(b.ids) > 0) for b in blocks)  # rows shuffled
    for b in blocks:
        emb = S.load_embeddings(folder)[b.ids]
        assert np.array_equal(b.emb, emb)


def test_rewrite_is_skipped_and_identical(folder, arrays):
    emb, ident, attrs = arrays
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}
    S.write_embedding_shards(folder, emb, ident, attrs, NAMES, shard_rows=700, block_rows=256)
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}
    assert before == after


def test_crash_leaves_no_manifest_and_resume_keeps_finished_shards(tmp_path, arrays):
    emb, ident, attrs = arrays
    plans = S.plan_shards(2500, 700, "emb")

    class Crashing(S._ArraySlices):
        def __call__(self, plan):
            if plan.index == 2:
                yield from list(super().__call__(plan))[:1]
                raise RuntimeError("killed")
            yield from super().__call__(plan)

    out = tmp_path / "c"
    with pytest.raises(RuntimeError):
        S.write_shard_set(out, plans, Crashing(emb, ident, attrs, 256), "embeddings", NAMES, dim=8, dtype="float32",
                          progress=False)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["emb-000000.tar", "emb-000001.tar"]
    assert not list(out.glob(".*partial"))
    first = (out / "emb-000000.tar").stat().st_mtime_ns
    S.write_shard_set(out, plans, S._ArraySlices(emb, ident, attrs, 256), "embeddings", NAMES, dim=8,
                      dtype="float32", progress=False)
    assert (out / "emb-000000.tar").stat().st_mtime_ns == first
    assert np.array_equal(S.load_embeddings(out), emb)


def test_truncated_tar_names_the_shard(folder):
    victim = Manifest.load(folder).shards[2].name
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[: len(data) // 3])
    with pytest.raises(ShardError, match=victim):
        list(S.iter_blocks(folder))


def test_changed_file_fails_checksum(folder):
    victim = Manifest.load(folder).shards[0].name
    data = bytearray((folder / victim).read_bytes())
    data[-2000] ^= 0xFF  # inside the zero padding of the tar: still parses, checksum must catch it
    (folder / victim).write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        list(S.iter_blocks(folder, verify=True))


def _rewrite_first_sample(folder, edit):
    manifest = Manifest.load(folder)
    path = folder / manifest.shards[0].name
    samples = list(S.iter_tar_samples(path))
    edit(samples[0])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    _update_manifest_entry(folder, 0)  # a consistent folder whose content is bad: decoding must catch it
    return samples[0]["__key__"]


def _update_manifest_entry(folder, index):
    data = json.loads((folder / "manifest.json").read_text())
    entry = data["shards"][index]
    content = (folder / entry["name"]).read_bytes()
    entry["sha256"], entry["bytes"] = hashlib.sha256(content).hexdigest(), len(content)
    (folder / "manifest.json").write_text(json.dumps(data))


def test_missing_meta_json(folder):
    key = _rewrite_first_sample(folder, lambda s: s.pop("meta.json"))
    with pytest.raises(ShardError, match=f"sample '{key}'.*meta.json"):
        list(S.iter_blocks(folder))


def test_wrong_dims_in_shard(folder):
    def edit(sample):
        emb = np.load(io.BytesIO(sample["emb.npy"]))
        sample["emb.npy"] = S._npy_bytes(np.zeros((emb.shape[0], 5), np.float32))
    _rewrite_first_sample(folder, edit)
    with pytest.raises(ShardError, match="5 dims, manifest says 8"):
        list(S.iter_blocks(folder))


def test_nan_in_shard(folder):
    def edit(sample):
        emb = np.load(io.BytesIO(sample["emb.npy"])).copy()
        emb[3, 1] = np.nan
        sample["emb.npy"] = S._npy_bytes(emb)
    _rewrite_first_sample(folder, edit)
    with pytest.raises(ShardError, match="id 3 contains NaN"):
        list(S.iter_blocks(folder))


def test_unknown_group_in_shard(folder):
    def edit(sample):
        attrs = np.load(io.BytesIO(sample["attrs.npy"])).copy()
        attrs[0, 0] = 9
        sample["attrs.npy"] = S._npy_bytes(attrs)
    _rewrite_first_sample(folder, edit)
    with pytest.raises(ShardError, match="'race' has value 9"):
        list(S.iter_blocks(folder))


def test_bad_input_on_write(tmp_path):
    emb = np.zeros((10, 4), np.float32)
    with pytest.raises(DataError, match="NaN"):
        bad = emb.copy()
        bad[4, 0] = np.nan
        S.write_embedding_shards(tmp_path / "a", bad)
    assert not (tmp_path / "a" / "manifest.json").exists()
    assert not list((tmp_path / "a").glob("*.tar"))
    with pytest.raises(DataError, match="not a known group"):
        S.write_embedding_shards(tmp_path / "b", emb, attrs={"race": np.full(10, 7)}, attribute_names=NAMES)
    with pytest.raises(DataError, match="attribute_names"):
        S.write_embedding_shards(tmp_path / "c", emb, attrs={"sex": np.zeros(10)}, attribute_names=NAMES)
    with pytest.raises(DataError, match="identity"):
        S.write_embedding_shards(tmp_path / "d", emb, identity=np.zeros(9))
    with pytest.raises(DataError, match="2-D"):
        S.write_embedding_shards(tmp_path / "e", np.zeros(10))


def test_manifest_errors(tmp_path, folder):
    with pytest.raises(ShardError, match="not found"):
        Manifest.load(tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    data["num_samples"] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="num_samples"):
        Manifest.load(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        Manifest.load(folder)


def test_missing_shard_file(folder):
    victim = Manifest.load(folder).shards[1].name
    (folder / victim).unlink()
    with pytest.raises(ShardError, match=f"{victim} .*missing"):
        S.load_labels(folder)


# --------------------------------------------------------------------------- integrity (issue 16)

def _member_offset(path, suffix):
    with tarfile.open(path) as tar:
        member = next(m for m in tar if m.name.endswith(suffix))
        return member.offset_data, member.size


def _flip_byte(path, suffix=".emb.npy", at=200):
    """Flip one byte inside the data of the first member ending in ``suffix`` (past the .npy header)."""
    offset, size = _member_offset(path, suffix)
    data = bytearray(path.read_bytes())
    data[offset + min(at, size - 1)] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_emb_fails_before_the_first_row(folder):
    info = Manifest.load(folder).shards[1]
    _flip_byte(folder / info.name)
    blocks = S.iter_blocks(folder)
    for _ in range(2):  # shard 0 is good: its blocks come
        assert len(next(blocks)) > 0
    first = next(b for b in S.iter_blocks(folder, [Manifest.load(folder).shards[0].name]))
    assert first.ids[0] == 0
    with pytest.raises(S.ShardIntegrityError) as err:
        next(S.iter_blocks(folder, [info.name]))  # not one row of the bad file is yielded
    message = str(err.value)
    actual = hashlib.sha256((folder / info.name).read_bytes()).hexdigest()
    assert info.name in message and info.sha256 in message and actual in message and "rewrite it" in message
    with pytest.raises(S.ShardIntegrityError):
        S.load_labels(folder)
    with pytest.raises(S.ShardIntegrityError):
        S.load_embeddings(folder)


def test_no_verify_reads_a_changed_file(folder, monkeypatch):
    info = Manifest.load(folder).shards[0]
    _flip_byte(folder / info.name)
    assert sum(len(b) for b in S.iter_blocks(folder, verify=False)) == 2500
    monkeypatch.setenv(S.VERIFY_ENV, "1")
    S.set_shard_verification(False)
    assert not S.verification_enabled()
    assert len(S.load_labels(folder)) == 2500
    S.set_shard_verification(True)
    with pytest.raises(S.ShardIntegrityError):
        S.load_labels(folder)


def test_stream_blocks_verifies(folder):
    info = Manifest.load(folder).shards[0]
    _flip_byte(folder / info.name)
    with pytest.raises(S.ShardIntegrityError, match="sha256 mismatch"):
        next(S.stream_blocks(folder, rank=0, world_size=1))


def test_stream_blocks_reads_every_row(folder):
    ids = np.concatenate([b.ids for b in S.stream_blocks(folder, 0, 1)])
    assert np.array_equal(np.sort(ids), np.arange(2500))


def test_cut_at_a_block_boundary_is_truncated(folder):
    info = Manifest.load(folder).shards[2]
    path = folder / info.name
    with tarfile.open(path) as tar:  # cut right before the first sample's meta.json header
        cut = next(m for m in tar if m.name.endswith(".meta.json")).offset
    data = path.read_bytes()
    assert cut % 512 == 0  # (today's code said "has no meta.json" here)
    path.write_bytes(data[:cut])
    with pytest.raises(ShardError, match="truncated"):
        list(S.iter_blocks(folder))
    with pytest.raises(ShardError, match="truncated") as err:
        list(S.iter_blocks(folder, verify=False))  # no manifest comparison: the missing end marker tells
    assert "meta.json" not in str(err.value)
    with pytest.raises(ShardError, match="truncated.*end-of-archive"):
        list(S.iter_tar_samples(path))


def test_cut_after_a_whole_sample_is_truncated(folder):
    """A cut between two tar samples: every remaining sample is whole; the counts still tell."""
    info = Manifest.load(folder).shards[0]
    path = folder / info.name
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert members[4].name.endswith("meta.json") and members[5].name.endswith("-000001.attrs.npy")
    path.write_bytes(path.read_bytes()[: members[5].offset])
    with pytest.raises(ShardError, match="truncated"):
        list(S.iter_blocks(folder, verify=False))


def test_resume_rewrites_a_shard_whose_bytes_differ_from_its_receipt(tmp_path, arrays):
    emb, ident, attrs = arrays
    out = tmp_path / "r"
    S.write_embedding_shards(out, emb, ident, attrs, NAMES, shard_rows=700, block_rows=256)
    info = Manifest.load(out).shards[1]
    good = (out / info.name).read_bytes()
    _flip_byte(out / info.name)
    S.write_embedding_shards(out, emb, ident, attrs, NAMES, shard_rows=700, block_rows=256)
    assert (out / info.name).read_bytes() == good
    assert np.array_equal(S.load_embeddings(out), emb)


def test_shard_set_digest_follows_the_bytes(folder):
    before = S.shard_set_digest(folder)
    assert S.shard_set_digest(folder) == before
    info = Manifest.load(folder).shards[3]
    good = (folder / info.name).read_bytes()
    _flip_byte(folder / info.name)
    with pytest.raises(S.ShardIntegrityError):
        S.shard_set_digest(folder)
    changed = S.shard_set_digest(folder, verify=False)
    assert changed != before
    (folder / info.name).write_bytes(good)
    assert S.shard_set_digest(folder) == before


def test_hostile_member_in_a_shard_is_refused(folder):
    from dist_fair.data.tar_safety import UnsafeTarMemberError

    info = Manifest.load(folder).shards[0]
    path = folder / info.name
    with open(path, "rb") as handle:
        good = handle.read()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("emb-000000.extra")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        with tarfile.open(fileobj=io.BytesIO(good)) as src:
            for member in src:
                tar.addfile(member, src.extractfile(member))
    path.write_bytes(buf.getvalue())
    _update_manifest_entry(folder, 0)
    with pytest.raises(UnsafeTarMemberError, match="symbolic link"):
        list(S.iter_blocks(folder))


def test_member_header_claiming_gigabytes_is_refused(folder):
    from dist_fair.data.tar_safety import UnsafeTarMemberError

    info = Manifest.load(folder).shards[0]
    path = folder / info.name
    with tarfile.open(path) as tar:
        first = tar.getmembers()[0]
    data = bytearray(path.read_bytes())
    header = tarfile.TarInfo(first.name)
    header.size, header.mtime, header.mode = 8 << 30, 0, 0o644
    data[first.offset:first.offset + 512] = header.tobuf(format=tarfile.GNU_FORMAT)[:512]
    path.write_bytes(bytes(data))
    _update_manifest_entry(folder, 0)
    with pytest.raises(UnsafeTarMemberError, match="8,589,934,592 bytes"):
        list(S.iter_blocks(folder))
