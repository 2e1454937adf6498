"""Writing and reading WebDataset shards (DESIGN.md, "Shard format"; schema in ``schema.py``).

Writing: a *producer* turns a ``ShardPlan`` (name, first id, rows) into the shard's rows, as
``Block`` objects (embeddings) or ``ImageRecord`` objects (images). ``write_shard_set`` runs one
producer call per output shard, in this process or as one Ray task per shard (``workers > 1``), each
writing ``<name>.tar`` under a temporary name, checksumming it, renaming it and leaving a receipt
``.<name>.done.json``. A re-run skips shards whose receipt matches the file, size and sha256 (a killed ingestion
resumes); the manifest is assembled from the receipts last, atomically.

Reading: ``iter_blocks`` (exactly once, in id order, with checks that name shard and sample),
``shards_for_worker`` (an exactly-once partition over W workers) and ``stream_blocks`` (a
WebDataset pipeline with an explicit node split; ``resampled=True`` gives the endless shuffled
stream used for training).

Integrity (every reader): before the first row of a shard file is used, its size is compared with
the manifest's ``bytes`` (shorter = "truncated") and its sha256 with the manifest's ``sha256``
(``ShardIntegrityError`` naming file, both digests and the fix). The file is hashed *first*, in one
streaming pass (sha256 runs at about 1 GB/s; the rows are then read from the page cache), not while
its rows are yielded: a consumer never sees a row of a file that has not been verified, so no result
can be committed from bad rows. Each file is hashed once per process (the digest is remembered for
its path, size, inode, mtime and ctime). Verification is on by default; ``set_shard_verification(False)``
(``dist-fair knn`` / ``evaluate`` ``--no-verify``) turns it off for this process and
the Ray workers it starts, for users who accept the risk (a truncated file is still caught by the
missing end-of-archive marker and the sample counts). Every tar member
passes ``tar_safety.check_tar_member`` (no links, devices, absolute or ``..`` names, no member larger
than its file), and a tar without its end-of-archive marker is reported as truncated.
``shard_set_digest`` hashes the actual bytes of a folder's shards, for stage fingerprints.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from dist_fair.data.schema import MANIFEST_NAME, Manifest, ShardInfo
from dist_fair.data.tar_safety import check_tar_member
from dist_fair.errors import DataError, ShardError
from dist_fair.faults import kill_point
from dist_fair.io_atomic import atomic_write_json

LOG = logging.getLogger(__name__)

UNKNOWN = -1
VERIFY_ENV = "DIST_FAIR_VERIFY_SHARDS"
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


class ShardIntegrityError(ShardError):
    """A shard file's bytes do not match its manifest entry (sha256 or size)."""


@dataclass
class Block:
    """A block of rows: global ``ids``, ``emb`` (float32, rows x dim; None for images),
    ``identity`` (-1 = unknown) and ``attrs`` (attribute name -> int16 values, -1 = unknown)."""

    ids: np.ndarray
    emb: np.ndarray | None
    identity: np.ndarray
    attrs: dict[str, np.ndarray]
    shard: str = ""

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class ImageRecord:
    """One image sample: encoded JPEG bytes plus labels (attribute values are indices)."""

    id: int
    jpg: bytes
    identity: int | None
    attrs: dict[str, int]
    source: str = ""


@dataclass(frozen=True)
class ShardPlan:
    """What one output shard will hold: ``rows`` samples with ids from ``first_id``; ``index`` is its
    position; ``payload`` is producer-specific (e.g. which identities or files go into it)."""

    index: int
    name: str
    first_id: int
    rows: int
    payload: Any = None


@dataclass
class Labels:
    """Identity and protected attributes of every sample, in manifest id order."""

    identity: np.ndarray
    attrs: dict[str, np.ndarray]
    attribute_names: dict[str, list[str]]

    def __len__(self) -> int:
        return int(self.identity.shape[0])


# --------------------------------------------------------------------------- encoding

def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ShardError(f"{where}: not a valid .npy array ({err}); the shard is corrupt, rewrite it") from err


def encode_block(key: str, block: Block, attribute_order: Sequence[str], dtype: str) -> dict[str, Any]:
    """Tar entries for one block of embedding rows."""
    n = len(block)
    attrs = np.full((n, len(attribute_order)), UNKNOWN, dtype=np.int16)
    for col, name in enumerate(attribute_order):
        if name in block.attrs:
            attrs[:, col] = block.attrs[name]
    meta = {"rows": n, "first_id": int(block.ids[0]) if n else None, "attributes": list(attribute_order)}
    return {
        "__key__": key,
        "emb.npy": _npy_bytes(np.asarray(block.emb, dtype=dtype)),
        "ids.npy": _npy_bytes(block.ids.astype(np.int64)),
        "identity.npy": _npy_bytes(block.identity.astype(np.int64)),
        "attrs.npy": _npy_bytes(attrs),
        "meta.json": json.dumps(meta).encode(),
    }


def encode_image(key: str, record: ImageRecord) -> dict[str, Any]:
    meta = {"id": int(record.id), "identity": record.identity, "attributes": record.attrs, "source": record.source}
    return {"__key__": key, "jpg": record.jpg, "meta.json": json.dumps(meta).encode()}


def decode_sample(sample: dict[str, bytes], manifest: Manifest, shard: str, with_emb: bool = True) -> Block:
    """Turn one tar sample (entries by extension) into a checked ``Block``."""
    key = sample.get("__key__", "?")
    where = f"shard {shard}, sample {key!r}"
    if "meta.json" not in sample:
        raise ShardError(f"{where}: has no meta.json (entries: {sorted(k for k in sample if k != '__key__')}); "
                         "every sample needs one - rewrite the shard")
    try:
        meta = json.loads(sample["meta.json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{where}: meta.json is not valid JSON ({err}); rewrite the shard") from err
    order = manifest.attribute_order
    if manifest.kind == "images":
        return _decode_image_meta(meta, manifest, where, shard)
    for entry in ("ids.npy", "identity.npy", "attrs.npy") + (("emb.npy",) if with_emb else ()):
        if entry not in sample:
            raise ShardError(f"{where}: missing {entry}; rewrite the shard")
    ids = _npy_load(sample["ids.npy"], f"{where}/ids.npy").astype(np.int64, copy=False)
    identity = _npy_load(sample["identity.npy"], f"{where}/identity.npy").astype(np.int64, copy=False)
    attrs_arr = _npy_load(sample["attrs.npy"], f"{where}/attrs.npy")
    n = ids.shape[0]
    if identity.shape != (n,) or attrs_arr.shape != (n, len(order)):
        raise ShardError(f"{where}: ids {ids.shape}, identity {identity.shape} and attrs {attrs_arr.shape} "
                         f"disagree (expected ({n},) and ({n}, {len(order)})); rewrite the shard")
    attrs = {}
    for col, name in enumerate(order):
        values = attrs_arr[:, col].astype(np.int16)
        bad = (values < UNKNOWN) | (values >= len(manifest.attributes[name]))
        if bad.any():
            raise ShardError(f"{where}: attribute {name!r} has value {int(values[bad][0])} outside its "
                             f"{len(manifest.attributes[name])} known groups {manifest.attributes[name]}")
        attrs[name] = values
    emb = None
    if with_emb:
        emb = _npy_load(sample["emb.npy"], f"{where}/emb.npy")
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ShardError(f"{where}: emb.npy has shape {emb.shape}, expected ({n}, {manifest.dim})")
        if emb.shape[1] != manifest.dim:
            raise ShardError(f"{where}: embedding has {emb.shape[1]} dims, manifest says {manifest.dim}; "
                             "all shards of a folder must share one dimension")
        emb = emb.astype(np.float32, copy=False)
        if not np.isfinite(emb).all():
            row = int(np.nonzero(~np.isfinite(emb).all(axis=1))[0][0])
            raise ShardError(f"{where}: embedding of id {int(ids[row])} contains NaN or inf; "
                             "clean the source data and rewrite the shard")
    return Block(ids=ids, emb=emb, identity=identity, attrs=attrs, shard=shard)


def _decode_image_meta(meta: dict, manifest: Manifest, where: str, shard: str) -> Block:
    try:
        sample_id = int(meta["id"])
    except (KeyError, TypeError, ValueError) as err:
        raise ShardError(f"{where}: meta.json needs an integer 'id'") from err
    identity = meta.get("identity")
    attrs = {}
    for name, names in manifest.attributes.items():
        value = meta.get("attributes", {}).get(name)
        value = UNKNOWN if value is None else int(value)
        if not UNKNOWN <= value < len(names):
            raise ShardError(f"{where}: attribute {name!r} value {value} is not one of the groups {names}")
        attrs[name] = np.array([value], dtype=np.int16)
    return Block(ids=np.array([sample_id], dtype=np.int64), emb=None,
                 identity=np.array([UNKNOWN if identity is None else int(identity)], dtype=np.int64),
                 attrs=attrs, shard=shard)


# --------------------------------------------------------------------------- tar reading

class _HashingReader(io.RawIOBase):
    """A file wrapper that feeds every byte read through sha256 (free checksum verification)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._handle.read(len(buffer))
        self.sha.update(data)
        buffer[: len(data)] = data
        return len(data)


def _has_end_of_archive(path: Path, offset: int) -> bool:
    """Whether the two zero blocks that end a tar archive follow the last member (at ``offset``)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read(_END_OF_ARCHIVE)
    return len(tail) == _END_OF_ARCHIVE and tail.count(0) == _END_OF_ARCHIVE


def iter_tar_samples(path: Path, verify_sha256: str | None = None,
                     max_member_bytes: int | None = None) -> Iterator[dict[str, bytes]]:
    """Group a tar's entries into samples by key (``key.ext`` -> sample[ext]), streaming.

    Every member header passes ``tar_safety.check_tar_member`` (``max_member_bytes``: default the
    file's size) before its bytes are read. A file that ends without the end-of-archive marker is
    truncated: ``ShardError`` before its last (possibly incomplete) sample is yielded.
    ``verify_sha256`` checks the digest of the bytes read at the end (shard readers verify the whole
    file before reading instead, see ``verify_shard_file``).
    """
    shard = path.name
    limit = path.stat().st_size if max_member_bytes is None else max_member_bytes
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        buffered = io.BufferedReader(reader, buffer_size=1 << 20)
        current: dict[str, bytes] | None = None
        try:
            with tarfile.open(fileobj=buffered, mode="r|") as tar:
                for member in tar:
                    check_tar_member(path, member, limit)
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    prefix = member.name[: len(member.name) - len(base)]
                    key = prefix + key
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise ShardError(f"shard {shard}: entry {member.name} is truncated "
                                         f"({len(data)} of {member.size} bytes); rewrite the shard")
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key}
                    current[ext] = data
                end_offset = tar.offset
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ShardError(f"shard {shard}: corrupt or truncated tar ({err}); rewrite it "
                             "(re-run `dist-fair shards ...`, finished shards are kept)") from err
        if not _has_end_of_archive(path, end_offset):
            raise ShardError(f"shard {shard} ({path}): truncated - the tar ends at byte {path.stat().st_size:,} "
                             f"without its end-of-archive marker (after {end_offset:,} bytes of members), so its "
                             "last sample may be incomplete; rewrite it (re-run `dist-fair shards ...`, finished "
                             "shards are kept) or restore the file from a copy")
        if current is not None:
            yield current
        buffered.read()  # hash the tail (tar padding) too
    if verify_sha256 and reader.sha.hexdigest() != verify_sha256:
        raise ShardIntegrityError(f"shard {shard}: sha256 {reader.sha.hexdigest()} does not match the manifest's "
                                  f"{verify_sha256}; the file changed after writing - rewrite it")


# --------------------------------------------------------------------------- integrity

def verification_enabled() -> bool:
    """Whether shard readers verify checksums in this process (``DIST_FAIR_VERIFY_SHARDS``, default on)."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def set_shard_verification(enabled: bool) -> None:
    """Turn checksum verification on or off for this process and the Ray workers it starts later
    (the variable is passed on by ``ray_runtime.init_ray``; workers of an already running Ray keep
    their setting)."""
    os.environ[VERIFY_ENV] = "1" if enabled else "0"
    if not enabled:
        LOG.warning("shard checksums are NOT verified (--no-verify): a corrupt shard "
                    "gives wrong results without an error")


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed in 4 MiB chunks; remembered per (path, size, inode, mtime, ctime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                sha.update(chunk)
        digest = _DIGESTS[key] = sha.hexdigest()
    return digest


def _rewrite_hint(shard_dir: Path) -> str:
    return (f"rewrite it: re-run the `dist-fair shards ...` (or embed) command that wrote {shard_dir} - finished "
            "shards whose bytes still match their receipts are kept, this one is written again - or restore the "
            "file from a copy; the reading command's `--no-verify` reads it anyway, at your own risk")


def verify_shard_file(shard_dir: str | Path, info: ShardInfo, verify: bool | None = None) -> Path:
    """Check one listed shard file before its rows are used; return its path.

    Always: the file exists. With ``verify`` (default: ``verification_enabled()``): it has the
    manifest's size (shorter = truncated) and sha256. Without, truncation is still caught while
    reading (end-of-archive marker, sample and row counts).

    Raises:
        ShardError: the file is missing or truncated.
        ShardIntegrityError: its size or sha256 differs from the manifest.
    """
    shard_dir = Path(shard_dir)
    path = shard_dir / info.name
    if not path.is_file():
        raise ShardError(f"shard {info.name} listed in {shard_dir / MANIFEST_NAME} is missing; "
                         "restore it or rewrite the shard folder")
    if not (verification_enabled() if verify is None else verify):
        return path
    size = path.stat().st_size
    if info.bytes and size < info.bytes:
        raise ShardIntegrityError(f"shard {path}: truncated - the file has {size:,} bytes, the manifest lists "
                                  f"{info.bytes:,}; {_rewrite_hint(shard_dir)}")
    if info.bytes and size != info.bytes:
        raise ShardIntegrityError(f"shard {path}: the file has {size:,} bytes, the manifest lists {info.bytes:,} "
                                  f"(it changed after writing); {_rewrite_hint(shard_dir)}")
    actual = file_sha256(path)
    if actual != info.sha256:
        raise ShardIntegrityError(f"shard {path}: sha256 mismatch - the file's bytes hash to {actual}, the "
                                  f"manifest ({shard_dir / MANIFEST_NAME}) records {info.sha256}: the file "
                                  f"changed after it was written (disk or copy error, or an edit); "
                                  f"{_rewrite_hint(shard_dir)}")
    return path


def shard_set_digest(shard_dir: str | Path, verify: bool | None = None) -> str:
    """One sha256 over what a shard folder's readers get: the manifest's schema fields and the
    *actual* sha256 of every listed file (hashed once per process, see ``file_sha256``).

    For stage fingerprints: a repaired or changed input gives a different digest, so the stages
    after it are redone. With ``verify`` (default: ``verification_enabled()``) a file whose digest
    differs from the manifest raises ``ShardIntegrityError`` instead.
    """
    manifest = read_manifest(shard_dir)
    shard_dir = Path(shard_dir)
    check = verification_enabled() if verify is None else verify
    files = []
    for info in manifest.shards:
        path = verify_shard_file(shard_dir, info, verify=check)
        files.append([info.name, info.first_id, info.samples, file_sha256(path)])
    payload = {"kind": manifest.kind, "dim": manifest.dim, "dtype": manifest.dtype,
               "attributes": manifest.attributes, "num_samples": manifest.num_samples, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def iter_shard_samples(shard_dir: str | Path, info: ShardInfo, verify: bool | None = None) -> Iterator[dict[str, bytes]]:
    """The raw tar samples of one listed shard, after ``verify_shard_file``; raises when the file holds
    fewer tar samples than the manifest's ``blocks`` (a truncated file)."""
    path = verify_shard_file(shard_dir, info, verify)
    count = 0
    for sample in iter_tar_samples(path):
        count += 1
        yield sample
    if info.blocks and count < info.blocks:
        raise ShardError(f"shard {path}: truncated - it holds {count} tar samples, the manifest lists {info.blocks}; "
                         f"{_rewrite_hint(Path(shard_dir))}")


def read_manifest(shard_dir: str | Path) -> Manifest:
    return Manifest.load(shard_dir)


def _shard_info(manifest: Manifest, name: str) -> ShardInfo:
    for shard in manifest.shards:
        if shard.name == name:
            return shard
    raise ShardError(f"shard {name} is not listed in the manifest (listed: {[s.name for s in manifest.shards][:5]}...)")


def iter_shard_blocks(shard_dir: str | Path, info: ShardInfo, manifest: Manifest, with_emb: bool = True,
                      verify: bool | None = None) -> Iterator[Block]:
    """Blocks of one shard, checked: the file against the manifest first (``verify_shard_file``;
    ``verify`` None = ``verification_enabled()``), then ids contiguous from ``first_id`` and the row
    count as listed."""
    expected = info.first_id
    for sample in iter_shard_samples(shard_dir, info, verify):
        block = decode_sample(sample, manifest, info.name, with_emb=with_emb)
        n = len(block)
        if n and (block.ids[0] != expected or (n > 1 and not np.array_equal(block.ids, np.arange(expected, expected + n)))):
            raise ShardError(f"shard {info.name}, sample {sample['__key__']!r}: ids start at {int(block.ids[0])}, "
                             f"expected contiguous ids from {expected}; rewrite the shard")
        expected += n
        yield block
    if expected != info.first_id + info.samples:
        raise ShardError(f"shard {info.name}: holds {expected - info.first_id} samples, the manifest lists "
                         f"{info.samples}; the file is truncated - rewrite it")


def iter_blocks(shard_dir: str | Path, shard_names: Sequence[str] | None = None, with_emb: bool = True,
                verify: bool | None = None) -> Iterator[Block]:
    """Every block of the given shards (default: all) exactly once, in id order; each file is
    verified before its first row (``verify`` None = ``verification_enabled()``)."""
    manifest = read_manifest(shard_dir)
    infos = manifest.shards if shard_names is None else [_shard_info(manifest, n) for n in shard_names]
    for info in infos:
        yield from iter_shard_blocks(shard_dir, info, manifest, with_emb=with_emb, verify=verify)


def concat_blocks(blocks: Sequence[Block], attribute_order: Sequence[str], dim: int | None = None) -> Block:
    if not blocks:
        emb = None if dim is None else np.zeros((0, dim), np.float32)
        return Block(np.zeros(0, np.int64), emb, np.zeros(0, np.int64),
                     {a: np.zeros(0, np.int16) for a in attribute_order})
    emb = None if blocks[0].emb is None else np.concatenate([b.emb for b in blocks])
    return Block(ids=np.concatenate([b.ids for b in blocks]), emb=emb,
                 identity=np.concatenate([b.identity for b in blocks]),
                 attrs={a: np.concatenate([b.attrs[a] for b in blocks]) for a in attribute_order},
                 shard=blocks[0].shard)


def read_shard(shard_dir: str | Path, shard_name: str, with_emb: bool = True) -> Block:
    """All rows of one shard as one ``Block``."""
    manifest = read_manifest(shard_dir)
    info = _shard_info(manifest, shard_name)
    blocks = list(iter_shard_blocks(shard_dir, info, manifest, with_emb=with_emb))
    return concat_blocks(blocks, manifest.attribute_order, manifest.dim if with_emb else None)


def load_labels(shard_dir: str | Path) -> Labels:
    """Identity and attribute arrays for all samples, in id order (embeddings are not decoded)."""
    manifest = read_manifest(shard_dir)
    n = manifest.num_samples
    identity = np.full(n, UNKNOWN, np.int64)
    attrs = {a: np.full(n, UNKNOWN, np.int16) for a in manifest.attribute_order}
    for block in iter_blocks(shard_dir, with_emb=False):
        identity[block.ids] = block.identity
        for a in attrs:
            attrs[a][block.ids] = block.attrs[a]
    return Labels(identity=identity, attrs=attrs, attribute_names=dict(manifest.attributes))


def load_embeddings(shard_dir: str | Path, out: np.ndarray | None = None) -> np.ndarray:
    """All embeddings as float32 (N x dim) in id order; ``out`` may be a memory map to fill."""
    manifest = read_manifest(shard_dir)
    if manifest.kind != "embeddings":
        raise ShardError(f"{shard_dir} holds {manifest.kind} shards; embed them first (`dist-fair run` "
                         "with an images source runs the embed stage)")
    if out is None:
        out = np.empty((manifest.num_samples, manifest.dim), np.float32)
    for block in iter_blocks(shard_dir):
        out[block.ids] = block.emb
    return out


# --------------------------------------------------------------------------- partitions and streams

def shards_for_worker(manifest: Manifest, rank: int, world_size: int) -> list[str]:
    """This worker's shards in an exactly-once partition of all shards over ``world_size`` workers.

    Greedy by size (largest shard to the least-loaded worker, ties to the lowest rank), so every
    worker gets a similar number of samples; returned in id order. With more workers than shards
    some workers get none.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
    loads = [0] * world_size
    owner: dict[str, int] = {}
    for shard in sorted(manifest.shards, key=lambda s: (-s.samples, s.first_id)):
        target = min(range(world_size), key=lambda w: (loads[w], w))
        owner[shard.name] = target
        loads[target] += shard.samples
    return [s.name for s in manifest.shards if owner[s.name] == rank]


def _tar_samples_stage(urls: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """WebDataset stage: url records -> samples, through ``iter_tar_samples`` (member safety checks)."""
    for record in urls:
        url = record["url"]
        for sample in iter_tar_samples(Path(url)):
            sample["__url__"] = url
            yield sample


def stream_blocks(shard_dir: str | Path, rank: int = 0, world_size: int = 1, resampled: bool = False,
                  seed: int = 0, shuffle_rows: bool | None = None) -> Iterator[Block]:
    """Stream this worker's share of the shards through a WebDataset pipeline.

    ``resampled=False``: each of the worker's shards once, in id order (inference; the union over
    ranks is every sample exactly once). ``resampled=True``: an endless stream for training -
    shards drawn at random with replacement from the worker's share (``wds.ResampledShards``) and
    rows shuffled within each block. The node split is done here explicitly
    (``shards_for_worker``), so webdataset's environment-based splitter is never used.
    """
    import webdataset as wds

    manifest = read_manifest(shard_dir)
    names = shards_for_worker(manifest, rank, world_size)
    if not names:
        LOG.warning("worker %d of %d has no shard to read (%d shards); write more, smaller shards",
                    rank, world_size, len(manifest.shards))
        return
    for name in names:  # every file of this worker verified before its first row is used
        verify_shard_file(shard_dir, _shard_info(manifest, name))
    urls = [str(Path(shard_dir) / n) for n in names]
    if resampled:
        source = wds.ResampledShards(urls, seed=seed * 1009 + rank, deterministic=True)
    else:
        source = wds.SimpleShardList(urls)
    pipeline = wds.DataPipeline(source, _tar_samples_stage)
    rng = np.random.default_rng([seed, rank])
    shuffle_rows = resampled if shuffle_rows is None else shuffle_rows
    for sample in pipeline:
        shard = Path(sample.get("__url__", "?")).name
        entries = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        block = decode_sample(entries, manifest, shard)
        if shuffle_rows and len(block) > 1:
            order = rng.permutation(len(block))
            block = Block(block.ids[order], None if block.emb is None else block.emb[order],
                          block.identity[order], {a: v[order] for a, v in block.attrs.items()}, shard)
        yield block


# --------------------------------------------------------------------------- writing

def _receipt_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.done.json"


def _count_groups(attrs: dict[str, np.ndarray], attribute_names: dict[str, list[str]],
                  totals: dict[str, np.ndarray]) -> None:
    for name, values in attrs.items():
        known = values[values >= 0]
        totals[name] += np.bincount(known, minlength=len(attribute_names[name]))[: len(attribute_names[name])]


def write_shard(out_dir: str | Path, plan: ShardPlan, rows: Iterable[Block | ImageRecord], kind: str,
                attribute_names: dict[str, list[str]], dim: int | None = None, dtype: str = "float16",
                fingerprint: str = "") -> ShardInfo:
    """Write one shard from its rows; return its ``ShardInfo`` and leave a receipt next to it.

    The tar is written under a temporary name and renamed only after every row was written, the
    row count and ids checked and the checksum computed; a failure leaves no ``<name>.tar``.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / plan.name
    tmp = out_dir / f".{plan.name}.partial"
    order = list(attribute_names)
    totals = {a: np.zeros(len(v), np.int64) for a, v in attribute_names.items()}
    identities: set[int] = set()
    expected, blocks = plan.first_id, 0
    try:
        with open(tmp, "wb") as handle:
            writer = wds.TarWriter(handle, encoder=False, mtime=0.0, user="dist_fair", group="dist_fair")
            try:
                for row in rows:
                    if kind == "embeddings":
                        block = row
                        n = len(block)
                        if n == 0:
                            continue
                        _check_block(block, plan, expected, dim, attribute_names)
                        writer.write(encode_block(f"{Path(plan.name).stem}-{blocks:06d}", block, order, dtype))
                        _count_groups(block.attrs, attribute_names, totals)
                        identities.update(np.unique(block.identity[block.identity >= 0]).tolist())
                    else:
                        record = row
                        n = 1
                        if record.id != expected:
                            raise DataError(f"shard {plan.name}: image id {record.id}, expected {expected}")
                        writer.write(encode_image(f"{Path(plan.name).stem}-{record.id:09d}", record))
                        _count_groups({a: np.array([v], np.int64) for a, v in record.attrs.items() if v is not None},
                                      attribute_names, totals)
                        if record.identity is not None:
                            identities.add(int(record.identity))
                    expected += n
                    blocks += 1
            finally:
                writer.close()
        written = expected - plan.first_id
        if written != plan.rows:
            raise DataError(f"shard {plan.name}: the producer gave {written} rows, the plan says {plan.rows}")
        sha = hashlib.sha256()
        with open(tmp, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                sha.update(chunk)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    info = ShardInfo(name=plan.name, samples=plan.rows, first_id=plan.first_id, sha256=sha.hexdigest(),
                     bytes=final.stat().st_size, blocks=blocks, identities=len(identities),
                     group_counts={a: {attribute_names[a][i]: int(c) for i, c in enumerate(cnt)}
                                   for a, cnt in totals.items()})
    atomic_write_json(_receipt_path(out_dir, plan.name), {**info.__dict__, "fingerprint": fingerprint})
    return info


def _check_block(block: Block, plan: ShardPlan, expected: int, dim: int | None,
                 attribute_names: dict[str, list[str]]) -> None:
    n = len(block)
    where = f"shard {plan.name}, rows {expected}..{expected + n - 1}"
    if not np.array_equal(block.ids, np.arange(expected, expected + n)):
        raise DataError(f"{where}: ids must be contiguous from {expected}")
    if block.emb is None or block.emb.ndim != 2 or block.emb.shape != (n, dim):
        shape = None if block.emb is None else block.emb.shape
        raise DataError(f"{where}: embeddings have shape {shape}, expected ({n}, {dim}); every row needs {dim} dims")
    finite = np.isfinite(block.emb).all(axis=1)
    if not finite.all():
        bad = int(block.ids[np.argmin(finite)])
        raise DataError(f"{where}: embedding of sample id {bad} contains NaN or inf; clean the input first")
    if block.identity.shape != (n,):
        raise DataError(f"{where}: identity has shape {block.identity.shape}, expected ({n},)")
    for name, values in block.attrs.items():
        if name not in attribute_names:
            raise DataError(f"{where}: unknown protected attribute {name!r}; declare it in attribute_names "
                            f"(known: {list(attribute_names)})")
        if values.shape != (n,):
            raise DataError(f"{where}: attribute {name!r} has shape {values.shape}, expected ({n},)")
        bad = (values < UNKNOWN) | (values >= len(attribute_names[name]))
        if bad.any():
            raise DataError(f"{where}: attribute {name!r} value {int(values[bad][0])} is not a known group "
                            f"(0..{len(attribute_names[name]) - 1} = {attribute_names[name]}, -1 = unknown)")


def _read_receipt(out_dir: Path, plan: ShardPlan, fingerprint: str) -> ShardInfo | None:
    """A finished shard's info if its receipt matches the job and the file on disk (size and sha256),
    else None (the shard is then written again)."""
    receipt, final = _receipt_path(out_dir, plan.name), out_dir / plan.name
    if not (receipt.is_file() and final.is_file()):
        return None
    try:
        data = json.loads(receipt.read_text())
        info = ShardInfo.from_dict(data)
    except (json.JSONDecodeError, TypeError, KeyError):
        return None
    if data.get("fingerprint") != fingerprint:
        return None
    if info.samples != plan.rows or info.first_id != plan.first_id or info.bytes != final.stat().st_size:
        return None
    actual = file_sha256(final)
    if actual != info.sha256:
        LOG.warning("%s: its bytes hash to %s but its receipt records %s (changed after writing); writing it again",
                    final, actual, info.sha256)
        return None
    return info


def _write_planned_shard(out_dir: str, plan: ShardPlan, producer: Callable[[ShardPlan], Iterable[Any]], kind: str,
                         attribute_names: dict[str, list[str]], dim: int | None, dtype: str,
                         fingerprint: str, kill_point_name: str = "shards.shard_written") -> ShardInfo:
    info = write_shard(out_dir, plan, producer(plan), kind, attribute_names, dim, dtype, fingerprint)
    kill_point(kill_point_name)  # fault injection (dist_fair.faults): shard and receipt written, manifest not
    return info


def write_shard_set(out_dir: str | Path, plans: Sequence[ShardPlan], producer: Callable[[ShardPlan], Iterable[Any]],
                    kind: str, attribute_names: dict[str, list[str]], dim: int | None = None,
                    dtype: str = "float16", workers: int = 1, source: dict[str, Any] | None = None,
                    num_identities: int | None = None, progress: bool = True) -> Manifest:
    """Write every planned shard (skipping finished ones), then the manifest.

    ``workers > 1`` runs one Ray task per shard (at most ``workers`` at a time, 1 CPU each) on the
    current Ray instance or cluster, so ingestion uses every core of every node; ``producer`` must
    then be picklable (a module-level function or a dataclass instance).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST_NAME).exists():
        (out_dir / MANIFEST_NAME).unlink()  # the folder is being (re)written: no stale manifest
    if kind == "embeddings" and dim is None:
        raise DataError("embedding shards need dim")
    # Receipts only count for the same job: same source description, schema and layout.
    fingerprint = hashlib.sha256(json.dumps(
        {"source": source or {}, "kind": kind, "dim": dim, "dtype": dtype, "attributes": attribute_names},
        sort_keys=True, default=str).encode()).hexdigest()
    infos: dict[int, ShardInfo] = {}
    todo = []
    for plan in plans:
        done = _read_receipt(out_dir, plan, fingerprint)
        if done is not None:
            infos[plan.index] = done
        else:
            todo.append(plan)
    if infos:
        LOG.info("resuming: %d of %d shards already complete in %s", len(infos), len(plans), out_dir)
    bar = tqdm(total=sum(p.rows for p in plans), initial=sum(i.samples for i in infos.values()),
               unit="rows", desc=f"writing {out_dir.name}", disable=not progress)
    point = "embed.shard_written" if (source or {}).get("source") == "embed" else "shards.shard_written"
    if workers <= 1 or len(todo) <= 1:
        for plan in todo:
            infos[plan.index] = _write_planned_shard(str(out_dir), plan, producer, kind, attribute_names, dim, dtype,
                                                   fingerprint, point)
            bar.update(plan.rows)
    else:
        import ray

        from dist_fair.ray_runtime import init_ray

        init_ray()
        remote = ray.remote(num_cpus=1, max_retries=2)(_write_planned_shard)
        producer_ref = ray.put(producer)
        pending: dict[Any, ShardPlan] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < workers:
                plan = queue.pop(0)
                pending[remote.remote(str(out_dir), plan, producer_ref, kind, attribute_names, dim, dtype,
                                      fingerprint, point)] = plan
            ready, _ = ray.wait(list(pending), num_returns=1)
            plan = pending.pop(ready[0])
            try:
                infos[plan.index] = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:
                for ref in pending:
                    ray.cancel(ref)
                cause = getattr(err, "cause", None)
                if isinstance(cause, Exception):  # show our own message, not Ray's wrapped traceback
                    raise cause from None
                raise
            bar.update(plan.rows)
    bar.close()
    ordered = [infos[p.index] for p in sorted(plans, key=lambda p: p.first_id)]
    manifest = Manifest(kind=kind, dim=dim, dtype=dtype if kind == "embeddings" else None,
                        attributes={k: list(v) for k, v in attribute_names.items()}, shards=ordered,
                        num_samples=sum(i.samples for i in ordered),
                        num_identities=num_identities if num_identities is not None else sum(i.identities for i in ordered),
                        source=source or {})
    manifest.save(out_dir)
    return manifest


def plan_shards(total_rows: int, shard_rows: int, prefix: str = "shard") -> list[ShardPlan]:
    """Contiguous plans of at most ``shard_rows`` rows named ``<prefix>-000000.tar``..."""
    if total_rows < 1:
        raise DataError("nothing to write: the source has no rows")
    plans, start = [], 0
    while start < total_rows:
        rows = min(shard_rows, total_rows - start)
        plans.append(ShardPlan(len(plans), f"{prefix}-{len(plans):06d}.tar", start, rows))
        start += rows
    return plans


@dataclass
class _ArraySlices:
    """Producer over in-memory arrays: each shard takes its id range in blocks."""

    emb: np.ndarray
    identity: np.ndarray
    attrs: dict[str, np.ndarray]
    block_rows: int = 4096
    extra: dict = field(default_factory=dict)

    def __call__(self, plan: ShardPlan) -> Iterator[Block]:
        for start in range(plan.first_id, plan.first_id + plan.rows, self.block_rows):
            stop = min(start + self.block_rows, plan.first_id + plan.rows)
            yield Block(ids=np.arange(start, stop, dtype=np.int64), emb=self.emb[start:stop],
                        identity=self.identity[start:stop], attrs={a: v[start:stop] for a, v in self.attrs.items()})


def write_embedding_shards(out_dir: str | Path, emb: np.ndarray, identity: np.ndarray | None = None,
                           attrs: dict[str, np.ndarray] | None = None,
                           attribute_names: dict[str, list[str]] | None = None, shard_rows: int = 65536,
                           block_rows: int = 4096, dtype: str = "float32", workers: int = 1,
                           source: dict[str, Any] | None = None, prefix: str = "emb") -> Manifest:
    """Write in-memory embeddings (ids = row positions) as embedding shards.

    ``attrs`` values are group indices into ``attribute_names`` (-1 = unknown); by default each
    attribute's names are ``["0", "1", ...]``.
    """
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise DataError(f"embeddings must be a 2-D array (rows x dim), got shape {emb.shape}")
    n = emb.shape[0]
    identity = np.full(n, UNKNOWN, np.int64) if identity is None else np.asarray(identity, np.int64)
    if identity.shape != (n,):
        raise DataError(f"identity has shape {identity.shape}, expected ({n},) - one per embedding row")
    attrs = {k: np.asarray(v, np.int16) for k, v in (attrs or {}).items()}
    if attribute_names is None:
        attribute_names = {k: [str(i) for i in range(int(v.max()) + 1 if v.size else 1)] for k, v in attrs.items()}
    for name in attrs:
        if name not in attribute_names:
            raise DataError(f"attribute {name!r} has no entry in attribute_names; add its group names")
    plans = plan_shards(n, shard_rows, prefix)
    producer = _ArraySlices(emb, identity, attrs, block_rows)
    return write_shard_set(out_dir, plans, producer, "embeddings", attribute_names, dim=emb.shape[1], dtype=dtype,
                           workers=workers, source=source or {"source": "arrays"},
                           num_identities=int(np.unique(identity[identity >= 0]).size), progress=False)
