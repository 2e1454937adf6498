"""Face images laid out one folder per person (``<root>/<Person>/<image>.jpg``) as image shards.

The layout of LFW, CASIA-WebFace and VGGFace2. Inputs are folders or uncompressed tar files,
several at once (LFW's four ``lfw-deepfunneled-0*.tar`` with the common top folder
``lfw-deepfunneled/``); a folder holding ``.tar`` files stands for those tar files. Tar files are
read in place: every member's header is checked with ``tar_safety.check_tar_member`` (absolute or
``..`` names, links, devices, images declaring more than ``images.MAX_IMAGE_BYTES`` (64 MiB) and
members declaring more bytes than the tar file has are refused, naming file, member, reason and
fix) and its bytes are later read at the member's offset, never extracted. Images are checked
while written as in ``images.write_image_entries`` (JPEG marker, pixel cap, full decode).

- Person: the folder an image sits in (the last folder of its path: ``lfw-deepfunneled/AJ_Cook/
  AJ_Cook_0001.jpg`` -> ``AJ_Cook``), so top folders and tar boundaries do not matter; an image
  with no folder is an error, as is the same ``Person/file`` in two places.
- Images: ``.jpg`` / ``.jpeg`` files (image shards hold JPEG bytes unchanged); other files are
  skipped and counted in ``source["ignored_files"]``; hidden files (``.name``) are skipped.
- Order: samples sorted by (person, file name); identities numbered 0, 1, ... in sorted person
  order, names in ``identity_names.json`` (``images.IDENTITY_NAMES_FILE``). For LFW this is the
  tar order, the row order of ``lfw_dlib128.npz``.
- Selection, in this order: ``min_images`` keeps people with at least that many images;
  ``people_limit`` the first people (sorted); ``limit`` the first images in id order.
  ``identity_names.json`` lists exactly the people kept.
- Protected attributes: side files joined by image or person name (``attribute_files``); unknown
  and conflicting values are -1 and counted in ``source["attribute_unknown"]``.

API::

    scan_identity_folders(inputs, limit=None, people_limit=None, min_images=1) -> IdentityScan
    write_identity_folder_shards(out_dir, inputs, attribute_files=(), limit=None, people_limit=None,
                                 min_images=1, multi_label="unknown", shard_rows=1024, workers=1,
                                 check="decode", skip_bad=False, prefix="faces", progress=True) -> Manifest
"""
from __future__ import annotations

import argparse
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dist_fair.data.attribute_files import (
    JOINS, MULTI_LABEL, SPEC_HELP, AttributeFile, AttributeJoin, join_attributes, parse_attribute_spec,
)
from dist_fair.data.images import IDENTITY_NAMES_FILE, MAX_IMAGE_BYTES, ImageEntry, write_image_entries
from dist_fair.data.schema import Manifest
from dist_fair.data.tar_safety import check_tar_member
from dist_fair.errors import DataError
from dist_fair.io_atomic import atomic_write_json

LOG = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class FaceFile:
    """One image found: its person, file name and where its bytes are (``entry``, labels unset)."""

    person: str
    file_name: str
    entry: ImageEntry


@dataclass
class IdentityScan:
    """The images kept, in id order, with their people; ``entries[i].identity`` indexes
    ``identity_names``."""

    entries: list[ImageEntry]
    persons: list[str]
    file_names: list[str]
    identity_names: list[str]
    inputs: list[str]
    ignored_files: int = 0
    ignored_first: list[str] = field(default_factory=list)

    @property
    def samples(self) -> list[tuple[str, str]]:
        """(person, file name) of every image, for ``attribute_files.join_attributes``."""
        return list(zip(self.persons, self.file_names))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _person_and_file(parts: Sequence[str], where: str) -> tuple[str, str]:
    parts = [p for p in parts if p not in ("", ".")]
    if len(parts) < 2:
        raise DataError(f"{where}: the image is not inside a person folder; expected <Person>/<image>.jpg "
                        "(one folder per person), move it into its person's folder")
    return parts[-2], parts[-1]


def _tar_files(tar_path: Path) -> tuple[list[FaceFile], list[str]]:
    """Images of one uncompressed tar (headers checked), and the names of other files."""
    found, ignored = [], []
    file_bytes = tar_path.stat().st_size
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                limit = min(file_bytes, MAX_IMAGE_BYTES) if _is_image(member.name) else file_bytes
                check_tar_member(tar_path, member, limit)
                if member.isdir():
                    continue
                parts = member.name.split("/")
                if parts[-1].startswith("."):
                    continue
                if not _is_image(parts[-1]):
                    ignored.append(f"{tar_path.name}:{member.name}")
                    continue
                person, file_name = _person_and_file(parts, f"tar file {tar_path}, member {member.name!r}")
                found.append(FaceFile(person, file_name, ImageEntry(
                    name=f"{tar_path.name}:{member.name}", path=str(tar_path), member=member.name,
                    offset=member.offset_data, size=member.size, identity=None, attrs={})))
    except tarfile.ReadError as err:
        raise DataError(f"{tar_path}: not an uncompressed tar file ({err}); decompress it first (tar files are read "
                        "in place) or extract it and pass the folder") from err
    return found, ignored


def _folder_files(root: Path) -> tuple[list[FaceFile], list[str]]:
    found, ignored = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(folder) / name
            relative = path.relative_to(root)
            if not _is_image(name):
                ignored.append(str(relative))
                continue
            person, file_name = _person_and_file(relative.parts, f"image {path}")
            found.append(FaceFile(person, file_name, ImageEntry(
                name=str(relative), path=str(path), member=None, offset=0, size=path.stat().st_size,
                identity=None, attrs={})))
    return found, ignored


def find_face_files(inputs: str | Path | Sequence[str | Path]) -> tuple[list[FaceFile], list[str]]:
    """Every image of the inputs (folders, tar files, folders of tar files), unsorted; and the
    names of the non-image files skipped."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not inputs:
        raise DataError("no input given; pass person-per-folder image folders or tar files")
    found: list[FaceFile] = []
    ignored: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            tars = sorted(item.glob("*.tar"))
            part, skipped = (_merge(map(_tar_files, tars)) if tars else _folder_files(item))
        elif item.is_file():
            part, skipped = _tar_files(item)
        else:
            raise DataError(f"input {item} not found; pass a folder laid out <Person>/<image>.jpg, or tar files "
                            "holding that layout")
        if not part:
            raise DataError(f"input {item} holds no .jpg images; expected <Person>/<image>.jpg (one folder per person)")
        found += part
        ignored += skipped
    return found, ignored


def _merge(results: Any) -> tuple[list[FaceFile], list[str]]:
    found, ignored = [], []
    for part, skipped in results:
        found += part
        ignored += skipped
    return found, ignored


def scan_identity_folders(inputs: str | Path | Sequence[str | Path], limit: int | None = None,
                          people_limit: int | None = None, min_images: int = 1) -> IdentityScan:
    """The images of the inputs in id order (sorted person, then file), numbered by person; the
    selection rules (``min_images``, then ``people_limit``, then ``limit``) are in the module
    docstring."""
    for name, value in (("limit", limit), ("people_limit", people_limit), ("min_images", min_images)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files, ignored = find_face_files(inputs)
    files.sort(key=lambda f: (f.person, f.file_name))
    for a, b in zip(files, files[1:]):
        if (a.person, a.file_name) == (b.person, b.file_name):
            raise DataError(f"image {a.person}/{a.file_name} is in two places ({a.entry.name} and {b.entry.name}); "
                            "keep one copy")
    per_person = Counter(f.person for f in files)
    people = sorted(p for p, count in per_person.items() if count >= min_images)
    if people_limit is not None:
        people = people[:people_limit]
    if not people:
        raise DataError(f"no person has at least {min_images} images in {[str(i) for i in inputs]}")
    number = {person: i for i, person in enumerate(people)}
    kept = [f for f in files if f.person in number]
    if limit is not None:
        kept = kept[:limit]
    identity_names = people[: number[kept[-1].person] + 1]
    entries = []
    for f in kept:
        f.entry.identity = number[f.person]
        entries.append(f.entry)
    if ignored:
        LOG.warning("skipped %d files that are not .jpg images (e.g. %s)", len(ignored), ignored[0])
    return IdentityScan(entries, [f.person for f in kept], [f.file_name for f in kept], identity_names,
                        [str(Path(i).resolve()) for i in inputs], len(ignored), ignored[:20])


def apply_attributes(scan: IdentityScan, attribute_files: Sequence[AttributeFile],
                     multi_label: str = "unknown") -> AttributeJoin:
    """Join the attribute files to the scan's images and set every entry's ``attrs``."""
    joined = join_attributes(scan.samples, attribute_files, multi_label)
    for position, entry in enumerate(scan.entries):
        entry.attrs = {name: int(codes[position]) for name, codes in joined.codes.items()}
    return joined


def write_scan_shards(out_dir: str | Path, scan: IdentityScan, joined: AttributeJoin, source: dict[str, Any],
                      shard_rows: int = 1024, workers: int = 1, check: str = "decode", skip_bad: bool = False,
                      prefix: str = "faces", progress: bool = True) -> Manifest:
    """Write a scan (attributes applied) as image shards plus ``identity_names.json``."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / IDENTITY_NAMES_FILE, scan.identity_names)
    source = dict(source, inputs=scan.inputs, identity_names_file=IDENTITY_NAMES_FILE, people=len(scan.identity_names),
                  ignored_files=scan.ignored_files, ignored_first=scan.ignored_first, **joined.source_fields())
    LOG.info("%d images of %d people, attributes %s", len(scan.entries), len(scan.identity_names), joined.names)
    return write_image_entries(out_dir, scan.entries, joined.names, source, shard_rows=shard_rows, workers=workers,
                               check=check, skip_bad=skip_bad, prefix=prefix, num_identities=len(scan.identity_names),
                               progress=progress)


def write_identity_folder_shards(out_dir: str | Path, inputs: str | Path | Sequence[str | Path],
                                 attribute_files: Sequence[AttributeFile] = (), limit: int | None = None,
                                 people_limit: int | None = None, min_images: int = 1, multi_label: str = "unknown",
                                 shard_rows: int = 1024, workers: int = 1, check: str = "decode",
                                 skip_bad: bool = False, prefix: str = "faces", progress: bool = True) -> Manifest:
    """Write person-per-folder images (folders or tar files) as image shards (module docstring).

    Args:
        out_dir: the shard folder (finished shards of an identical earlier run are kept).
        inputs: folders ``<Person>/<image>.jpg``, tar files holding that layout, or folders of tar files.
        attribute_files: protected attributes joined by image or person name (``attribute_files.py``).
        limit / people_limit / min_images: selection (module docstring).
        multi_label: a value with several labels is "unknown" (default) or its "first" label.
        shard_rows: images per shard (small shards make the embed stage resumable at a fine grain).
        check, skip_bad: image checks as in ``images.write_image_entries``.
    """
    scan = scan_identity_folders(inputs, limit, people_limit, min_images)
    joined = apply_attributes(scan, attribute_files, multi_label)
    source = {"source": "identity_folders", "limit": limit, "people_limit": people_limit, "min_images": min_images,
              "multi_label": multi_label}
    return write_scan_shards(out_dir, scan, joined, source, shard_rows=shard_rows, workers=workers, check=check,
                             skip_bad=skip_bad, prefix=prefix, progress=progress)


# --------------------------------------------------------------------------- command line

def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--people-limit``, ``--min-images`` and ``--multi-label`` (shared with the LFW preset)."""
    parser.add_argument("--people-limit", type=int, default=None,
                        help="only the first N people in sorted name order (after --min-images)")
    parser.add_argument("--min-images", type=int, default=1,
                        help="only people with at least this many images (e.g. 2 drops single-image people)")
    parser.add_argument("--multi-label", choices=MULTI_LABEL, default="unknown",
                        help="an attribute value with several comma-separated labels: unknown (-1, counted as "
                             "conflicting) or its first label")


def add_image_shard_arguments(parser: argparse.ArgumentParser, prefix: str) -> None:
    """The image checking and output options, with 1,024 images per shard by default."""
    from dist_fair.data.images import _add_image_output_arguments

    _add_image_output_arguments(parser, prefix)
    parser.set_defaults(shard_rows=1024)


def add_faces_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-fair shards faces``."""
    parser.add_argument("--input", nargs="+", required=True,
                        help="folders laid out <Person>/<image>.jpg, uncompressed tar files holding that layout "
                             "(any top folders), or folders of such tar files")
    parser.add_argument("--attribute", action="append", default=[], metavar="SPEC", help=SPEC_HELP)
    parser.add_argument("--join", choices=JOINS, default="auto",
                        help="match attribute-file keys to image file names or to person (folder) names; auto: "
                             "image when some key ends in an image suffix such as .jpg")
    parser.add_argument("--key-column", default=None,
                        help="the key column of CSV attribute files (when not given: the first column)")
    add_selection_arguments(parser)
    add_image_shard_arguments(parser, "faces")


def run_faces(args: argparse.Namespace) -> Manifest:
    files = [parse_attribute_spec(s, join=args.join, key_column=args.key_column) for s in args.attribute]
    return write_identity_folder_shards(args.out, args.input, files, limit=args.limit, people_limit=args.people_limit,
                                        min_images=args.min_images, multi_label=args.multi_label,
                                        shard_rows=args.shard_rows, workers=args.workers, check=args.check,
                                        skip_bad=args.skip_bad, prefix=args.prefix)
