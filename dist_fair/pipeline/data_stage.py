"""The ``shards`` stage: the job's samples as an embedding shard folder (``data`` section).

``data.source=shards`` uses the folder ``data.shards`` as it is (an external input: its
fingerprint is the digest of its shards' sha256 list, so later stages are redone when the shards
change); ``synth`` generates the BUPT-style set (METHODS.md §2), ``digits`` MNIST-USPS /
Reverse-MNIST and ``table`` a CSV table into ``<run>/shards``. The fingerprint later stages see is
always the digest of the shards' content.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .stage import JobContext, StageOutcome

#: data fields each source reads (the fingerprint of a generated shard folder covers exactly these).
SOURCE_FIELDS = {
    "synth": ("preset", "identities", "images_per_identity", "dim", "seed", "block_rows", "shard_rows"),
    "digits": ("path", "dataset", "limit", "block_rows", "shard_rows"),
    "table": ("path", "protected", "label", "features", "limit", "block_rows", "shard_rows"),
}


def shard_digest(folder: str | Path) -> str:
    """The digest of what the shard folder's readers get (:func:`dist_fair.data.shards.shard_set_digest`:
    the manifest's schema and the actual sha256 of every file): changes whenever any shard's bytes do."""
    from dist_fair.data.shards import shard_set_digest

    return shard_set_digest(folder)[:16]


def _summary(manifest: Any) -> dict[str, Any]:
    return {"samples": manifest.num_samples, "identities": manifest.num_identities, "shards": len(manifest.shards),
            "dim": manifest.dim, "groups": manifest.group_counts()}


def _write(data: Any, folder: Path) -> Any:
    if data.source == "synth":
        from dist_fair.data.synthetic import generate_synthetic_shards

        return generate_synthetic_shards(folder, preset=data.preset, identities=data.identities,
                                         images_per_identity=data.images_per_identity, dim=data.dim, seed=data.seed,
                                         shard_rows=data.shard_rows, block_rows=data.block_rows, workers=data.workers)
    if data.source == "digits":
        from dist_fair.data.digits import write_digits_shards

        return write_digits_shards(folder, data.path, dataset=data.dataset, limit=data.limit,
                                   shard_rows=data.shard_rows, block_rows=data.block_rows, workers=data.workers,
                                   progress=False)
    from dist_fair.data.table import write_table_shards

    return write_table_shards(folder, data.path, data.protected, label=data.label, features=data.features,
                              limit=data.limit, shard_rows=data.shard_rows, block_rows=data.block_rows,
                              workers=data.workers)


def shards_stage(ctx: JobContext) -> StageOutcome:
    """The shard folder of the job (see the module docstring)."""
    from dist_fair.data.shards import read_manifest
    from dist_fair.errors import ConfigError

    data = ctx.config.data
    if data.source == "shards":
        folder = Path(data.shards).resolve()
        if not (folder / "manifest.json").is_file():
            raise ConfigError(f"config field 'data.shards': {folder} holds no manifest.json; write the shards first "
                              "(dist-fair shards ... --out DIR, or dist-fair embed ...)")
        stage = ctx.stage("shards", folder, {"source": "shards"})
        return stage.external(shard_digest(folder), {**_summary(read_manifest(folder)), "external": True})
    if data.source in ("digits", "table") and not Path(data.path).is_file():
        raise ConfigError(f"config field 'data.path': {data.path} does not exist (data.source={data.source}); "
                          "give the path of the file to read, relative to the working directory or absolute")
    params = {"source": data.source, **{k: v for k, v in asdict(data).items() if k in SOURCE_FIELDS[data.source]}}
    if data.source in ("digits", "table"):
        params["path"] = str(Path(data.path).resolve())
    stage = ctx.stage("shards", "shards", params)
    outcome = stage.run(lambda folder: _summary(_write(data, folder)))
    if outcome.complete:
        outcome.fingerprint = shard_digest(outcome.folder)
    return outcome


__all__ = ["shards_stage", "shard_digest", "SOURCE_FIELDS"]
