"""Precomputed embeddings (``.npy``, ``.npz``, learn-to-cluster ``.bin`` + ``.meta``) as embedding shards.

Inputs (``layout``):

- ``npy``: one (N, d) array, read in place (its header gives the offset of row 0).
- ``npz``: arrays named by key: embeddings ``emb_key`` (default ``emb``, or the only 2-D array),
  identity labels ``label_key``, per-row image names ``names_key``, protected attributes
  ``group_keys`` (attribute -> key). Members stored uncompressed (``np.savez``) are read in place
  at their offset inside the zip (``npz_array`` memory-maps them); compressed ones
  (``np.savez_compressed``) must be read into memory.
- ``bin``: the learn-to-cluster layout: raw little-endian float32 rows, ``dim`` required and
  checked (file size must be ``rows * 4 * dim``), read in place; identity labels from a ``.meta``
  file, one integer a line (default: ``<stem>.meta`` beside the ``.bin`` or in a sibling
  ``labels/`` folder of ``features/``); its line count must equal the rows.

``allow_pickle`` is never set: an object array is refused naming file and key.

Labels and attributes (all optional, all -1 where unknown):

- identity: integer labels are kept as they are (-1 = unknown); string labels are numbered in
  sorted order and the names written to ``identity_names.json``. With ``names_key`` and no other
  label, the identity is the person of each image name (``Person/file.jpg`` -> ``Person``,
  ``Name_0001.jpg`` -> ``Name``; LFW's convention), numbered in sorted person order like
  ``identity_folders.py``.
- attributes from ``group_keys`` arrays or the columns ``csv_attributes`` of ``attributes_csv``
  (one row per embedding, in row order): the distinct values, sorted (numerically when all are
  numbers), are the group names; a negative integer, an empty string or an empty CSV field (or a
  ``table.MISSING`` marker) is unknown, counted in ``source["attribute_unknown"]``.
- attributes from side files joined by the image names (``attribute_files``, same rules as for
  image folders, see ``attribute_files.py``).

Every row is checked before anything is written: rows holding NaN or Inf, or all zeros (no
direction), are refused naming the first rows and their count. Rows are L2-normalised on write,
``x_i / ||x_i||_2`` (computed in float64; METHODS.md §1: embeddings are L2-normalised), and stored
as ``dtype`` (float32 by default). Reading is streamed: the check and the writers read
``block_rows`` rows at a time at their byte offset (row-major files; column-major ones through a
memory map), so a 5M x 512 file is never in memory at all, let alone twice; with ``workers > 1``
each Ray task reads the file itself (the producer carries only its path and offsets).

API::

    write_feature_shards(out_dir, path, emb_key=None, dim=None, labels=None, label_key=None,
                         names_key=None, group_keys=None, attributes_csv=None, csv_attributes=(),
                         csv_identity=None, attribute_files=(), multi_label="unknown", limit=None,
                         shard_rows=65536, block_rows=4096, dtype="float32", workers=1,
                         prefix="features", extra_source=None) -> Manifest
    load_features(path, ...same selection arguments...) -> FeatureSet     # arrays, nothing written
    open_embeddings(path, emb_key=None, dim=None) -> EmbeddingFile
    npz_array(path, key) -> np.ndarray                                    # memory-mapped when stored
    read_label_lines(path) -> np.ndarray                                  # a .meta file
    person_of_image_name(name, row=None) -> str
"""
from __future__ import annotations

import argparse
import logging
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dist_fair.data.attribute_files import (
    JOINS, MULTI_LABEL, SPEC_HELP, AttributeFile, join_attributes, parse_attribute_spec,
)
from dist_fair.data.images import IDENTITY_NAMES_FILE
from dist_fair.data.schema import Manifest
from dist_fair.data.shards import UNKNOWN, Block, ShardPlan, plan_shards, write_shard_set
from dist_fair.errors import DataError
from dist_fair.io_atomic import atomic_write_json

LOG = logging.getLogger(__name__)

LAYOUTS = {".npy": "npy", ".npz": "npz", ".bin": "bin"}
CHECK_BYTES = 1 << 25          # rows per finiteness-check chunk: about 32 MiB of input
FIRST_ROWS_SHOWN = 10


# --------------------------------------------------------------------------- opening arrays

@dataclass(frozen=True)
class EmbeddingFile:
    """Where the embedding rows are: ``path`` and, for a memory map, the byte ``offset`` of row 0,
    ``dtype``, ``shape`` and ``fortran`` order. ``offset`` None: a compressed ``.npz`` member,
    read into ``in_memory``."""

    path: str
    layout: str
    key: str | None
    dtype: str
    shape: tuple[int, int]
    offset: int | None
    fortran: bool = False
    in_memory: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def open(self) -> np.ndarray:
        """The rows as an array (a read-only memory map unless ``in_memory``)."""
        if self.offset is None:
            return self.in_memory
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=self.offset, shape=self.shape,
                         order="F" if self.fortran else "C")

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a fresh array. Row-major files are read with ``np.fromfile`` at the
        rows' offset, so no mapping of the whole file stays resident between blocks."""
        stop = min(stop, self.rows)
        if self.offset is None or self.fortran:
            return np.array(self.open()[start:stop])
        dtype = np.dtype(self.dtype)
        rows = max(0, stop - start)
        out = np.fromfile(self.path, dtype=dtype, count=rows * self.dim,
                          offset=self.offset + start * dtype.itemsize * self.dim)
        if out.size != rows * self.dim:
            raise DataError(f"{self.path}: rows {start}..{stop} are past the end of the file (truncated?)")
        return out.reshape(rows, self.dim)


def _refuse_object(dtype: np.dtype, where: str) -> None:
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (dtype {dtype}); dist_fair never unpickles data - save it as a "
                        "numeric or string array (np.save(..., allow_pickle=False))")


def _npy_header(handle: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        if version in ((2, 0), (3, 0)):
            return np.lib.format.read_array_header_2_0(handle)
        raise ValueError(f"unsupported .npy version {version}")
    except ValueError as err:
        if "allow_pickle" in str(err) or "object" in str(err).lower():
            raise DataError(f"{where}: holds Python objects; dist_fair never unpickles data - save it as a numeric "
                            "or string array") from err
        raise DataError(f"{where}: not a valid .npy array ({err})") from err


def _npz_member(path: Path, key: str) -> zipfile.ZipInfo:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({err}); write it with np.savez") from err
    with archive:
        names = archive.namelist()
        if f"{key}.npy" not in names:
            keys = [n[:-4] for n in names if n.endswith(".npy")]
            raise DataError(f"{path}: no array {key!r}; the file holds {keys} - pass the right key")
        return archive.getinfo(f"{key}.npy")


def npz_keys(path: str | Path) -> list[str]:
    """The array names of an ``.npz`` file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz file ({err}); write it with np.savez") from err


def _npz_layout(path: Path, key: str) -> tuple[int | None, tuple[int, ...], bool, np.dtype]:
    """(data offset or None when compressed, shape, fortran, dtype) of member ``key``."""
    info = _npz_member(path, key)
    where = f"{path}, array {key!r}"
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise DataError(f"{where}: corrupt zip entry header; rewrite the file")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        if info.compress_type != zipfile.ZIP_STORED:
            with zipfile.ZipFile(path) as archive, archive.open(info) as member:
                shape, fortran, dtype = _npy_header(member, where)
            _refuse_object(dtype, where)
            return None, shape, fortran, dtype
        handle.seek(start)
        shape, fortran, dtype = _npy_header(handle, where)
        _refuse_object(dtype, where)
        offset = handle.tell()
    if offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > start + info.file_size:
        raise DataError(f"{where}: the array is larger than its zip entry (truncated file); rewrite it")
    return offset, shape, fortran, dtype


def npz_array(path: str | Path, key: str) -> np.ndarray:
    """Array ``key`` of an ``.npz``: a read-only memory map when stored uncompressed, else loaded
    (``allow_pickle=False``)."""
    path = Path(path)
    offset, shape, fortran, dtype = _npz_layout(path, key)
    if offset is None:
        with np.load(path, allow_pickle=False) as data:
            return _load_member(data, key, path)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _load_member(data: Any, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except ValueError as err:
        raise DataError(f"{path}, array {key!r}: holds Python objects; dist_fair never unpickles data ({err})") from err


def _check_numeric(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "fiu":
        raise DataError(f"{where}: embeddings must be numbers (float or integer), got dtype {dtype}")


def open_embeddings(path: str | Path, emb_key: str | None = None, dim: int | None = None) -> EmbeddingFile:
    """Locate the embedding rows of ``path`` (layout by suffix) and check their shape."""
    path = Path(path)
    layout = LAYOUTS.get(path.suffix.lower())
    if layout is None:
        raise DataError(f"{path}: unknown embedding file type {path.suffix!r}; use .npy, .npz or .bin (+ .meta)")
    if not path.is_file():
        raise DataError(f"embedding file {path} not found")
    if dim is not None and dim < 1:
        raise DataError(f"--dim must be >= 1, got {dim}")
    if layout == "bin":
        if dim is None:
            raise DataError(f"{path}: a .bin file is raw float32 rows without a header; pass its dimension (--dim)")
        size = path.stat().st_size
        if size % (4 * dim):
            raise DataError(f"{path}: {size:,} bytes is not a whole number of float32 rows of dim {dim} "
                            f"({4 * dim} bytes each; {size % (4 * dim)} bytes left over); check --dim")
        if size == 0:
            raise DataError(f"{path}: the file is empty")
        return EmbeddingFile(str(path), layout, None, "<f4", (size // (4 * dim), dim), 0)
    if layout == "npy":
        with open(path, "rb") as handle:
            shape, fortran, dtype = _npy_header(handle, str(path))
            offset = handle.tell()
        _refuse_object(dtype, str(path))
        key, in_memory = None, None
    else:
        key = emb_key
        if key is None:
            keys = npz_keys(path)
            if "emb" in keys:
                key = "emb"
            else:
                two_d = [k for k in keys if len(_npz_layout(path, k)[1]) == 2]
                if len(two_d) != 1:
                    raise DataError(f"{path}: which array holds the embeddings? keys {keys}; pass --emb-key")
                key = two_d[0]
        offset, shape, fortran, dtype = _npz_layout(path, key)
        in_memory = None if offset is not None else npz_array(path, key)
        if offset is None:
            LOG.warning("%s: array %r is compressed, so it is read into memory; save with np.savez (uncompressed) "
                        "to memory-map it", path, key)
    where = f"{path}" + (f", array {key!r}" if key else "")
    if len(shape) != 2:
        raise DataError(f"{where}: embeddings must be a 2-D array (rows x dim), got shape {shape}")
    _check_numeric(dtype, where)
    if dim is not None and shape[1] != dim:
        raise DataError(f"{where}: rows have {shape[1]} dims, --dim says {dim}")
    if shape[0] == 0:
        raise DataError(f"{where}: no rows")
    return EmbeddingFile(str(path), layout, key, dtype.str, (int(shape[0]), int(shape[1])), offset, bool(fortran),
                         in_memory)


# --------------------------------------------------------------------------- labels

def read_label_lines(path: str | Path) -> np.ndarray:
    """A ``.meta`` file: one integer label a line (int64); a non-integer line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file {path} not found")
    labels = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            text = line.strip()
            try:
                labels.append(int(text))
            except ValueError:
                raise DataError(f"{path}, line {line_number}: label {text!r} is not an integer; a .meta file holds "
                                "one integer label a line") from None
    return np.asarray(labels, np.int64)


def default_meta_path(bin_path: str | Path) -> Path | None:
    """``x.meta`` beside ``x.bin``, or ``../labels/x.meta`` for ``features/x.bin`` (learn-to-cluster)."""
    bin_path = Path(bin_path)
    for candidate in (bin_path.with_suffix(".meta"), bin_path.parent.parent / "labels" / f"{bin_path.stem}.meta"):
        if candidate.is_file():
            return candidate
    return None


def person_of_image_name(name: str, row: int | None = None) -> str:
    """``Person/file.jpg`` -> ``Person``; ``Name_0001.jpg`` -> ``Name`` (LFW)."""
    text = str(name).strip().replace("\\", "/")
    if "/" in text:
        parts = [p for p in text.split("/") if p]
        if len(parts) >= 2:
            return parts[-2]
    stem = text.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    match = re.fullmatch(r"(.+)_\d+", stem)
    if not match:
        where = f"row {row}: " if row is not None else ""
        raise DataError(f"{where}image name {name!r} names no person: expected Person/file.jpg or "
                        "Person_0001.jpg; pass identity labels instead")
    return match.group(1)


def identity_codes(values: np.ndarray, where: str) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels as they are (-1 = unknown); string labels numbered in sorted order (names)."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise DataError(f"{where}: labels must be 1-D (one per row), got shape {values.shape}")
    if values.dtype.kind in "iu":
        labels = values.astype(np.int64)
        if (labels < UNKNOWN).any():
            row = int(np.nonzero(labels < UNKNOWN)[0][0])
            raise DataError(f"{where}: row {row} has label {int(labels[row])}; labels are >= 0 (-1 = unknown)")
        return labels, None
    if values.dtype.kind in "US":
        text = values.astype(str)
        names = sorted(set(text.tolist()) - {""})
        lookup = {n: i for i, n in enumerate(names)}
        return np.array([lookup.get(v, UNKNOWN) for v in text.tolist()], np.int64), names
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        if finite.all() and (values == np.round(values)).all():
            return identity_codes(values.astype(np.int64), where)
    raise DataError(f"{where}: labels must be integers or strings, got dtype {values.dtype}")


def group_codes(values: Sequence[Any] | np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    """Protected attribute values -> (int16 codes, sorted group names); negative integers, empty
    strings and None are unknown."""
    from dist_fair.data.table import sorted_values

    array = np.asarray(values) if not isinstance(values, list) else None
    if array is not None and array.dtype.kind in "iub":
        array = array.astype(np.int64)
        text: list[str | None] = [None if v < 0 else str(v) for v in array.tolist()]
    elif array is not None and array.dtype.kind in "US":
        text = [v or None for v in array.astype(str).tolist()]
    elif array is not None and array.dtype.kind == "f":
        raise DataError(f"{where}: a protected attribute must hold integers or strings (group values), got floats")
    else:
        text = [None if v is None or str(v) == "" else str(v) for v in values]
    names = sorted_values(text)
    if not names:
        raise DataError(f"{where}: no values (every row is unknown); choose another column or key")
    if len(names) > np.iinfo(np.int16).max:
        raise DataError(f"{where}: {len(names)} distinct values; a protected attribute must be a small set of groups")
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([UNKNOWN if v is None else lookup[v] for v in text], np.int16), names


# --------------------------------------------------------------------------- checks

def bad_rows(emb: np.ndarray | EmbeddingFile, chunk_rows: int | None = None,
             rows: int | None = None) -> dict[str, tuple[list[int], int]]:
    """{"NaN or Inf": (first rows, count), "all zeros": (...)} over the first ``rows`` of ``emb``
    (an array or an ``EmbeddingFile``), read in chunks of about 32 MiB."""
    if isinstance(emb, EmbeddingFile):
        total, dim, itemsize, read = emb.rows, emb.dim, np.dtype(emb.dtype).itemsize, emb.read_rows
    else:
        (total, dim), itemsize = emb.shape, emb.dtype.itemsize

        def read(start: int, stop: int) -> np.ndarray:
            return np.asarray(emb[start:stop])
    rows = total if rows is None else min(rows, total)
    chunk_rows = chunk_rows or max(1, CHECK_BYTES // max(1, dim * itemsize))
    found: dict[str, tuple[list[int], int]] = {"NaN or Inf": ([], 0), "all zeros": ([], 0)}
    for start in range(0, rows, chunk_rows):
        block = read(start, min(start + chunk_rows, rows))
        for what, mask in (("NaN or Inf", ~np.isfinite(block).all(axis=1) if block.dtype.kind == "f" else None),
                           ("all zeros", ~block.any(axis=1))):
            if mask is None or not mask.any():
                continue
            first, count = found[what]
            hits = np.nonzero(mask)[0] + start
            found[what] = ((first + hits[: FIRST_ROWS_SHOWN - len(first)].tolist()), count + int(hits.size))
    return {k: v for k, v in found.items() if v[1]}


def normalise_rows(block: np.ndarray) -> np.ndarray:
    """``x_i / ||x_i||_2`` in float64 (METHODS.md §1)."""
    x = np.asarray(block, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- the feature set

@dataclass
class FeatureSet:
    """Embeddings (not yet normalised, possibly a memory map) with labels, in row = id order."""

    file: EmbeddingFile
    rows: int
    identity: np.ndarray
    identity_names: list[str] | None
    attrs: dict[str, np.ndarray]
    attribute_names: dict[str, list[str]]
    source: dict[str, Any]

    def embeddings(self) -> np.ndarray:
        """The raw rows (first ``rows``), a memory map where possible."""
        return self.file.open()[: self.rows]


def _take(array: np.ndarray, rows: int, expected: int, where: str) -> np.ndarray:
    if array.shape[0] != expected:
        raise DataError(f"{where}: {array.shape[0]} rows, the embeddings have {expected}; one per embedding row")
    return np.asarray(array[:rows])


def load_features(path: str | Path, emb_key: str | None = None, dim: int | None = None,
                  labels: str | Path | None = None, label_key: str | None = None, names_key: str | None = None,
                  group_keys: Mapping[str, str] | None = None, attributes_csv: str | Path | None = None,
                  csv_attributes: Sequence[str] = (), csv_identity: str | None = None,
                  attribute_files: Sequence[AttributeFile] = (), multi_label: str = "unknown",
                  limit: int | None = None) -> FeatureSet:
    """Open the embeddings and gather identity and attributes (rules in the module docstring).

    Args:
        path: ``.npy``, ``.npz`` or ``.bin``.
        emb_key / label_key / names_key / group_keys: ``.npz`` array names (group_keys: attribute -> key).
        dim: required for ``.bin``, checked otherwise.
        labels: identity labels file (``.meta``/text: one integer a line; ``.npy``); for ``.bin``
            the ``.meta`` is found beside it by default.
        attributes_csv, csv_attributes, csv_identity: a CSV with one row per embedding; the
            protected columns and an identity column.
        attribute_files: side files joined by the image names (needs ``names_key``).
        limit: only the first rows.
    """
    path = Path(path)
    emb_file = open_embeddings(path, emb_key, dim)
    total = emb_file.rows
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    rows = min(total, limit) if limit is not None else total
    npz_only = {"label_key": label_key, "names_key": names_key, "group_keys": group_keys}
    if emb_file.layout != "npz" and any(npz_only.values()):
        raise DataError(f"{path}: {[k for k, v in npz_only.items() if v]} name arrays inside an .npz file; "
                        f"this is a .{emb_file.layout} file")
    source: dict[str, Any] = {"source": "features", "path": str(path.resolve()), "layout": emb_file.layout,
                              "emb_key": emb_file.key, "rows_in_file": total, "limit": limit,
                              "file_bytes": path.stat().st_size, "file_mtime_ns": path.stat().st_mtime_ns,
                              "normalised": "l2"}
    if emb_file.layout == "bin" and labels is None and not csv_identity:
        labels = default_meta_path(path)
        if labels is None:
            LOG.info("%s: no .meta label file beside it or in ../labels/; identities unknown", path)
    label_sources = [s for s, given in (("labels", labels), ("label_key", label_key), ("csv_identity", csv_identity))
                     if given]
    if len(label_sources) > 1:
        raise DataError(f"identity labels given twice ({label_sources}); pass one")
    identity, identity_names = np.full(rows, UNKNOWN, np.int64), None
    if labels is not None:
        labels = Path(labels)
        where = f"label file {labels}"
        values = (np.load(labels, mmap_mode="r", allow_pickle=False) if labels.suffix == ".npy"
                  else read_label_lines(labels))
        identity, identity_names = identity_codes(_take(values, rows, total, where), where)
        source["labels"] = str(labels.resolve())
    elif label_key:
        where = f"{path}, array {label_key!r}"
        identity, identity_names = identity_codes(_take(npz_array(path, label_key), rows, total, where), where)
        source["label_key"] = label_key
    names = None
    if names_key:
        where = f"{path}, array {names_key!r}"
        names = _take(npz_array(path, names_key), rows, total, where)
        if names.dtype.kind not in "US":
            raise DataError(f"{where}: image names must be strings, got dtype {names.dtype}")
        names = names.astype(str).tolist()
        source["names_key"] = names_key
    attrs: dict[str, np.ndarray] = {}
    attribute_names: dict[str, list[str]] = {}
    unknown: dict[str, dict[str, int]] = {}

    def add_attribute(name: str, codes: np.ndarray, groups: list[str], where: str) -> None:
        if name in attrs:
            raise DataError(f"{where}: attribute {name!r} is given twice; give each attribute once")
        attrs[name], attribute_names[name] = codes, groups
        unknown[name] = {"missing": int((codes == UNKNOWN).sum()), "conflicting": 0}

    for name, key in (group_keys or {}).items():
        where = f"{path}, array {key!r}"
        add_attribute(name, *group_codes(_take(npz_array(path, key), rows, total, where), where), where)
    if attributes_csv is not None or csv_attributes or csv_identity:
        if attributes_csv is None:
            raise DataError("csv_attributes / csv_identity need attributes_csv (--attributes-csv)")
        from dist_fair.data.table import read_table

        table = read_table(attributes_csv)
        if len(table) != total:
            raise DataError(f"{attributes_csv}: {len(table)} data rows, the embeddings have {total}; the CSV needs one "
                            "row per embedding, in the same order")
        for column in csv_attributes:
            where = f"{attributes_csv}, column {column!r}"
            add_attribute(column, *group_codes(table.column(column)[:rows], where), where)
        if csv_identity:
            values = table.column(csv_identity)[:rows]
            try:  # integer labels stay as they are, others are numbered in sorted order
                array = np.array([UNKNOWN if v is None else int(v) for v in values], np.int64)
            except ValueError:
                array = np.array([v or "" for v in values])
            identity, identity_names = identity_codes(array, f"{attributes_csv}, column {csv_identity!r}")
        source["attributes_csv"] = str(Path(attributes_csv).resolve())
    if attribute_files:
        if names is None:
            raise DataError("attribute files are joined by image name; name the array of image names (--names-key)")
        samples = [(person_of_image_name(n, i), n.replace("\\", "/").rsplit("/", 1)[-1]) for i, n in enumerate(names)]
        joined = join_attributes(samples, attribute_files, multi_label)
        for name in joined.codes:
            add_attribute(name, joined.codes[name], joined.names[name], f"attribute files of {name!r}")
            unknown[name] = joined.unknown[name]
        source.update(attribute_files=joined.files, attribute_unmatched_keys=joined.unmatched_keys,
                      multi_label=multi_label)
    if names is not None and not label_sources:
        persons = [person_of_image_name(n, i) for i, n in enumerate(names)]
        identity_names = sorted(set(persons))
        lookup = {p: i for i, p in enumerate(identity_names)}
        identity = np.array([lookup[p] for p in persons], np.int64)
        source["identity_from"] = "person part of the image names"
    source["attribute_unknown"] = unknown
    return FeatureSet(emb_file, rows, identity, identity_names, attrs, attribute_names, source)


# --------------------------------------------------------------------------- writing

@dataclass
class NormalisedRows:
    """Producer: the plan's rows read from the file block by block, L2-normalised. Picklable
    without the embeddings (unless they had to be read into memory): every process reads the file itself."""

    file: EmbeddingFile
    identity: np.ndarray
    attrs: dict[str, np.ndarray]
    block_rows: int = 4096

    def __call__(self, plan: ShardPlan) -> Iterator[Block]:
        for start in range(plan.first_id, plan.first_id + plan.rows, self.block_rows):
            stop = min(start + self.block_rows, plan.first_id + plan.rows)
            emb = normalise_rows(self.file.read_rows(start, stop))
            yield Block(ids=np.arange(start, stop, dtype=np.int64), emb=emb,
                        identity=self.identity[start:stop], attrs={a: v[start:stop] for a, v in self.attrs.items()})


def check_rows(features: FeatureSet) -> None:
    """Refuse NaN/Inf and all-zero rows, naming the first rows and the count."""
    problems = bad_rows(features.file, rows=features.rows)
    if problems:
        parts = [f"{count} rows contain {what} (rows {', '.join(map(str, first))}"
                 f"{', ...' if count > len(first) else ''})" for what, (first, count) in problems.items()]
        raise DataError(f"{features.file.path}: {'; '.join(parts)}; such rows cannot be L2-normalised - fix or "
                        "drop them in the source")


def write_feature_set(out_dir: str | Path, features: FeatureSet, shard_rows: int = 65536, block_rows: int = 4096,
                      dtype: str = "float32", workers: int = 1, prefix: str = "features",
                      extra_source: dict[str, Any] | None = None, progress: bool = True) -> Manifest:
    """Check, normalise and write a ``FeatureSet`` as embedding shards (plus ``identity_names.json``)."""
    if block_rows < 1:
        raise DataError(f"block_rows must be >= 1, got {block_rows}")
    check_rows(features)
    out_dir = Path(out_dir)
    source = dict(features.source, **(extra_source or {}))
    if features.identity_names is not None:
        atomic_write_json(out_dir / IDENTITY_NAMES_FILE, features.identity_names)
        source["identity_names_file"] = IDENTITY_NAMES_FILE
    elif (out_dir / IDENTITY_NAMES_FILE).exists():
        (out_dir / IDENTITY_NAMES_FILE).unlink()
    identity = features.identity
    producer = NormalisedRows(features.file, identity, features.attrs, block_rows)
    plans = plan_shards(features.rows, shard_rows, prefix)
    LOG.info("%s: %d rows x %d, %d identities, attributes %s", features.file.path, features.rows, features.file.dim,
             int(np.unique(identity[identity >= 0]).size), features.attribute_names)
    return write_shard_set(out_dir, plans, producer, "embeddings", features.attribute_names, dim=features.file.dim,
                           dtype=dtype, workers=workers, source=source,
                           num_identities=int(np.unique(identity[identity >= 0]).size), progress=progress)


def write_feature_shards(out_dir: str | Path, path: str | Path, emb_key: str | None = None, dim: int | None = None,
                         labels: str | Path | None = None, label_key: str | None = None, names_key: str | None = None,
                         group_keys: Mapping[str, str] | None = None, attributes_csv: str | Path | None = None,
                         csv_attributes: Sequence[str] = (), csv_identity: str | None = None,
                         attribute_files: Sequence[AttributeFile] = (), multi_label: str = "unknown",
                         limit: int | None = None, shard_rows: int = 65536, block_rows: int = 4096,
                         dtype: str = "float32", workers: int = 1, prefix: str = "features",
                         extra_source: dict[str, Any] | None = None, progress: bool = True) -> Manifest:
    """Precomputed embeddings as embedding shards, L2-normalised (arguments as in ``load_features``)."""
    features = load_features(path, emb_key=emb_key, dim=dim, labels=labels, label_key=label_key, names_key=names_key,
                             group_keys=group_keys, attributes_csv=attributes_csv, csv_attributes=csv_attributes,
                             csv_identity=csv_identity, attribute_files=attribute_files, multi_label=multi_label,
                             limit=limit)
    return write_feature_set(out_dir, features, shard_rows=shard_rows, block_rows=block_rows, dtype=dtype,
                             workers=workers, prefix=prefix, extra_source=extra_source, progress=progress)


# --------------------------------------------------------------------------- command line

def _group_key(text: str) -> tuple[str, str]:
    name, _, key = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--group-key {text!r}: expected NAME or NAME=KEY")
    return name, key or name


def _names(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def add_features_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-fair shards features``."""
    from dist_fair.data.cli import add_common_arguments

    parser.add_argument("--input", required=True,
                        help=".npy (one rows x dim array), .npz (arrays named by the --*-key options) or .bin "
                             "(raw float32 rows, learn-to-cluster layout; needs --dim). Rows are L2-normalised on "
                             "write")
    parser.add_argument("--dim", type=int, default=None, help="embedding dimension: required for .bin (checked against "
                                                              "the file size), checked for .npy/.npz")
    parser.add_argument("--emb-key", default=None,
                        help=".npz array of the embeddings (when not given: emb if present, else the only 2-D array)")
    parser.add_argument("--labels", default=None,
                        help="identity labels: a .meta/text file (one integer a line) or a .npy; for .bin the "
                             "<stem>.meta beside it (or in ../labels/) is used when not given")
    parser.add_argument("--label-key", default=None, help=".npz array of identity labels (integers or strings)")
    parser.add_argument("--names-key", default=None,
                        help=".npz array of per-row image names (Person/file.jpg or Name_0001.jpg): the identity is "
                             "the person when no labels are given, and --attribute files are joined by these names")
    parser.add_argument("--group-key", type=_group_key, action="append", default=[], metavar="NAME[=KEY]",
                        help=".npz array holding protected attribute NAME (integers, negative = unknown, or strings, "
                             "empty = unknown); repeat for several")
    parser.add_argument("--attributes-csv", default=None,
                        help="CSV with a header and one row per embedding (same order) holding protected attributes")
    parser.add_argument("--csv-attribute", type=_names, action="append", default=[], metavar="COLUMN[,COLUMN]",
                        help="protected column(s) of --attributes-csv (values are group names, empty = unknown)")
    parser.add_argument("--csv-identity", default=None, help="identity column of --attributes-csv")
    parser.add_argument("--attribute", action="append", default=[], metavar="SPEC",
                        help=f"side file joined by the --names-key image names: {SPEC_HELP}")
    parser.add_argument("--join", choices=JOINS, default="auto",
                        help="match --attribute file keys to image names or to person names (auto: by key suffix)")
    parser.add_argument("--key-column", default=None,
                        help="key column of CSV --attribute files (when not given: the first column)")
    parser.add_argument("--multi-label", choices=MULTI_LABEL, default="unknown",
                        help="an --attribute value with several comma-separated labels: unknown or its first label")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored embedding dtype")
    add_common_arguments(parser)
    parser.add_argument("--block-rows", type=int, default=4096, help="rows per tar sample (block)")
    parser.add_argument("--prefix", default="features", help="shard file name prefix")


def run_features(args: argparse.Namespace) -> Manifest:
    files = [parse_attribute_spec(s, join=args.join, key_column=args.key_column) for s in args.attribute]
    group_keys = dict(args.group_key)
    if len(group_keys) != len(args.group_key):
        raise DataError(f"--group-key names an attribute twice: {[n for n, _ in args.group_key]}")
    return write_feature_shards(args.out, args.input, emb_key=args.emb_key, dim=args.dim, labels=args.labels,
                                label_key=args.label_key, names_key=args.names_key, group_keys=group_keys or None,
                                attributes_csv=args.attributes_csv,
                                csv_attributes=[c for group in args.csv_attribute for c in group],
                                csv_identity=args.csv_identity, attribute_files=files, multi_label=args.multi_label,
                                limit=args.limit, shard_rows=args.shard_rows, block_rows=args.block_rows,
                                dtype=args.dtype, workers=args.workers, prefix=args.prefix)
