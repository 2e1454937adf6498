"""Embedding image shards (DESIGN.md, "[embed]").

Each image shard becomes one embedding shard with the same name stem and the same id range, so
ids, identities and protected attributes carry over unchanged. One Ray task per shard
(``workers`` at a time); a task decodes its JPEGs (PIL), resizes them to ``image_size`` squared,
normalises them with the ImageNet mean and std, runs the backbone in batches of ``batch_size`` and
L2-normalises the features: ``x = f(image) / ||f(image)||`` (METHODS.md §1). Writing goes through
``write_shard_set``, so it is atomic and resumable like every other shard write.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dist_fair.data.schema import Manifest
from dist_fair.data.shards import Block, ShardPlan, decode_sample, iter_tar_samples, read_manifest, write_shard_set
from dist_fair.embed.backbone import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from dist_fair.errors import ShardError

LOG = logging.getLogger(__name__)

_MODEL_CACHE: dict[tuple, Any] = {}


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """JPEG bytes -> float32 array (3, size, size), ImageNet-normalised."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        raise ShardError(f"{where}: the image cannot be decoded ({err}); rewrite the image shard") from err
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass
class EmbedProducer:
    """Producer for ``write_shard_set``: the rows of one image shard, embedded."""

    image_dir: str
    model: str
    checkpoint: str | None = None
    image_size: int = 112
    batch_size: int = 64
    threads: int = 1
    seed: int = 0
    block_rows: int = 4096

    def _net(self) -> Any:
        key = (self.model, self.checkpoint, self.seed)
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = create_backbone(self.model, self.checkpoint, self.seed)
        return _MODEL_CACHE[key]

    def __call__(self, plan: ShardPlan) -> Iterator[Block]:
        import torch

        torch.set_num_threads(self.threads)
        net = self._net()
        manifest = read_manifest(self.image_dir)
        source = plan.payload
        pending: list[tuple[Block, np.ndarray]] = []
        out: list[Block] = []

        def flush() -> None:
            images = np.stack([p[1] for p in pending])
            with torch.inference_mode():
                feats = net(torch.from_numpy(images)).float().numpy()
            feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            for (meta, _), feat in zip(pending, feats):
                out.append(Block(meta.ids, feat[None, :], meta.identity, meta.attrs))
            pending.clear()

        for sample in iter_tar_samples(Path(self.image_dir) / source):
            where = f"shard {source}, sample {sample.get('__key__')!r}"
            if "jpg" not in sample:
                raise ShardError(f"{where}: no jpg entry; is {self.image_dir} an image shard folder?")
            meta = decode_sample(sample, manifest, source, with_emb=False)
            pending.append((meta, decode_image(sample["jpg"], self.image_size, where)))
            if len(pending) == self.batch_size:
                flush()
            if len(out) >= self.block_rows:
                yield _merge(out, manifest)
                out = []
        if pending:
            flush()
        if out:
            yield _merge(out, manifest)


def _merge(rows: list[Block], manifest: Manifest) -> Block:
    return Block(ids=np.concatenate([r.ids for r in rows]), emb=np.concatenate([r.emb for r in rows]),
                 identity=np.concatenate([r.identity for r in rows]),
                 attrs={a: np.concatenate([r.attrs[a] for r in rows]) for a in manifest.attribute_order})


def embed_image_shards(image_dir: str | Path, out_dir: str | Path, model: str = "resnet18",
                       checkpoint: str | None = None, image_size: int = 112, batch_size: int = 64,
                       workers: int = 1, seed: int = 0, dtype: str = "float16", progress: bool = True) -> Manifest:
    """Embed every image shard of ``image_dir`` into an embedding shard folder ``out_dir``."""
    manifest = read_manifest(image_dir)
    if manifest.kind != "images":
        raise ShardError(f"{image_dir} holds {manifest.kind} shards, not images; it needs no embedding")
    dim = int(create_backbone(model, checkpoint, seed).num_features)
    plans = [ShardPlan(i, f"{Path(s.name).stem}.tar", s.first_id, s.samples, s.name)
             for i, s in enumerate(manifest.shards)]
    producer = EmbedProducer(str(image_dir), model, checkpoint, image_size, batch_size, seed=seed)
    source = {"source": "embed", "images": str(Path(image_dir).resolve()), "image_shards_sha256":
              [s.sha256 for s in manifest.shards], "model": model, "checkpoint": checkpoint,
              "image_size": image_size, "seed": seed, "random_weights": checkpoint is None}
    return write_shard_set(out_dir, plans, producer, "embeddings", manifest.attributes, dim=dim, dtype=dtype,
                           workers=workers, source=source, num_identities=manifest.num_identities,
                           progress=progress)
