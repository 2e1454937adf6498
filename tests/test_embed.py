"""The embed stage on real UTKFace images: labels carried over, features equal an independent
forward pass, checkpoints load, and Ray workers give the same shards as one process."""
import io

import numpy as np
import pytest
import torch

from dist_fair.data import shards as S
from dist_fair.embed.timm_backbone import create_backbone
from dist_fair.embed.stage import embed_image_shards
from dist_fair.errors import ConfigError, ShardError


@pytest.fixture(scope="module")
def image_shards(shared_data, tmp_path_factory):
    from dist_fair.data.images import write_utkface_shards

    out = tmp_path_factory.mktemp("utk")
    write_utkface_shards(out, shared_data / "utkface" / "UTKFace-00.tar", limit=10, shard_rows=4)
    return out


def _reference_embedding(jpg: bytes, net, size: int) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(jpg)).convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        feat = net(((x - mean) / std)[None])[0]
    return (feat / feat.norm()).numpy()


def test_embeddings_carry_labels_and_match_reference(image_shards, tmp_path):
    manifest = embed_image_shards(image_shards, tmp_path / "e", "resnet18", image_size=32, batch_size=3,
                                  dtype="float32", progress=False)
    assert manifest.kind == "embeddings" and manifest.dim == 512 and manifest.num_samples == 10
    images, embedded = S.load_labels(image_shards), S.load_labels(tmp_path / "e")
    assert np.array_equal(images.identity, embedded.identity)
    for attr in images.attrs:
        assert np.array_equal(images.attrs[attr], embedded.attrs[attr])
    emb = S.load_embeddings(tmp_path / "e")
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    first = next(S.iter_tar_samples(image_shards / S.read_manifest(image_shards).shards[0].name))
    ref = _reference_embedding(first["jpg"], create_backbone("resnet18", seed=0), 32)
    assert np.allclose(emb[0], ref, atol=1e-4)


def test_checkpoint_is_loaded(image_shards, tmp_path):
    net = create_backbone("resnet18", seed=7)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    a = embed_image_shards(image_shards, tmp_path / "a", "resnet18", checkpoint=str(tmp_path / "w.pt"),
                           image_size=32, dtype="float32", progress=False)
    b = embed_image_shards(image_shards, tmp_path / "b", "resnet18", image_size=32, seed=7, dtype="float32",
                           progress=False)
    assert np.array_equal(S.load_embeddings(tmp_path / "a"), S.load_embeddings(tmp_path / "b"))
    assert a.source["random_weights"] is False and b.source["random_weights"] is True
    torch.save({"nonsense": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="lacks"):
        create_backbone("resnet18", str(tmp_path / "bad.pt"))
    with pytest.raises(ConfigError, match="not a timm model"):
        create_backbone("no_such_net")


def test_ray_workers_equal_one_process(image_shards, tmp_path, ray_cluster):
    one = embed_image_shards(image_shards, tmp_path / "one", "resnet18", image_size=32, workers=1, progress=False)
    two = embed_image_shards(image_shards, tmp_path / "two", "resnet18", image_size=32, workers=2, progress=False)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]


def test_embedding_shards_are_rejected(tmp_path):
    S.write_embedding_shards(tmp_path / "x", np.zeros((3, 4), np.float32))
    with pytest.raises(ShardError, match="not images"):
        embed_image_shards(tmp_path / "x", tmp_path / "y")


def test_a_changed_image_shard_is_refused_before_embedding(image_shards, tmp_path):
    import shutil

    copy = tmp_path / "images"
    shutil.copytree(image_shards, copy)
    info = S.read_manifest(copy).shards[1]
    data = bytearray((copy / info.name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a JPEG
    (copy / info.name).write_bytes(bytes(data))
    with pytest.raises(S.ShardIntegrityError, match=info.name):
        embed_image_shards(copy, tmp_path / "e", "resnet18", image_size=32, progress=False)
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_a_decompression_bomb_is_refused_by_the_embedders(monkeypatch):
    from PIL import Image

    from dist_fair.embed.timm_backbone import decode_image
    from dist_fair.errors import DataError

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4,096 pixels counts as a bomb now
    with pytest.raises(DataError, match="sample 7"):
        decode_image(buffer.getvalue(), 32, "sample 7")
