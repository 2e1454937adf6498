"""Face images as image shards: a ``<group>/<identity>/*.jpg`` folder tree, or UTKFace.

Samples as in METHODS.md §1 (id, image, identity, protected attributes). Image shards hold one tar
sample per image: the JPEG bytes exactly as read (never re-encoded) and
``meta.json`` with the id, identity and attribute values (``schema.py``). Ids follow a
deterministic sort, so the same input always gives the same ids and byte-identical shards,
whether written by one process or by ``workers`` Ray tasks (one per shard).

Sources:

- **Folder tree** ``<root>/<group>/<identity>/<image>`` (the BUPT-BalancedFace layout): the sorted
  group folder names are the value names of one protected attribute (``race`` unless told
  otherwise); identities are numbered 0, 1, ... in (group, identity folder) sorted order, and their
  names ``<group>/<identity>`` are written to ``identity_names.json`` in the shard folder; images
  take ids in (group, identity, file name) order. An empty group or identity folder, or a file
  lying directly in a group folder, is an error naming it.
- **UTKFace** (``utkface/UTKFace-0{0..3}.tar`` or an extracted folder): files named
  ``<age>_<gender>_<race>_<date>.jpg.chip.jpg``. Tar files are read in place (member offsets from
  the tar headers, no extraction). Attributes: ``race`` (White, Black, Asian, Indian, Other; a
  name without the race field -> -1, counted in ``source["race_unknown"]``), ``gender`` (male,
  female) and ``age`` bucketed by ``age_edges`` (default 20, 40, 60 -> ``0-19``, ``20-39``,
  ``40-59``, ``60+``; bucket = number of edges <= age). UTKFace has no identities (all -1). Ids
  follow the file name (then the container) in sorted order.

Every image is checked while it is written: it must start with the JPEG marker ``FF D8 FF``, PIL
must identify it as JPEG and its header must declare at most ``MAX_IMAGE_PIXELS`` pixels (a
decompression bomb - a small file that decodes to gigabytes - is refused before decoding;
``check="header"``) and, by default, it must decode completely (``check="decode"``, which catches
truncated files). Tar members are checked by ``tar_safety`` (no links, devices, absolute or ``..``
names; a JPEG member may declare at most ``MAX_IMAGE_BYTES``). A bad image is an error naming the file;
with ``skip_bad`` a first pass finds the bad images (in parallel with ``workers > 1``), leaves them
out and records their number and the first names in ``source["skipped_bad"]`` and
``source["bad_files_first"]``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from dist_fair.data.schema import Manifest
from dist_fair.data.shards import ImageRecord, ShardPlan, plan_shards, write_shard_set
from dist_fair.data.tar_safety import check_tar_member
from dist_fair.errors import DataError
from dist_fair.io_atomic import atomic_write_json

LOG = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
CHECKS = ("decode", "header")
IDENTITY_NAMES_FILE = "identity_names.json"

UTK_RACES = ["White", "Black", "Asian", "Indian", "Other"]
UTK_GENDERS = ["male", "female"]
UTK_AGE_EDGES = (20, 40, 60)

#: Most pixels an image may declare (PIL's own default limit, applied explicitly and strictly: PIL
#: only warns between 1x and 2x of it).
MAX_IMAGE_PIXELS = 89_478_485
#: Most bytes one JPEG member of a tar archive may declare in its header.
MAX_IMAGE_BYTES = 64 << 20


@dataclass
class ImageEntry:
    """Where one image's bytes are: a file (``member`` None) or a member of an uncompressed tar at
    byte ``offset`` with ``size`` bytes; plus its labels. ``name`` is shown in messages and stored
    as the sample's ``source``."""

    name: str
    path: str
    member: str | None
    offset: int
    size: int
    identity: int | None
    attrs: dict[str, int]


# --------------------------------------------------------------------------- reading and checking

class EntryReader:
    """Reads entries' bytes, keeping each tar file open once."""

    def __init__(self) -> None:
        self._tars: dict[str, BinaryIO] = {}

    def read(self, entry: ImageEntry) -> bytes:
        if entry.member is None:
            return Path(entry.path).read_bytes()
        handle = self._tars.get(entry.path)
        if handle is None:
            handle = self._tars[entry.path] = open(entry.path, "rb")
        handle.seek(entry.offset)
        data = handle.read(entry.size)
        if len(data) != entry.size:
            raise OSError(f"tar member is truncated ({len(data)} of {entry.size} bytes)")
        return data

    def close(self) -> None:
        for handle in self._tars.values():
            handle.close()
        self._tars.clear()

    def __enter__(self) -> "EntryReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pixel_count_problem(width: int, height: int, limit: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why an image of ``width`` x ``height`` must not be decoded (a decompression bomb), or None."""
    pixels = int(width) * int(height)
    if pixels > limit:
        return (f"decompression bomb: the header declares {width} x {height} = {pixels:,} pixels, more than "
                f"the {limit:,} allowed (dist_fair.data.images.MAX_IMAGE_PIXELS); it is not decoded")
    return None


def check_image_pixels(image: Any, where: str) -> None:
    """Raise ``DataError`` when an opened (not yet decoded) PIL image is a decompression bomb; for
    every decoder of untrusted JPEG bytes (call between ``Image.open`` and ``load``/``convert``)."""
    problem = pixel_count_problem(*image.size)
    if problem:
        raise DataError(f"{where}: {problem}; delete or replace the image (or rewrite the shard without it)")


def jpeg_problem(data: bytes, check: str = "decode") -> str | None:
    """Why ``data`` is not a usable JPEG, or None when it is (``check``: "header" or "decode")."""
    from PIL import Image, UnidentifiedImageError

    if not data.startswith(JPEG_MAGIC):
        return f"not a JPEG file (starts with {data[:4].hex(' ') or 'nothing, it is empty'})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return f"PIL reads it as {image.format}, not JPEG"
            bomb = pixel_count_problem(*image.size)
            if bomb:
                return bomb
            if check == "decode":
                image.load()
    except UnidentifiedImageError:
        return "unreadable JPEG (PIL cannot identify it as an image)"
    except Image.DecompressionBombError as err:
        return f"decompression bomb ({err}); it is not decoded"
    except (OSError, SyntaxError, ValueError) as err:
        return f"unreadable JPEG ({err})"
    return None


def _read_checked(reader: EntryReader, entry: ImageEntry, check: str) -> tuple[bytes | None, str | None]:
    try:
        data = reader.read(entry)
    except OSError as err:
        return None, f"cannot be read ({err})"
    return data, jpeg_problem(data, check)


def _bad_image_error(entry: ImageEntry, reason: str) -> DataError:
    return DataError(f"image {entry.name}: {reason}; delete or replace it, or pass --skip-bad to leave bad "
                     "images out (their number is recorded in the manifest)")


def check_entries(entries: Sequence[ImageEntry], check: str = "decode") -> list[tuple[int, str]]:
    """(position, reason) of every bad image among ``entries``."""
    bad = []
    with EntryReader() as reader:
        for position, entry in enumerate(entries):
            _, reason = _read_checked(reader, entry, check)
            if reason:
                bad.append((position, reason))
    return bad


def find_bad_images(entries: Sequence[ImageEntry], check: str = "decode", workers: int = 1,
                    chunk: int = 4096) -> list[tuple[int, str]]:
    """``check_entries`` over all entries, in chunks run as Ray tasks when ``workers > 1``."""
    starts = list(range(0, len(entries), chunk))
    if workers <= 1 or len(starts) <= 1:
        return check_entries(entries, check)
    import ray

    from dist_fair.ray_runtime import init_ray

    init_ray()
    remote = ray.remote(num_cpus=1)(check_entries)
    bad: list[tuple[int, str]] = []
    pending: dict[Any, int] = {}
    queue = list(starts)
    while queue or pending:
        while queue and len(pending) < workers:
            start = queue.pop(0)
            pending[remote.remote(list(entries[start: start + chunk]), check)] = start
        ready, _ = ray.wait(list(pending), num_returns=1)
        start = pending.pop(ready[0])
        bad += [(start + position, reason) for position, reason in ray.get(ready[0])]
    return sorted(bad)


@dataclass
class ImageRows:
    """Producer: reads, checks and yields the images listed in a plan's payload, ids from ``first_id``."""

    check: str = "decode"

    def __call__(self, plan: ShardPlan) -> Iterator[ImageRecord]:
        with EntryReader() as reader:
            for position, entry in enumerate(plan.payload):
                data, reason = _read_checked(reader, entry, self.check)
                if reason:
                    raise _bad_image_error(entry, reason)
                yield ImageRecord(id=plan.first_id + position, jpg=data, identity=entry.identity,
                                  attrs=dict(entry.attrs), source=entry.name)


# --------------------------------------------------------------------------- writing

def _entries_digest(entries: Sequence[ImageEntry]) -> str:
    sha = hashlib.sha256()
    for e in entries:
        sha.update(f"{e.name}\0{e.size}\0{e.identity}\0{sorted(e.attrs.items())}\n".encode())
    return sha.hexdigest()


def write_image_entries(out_dir: str | Path, entries: Sequence[ImageEntry], attribute_names: dict[str, list[str]],
                        source: dict[str, Any], shard_rows: int = 4096, workers: int = 1, check: str = "decode",
                        skip_bad: bool = False, prefix: str = "images", num_identities: int | None = None,
                        progress: bool = True) -> Manifest:
    """Write listed images as image shards (one Ray task per shard with ``workers > 1``)."""
    if check not in CHECKS:
        raise DataError(f"check {check!r} must be one of {CHECKS}")
    if shard_rows < 1:
        raise DataError(f"shard_rows must be >= 1, got {shard_rows}")
    entries = list(entries)
    source = dict(source, check=check, skip_bad=skip_bad)
    if skip_bad:
        bad = find_bad_images(entries, check, workers)
        if bad:
            LOG.warning("leaving out %d bad images (first: %s: %s)", len(bad), entries[bad[0][0]].name, bad[0][1])
        skip = {position for position, _ in bad}
        source["skipped_bad"] = source.get("skipped_bad", 0) + len(bad)
        source["bad_files_first"] = (source.get("bad_files_first", [])
                                     + [f"{entries[p].name}: {reason}" for p, reason in bad])[:20]
        entries = [e for i, e in enumerate(entries) if i not in skip]
    if not entries:
        raise DataError("no images left to write")
    source["images"] = len(entries)
    source["images_sha256"] = _entries_digest(entries)
    if num_identities is None:
        num_identities = len({e.identity for e in entries if e.identity is not None})
    plans = [replace(plan, payload=entries[plan.first_id: plan.first_id + plan.rows])
             for plan in plan_shards(len(entries), shard_rows, prefix)]
    return write_shard_set(out_dir, plans, ImageRows(check), "images", attribute_names, workers=workers,
                           source=source, num_identities=num_identities, progress=progress)


# --------------------------------------------------------------------------- folder tree

@dataclass
class FolderScan:
    """The images of a ``<group>/<identity>/*`` tree in id order, with the name tables."""

    entries: list[ImageEntry]
    groups: list[str]
    identity_names: list[str] = field(default_factory=list)


def _visible(entries: Iterator[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def scan_image_folder(root: str | Path, attribute: str = "race", limit: int | None = None) -> FolderScan:
    """List ``<root>/<group>/<identity>/<image>`` in (group, identity, file) sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; expected a folder laid out as <group>/<identity>/*.jpg")
    with os.scandir(root) as it:
        top = _visible(it)
    groups = [e for e in top if e.is_dir()]
    ignored = [e.name for e in top if not e.is_dir()]
    if ignored:
        LOG.warning("%s: ignoring %d files beside the group folders (e.g. %s)", root, len(ignored), ignored[0])
    if not groups:
        raise DataError(f"{root} holds no group folders; expected <group>/<identity>/*.jpg, e.g. "
                        f"{root}/African/m.0abc/0001.jpg")
    entries: list[ImageEntry] = []
    identity_names: list[str] = []
    for group_index, group in enumerate(groups):
        with os.scandir(group.path) as it:
            inside = _visible(it)
        stray = [e.name for e in inside if not e.is_dir()]
        if stray:
            raise DataError(f"{group.path}/{stray[0]}: images must sit in identity folders "
                            f"(<group>/<identity>/*.jpg), not directly in the group folder {group.path}; move it")
        if not inside:
            raise DataError(f"group folder {group.path} is empty: it holds no identity folders; remove it or add "
                            "<identity>/*.jpg under it")
        for ident in inside:
            with os.scandir(ident.path) as it:
                files = _visible(it)
            nested = [e.name for e in files if e.is_dir()]
            if nested:
                LOG.warning("%s: ignoring %d sub-folders (e.g. %s)", ident.path, len(nested), nested[0])
            files = [e for e in files if not e.is_dir()]
            if not files:
                raise DataError(f"identity folder {ident.path} holds no images; remove it or add its images")
            identity = len(identity_names)
            identity_names.append(f"{group.name}/{ident.name}")
            for f in files:
                entries.append(ImageEntry(name=f"{group.name}/{ident.name}/{f.name}", path=f.path, member=None,
                                          offset=0, size=f.stat().st_size, identity=identity,
                                          attrs={attribute: group_index}))
    if limit is not None:
        entries = entries[:limit]
    return FolderScan(entries, [g.name for g in groups], identity_names)


def write_images_shards(out_dir: str | Path, root: str | Path, attribute: str = "race", limit: int | None = None,
                        shard_rows: int = 4096, workers: int = 1, check: str = "decode", skip_bad: bool = False,
                        prefix: str = "images", progress: bool = True) -> Manifest:
    """Write a ``<group>/<identity>/*.jpg`` tree as image shards (see the module docstring).

    Args:
        out_dir: the shard folder (finished shards of an identical earlier run are kept).
        root: the folder holding one sub-folder per group.
        attribute: name of the protected attribute the group folders stand for.
        limit: only the first images in id order.
        check: "decode" (default) or "header" (see ``jpeg_problem``).
        skip_bad: leave bad images out instead of failing.
    """
    scan = scan_image_folder(root, attribute, limit)
    LOG.info("%s: %d images of %d identities in groups %s", root, len(scan.entries), len(scan.identity_names),
             scan.groups)
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / IDENTITY_NAMES_FILE, scan.identity_names)
    source = {"source": "image_folder", "root": str(Path(root).resolve()), "attribute": attribute, "limit": limit,
              "identity_names_file": IDENTITY_NAMES_FILE}
    return write_image_entries(out_dir, scan.entries, {attribute: scan.groups}, source, shard_rows=shard_rows,
                               workers=workers, check=check, skip_bad=skip_bad, prefix=prefix, progress=progress)


# --------------------------------------------------------------------------- UTKFace

def age_bucket_names(edges: Sequence[int]) -> list[str]:
    """``(20, 40, 60)`` -> ``["0-19", "20-39", "40-59", "60+"]``."""
    edges = list(edges)
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise DataError(f"age edges {edges} must be positive and strictly increasing, e.g. 20,40,60")
    lows = [0] + edges
    return [f"{lo}-{hi - 1}" for lo, hi in zip(lows, edges)] + [f"{edges[-1]}+"]


def parse_utkface_name(file_name: str) -> tuple[int, int, int] | None:
    """``<age>_<gender>_<race>_<date>.jpg.chip.jpg`` -> (age, gender, race); race -1 when the name has
    only ``<age>_<gender>_<date>``; None when the name does not follow the pattern."""
    fields = Path(file_name).name.split(".", 1)[0].split("_")
    if len(fields) not in (3, 4):
        return None
    try:
        age, gender = int(fields[0]), int(fields[1])
        race = int(fields[2]) if len(fields) == 4 else -1
    except ValueError:
        return None
    if age < 0 or gender not in (0, 1) or not -1 <= race < len(UTK_RACES):
        return None
    return age, gender, race


def _utkface_files(inputs: Sequence[str | Path]) -> list[tuple[str, ImageEntry]]:
    """(file name, entry without labels) of every JPEG in the inputs (tar files or folders)."""
    found: list[tuple[str, ImageEntry]] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            tars = sorted(item.glob("*.tar"))
            if tars:
                found += _utkface_files(tars)
                continue
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.name.lower().endswith(".jpg"))
            if not files:
                raise DataError(f"{item} holds neither .tar files nor .jpg images; pass the UTKFace tar files or "
                                "the extracted UTKFace folder")
            found += [(p.name, ImageEntry(str(p.relative_to(item)), str(p), None, 0, p.stat().st_size, None, {}))
                      for p in files]
        elif item.is_file():
            size = item.stat().st_size
            try:
                with tarfile.open(item, "r:") as tar:
                    members = []
                    for m in tar:  # every header checked before anything is read from it
                        jpg = m.name.lower().endswith(".jpg")
                        check_tar_member(item, m, min(size, MAX_IMAGE_BYTES) if jpg else size)
                        if m.isfile() and jpg:
                            members.append(m)
            except tarfile.ReadError as err:
                raise DataError(f"{item}: not an uncompressed tar file ({err}); decompress it first (tar files are "
                                "read in place) or extract it and pass the folder") from err
            found += [(Path(m.name).name, ImageEntry(f"{item.name}:{m.name}", str(item), m.name, m.offset_data,
                                                     m.size, None, {})) for m in members]
        else:
            raise DataError(f"UTKFace input {item} not found; pass the UTKFace-0*.tar files or a folder")
    return found


@dataclass
class UTKFaceScan:
    entries: list[ImageEntry]
    attribute_names: dict[str, list[str]]
    race_unknown: int
    bad_names: list[str]


def scan_utkface(inputs: str | Path | Sequence[str | Path], limit: int | None = None,
                 age_edges: Sequence[int] = UTK_AGE_EDGES, skip_bad: bool = False) -> UTKFaceScan:
    """UTKFace images in id order (sorted by file name, then container) with their attributes."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    age_names = age_bucket_names(age_edges)
    edges = np.asarray(age_edges)
    files = sorted(_utkface_files(inputs), key=lambda f: (f[0], f[1].name))
    entries, bad_names, race_unknown = [], [], 0
    for file_name, entry in files:
        parsed = parse_utkface_name(file_name)
        if parsed is None:
            if not skip_bad:
                raise DataError(f"image {entry.name}: the name does not follow UTKFace's "
                                "<age>_<gender 0|1>_<race 0-4>_<date>.jpg.chip.jpg; rename it, or pass --skip-bad")
            bad_names.append(entry.name)
            continue
        age, gender, race = parsed
        race_unknown += race < 0
        entry.attrs = {"race": race, "gender": gender, "age": int(np.searchsorted(edges, age, side="right"))}
        entries.append(entry)
        if limit is not None and len(entries) >= limit:
            break
    if race_unknown:
        LOG.info("UTKFace: %d images have no race field in their name; their race is unknown (-1)", race_unknown)
    return UTKFaceScan(entries, {"race": list(UTK_RACES), "gender": list(UTK_GENDERS), "age": age_names},
                       int(race_unknown), bad_names)


def write_utkface_shards(out_dir: str | Path, inputs: str | Path | Sequence[str | Path], limit: int | None = None,
                         age_edges: Sequence[int] = UTK_AGE_EDGES, shard_rows: int = 4096, workers: int = 1,
                         check: str = "decode", skip_bad: bool = False, prefix: str = "utkface",
                         progress: bool = True) -> Manifest:
    """Write UTKFace (tar files or folder) as image shards: attributes race, gender, age bucket;
    identity unknown. ``limit`` keeps the first images in id order."""
    scan = scan_utkface(inputs, limit, age_edges, skip_bad)
    LOG.info("UTKFace: %d images", len(scan.entries))
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    source = {"source": "utkface", "inputs": [str(Path(i).resolve()) for i in inputs], "limit": limit,
              "age_edges": list(age_edges), "race_unknown": scan.race_unknown, "identity": None,
              "skipped_bad": len(scan.bad_names), "bad_files_first": [f"{n}: name does not follow the pattern"
                                                                       for n in scan.bad_names[:20]]}
    return write_image_entries(out_dir, scan.entries, scan.attribute_names, source, shard_rows=shard_rows,
                               workers=workers, check=check, skip_bad=skip_bad, prefix=prefix, num_identities=0,
                               progress=progress)


# --------------------------------------------------------------------------- command line

def _add_image_output_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    """Checking options plus the common ``--out``, ``--shard-rows`` (default 4096 images), ``--workers``."""
    from dist_fair.data.cli import add_common_arguments

    parser.add_argument("--check", choices=CHECKS, default="decode",
                        help="decode: decode every JPEG completely (catches truncated files); header: JPEG marker "
                             "and header only (faster)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave unreadable or non-JPEG images out (counted in the manifest) instead of failing")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images in id order")
    add_common_arguments(parser)
    parser.set_defaults(shard_rows=4096)
    parser.add_argument("--prefix", default=prefix, help="shard file name prefix")


def add_images_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-fair shards images``."""
    parser.add_argument("--root", required=True, help="folder laid out as <group>/<identity>/*.jpg (BUPT layout)")
    parser.add_argument("--attribute", default="race", help="protected attribute the group folders stand for")
    _add_image_output_arguments(parser, "images")


def run_images(args: argparse.Namespace) -> Manifest:
    return write_images_shards(args.out, args.root, attribute=args.attribute, limit=args.limit,
                               shard_rows=args.shard_rows, workers=args.workers, check=args.check,
                               skip_bad=args.skip_bad, prefix=args.prefix)


def _age_edges(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"age edges must be comma-separated integers, e.g. 20,40,60 ({err})")


def add_utkface_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-fair shards utkface``."""
    parser.add_argument("--input", nargs="+", required=True,
                        help="UTKFace-0*.tar files, a folder holding them, or the extracted UTKFace folder")
    parser.add_argument("--age-edges", type=_age_edges, default=UTK_AGE_EDGES,
                        help="age bucket edges: 20,40,60 gives 0-19, 20-39, 40-59, 60+")
    _add_image_output_arguments(parser, "utkface")


def run_utkface(args: argparse.Namespace) -> Manifest:
    return write_utkface_shards(args.out, args.input, limit=args.limit, age_edges=args.age_edges,
                                shard_rows=args.shard_rows, workers=args.workers, check=args.check,
                                skip_bad=args.skip_bad, prefix=args.prefix)
