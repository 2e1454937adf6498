"""dist_fair.data.digits: MNIST-USPS and Reverse-MNIST from the shared mnist_usps.npz."""
from __future__ import annotations

import numpy as np
import pytest

from dist_fair.data.digits import load_digits, source_names, transform_images, write_digits_shards
from dist_fair.data.shards import iter_blocks, load_embeddings, load_labels, read_manifest
from dist_fair.errors import DataError

LIMIT = 300


@pytest.fixture(scope="module")
def npz_path(shared_data):
    return shared_data / "digits" / "mnist_usps.npz"


@pytest.fixture(scope="module")
def raw(npz_path):
    with np.load(npz_path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Brute-force bilinear resize with half-pixel centres: src = (dst + 0.5) * in / out - 0.5,
    clamped at the border (what align_corners=False means)."""
    side = image.shape[0]
    out = np.empty((size, size))
    for u in range(size):
        for v in range(size):
            su = min(max((u + 0.5) * side / size - 0.5, 0.0), side - 1)
            sv = min(max((v + 0.5) * side / size - 0.5, 0.0), side - 1)
            i0, j0 = int(np.floor(su)), int(np.floor(sv))
            i1, j1 = min(i0 + 1, side - 1), min(j0 + 1, side - 1)
            a, b = su - i0, sv - j0
            out[u, v] = ((1 - a) * (1 - b) * image[i0, j0] + (1 - a) * b * image[i0, j1]
                         + a * (1 - b) * image[i1, j0] + a * b * image[i1, j1])
    return out


def test_mnist_usps_arrays(npz_path, raw):
    X, y, source = load_digits("mnist_usps", npz_path, limit=LIMIT)
    assert X.shape == (2 * LIMIT, 784) and X.dtype == np.float32
    assert y.dtype == np.int64 and source.dtype == np.int16
    assert source_names("mnist_usps") == ["MNIST", "USPS"]
    np.testing.assert_array_equal(source, np.repeat([0, 1], LIMIT))
    np.testing.assert_array_equal(y, np.concatenate([raw["mnist_y"][:LIMIT], raw["usps_y"][:LIMIT]]))
    np.testing.assert_allclose(X[:LIMIT], raw["mnist_x"][:LIMIT].reshape(LIMIT, 784) / 255.0, rtol=0, atol=1e-7)
    assert 0.0 <= X.min() and X.max() <= 1.0
    for k in (0, 17, LIMIT - 1):
        expected = bilinear_reference(raw["usps_x"][k] / 255.0, 28)
        np.testing.assert_allclose(X[LIMIT + k].reshape(28, 28), expected, rtol=0, atol=1e-6)


def test_reverse_mnist_arrays(npz_path, raw):
    X, y, source = load_digits("reverse_mnist", npz_path, limit=LIMIT, flatten=False)
    assert X.shape == (2 * LIMIT, 1, 28, 28)
    assert source_names("reverse_mnist") == ["original", "inverted"]
    np.testing.assert_array_equal(source, np.repeat([0, 1], LIMIT))
    np.testing.assert_array_equal(y, np.tile(raw["mnist_y"][:LIMIT], 2))
    mnist = raw["mnist_x"][:LIMIT].astype(np.float64)
    np.testing.assert_allclose(X[:LIMIT, 0], mnist / 255.0, atol=1e-7)
    np.testing.assert_allclose(X[LIMIT:, 0], (255.0 - mnist) / 255.0, atol=1e-7)


def test_full_sizes_without_limit(npz_path):
    X, y, source = load_digits("mnist_usps", npz_path)
    assert X.shape == (67291, 784) and np.bincount(source).tolist() == [60000, 7291]
    assert set(np.unique(y).tolist()) == set(range(10))


@pytest.mark.parametrize("dataset", ["mnist_usps", "reverse_mnist"])
def test_shards_round_trip(tmp_path, npz_path, dataset):
    manifest = write_digits_shards(tmp_path / dataset, npz_path, dataset=dataset, limit=LIMIT, shard_rows=256,
                                   block_rows=100, progress=False)
    X, y, source = load_digits(dataset, npz_path, limit=LIMIT)
    assert manifest.kind == "embeddings" and manifest.dim == 784 and manifest.dtype == "float32"
    assert manifest.num_samples == 2 * LIMIT and [s.samples for s in manifest.shards] == [256, 256, 88]
    assert manifest.attributes == {"source": source_names(dataset)}
    assert manifest.group_counts() == {"source": {name: LIMIT for name in source_names(dataset)}}
    assert manifest.num_identities == 10
    assert manifest.source["dataset"] == dataset and manifest.source["limit_per_source"] == LIMIT
    assert read_manifest(tmp_path / dataset).to_dict() == manifest.to_dict()
    np.testing.assert_array_equal(load_embeddings(tmp_path / dataset), X)
    labels = load_labels(tmp_path / dataset)
    np.testing.assert_array_equal(labels.identity, y)
    np.testing.assert_array_equal(labels.attrs["source"], source)
    ids = np.concatenate([b.ids for b in iter_blocks(tmp_path / dataset)])
    np.testing.assert_array_equal(ids, np.arange(2 * LIMIT))


def test_bad_input(tmp_path, npz_path):
    with pytest.raises(DataError, match="unknown digits dataset 'svhn'"):
        load_digits("svhn", npz_path)
    with pytest.raises(DataError, match="not found"):
        write_digits_shards(tmp_path / "out", tmp_path / "missing.npz")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mnist_x=np.zeros((3, 28, 28), np.uint8), mnist_y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="no array 'usps_x'"):
        load_digits("mnist_usps", wrong)
    with pytest.raises(DataError, match="limit must be >= 1"):
        load_digits("reverse_mnist", npz_path, limit=0)
    with pytest.raises(DataError, match="unknown digit transform"):
        transform_images(np.zeros((1, 28, 28), np.uint8), "blur")


def test_command_line_arguments(tmp_path, npz_path):
    import argparse

    from dist_fair.data.digits import add_digits_arguments, run_digits

    parser = argparse.ArgumentParser()
    add_digits_arguments(parser)
    args = parser.parse_args(["--path", str(npz_path), "--dataset", "reverse_mnist", "--limit", "50",
                              "--out", str(tmp_path / "d"), "--shard-rows", "64"])
    manifest = run_digits(args)
    assert manifest.num_samples == 100 and len(manifest.shards) == 2
    assert manifest.attributes == {"source": ["original", "inverted"]}
