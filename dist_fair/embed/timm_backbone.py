"""Any timm model as an embedder, with weights from a local checkpoint.

Face-recognition weights are never downloaded (this machine reaches no model hub): pass
``checkpoint`` (a ``state_dict`` saved with ``torch.save``; loaded with ``weights_only=True``).
Without one the model keeps its seeded random initialisation, which is deterministic and useful
for tests and throughput measurements only - say so in any report (the manifest records
``random_weights``).

Preprocessing: PIL RGB decode, bilinear resize to ``image_size`` squared, ImageNet mean/std;
features are the pooled output (``num_classes=0``), L2-normalised (METHODS.md §1).
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dist_fair.embed.registry import EmbeddedBatch, Embedder, l2_normalise, register_embedder
from dist_fair.errors import ConfigError, DataError, ShardError

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NET_CACHE: dict[tuple, Any] = {}


def is_timm_model(name: str) -> bool:
    """Whether timm knows ``name`` (architecture, optionally with a ``.tag``)."""
    from dist_fair.compat.torchvision_cpu import import_timm

    return bool(import_timm().is_model(name))


def create_backbone(model: str, checkpoint: str | None = None, seed: int = 0) -> Any:
    """A timm feature extractor (``num_classes=0``) in eval mode."""
    import torch

    from dist_fair.compat.torchvision_cpu import import_timm

    timm = import_timm()
    if not timm.list_models(model):
        raise ConfigError(f"embed model {model!r} is not a timm model name; see timm.list_models() "
                          "(e.g. resnet18, resnet50, mobilenetv3_small_100, vit_small_patch16_224)")
    torch.manual_seed(seed)
    net = timm.create_model(model, pretrained=False, num_classes=0)
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError(f"embed checkpoint {path} does not exist; pass a state_dict saved with torch.save")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing:
            raise ConfigError(f"embed checkpoint {path} lacks {len(missing)} weights of {model} "
                              f"(first: {missing[:3]}); is it a {model} state_dict?")
        if unexpected:
            LOG.warning("embed checkpoint %s has %d weights %s does not use (e.g. a classifier head); ignored",
                        path, len(unexpected), model)
    else:
        LOG.warning("embed: %s has random weights (no --checkpoint); embeddings are not face features", model)
    return net.eval()


def decode_image(data: bytes, size: int, where: str) -> np.ndarray:
    """JPEG bytes -> float32 array (3, size, size), ImageNet-normalised."""
    from PIL import Image

    from dist_fair.data.images import check_image_pixels

    try:
        with Image.open(io.BytesIO(data)) as image:
            check_image_pixels(image, where)  # a decompression bomb is refused before decoding
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except Image.DecompressionBombError as err:
        raise DataError(f"{where}: decompression bomb ({err}); delete or replace the image") from err
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
        raise ShardError(f"{where}: the image cannot be decoded ({err}); rewrite the image shard") from err
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class TimmEmbedder(Embedder):
    """A timm backbone's pooled features of the resized image (no face detection: no flags)."""

    default_batch_size = 64

    def __init__(self, model: str, checkpoint: str | None = None, image_size: int = 112, seed: int = 0) -> None:
        if image_size < 8:
            raise ConfigError(f"embed image size {image_size} is too small; use >= 8 pixels (e.g. 112)")
        self.model, self.checkpoint, self.image_size, self.seed = model, checkpoint, int(image_size), int(seed)
        self.net = self._net()
        self.dim = int(self.net.num_features)

    def _net(self) -> Any:
        key = (self.model, self.checkpoint, self.seed)
        if key not in _NET_CACHE:
            _NET_CACHE[key] = create_backbone(self.model, self.checkpoint, self.seed)
        return _NET_CACHE[key]

    def embed_jpegs(self, images: Sequence[bytes], where: Sequence[str]) -> EmbeddedBatch:
        import torch

        batch = np.stack([decode_image(data, self.image_size, w) for data, w in zip(images, where)])
        with torch.inference_mode():
            feats = self.net(torch.from_numpy(batch)).float().numpy()
        return EmbeddedBatch(l2_normalise(feats))

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "family": "timm", "checkpoint": self.checkpoint, "image_size": self.image_size,
                "seed": self.seed, "random_weights": self.checkpoint is None}

    @contextlib.contextmanager
    def limit_threads(self, threads: int) -> Iterator[None]:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with super().limit_threads(threads):
                yield
        finally:
            torch.set_num_threads(before)


@register_embedder("timm", matches=is_timm_model,
                   description="any timm model name, e.g. resnet18 or timm:resnet50; weights from --checkpoint, "
                               "else random (tests only)")
def create_timm_embedder(model: str, checkpoint: str | None = None, image_size: int = 112,
                         seed: int = 0) -> TimmEmbedder:
    """A timm model by name (``timm.is_model``)."""
    return TimmEmbedder(model, checkpoint, image_size, seed)
