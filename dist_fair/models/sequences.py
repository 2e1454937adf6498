"""kNN token sequences and their targets, built from the kNN graph and the shards (METHODS.md §4).

The sequence of anchor ``i`` is its first ``L`` kNN-graph neighbours in decreasing similarity
order, the anchor itself first (``nbrs[i, :L]``, METHODS.md §3). For a block of anchors
:func:`build_sequences` returns:

- ``tokens`` (n x L x d, float32): ``tokens[a, j] = x_{nbrs[i_a, j]}``, the L2-normalised
  embedding of neighbour j (zeros where the neighbour is missing, id -1);
- ``valid`` (n x L, bool): the neighbour exists;
- with identities: ``target[a, j] = [identity(nbrs[i_a, j]) == identity(i_a)]`` (float32) and
  ``mask[a, j] = valid and both identities known`` (unknown = -1: such tokens take part in
  attention but not in the loss);
- with protected groups: ``group[a]`` of the anchor (-1 unknown); and ``ids`` (the anchors).

Inputs live in files so that every training or inference worker memory-maps them instead of
receiving copies (:class:`SequenceInputs`, made by :func:`prepare_sequence_inputs`):
``emb.npy`` (N x d, rows L2-normalised, id order), the kNN graph's ``nbrs.npy``, the identities
*visible to training* (``visible_identity.npy``: the identities of the training and validation
splits, -1 for the test split, so that no test label ever reaches a loss; training anchors are
all training samples, validation anchors only monitor the validation loss) and the anchors'
protected groups (``group.npy``).

The identity split (``split.npy``, int8 per sample) is :func:`dist_fair.data.splits.split_samples`:
validation identities are chosen exactly as the kNN + threshold baseline chooses them
(``split_identities`` with the same fraction and seed), then a fraction ``train_fraction`` of the
remaining known identities trains the model and the rest is the test split that the report
evaluates. Thresholds are chosen on the validation identities only. (``TEST``, ``TRAIN``,
``VAL`` and ``split_samples`` are re-exported here for the readers of ``split.npy``.)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dist_fair.data.splits import SPLIT_NAMES, TEST, TRAIN, VAL, split_samples
from dist_fair.errors import DataError
from dist_fair.io_atomic import atomic_path, atomic_save_npy, atomic_write_json

LOG = logging.getLogger(__name__)

EMB_NAME = "emb.npy"
SPLIT_NAME = "split.npy"
VISIBLE_IDENTITY_NAME = "visible_identity.npy"
GROUP_NAME = "group.npy"
INFO_NAME = "sequences.json"



# ----------------------------------------------------------------------------- pure functions

def build_sequences(emb: np.ndarray, nbrs: np.ndarray, rows: np.ndarray, seq_len: int,
                    identity: np.ndarray | None = None, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Token sequences (and targets) of the anchors ``rows``; see the module docstring.

    Args:
        emb: N x d embeddings (rows L2-normalised; a memory map is fine).
        nbrs: N x k kNN graph (int64, -1 = missing), k >= seq_len.
        rows: anchor ids.
        seq_len: L, tokens per sequence.
        identity: N identities (-1 unknown) for targets, or None (inference).
        groups: N protected group indices (-1 unknown), or None.
    """
    if nbrs.ndim != 2 or nbrs.shape[1] < seq_len:
        raise DataError(f"the kNN graph has {nbrs.shape[1] if nbrs.ndim == 2 else '?'} neighbours per sample but "
                        f"sequences need {seq_len}; rebuild it with knn.k >= {seq_len} or lower train.seq_len")
    rows = np.asarray(rows, dtype=np.int64)
    nb = np.asarray(nbrs[rows, :seq_len], dtype=np.int64)
    valid = nb >= 0
    safe = np.where(valid, nb, 0)
    flat = safe.reshape(-1)
    order = np.argsort(flat, kind="stable")  # sorted gather: sequential reads on a memory map
    gathered = np.empty((flat.size, emb.shape[1]), dtype=np.float32)
    gathered[order] = np.asarray(emb[flat[order]], dtype=np.float32)
    tokens = gathered.reshape(rows.size, seq_len, emb.shape[1])
    tokens[~valid] = 0.0
    out: dict[str, np.ndarray] = {"ids": rows, "tokens": tokens, "valid": valid}
    if identity is not None:
        anchor = np.asarray(identity[rows], dtype=np.int64)
        other = np.asarray(identity, dtype=np.int64)[safe]
        known = valid & (other >= 0) & (anchor[:, None] >= 0)
        out["target"] = ((other == anchor[:, None]) & known).astype(np.float32)
        out["mask"] = known
    if groups is not None:
        out["group"] = np.asarray(groups[rows], dtype=np.int64)
    return out


# ----------------------------------------------------------------------------- files

def write_normalised_embeddings(shard_dir: str | Path, out_path: str | Path, dtype: str | None = None) -> Path:
    """``emb.npy``: every embedding of the shard folder, L2-normalised, in id order, written block by
    block into a memory map (bounded memory) and renamed into place when complete.

    ``dtype``: storage type (default: the manifest's, float16 or float32).
    """
    from dist_fair.data.shards import iter_blocks, read_manifest

    manifest = read_manifest(shard_dir)
    if manifest.kind != "embeddings":
        raise DataError(f"{shard_dir} holds {manifest.kind} shards; sequences need embedding shards (embed them first)")
    dtype = dtype or manifest.dtype or "float32"
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(manifest.num_samples, manifest.dim))
        for block in iter_blocks(shard_dir):
            norms = np.linalg.norm(block.emb, axis=1, keepdims=True)
            if (norms <= 0).any():
                bad = int(block.ids[np.nonzero(norms[:, 0] <= 0)[0][0]])
                raise DataError(f"shard {block.shard}: embedding of id {bad} has zero norm; it cannot be normalised "
                                "- remove or fix that sample")
            out[block.ids] = (block.emb / norms).astype(dtype)
        out.flush()
        del out
    return out_path


@dataclass
class SequenceInputs:
    """Paths of the files sequences are built from (picklable: sent to workers, which memory-map
    the files on first use). ``identity_path`` / ``group_path`` may be None (inference)."""

    emb_path: str
    nbrs_path: str
    seq_len: int
    identity_path: str | None = None
    group_path: str | None = None
    num_groups: int = 0
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _load(self, key: str, path: str | None) -> Any:
        if path is None:
            return None
        if key not in self._cache:
            self._cache[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        return self._cache[key]

    @property
    def emb(self) -> np.ndarray:
        return self._load("emb", self.emb_path)

    @property
    def nbrs(self) -> np.ndarray:
        return self._load("nbrs", self.nbrs_path)

    @property
    def identity(self) -> np.ndarray | None:
        return self._load("identity", self.identity_path)

    @property
    def groups(self) -> np.ndarray | None:
        return self._load("groups", self.group_path)

    @property
    def num_samples(self) -> int:
        return int(self.nbrs.shape[0])

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def sequences(self, rows: np.ndarray, with_targets: bool = True) -> dict[str, np.ndarray]:
        """:func:`build_sequences` of ``rows`` (targets and groups only if ``with_targets``)."""
        return build_sequences(self.emb, self.nbrs, rows, self.seq_len,
                               self.identity if with_targets else None, self.groups if with_targets else None)


def prepare_sequence_inputs(shard_dir: str | Path, knn_dir: str | Path, out_dir: str | Path, seq_len: int,
                            val_fraction: float, train_fraction: float, seed: int = 0,
                            group_attribute: str | None = None) -> dict[str, Any]:
    """Write ``emb.npy``, ``split.npy``, ``visible_identity.npy`` and ``group.npy`` into ``out_dir``
    (``sequences.json`` last) and return the summary recorded there."""
    from dist_fair.data.shards import load_labels

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nbrs = np.load(Path(knn_dir) / "nbrs.npy", mmap_mode="r", allow_pickle=False)
    labels = load_labels(shard_dir)
    if nbrs.shape[0] != len(labels):
        raise DataError(f"the kNN graph in {knn_dir} has {nbrs.shape[0]} rows but {shard_dir} holds {len(labels)} "
                        "samples; rebuild the graph from these shards")
    if nbrs.shape[1] < seq_len:
        raise DataError(f"the kNN graph in {knn_dir} has k = {nbrs.shape[1]} but train.seq_len = {seq_len}; "
                        f"set knn.k >= {seq_len} or lower train.seq_len")
    write_normalised_embeddings(shard_dir, out_dir / EMB_NAME)
    split = split_samples(labels.identity, val_fraction, train_fraction, seed)
    atomic_save_npy(out_dir / SPLIT_NAME, split)
    atomic_save_npy(out_dir / VISIBLE_IDENTITY_NAME, np.where(split != TEST, labels.identity, -1).astype(np.int64))
    num_groups = 0
    if group_attribute:
        if group_attribute not in labels.attrs:
            raise DataError(f"config field 'train.group_attribute': {group_attribute!r} is not an attribute of "
                            f"{shard_dir} (it has {sorted(labels.attrs)})")
        atomic_save_npy(out_dir / GROUP_NAME, labels.attrs[group_attribute].astype(np.int64))
        num_groups = len(labels.attribute_names[group_attribute])
    info = {"samples": int(len(labels)), "seq_len": int(seq_len), "dim": int(np.load(out_dir / EMB_NAME, mmap_mode="r").shape[1]),
            "group_attribute": group_attribute, "num_groups": num_groups,
            "split_samples": {SPLIT_NAMES[s]: int((split == s).sum()) for s in SPLIT_NAMES},
            "split_identities": {SPLIT_NAMES[s]: int(np.unique(labels.identity[(split == s) & (labels.identity >= 0)]).size)
                                 for s in SPLIT_NAMES}}
    atomic_write_json(out_dir / INFO_NAME, info)
    return info


def open_sequence_inputs(seq_dir: str | Path, knn_dir: str | Path, seq_len: int | None = None) -> SequenceInputs:
    """:class:`SequenceInputs` over a folder written by :func:`prepare_sequence_inputs`."""
    seq_dir = Path(seq_dir)
    info_path = seq_dir / INFO_NAME
    if not info_path.is_file():
        raise DataError(f"{seq_dir} holds no sequence inputs ({INFO_NAME} missing); run the pipeline's sequences stage")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    group_path = seq_dir / GROUP_NAME
    return SequenceInputs(emb_path=str(seq_dir / EMB_NAME), nbrs_path=str(Path(knn_dir) / "nbrs.npy"),
                          seq_len=int(seq_len or info["seq_len"]), identity_path=str(seq_dir / VISIBLE_IDENTITY_NAME),
                          group_path=str(group_path) if group_path.is_file() else None,
                          num_groups=int(info.get("num_groups", 0)))


# ----------------------------------------------------------------------------- streams for the engine

class SequenceStreams:
    """Train/eval streams of sequence blocks for ``dist_fair.train`` (picklable).

    Anchors are dealt to workers round-robin (``rows[rank::world_size]``: disjoint, together every
    anchor exactly once). Training: an endless stream, this worker's anchors in a fresh random
    order every pass (seeded by (seed, rank)); evaluation: each of this worker's anchors once.
    """

    def __init__(self, inputs: SequenceInputs, train_rows: np.ndarray, eval_rows: np.ndarray | None = None,
                 block_rows: int = 256) -> None:
        self.inputs = inputs
        self.train_rows = np.asarray(train_rows, dtype=np.int64)
        self.eval_rows = None if eval_rows is None else np.asarray(eval_rows, dtype=np.int64)
        self.block_rows = int(block_rows)
        if self.train_rows.size == 0:
            raise DataError("no training anchors: the training split holds no sample with a known identity")

    @property
    def num_samples(self) -> int:
        return int(self.train_rows.size)

    def _blocks(self, rows: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, rows.size, self.block_rows):
            yield self.inputs.sequences(rows[start:start + self.block_rows])

    def train(self, rank: int, world_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        mine = self.train_rows[rank::world_size]
        if mine.size == 0:
            raise DataError(f"worker {rank} of {world_size} has no training anchors ({self.train_rows.size} in all); "
                            "use fewer workers")
        rng = np.random.default_rng([seed, rank])
        while True:
            yield from self._blocks(rng.permutation(mine))

    def eval(self, rank: int, world_size: int) -> Iterator[dict[str, np.ndarray]]:
        if self.eval_rows is not None:
            yield from self._blocks(self.eval_rows[rank::world_size])


__all__ = ["build_sequences", "split_samples", "write_normalised_embeddings", "SequenceInputs",
           "prepare_sequence_inputs", "open_sequence_inputs", "SequenceStreams", "SPLIT_NAMES", "TEST", "TRAIN",
           "VAL"]
