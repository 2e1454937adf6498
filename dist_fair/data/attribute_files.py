"""Protected attributes from side files, joined to face images by image name or by person name.

Face sets laid out one folder per person (LFW, CASIA-WebFace, VGGFace2) ship their protected
attributes as separate files. Three formats are read (``AttributeFile.kind``):

- ``list``: a text file of names, one a line, all having one value (LFW's ``lfw_female_names.txt``
  -> ``gender=female``). Blank lines and lines starting with ``#`` are skipped.
- ``json``: a JSON object name -> value (LFW's ``lfw_race_dict.json``: person -> race). A value
  may be a string, an integer or a list of strings.
- ``csv``: a CSV file with a header row, a key column (default: the first) and the value column
  (default: the column named like the attribute); empty fields (and ``table.MISSING`` markers)
  are skipped.

A string value holding commas (``"african,caucasian"``) or a list is *several labels*.

Joining (``join_attributes``) over samples given as ``(person, image file name)`` pairs: a file's
keys are image names (``join="image"``; a key ``Person/file.jpg`` matches that person's file, a
bare ``file.jpg`` matches the one sample with that file name and is refused as ambiguous when
several people have such a file, as in CASIA-WebFace's ``001.jpg``) or person names
(``join="person"``); ``"auto"`` picks ``image`` when some key ends in an image suffix
(``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.webp``), else ``person``. Several files may give the
same attribute (LFW's female and male lists). For every sample and attribute, the labels of all
files are pooled:

- no label -> unknown (``-1``), counted as ``missing``;
- more than one distinct label (the sample is in both gender lists, or its value has several
  labels) -> unknown, counted as ``conflicting``; with ``multi_label="first"`` a multi-label
  value counts as its first label instead (two files that disagree are still conflicting);
- else the label's index in the attribute's group names: every label the attribute's files
  mention, sorted (so the table does not depend on which images were kept).

Keys that match no sample are counted (``unmatched_keys``): a large number usually means the
wrong ``join``.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dist_fair.data.shards import UNKNOWN
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

KINDS = ("list", "json", "csv")
JOINS = ("auto", "image", "person")
MULTI_LABEL = ("unknown", "first")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

SPEC_HELP = ("ATTR:VALUE=FILE: a text list of names (one a line) that all have VALUE, e.g. "
             "gender:female=lfw_female_names.txt; ATTR=FILE.json: a JSON object name -> value, e.g. "
             "race=lfw_race_dict.json; ATTR=FILE.csv: the CSV column ATTR (key column: --key-column, else the "
             "first). Repeat for more files; several files may give one attribute")


@dataclass(frozen=True)
class AttributeFile:
    """One side file giving protected attribute ``attribute`` (formats in the module docstring).

    ``value``: the value every name of a ``list`` file has; ``column`` / ``key_column``: the CSV
    value and key columns (default: the attribute's name, the first column)."""

    attribute: str
    path: str
    kind: str
    value: str | None = None
    column: str | None = None
    key_column: str | None = None
    join: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"attribute file {self.path}: kind {self.kind!r} must be one of {KINDS}")
        if self.join not in JOINS:
            raise DataError(f"attribute file {self.path}: join {self.join!r} must be one of {JOINS}")
        if (self.kind == "list") != (self.value is not None and self.value != ""):
            raise DataError(f"attribute file {self.path}: a name list needs the value its names have "
                            f"({self.attribute}:VALUE=FILE) and only a list takes one")
        if not self.attribute:
            raise DataError(f"attribute file {self.path}: the attribute needs a name")


def parse_attribute_spec(text: str, join: str = "auto", key_column: str | None = None) -> AttributeFile:
    """``ATTR:VALUE=FILE`` (name list), ``ATTR=FILE.json`` or ``ATTR=FILE.csv`` -> ``AttributeFile``."""
    head, sep, path = text.partition("=")
    if not sep or not head or not path:
        raise DataError(f"attribute {text!r}: expected {SPEC_HELP}")
    attribute, colon, value = head.partition(":")
    if colon:
        return AttributeFile(attribute.strip(), path, "list", value=value.strip(), join=join)
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return AttributeFile(attribute.strip(), path, "json", join=join)
    if suffix in (".csv", ".tsv"):
        return AttributeFile(attribute.strip(), path, "csv", key_column=key_column, join=join)
    raise DataError(f"attribute {text!r}: {path} is neither .json nor .csv; for a text list of names give the value "
                    f"they all have: {attribute}:VALUE={path}")


@dataclass
class AttributeValues:
    """A file read: key -> labels (a tuple of several labels = a multi-label value)."""

    spec: AttributeFile
    labels: dict[str, tuple[str, ...]]
    join: str                               # "image" or "person" (resolved)
    conflicting_keys: int = 0               # keys listed twice with different values


def _split_labels(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, bool) or not isinstance(value, (str, int, list)):
        raise DataError(f"{where}: value {value!r} must be a string, an integer or a list of strings")
    if isinstance(value, int):
        return (str(value),)
    parts = value if isinstance(value, list) else value.split(",")
    if not all(isinstance(p, str) for p in parts):
        raise DataError(f"{where}: a list value must hold strings, got {value!r}")
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _add(labels: dict[str, tuple[str, ...]], key: str, value: tuple[str, ...]) -> bool:
    """Pool ``value`` into ``labels[key]``; True when the key already had a different value."""
    old = labels.get(key)
    if old is None:
        labels[key] = value
        return False
    labels[key] = tuple(dict.fromkeys(old + value))
    return old != value


def _normal_key(key: str) -> str:
    return key.strip().replace("\\", "/")


def read_attribute_file(spec: AttributeFile) -> AttributeValues:
    """Read one attribute file (see the module docstring); errors name the file and line or key."""
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"attribute file {path} (attribute {spec.attribute!r}) not found; check the path")
    labels: dict[str, tuple[str, ...]] = {}
    conflicting = 0
    if spec.kind == "list":
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            key = _normal_key(line)
            if key and not key.startswith("#"):
                _add(labels, key, (spec.value,))
    elif spec.kind == "json":
        def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            return {"__pairs__": pairs}

        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=pairs_hook)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"attribute file {path}: not valid JSON ({err}); it must be one object "
                            "name -> value") from err
        if not isinstance(data, dict):
            raise DataError(f"attribute file {path}: the top level must be a JSON object name -> value, "
                            f"got {type(data).__name__}")
        for key, value in data["__pairs__"]:
            if isinstance(value, dict):
                raise DataError(f"attribute file {path}, key {key!r}: the value is an object; expected a string, "
                                "an integer or a list of strings")
            parts = _split_labels(value, f"attribute file {path}, key {key!r}")
            if parts:
                conflicting += _add(labels, _normal_key(key), parts)
    else:
        from dist_fair.data.table import read_table

        table = read_table(path)
        key_column = spec.key_column or table.columns[0]
        column = spec.column or spec.attribute
        keys, values = table.column(key_column), table.column(column)
        if key_column == column:
            raise DataError(f"attribute file {path}: the key column and the value column are both {column!r}; "
                            "pass --key-column")
        for row, (key, value) in enumerate(zip(keys, values)):
            if key is None or value is None:
                continue
            parts = _split_labels(value, f"attribute file {path}, line {table.lines[row]}")
            if parts:
                conflicting += _add(labels, _normal_key(key), parts)
    join = spec.join
    if join == "auto":
        join = "image" if any(k.lower().endswith(IMAGE_SUFFIXES) for k in labels) else "person"
    if not labels:
        LOG.warning("attribute file %s holds no values", path)
    return AttributeValues(spec, labels, join, conflicting)


@dataclass
class AttributeJoin:
    """Attribute codes of every sample (int16, -1 = unknown), the group names, and the counts."""

    codes: dict[str, np.ndarray]
    names: dict[str, list[str]]
    unknown: dict[str, dict[str, int]]          # attribute -> {"missing": n, "conflicting": m}
    unmatched_keys: dict[str, int]              # attribute -> keys of its files that match no sample
    files: list[dict[str, Any]] = field(default_factory=list)   # each file's spec, resolved join, key count

    def source_fields(self) -> dict[str, Any]:
        """The manifest ``source`` entries that describe this join."""
        return {"attribute_files": self.files, "attribute_unknown": self.unknown,
                "attribute_unmatched_keys": self.unmatched_keys}


class _SampleIndex:
    """Positions of samples by person, by ``person/file`` and by bare file name."""

    def __init__(self, samples: Sequence[tuple[str, str]]) -> None:
        self.by_person: dict[str, list[int]] = defaultdict(list)
        self.by_path: dict[str, int] = {}
        self.by_file: dict[str, list[int]] = defaultdict(list)
        for position, (person, file_name) in enumerate(samples):
            self.by_person[person].append(position)
            self.by_path[f"{person}/{file_name}"] = position
            self.by_file[file_name].append(position)

    def positions(self, key: str, join: str, where: str) -> list[int]:
        if join == "person":
            return self.by_person.get(key, [])
        if "/" in key:
            position = self.by_path.get("/".join(key.split("/")[-2:]))
            return [] if position is None else [position]
        found = self.by_file.get(key, [])
        if len(found) > 1:
            raise DataError(f"{where}: image name {key!r} is ambiguous, {len(found)} people have a file of that "
                            "name; write the keys as Person/file.jpg")
        return found


def join_attributes(samples: Sequence[tuple[str, str]], files: Sequence[AttributeFile | AttributeValues],
                    multi_label: str = "unknown") -> AttributeJoin:
    """Codes of every attribute the files give, for ``samples`` = (person, image file name) pairs.

    Rules (missing, conflicting, group names) in the module docstring.
    """
    if multi_label not in MULTI_LABEL:
        raise DataError(f"multi_label {multi_label!r} must be one of {MULTI_LABEL}")
    index = _SampleIndex(samples)
    n = len(samples)
    read = [f if isinstance(f, AttributeValues) else read_attribute_file(f) for f in files]
    attributes = list(dict.fromkeys(v.spec.attribute for v in read))
    codes, names, unknown, unmatched, described = {}, {}, {}, {}, []
    for attribute in attributes:
        pooled: list[set[str]] = [set() for _ in range(n)]
        multi = np.zeros(n, bool)
        group_names: set[str] = set()
        unmatched[attribute] = 0
        for values in (v for v in read if v.spec.attribute == attribute):
            matched = 0
            where = f"attribute file {values.spec.path}"
            for key, labels in values.labels.items():
                group_names.update(labels)
                positions = index.positions(key, values.join, where)
                if not positions:
                    unmatched[attribute] += 1
                    continue
                matched += 1
                if len(labels) > 1 and multi_label == "first":
                    labels = labels[:1]
                for position in positions:
                    pooled[position].update(labels)
                    multi[position] |= len(labels) > 1
            described.append(dict(asdict(values.spec), path=str(Path(values.spec.path).resolve()), join=values.join,
                                  keys=len(values.labels), matched_keys=matched,
                                  keys_with_two_values=values.conflicting_keys))
            if values.labels and not matched:
                LOG.warning("%s: none of its %d keys matches a %s name of the %d samples (join=%s); check the join",
                            where, len(values.labels), values.join, n, values.join)
        ordered = sorted(group_names)
        if not ordered:
            paths = [v.spec.path for v in read if v.spec.attribute == attribute]
            raise DataError(f"attribute {attribute!r}: its files {paths} hold no values; check them")
        lookup = {name: i for i, name in enumerate(ordered)}
        column = np.full(n, UNKNOWN, np.int16)
        missing = conflicting = 0
        for position, labels in enumerate(pooled):
            if not labels:
                missing += 1
            elif len(labels) > 1 or multi[position]:
                conflicting += 1
            else:
                column[position] = lookup[next(iter(labels))]
        if len(ordered) > np.iinfo(np.int16).max:
            raise DataError(f"attribute {attribute!r} has {len(ordered)} distinct values; a protected attribute must "
                            "be a small set of groups")
        codes[attribute], names[attribute] = column, ordered or ["unknown"]
        unknown[attribute] = {"missing": missing, "conflicting": conflicting}
        if missing or conflicting:
            LOG.info("attribute %r: %d of %d samples unknown (%d missing, %d conflicting)", attribute,
                     missing + conflicting, n, missing, conflicting)
    return AttributeJoin(codes, names, unknown, unmatched, described)
