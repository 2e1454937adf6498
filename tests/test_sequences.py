"""dist_fair.models.sequences: token sequences and targets against a brute-force loop, the identity
split (dist_fair.data.splits), the files written from shards, and the exactly-once streams."""
from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest

from dist_fair.errors import DataError
from dist_fair.models.sequences import (TEST, TRAIN, VAL, SequenceStreams, build_sequences, open_sequence_inputs,
                                        prepare_sequence_inputs, split_samples)


def small_graph(n: int = 30, k: int = 6, d: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    nbrs = np.argsort(-sims, axis=1, kind="stable")[:, :k].astype(np.int64)
    nbrs[:, 0] = np.arange(n)
    nbrs[3, 4:] = -1  # missing neighbours
    identity = rng.integers(0, 6, n).astype(np.int64)
    identity[[5, 7]] = -1  # unknown identities
    groups = rng.integers(0, 3, n).astype(np.int64)
    return emb, nbrs, identity, groups


def test_sequences_match_a_brute_force_loop():
    emb, nbrs, identity, groups = small_graph()
    rows = np.array([3, 0, 5, 7, 12])
    out = build_sequences(emb, nbrs, rows, 5, identity, groups)
    assert out["tokens"].shape == (5, 5, emb.shape[1]) and out["tokens"].dtype == np.float32
    for a, i in enumerate(rows):
        for j in range(5):
            n = nbrs[i, j]
            assert out["valid"][a, j] == (n >= 0)
            if n < 0:
                assert not out["tokens"][a, j].any() and not out["mask"][a, j] and out["target"][a, j] == 0
                continue
            assert np.array_equal(out["tokens"][a, j], emb[n])
            known = identity[i] >= 0 and identity[n] >= 0
            assert out["mask"][a, j] == known
            assert out["target"][a, j] == float(known and identity[n] == identity[i])
        assert out["group"][a] == groups[i] and out["ids"][a] == i
    assert out["target"][1, 0] == 1.0  # the anchor itself is its own positive


def test_inference_sequences_carry_no_labels():
    emb, nbrs, _, _ = small_graph()
    out = build_sequences(emb, nbrs, np.arange(4), 6)
    assert set(out) == {"ids", "tokens", "valid"}
    with pytest.raises(DataError, match="knn.k >= 7"):
        build_sequences(emb, nbrs, np.arange(4), 7)


def test_split_by_identity_keeps_the_baselines_validation_identities():
    from dist_fair.data.splits import split_identities

    identity = np.repeat(np.arange(50), 4)
    identity[:4] = -1
    split = split_samples(identity, val_fraction=0.2, train_fraction=0.5, seed=3)
    assert np.array_equal(split == VAL, split_identities(identity, 0.2, seed=3))
    for s in (TRAIN, VAL, TEST):  # an identity lies in exactly one split
        ids = set(identity[(split == s) & (identity >= 0)])
        others = set(identity[(split != s) & (identity >= 0)])
        assert ids and not ids & others
    assert (split[:4] == TEST).all()  # unknown identities are never trained on or validated
    known_rest = np.unique(identity[(identity >= 0) & (split != VAL)]).size
    assert np.unique(identity[split == TRAIN]).size == round(0.5 * known_rest)


def test_prepared_files_from_shards(tmp_path):
    from dist_fair.data.shards import write_embedding_shards

    emb, nbrs, identity, groups = small_graph(n=40)
    identity = np.repeat(np.arange(10), 4)
    write_embedding_shards(tmp_path / "shards", emb * 3.0, identity, {"race": groups},
                           {"race": ["a", "b", "c"]}, shard_rows=16, block_rows=8)
    np.save(tmp_path / "nbrs.npy", nbrs)
    info = prepare_sequence_inputs(tmp_path / "shards", tmp_path, tmp_path / "seq", seq_len=5, val_fraction=0.2,
                                   train_fraction=0.5, seed=0, group_attribute="race")
    assert info["num_groups"] == 3 and sum(info["split_samples"].values()) == 40
    inputs = open_sequence_inputs(tmp_path / "seq", tmp_path)
    assert np.allclose(np.linalg.norm(inputs.emb, axis=1), 1.0, atol=1e-6)  # normalised on the way
    assert np.allclose(inputs.emb, emb, atol=1e-6)
    split = np.load(tmp_path / "seq" / "split.npy")
    visible = inputs.identity
    assert (visible[split == TEST] == -1).all() and np.array_equal(visible[split != TEST], identity[split != TEST])
    restored = pickle.loads(pickle.dumps(inputs))  # sent to workers without the memory maps
    assert restored._cache == {} and np.array_equal(restored.sequences(np.arange(3))["target"],
                                                    inputs.sequences(np.arange(3))["target"])
    with pytest.raises(DataError, match="train.group_attribute"):
        prepare_sequence_inputs(tmp_path / "shards", tmp_path, tmp_path / "seq2", 5, 0.2, 0.5, group_attribute="age")


def test_streams_partition_anchors_exactly_once(tmp_path):
    from dist_fair.models.sequences import SequenceInputs

    emb, nbrs, identity, _ = small_graph()
    for name, array in (("emb", emb), ("nbrs", nbrs), ("identity", identity)):
        np.save(tmp_path / f"{name}.npy", array)
    inputs = SequenceInputs(str(tmp_path / "emb.npy"), str(tmp_path / "nbrs.npy"), 4, str(tmp_path / "identity.npy"))
    train_rows = np.arange(0, 30, 2)
    streams = SequenceStreams(inputs, train_rows, eval_rows=np.arange(1, 30, 2), block_rows=4)
    seen = [np.concatenate([b["ids"] for b in streams.eval(r, 2)]) for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(np.concatenate(seen)) == list(range(1, 30, 2))
    for rank in range(2):
        blocks = list(itertools.islice(streams.train(rank, 2, seed=5), 8))  # endless: 4 passes over its 8 anchors
        ids = np.concatenate([b["ids"] for b in blocks])
        mine = set(train_rows[rank::2])
        assert set(ids) == mine  # only its own share, every anchor of it
        assert all(b["tokens"].shape[1:] == (4, emb.shape[1]) for b in blocks)
    with pytest.raises(DataError, match="no training anchors"):
        SequenceStreams(inputs, np.zeros(0, np.int64))
