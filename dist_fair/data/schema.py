"""The shard folder's manifest (DESIGN.md, "Shard format"; METHODS.md §1).

A shard folder holds WebDataset tar files and ``manifest.json``. Global sample ids are
``0 .. N-1``; shard ``s`` holds the contiguous id range ``[first_id, first_id + samples)`` and the
shards are listed in id order, so "manifest id order" is simply ``id`` order.

Two kinds of shard:
- ``embeddings``: one tar sample per *block* of rows with ``emb.npy`` (rows x dim),
  ``ids.npy`` (int64), ``identity.npy`` (int64, -1 = unknown), ``attrs.npy`` (int16, rows x A, -1 =
  unknown, columns in manifest attribute order) and ``meta.json`` (rows, first id, attribute names);
- ``images``: one tar sample per image with ``jpg`` and ``meta.json`` (``id``, ``identity`` or
  null, ``attributes`` {name: value index}, ``source`` path).

The manifest is written last and atomically, and lists only shards whose file was completely
written and checksummed: a crash never leaves a manifest naming an incomplete shard.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_fair.errors import ShardError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
KINDS = ("embeddings", "images")
DTYPES = ("float16", "float32")


@dataclass
class ShardInfo:
    """One tar file: its name, id range, per-group counts and checksum."""

    name: str
    samples: int
    first_id: int
    sha256: str
    bytes: int = 0
    blocks: int = 0
    identities: int = 0
    group_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Manifest:
    """What a shard folder holds. ``attributes`` maps a protected attribute name to its value names
    (``{"race": ["African", "Asian", "Caucasian", "Indian"]}``); a sample's attribute value is an
    index into that list."""

    kind: str
    dim: int | None
    dtype: str | None
    attributes: dict[str, list[str]]
    shards: list[ShardInfo]
    num_samples: int = 0
    num_identities: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def attribute_order(self) -> list[str]:
        return list(self.attributes)

    def group_counts(self) -> dict[str, dict[str, int]]:
        """Samples per attribute value over all shards."""
        total: dict[str, dict[str, int]] = {a: {v: 0 for v in names} for a, names in self.attributes.items()}
        for shard in self.shards:
            for attr, counts in shard.group_counts.items():
                for value, count in counts.items():
                    total.setdefault(attr, {}).setdefault(value, 0)
                    total[attr][value] += count
        return total

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["group_counts"] = self.group_counts()
        return out

    def validate(self, where: str = "manifest") -> None:
        """Check internal consistency; raise ShardError naming the field and the fix."""
        if self.schema_version != SCHEMA_VERSION:
            raise ShardError(f"{where}: schema_version {self.schema_version} is not supported (this dist_fair "
                             f"reads version {SCHEMA_VERSION}); rewrite the shards with `dist-fair shards`")
        if self.kind not in KINDS:
            raise ShardError(f"{where}: kind {self.kind!r} must be one of {KINDS}")
        if self.kind == "embeddings":
            if not isinstance(self.dim, int) or self.dim < 1:
                raise ShardError(f"{where}: embedding shards need a positive integer 'dim', got {self.dim!r}")
            if self.dtype not in DTYPES:
                raise ShardError(f"{where}: dtype {self.dtype!r} must be one of {DTYPES}")
        expected = 0
        for shard in self.shards:
            if shard.first_id != expected:
                raise ShardError(f"{where}: shard {shard.name} starts at id {shard.first_id}, expected {expected}; "
                                 "shards must cover ids 0..N-1 contiguously in listed order")
            expected += shard.samples
        if expected != self.num_samples:
            raise ShardError(f"{where}: shards hold {expected} samples but num_samples is {self.num_samples}")
        for attr, names in self.attributes.items():
            if not names or len(set(names)) != len(names):
                raise ShardError(f"{where}: attribute {attr!r} needs a non-empty list of distinct value names")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> "Manifest":
        try:
            manifest = cls(
                kind=d["kind"], dim=d.get("dim"), dtype=d.get("dtype"),
                attributes={k: list(v) for k, v in d.get("attributes", {}).items()},
                shards=[ShardInfo.from_dict(s) for s in d["shards"]],
                num_samples=int(d["num_samples"]), num_identities=int(d.get("num_identities", 0)),
                source=dict(d.get("source", {})), schema_version=int(d.get("schema_version", -1)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ShardError(f"{where}: malformed manifest ({err!r}); rewrite the shards with `dist-fair shards`") from err
        manifest.validate(where)
        return manifest

    @classmethod
    def load(cls, shard_dir: str | Path) -> "Manifest":
        path = Path(shard_dir) / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"{path} not found: {shard_dir} is not a complete shard folder (write one with "
                             "`dist-fair shards synth|images|table|digits ... --out DIR`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ShardError(f"{path} is not valid JSON ({err}); rewrite the shards") from err
        return cls.from_dict(data, where=str(path))

    def save(self, shard_dir: str | Path) -> None:
        from dist_fair.io_atomic import atomic_write_json

        self.validate()
        atomic_write_json(Path(shard_dir) / MANIFEST_NAME, self.to_dict())
