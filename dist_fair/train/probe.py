"""The built-in training task ``probe``: an MLP on embeddings predicting the identity.

Not a clustering method: a small supervised model that makes ``dist-fair train`` usable before the
clustering models exist, and the workload of the engine's tests and benchmark. Model:
``logits = W2 relu(W1 x + b1) + b2`` (``train.hidden = 0``: ``logits = W x + b``); loss: mean
cross-entropy over rows with a known identity (``identity >= 0``); metric: accuracy.

Data: an embedding shard folder — ``data.shards`` for ``data.source=shards``, or the BUPT-style
synthetic shards (METHODS.md §2) that the pipeline's shards stage writes for ``data.source=synth``
— or, in tests and benchmarks, in-memory arrays such as :func:`identity_blobs` (identity centres
uniform on the unit sphere, ``x = normalise(centre + noise / sqrt(dim) * z)``).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from dist_fair.train.task import TrainTask


def identity_blobs(identities: int, per_identity: int, dim: int, seed: int = 0,
                   noise: float = 0.5) -> dict[str, np.ndarray]:
    """``{"emb": float32[N, dim], "identity": int64[N]}`` with N = identities * per_identity, rows
    in random order; ``emb = normalise(c_identity + noise / sqrt(dim) * z)``, ``z ~ N(0, I)``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identities, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    identity = np.repeat(np.arange(identities, dtype=np.int64), per_identity)
    rng.shuffle(identity)
    emb = centres[identity] + (noise / np.sqrt(dim)) * rng.standard_normal((len(identity), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return {"emb": emb.astype(np.float32), "identity": identity}


def make_probe_model(dim: int, hidden: int, classes: int):
    """``Linear(dim, classes)`` or ``Linear(dim, hidden) -> ReLU -> Linear(hidden, classes)``."""
    from torch import nn

    if hidden == 0:
        return nn.Linear(dim, classes)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def probe_forward(model: Any, batch: dict[str, Any]) -> Any:
    return model(batch["emb"])


def probe_loss(batch: dict[str, Any], logits: Any, ctx: Any) -> tuple[Any, dict[str, Any]]:
    """Cross-entropy ``-mean_i log softmax(logits_i)[y_i]`` over rows with ``y_i >= 0``, and accuracy."""
    import torch.nn.functional as F

    target = batch["identity"]
    known = target >= 0
    logits = logits.float()
    loss = F.cross_entropy(logits, target.clamp(min=0), reduction="none")
    denom = known.sum().clamp(min=1)
    loss = (loss * known).sum() / denom
    accuracy = ((logits.argmax(dim=1) == target) & known).sum() / denom
    return loss, {"accuracy": accuracy.detach()}


def probe_task(arrays_or_shards: dict[str, np.ndarray] | str | Path, classes: int | None = None, hidden: int = 256,
               block_rows: int = 1024, name: str = "probe") -> TrainTask:
    """A probe task over in-memory arrays (``emb``, ``identity``) or an embedding shard folder."""
    from dist_fair.train.stream import InMemoryStreams, ShardStreams

    if isinstance(arrays_or_shards, (str, Path)):
        streams: Any = ShardStreams(str(arrays_or_shards), keys=("ids", "emb", "identity"))
        from dist_fair.data.shards import read_manifest

        manifest = read_manifest(str(arrays_or_shards))
        dim = streams.dim
        classes = classes or int(manifest.num_identities) or None
        if classes is None:
            from dist_fair.data.shards import load_labels

            classes = int(load_labels(str(arrays_or_shards)).identity.max()) + 1
    else:
        streams = InMemoryStreams(arrays_or_shards, block_rows=block_rows)
        dim = int(arrays_or_shards["emb"].shape[1])
        classes = classes or int(arrays_or_shards["identity"].max()) + 1
    return TrainTask(
        name=name,
        model_factory=functools.partial(make_probe_model, dim, hidden, int(classes)),
        loss_fn=probe_loss,
        forward=probe_forward,
        train_stream=streams.train,
        eval_stream=streams.eval,
        num_samples=streams.num_samples,
        info={"dim": dim, "classes": int(classes), "hidden": hidden},
    )


def build_probe_task(job: Any, inputs: Any) -> TrainTask:
    """``train.model=probe`` (the registry's builder): the probe over the shard folder
    ``inputs.shards`` (``data.shards``, or the shards the pipeline's shards stage wrote)."""
    return probe_task(inputs.shards, hidden=job.train.hidden)
