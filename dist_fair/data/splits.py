"""Identity splits: which samples validate, train and test (METHODS.md §4, "Decoding to clusters").

Splits are drawn over *identities*, never over samples, so that no identity's samples are on both
sides of a split: the validation samples are all samples of a random ``val_fraction`` of the
known identities (the threshold of the kNN + threshold baseline and of every decoder is chosen
there), a fraction ``train_fraction`` of the remaining known identities trains a model and the
rest is the test split that the report evaluates. Samples of unknown identity (-1) are never in
validation or training. Pure functions over label arrays; every stage that needs a split (the
sequence inputs of the transformers, the baseline's threshold choice, the decoders) draws it here,
with the same fraction and seed, so they agree.
"""
from __future__ import annotations

import numpy as np

from dist_fair.errors import DataError

#: per-sample split codes (int8) of :func:`split_samples`
TEST, TRAIN, VAL = 0, 1, 2
SPLIT_NAMES = {TEST: "test", TRAIN: "train", VAL: "val"}

__all__ = ["SPLIT_NAMES", "TEST", "TRAIN", "VAL", "split_identities", "split_samples"]


def split_identities(identity: np.ndarray, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the validation samples: all samples of ``max(1, round(val_fraction * I))``
    of the I known identities, drawn without replacement with ``numpy.random.default_rng(seed)``
    (unknown identity, -1, is never in validation).

    Raises:
        DataError: fewer than 2 known identities (a threshold cannot be chosen on them).
    """
    identity = np.asarray(identity)
    known = np.unique(identity[identity >= 0])
    if known.size < 2:
        raise DataError("choosing a threshold needs at least 2 labelled identities; set cluster.threshold instead")
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_fraction * known.size)))
    val_ids = rng.choice(known, size=n_val, replace=False)
    return np.isin(identity, val_ids)


def split_samples(identity: np.ndarray, val_fraction: float, train_fraction: float, seed: int = 0) -> np.ndarray:
    """Per-sample split (int8: TEST 0, TRAIN 1, VAL 2) by identity; unknown identities are TEST.

    VAL: ``split_identities(identity, val_fraction, seed)`` (the baseline's validation split);
    TRAIN: ``round(train_fraction * R)`` of the R remaining known identities (at least 1, at most
    R - 1), drawn with seed ``seed + 1``; TEST: the rest.

    Raises:
        DataError: ``train_fraction`` outside (0, 1), or fewer than 2 identities left after the
            validation split.
    """
    identity = np.asarray(identity)
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must be in (0, 1), got {train_fraction}")
    val = split_identities(identity, val_fraction, seed=seed)
    rest = np.unique(identity[(identity >= 0) & ~val])
    if rest.size < 2:
        raise DataError(f"only {rest.size} identities are left after the validation split; training and testing "
                        "need at least one identity each - use more identities or a smaller cluster.val_fraction")
    n_train = min(max(1, int(round(train_fraction * rest.size))), rest.size - 1)
    chosen = np.random.default_rng(seed + 1).choice(rest, size=n_train, replace=False)
    split = np.full(identity.shape[0], TEST, dtype=np.int8)
    split[np.isin(identity, chosen)] = TRAIN
    split[val] = VAL
    return split
