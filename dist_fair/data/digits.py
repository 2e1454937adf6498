"""Digit benchmarks of deep fair clustering: MNIST-USPS and Reverse-MNIST (METHODS.md §8).

Both come from ``digits/mnist_usps.npz`` (``mnist_x`` (60000, 28, 28) uint8, ``mnist_y``,
``usps_x`` (7291, 16, 16) uint8, ``usps_y``; the JPEG-decoded images of the public Deep Fair
Clustering code, Li et al. 2020). A sample is a 28x28 grey image scaled to [0, 1]; its identity is
the digit and its protected attribute ``source`` says where it came from:

- ``mnist_usps``: the MNIST images (source ``MNIST``, ids ``0..n_mnist-1``) followed by the USPS
  images (source ``USPS``). USPS is 16x16 and is resized to 28x28 by bilinear interpolation
  (``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, no antialiasing;
  upsampling needs none) on the [0, 1] values, so a USPS pixel is
  ``x'(u, v) = sum_{i,j} w_i(u) w_j(v) x(i, j) / 255`` with the usual half-pixel-centre weights.
- ``reverse_mnist``: the MNIST images (source ``original``) followed by the same images inverted,
  ``(255 - x) / 255`` (source ``inverted``).

``load_digits`` returns the arrays in memory (deep clustering trains on them directly);
``write_digits_shards`` writes them as embedding shards (dim 784, float32, rows flattened in
row-major order), each shard computing only its own id range from the raw uint8 arrays.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dist_fair.data.schema import Manifest
from dist_fair.data.shards import Block, ShardPlan, plan_shards, write_shard_set
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

SIDE = 28
DIM = SIDE * SIDE
ATTRIBUTE = "source"


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive ids taken from one array of the npz, with one transform."""

    name: str          # value name of the ``source`` attribute
    x_key: str
    y_key: str
    count: int
    transform: str     # "scale" (x / 255), "invert" ((255 - x) / 255) or "resize" (bilinear to 28x28)


#: dataset -> (x key, y key, transform) of each source, in id order; the names are the attribute values.
DATASETS: dict[str, list[tuple[str, str, str, str]]] = {
    "mnist_usps": [("MNIST", "mnist_x", "mnist_y", "scale"), ("USPS", "usps_x", "usps_y", "resize")],
    "reverse_mnist": [("original", "mnist_x", "mnist_y", "scale"), ("inverted", "mnist_x", "mnist_y", "invert")],
}


def source_names(dataset: str) -> list[str]:
    """Value names of the ``source`` attribute of ``dataset`` (index = attribute value)."""
    _check_dataset(dataset)
    return [name for name, *_ in DATASETS[dataset]]


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown digits dataset {dataset!r}; choose one of {sorted(DATASETS)}")


def _raw_array(path: str, key: str) -> np.ndarray:
    """One array of the npz, cached per process (Ray workers writing several shards read it once);
    the cache is keyed by the file's size and modification time, so a replaced file is re-read."""
    try:
        stat = os.stat(path)
    except OSError as err:
        raise DataError(f"digits file {path} cannot be read ({err}); pass the mnist_usps.npz of the "
                        "shared data") from err
    return _cached_array(path, stat.st_size, stat.st_mtime_ns, key)


@lru_cache(maxsize=4)
def _cached_array(path: str, size: int, mtime_ns: int, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise DataError(f"{path} has no array {key!r} (it holds {npz.files}); expected the "
                                "mnist_usps.npz of the shared data (mnist_x, mnist_y, usps_x, usps_y)")
            array = npz[key]
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read it as a .npz archive ({err}); point --path at mnist_usps.npz") from err
    array.setflags(write=False)
    return array


def _segments(dataset: str, path: str, limit: int | None) -> list[_Segment]:
    _check_dataset(dataset)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 (samples per source), got {limit}")
    segments = []
    for name, x_key, y_key, transform in DATASETS[dataset]:
        x, y = _raw_array(path, x_key), _raw_array(path, y_key)
        if x.ndim != 3 or x.dtype != np.uint8 or y.shape != (x.shape[0],):
            raise DataError(f"{path}: {x_key} must be uint8 (n, h, w) and {y_key} (n,), got {x.dtype} {x.shape} "
                            f"and {y.shape}")
        expected_side = 16 if transform == "resize" else SIDE
        if x.shape[1:] != (expected_side, expected_side):
            raise DataError(f"{path}: {x_key} images are {x.shape[1:]}, expected {expected_side}x{expected_side}")
        count = x.shape[0] if limit is None else min(limit, x.shape[0])
        segments.append(_Segment(name, x_key, y_key, count, transform))
    return segments


def transform_images(x: np.ndarray, transform: str) -> np.ndarray:
    """uint8 images (n, h, w) -> float32 (n, 28, 28) in [0, 1] (see the module docstring)."""
    if transform == "scale":
        return x.astype(np.float32) / np.float32(255.0)
    if transform == "invert":
        return (np.uint8(255) - x).astype(np.float32) / np.float32(255.0)
    if transform == "resize":
        import torch
        import torch.nn.functional as F

        scaled = torch.from_numpy(x.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
        resized = F.interpolate(scaled, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return resized.squeeze(1).clamp_(0.0, 1.0).numpy()
    raise DataError(f"unknown digit transform {transform!r}")


def _rows(path: str, segments: list[_Segment], start: int,
          stop: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    """(first id, images float32 (n, 28, 28), digits, source index) for global ids [start, stop)."""
    offset = 0
    for index, seg in enumerate(segments):
        lo, hi = max(start, offset), min(stop, offset + seg.count)
        if lo < hi:
            x = _raw_array(path, seg.x_key)[lo - offset: hi - offset]
            y = _raw_array(path, seg.y_key)[lo - offset: hi - offset]
            yield lo, transform_images(x, seg.transform), y.astype(np.int64), index
        offset += seg.count


def load_digits(dataset: str, path: str | Path, limit: int | None = None,
                flatten: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole digit dataset in memory, in id order (the same order as the shards).

    Args:
        dataset: ``"mnist_usps"`` or ``"reverse_mnist"``.
        path: the ``mnist_usps.npz`` file.
        limit: at most this many samples *per source* (the first ones), for tests.
        flatten: ``True`` gives ``X`` as float32 ``[N, 784]``; ``False`` as ``[N, 1, 28, 28]``.

    Returns:
        ``(X, y, source)``: images in [0, 1], the digit (int64) and the source index (int16) into
        ``source_names(dataset)``.
    """
    path = str(path)
    segments = _segments(dataset, path, limit)
    total = sum(s.count for s in segments)
    X = np.empty((total, SIDE, SIDE), np.float32)
    y = np.empty(total, np.int64)
    source = np.empty(total, np.int16)
    for first, images, digits, index in _rows(path, segments, 0, total):
        X[first: first + len(images)] = images
        y[first: first + len(images)] = digits
        source[first: first + len(images)] = index
    return (X.reshape(total, DIM) if flatten else X.reshape(total, 1, SIDE, SIDE)), y, source


@dataclass
class DigitRows:
    """Producer: the rows of one shard's id range, computed from the raw npz arrays."""

    path: str
    dataset: str
    limit: int | None = None
    block_rows: int = 4096

    def __call__(self, plan: ShardPlan) -> Iterator[Block]:
        segments = _segments(self.dataset, self.path, self.limit)
        stop = plan.first_id + plan.rows
        for start in range(plan.first_id, stop, self.block_rows):
            for first, images, digits, index in _rows(self.path, segments, start, min(stop, start + self.block_rows)):
                n = len(images)
                yield Block(ids=np.arange(first, first + n, dtype=np.int64), emb=images.reshape(n, DIM),
                            identity=digits, attrs={ATTRIBUTE: np.full(n, index, np.int16)})


def _file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def write_digits_shards(out_dir: str | Path, path: str | Path, dataset: str = "mnist_usps", limit: int | None = None,
                        shard_rows: int = 16384, block_rows: int = 4096, workers: int = 1, prefix: str = "digits",
                        progress: bool = True) -> Manifest:
    """Write a digit dataset as embedding shards: dim 784 float32, identity = digit, attribute ``source``.

    Args:
        out_dir: the shard folder to write (finished shards of an identical earlier run are kept).
        path: the ``mnist_usps.npz`` file.
        dataset: ``"mnist_usps"`` or ``"reverse_mnist"``.
        limit: at most this many samples per source (the first ones).
        shard_rows, block_rows: rows per tar file and per tar sample.
        workers: parallel Ray tasks (one per shard); 1 writes in this process.
    """
    path = str(path)
    if not Path(path).is_file():
        raise DataError(f"digits file {path} not found; pass the mnist_usps.npz of the shared data "
                        "(../shared/data/digits/mnist_usps.npz)")
    segments = _segments(dataset, path, limit)
    total = sum(s.count for s in segments)
    source: dict[str, Any] = {
        "source": "digits", "dataset": dataset, "path": str(Path(path).resolve()), "sha256": _file_sha256(path),
        "limit_per_source": limit, "counts": {s.name: s.count for s in segments},
        "pixels": "28x28 row-major, x / 255 in [0, 1]",
        "resize": "USPS 16x16 -> 28x28: torch interpolate, bilinear, align_corners=False" if dataset == "mnist_usps"
        else None,
        "identity": "digit 0-9",
    }
    LOG.info("digits %s: %s samples", dataset, {s.name: s.count for s in segments})
    digits = np.unique(np.concatenate([_raw_array(path, s.y_key)[: s.count] for s in segments]))
    plans = plan_shards(total, shard_rows, prefix)
    return write_shard_set(out_dir, plans, DigitRows(path, dataset, limit, block_rows), "embeddings",
                           {ATTRIBUTE: source_names(dataset)}, dim=DIM, dtype="float32", workers=workers,
                           source=source, num_identities=int(digits.size), progress=progress)


# --------------------------------------------------------------------------- command line

def add_digits_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dist-fair shards digits`` (with the common ``--out``, ``--shard-rows``, ``--workers``)."""
    from dist_fair.data.cli import add_common_arguments

    parser.add_argument("--path", required=True, help="mnist_usps.npz (mnist_x, mnist_y, usps_x, usps_y)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist_usps",
                        help="mnist_usps: MNIST + USPS resized to 28x28; reverse_mnist: MNIST + 255 - MNIST")
    parser.add_argument("--limit", type=int, default=None, help="at most this many samples per source")
    add_common_arguments(parser)
    parser.set_defaults(shard_rows=16384)
    parser.add_argument("--block-rows", type=int, default=4096, help="rows per tar sample")
    parser.add_argument("--prefix", default="digits", help="shard file name prefix")


def run_digits(args: argparse.Namespace) -> Manifest:
    return write_digits_shards(args.out, args.path, dataset=args.dataset, limit=args.limit,
                               shard_rows=args.shard_rows, block_rows=args.block_rows, workers=args.workers,
                               prefix=args.prefix)
