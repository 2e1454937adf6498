"""Labeled Faces in the Wild (``../shared/data/lfw``, data/README.md) as shards, with gender and race.

LFW is one folder per person (``identity_folders.py``): identities are the people, in sorted name
order; images in (person, file) order, which is the order of the four tar files and the row order
of the reference descriptors ``lfw_dlib128.npz``. Protected attributes from the side files
(``attribute_files.py``):

- ``gender``: ``lfw_female_names.txt`` -> female, ``lfw_male_names.txt`` -> male, joined by image
  name. Of 13,233 images 5 are in both lists (conflicting) and 3 in neither (missing): unknown (-1).
- ``race``: ``lfw_race_dict.json`` person -> race, joined by person (866 people). A value with two
  labels (``"african,caucasian"``, 91 people) is conflicting -> unknown, or with
  ``multi_label="first"`` its first label; people not in the file are missing -> unknown.

The counts land in the manifest's ``source["attribute_unknown"]``.

API (used by ``benchmarks/bench_faces.py``)::

    lfw_attribute_files(lfw_dir) -> list[AttributeFile]
    lfw_image_inputs(lfw_dir) -> list[Path]
    scan_lfw(lfw_dir, limit=None, people_limit=None, min_images=1, multi_label="unknown") -> LFWScan
    write_lfw_shards(out_dir, lfw_dir, limit=None, people_limit=None, min_images=1, multi_label="unknown",
                     shard_rows=1024, workers=1, check="decode", skip_bad=False, prefix="lfw",
                     progress=True) -> Manifest                     # image shards
    lfw_attributes_for_names(names, lfw_dir, multi_label="unknown") -> AttributeJoin
    write_lfw_descriptor_shards(out_dir, lfw_dir, descriptors=None, multi_label="unknown",
                                shard_rows=65536, dtype="float32", workers=1,
                                prefix="lfw-dlib128") -> Manifest   # embedding shards of lfw_dlib128.npz
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dist_fair.data.attribute_files import AttributeFile, AttributeJoin, join_attributes
from dist_fair.data.identity_folders import (
    IdentityScan, add_image_shard_arguments, add_selection_arguments, apply_attributes, scan_identity_folders,
    write_scan_shards,
)
from dist_fair.data.schema import Manifest
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

TAR_GLOB = "lfw-deepfunneled-*.tar"
FOLDER = "lfw-deepfunneled"
FEMALE_NAMES = "lfw_female_names.txt"
MALE_NAMES = "lfw_male_names.txt"
RACE_FILE = "lfw_race_dict.json"
DESCRIPTORS = "lfw_dlib128.npz"


def lfw_attribute_files(lfw_dir: str | Path) -> list[AttributeFile]:
    """gender from the two name lists (by image), race from the JSON (by person); files that are
    absent are left out with a warning."""
    lfw_dir = Path(lfw_dir)
    specs = [AttributeFile("gender", str(lfw_dir / FEMALE_NAMES), "list", value="female", join="image"),
             AttributeFile("gender", str(lfw_dir / MALE_NAMES), "list", value="male", join="image"),
             AttributeFile("race", str(lfw_dir / RACE_FILE), "json", join="person")]
    present = [s for s in specs if Path(s.path).is_file()]
    for missing in (s for s in specs if s not in present):
        LOG.warning("LFW attribute file %s not found; %s is left out", missing.path, missing.attribute)
    return present


def lfw_image_inputs(lfw_dir: str | Path) -> list[Path]:
    """The LFW tar files of ``lfw_dir`` or, when there are none, its extracted ``lfw-deepfunneled`` folder."""
    lfw_dir = Path(lfw_dir)
    tars = sorted(lfw_dir.glob(TAR_GLOB))
    if tars:
        return tars
    if (lfw_dir / FOLDER).is_dir():
        return [lfw_dir / FOLDER]
    raise DataError(f"{lfw_dir}: neither {TAR_GLOB} nor a {FOLDER}/ folder found; pass the folder holding LFW "
                    "(../shared/data/lfw, see data/README.md)")


@dataclass
class LFWScan:
    """LFW's images in id order with identities, and the attribute join (codes set on the entries)."""

    scan: IdentityScan
    attributes: AttributeJoin

    @property
    def entries(self):
        return self.scan.entries

    @property
    def identity_names(self) -> list[str]:
        return self.scan.identity_names

    @property
    def file_names(self) -> list[str]:
        return self.scan.file_names


def scan_lfw(lfw_dir: str | Path, limit: int | None = None, people_limit: int | None = None, min_images: int = 1,
             multi_label: str = "unknown") -> LFWScan:
    """LFW's images (tar files or extracted folder) with identity, gender and race."""
    scan = scan_identity_folders(lfw_image_inputs(lfw_dir), limit, people_limit, min_images)
    return LFWScan(scan, apply_attributes(scan, lfw_attribute_files(lfw_dir), multi_label))


def write_lfw_shards(out_dir: str | Path, lfw_dir: str | Path, limit: int | None = None,
                     people_limit: int | None = None, min_images: int = 1, multi_label: str = "unknown",
                     shard_rows: int = 1024, workers: int = 1, check: str = "decode", skip_bad: bool = False,
                     prefix: str = "lfw", progress: bool = True) -> Manifest:
    """LFW as image shards (JPEG bytes unchanged) with identity, gender and race; options as in
    ``identity_folders.write_identity_folder_shards``."""
    lfw = scan_lfw(lfw_dir, limit, people_limit, min_images, multi_label)
    source = {"source": "lfw", "lfw_dir": str(Path(lfw_dir).resolve()), "limit": limit, "people_limit": people_limit,
              "min_images": min_images, "multi_label": multi_label}
    return write_scan_shards(out_dir, lfw.scan, lfw.attributes, source, shard_rows=shard_rows, workers=workers,
                             check=check, skip_bad=skip_bad, prefix=prefix, progress=progress)


def lfw_attributes_for_names(names: Sequence[str], lfw_dir: str | Path, multi_label: str = "unknown") -> AttributeJoin:
    """gender and race codes for LFW image names (``Name_0001.jpg``, e.g. ``lfw_dlib128.npz["names"]``)."""
    from dist_fair.data.features import person_of_image_name

    samples = [(person_of_image_name(n, i), str(n).replace("\\", "/").rsplit("/", 1)[-1]) for i, n in enumerate(names)]
    return join_attributes(samples, lfw_attribute_files(lfw_dir), multi_label)


def write_lfw_descriptor_shards(out_dir: str | Path, lfw_dir: str | Path, descriptors: str | Path | None = None,
                                multi_label: str = "unknown", shard_rows: int = 65536, dtype: str = "float32",
                                workers: int = 1, prefix: str = "lfw-dlib128") -> Manifest:
    """The reference dlib descriptors (``lfw_dlib128.npz``: names, emb, no_face) as embedding shards,
    L2-normalised (METHODS.md §1), with identity from the person part of each name and gender and
    race joined as for the images; ``source["no_face"]`` counts the rows without a detected face."""
    import numpy as np

    from dist_fair.data.features import npz_array, npz_keys, write_feature_shards

    descriptors = Path(descriptors) if descriptors is not None else Path(lfw_dir) / DESCRIPTORS
    if not descriptors.is_file():
        raise DataError(f"LFW descriptors {descriptors} not found; pass the lfw_dlib128.npz file (data/README.md)")
    no_face = np.asarray(npz_array(descriptors, "no_face")) if "no_face" in npz_keys(descriptors) else None
    extra = {} if no_face is None else {"no_face": int(no_face.sum()),
                                        "no_face_ids": np.nonzero(no_face)[0].tolist()}
    return write_feature_shards(out_dir, descriptors, emb_key="emb", names_key="names",
                                attribute_files=lfw_attribute_files(lfw_dir), multi_label=multi_label,
                                shard_rows=shard_rows, dtype=dtype, workers=workers, prefix=prefix,
                                extra_source=dict(extra, source_preset="lfw"))


# --------------------------------------------------------------------------- command line

def add_lfw_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-fair shards lfw``."""
    parser.add_argument("--input", required=True,
                        help=f"the LFW folder: {TAR_GLOB} (or an extracted {FOLDER}/), {FEMALE_NAMES}, "
                             f"{MALE_NAMES}, {RACE_FILE} (e.g. ../shared/data/lfw)")
    parser.add_argument("--descriptors", nargs="?", const="", default=None, metavar="NPZ",
                        help=f"write embedding shards of the reference descriptors instead of image shards "
                             f"(default file: INPUT/{DESCRIPTORS}); L2-normalised, with the same identities and "
                             "attributes")
    add_selection_arguments(parser)
    add_image_shard_arguments(parser, "lfw")


def run_lfw(args: argparse.Namespace) -> Manifest:
    if args.descriptors is not None:
        if args.limit or args.people_limit or args.min_images != 1 or args.skip_bad:
            raise DataError("--descriptors writes every row of the descriptor file; --limit, --people-limit, "
                            "--min-images and --skip-bad apply to images only")
        return write_lfw_descriptor_shards(args.out, args.input, args.descriptors or None,
                                           multi_label=args.multi_label, shard_rows=args.shard_rows,
                                           workers=args.workers,
                                           prefix="lfw-dlib128" if args.prefix == "lfw" else args.prefix)
    return write_lfw_shards(args.out, args.input, limit=args.limit, people_limit=args.people_limit,
                            min_images=args.min_images, multi_label=args.multi_label, shard_rows=args.shard_rows,
                            workers=args.workers, check=args.check, skip_bad=args.skip_bad, prefix=args.prefix)
