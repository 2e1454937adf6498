"""Face embedders behind one registry (timm's ``register_model`` / ``create_model`` pattern).

An *embedder* turns a batch of JPEG bytes into one L2-normalised float32 row per image,
``x = f(image) / ||f(image)||`` (METHODS.md §1), and reports per-image boolean *flags* such as
``no_face`` (no face was detected and the image was embedded from its centre). The embed stage
(``stage.py``) runs any registered embedder over image shards.

Names are resolved in this order:

1. an exact registered name (``dlib-resnet``);
2. ``<family>:<name>`` (``timm:resnet18``) for a registered family;
3. every family whose ``matches(name)`` accepts the name (every timm model name).

Unknown names raise ``ConfigError`` listing the choices; options a factory does not take raise
``ConfigError`` naming the option and the ones it does take.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dist_fair.errors import ConfigError

#: Modules that register the built-in embedders when imported (kept light: no torch/dlib at import).
BUILTIN_MODULES = ("dist_fair.embed.timm_backbone", "dist_fair.embed.dlib_resnet")


@dataclass
class EmbeddedBatch:
    """The rows of one batch: ``rows`` float32 (n, dim), each of unit L2 norm, and ``flags``
    (flag name -> bool array (n,), one entry per name in the embedder's ``flags``)."""

    rows: np.ndarray
    flags: dict[str, np.ndarray] = field(default_factory=dict)


class Embedder(ABC):
    """What the embed stage needs of a model.

    Attributes:
        name: the registry name it was created under.
        dim: length of every output row.
        flags: names of the per-image boolean flags ``embed_jpegs`` reports (e.g. ``("no_face",)``).
        default_batch_size: images per ``embed_jpegs`` call when the caller does not choose.
    """

    name: str = ""
    dim: int = 0
    flags: tuple[str, ...] = ()
    default_batch_size: int = 64

    @abstractmethod
    def embed_jpegs(self, images: Sequence[bytes], where: Sequence[str]) -> EmbeddedBatch:
        """Embed JPEG-encoded images; ``where[i]`` names image i in error messages."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able provenance (model, weights, preprocessing) stored in the output manifest."""

    @contextlib.contextmanager
    def limit_threads(self, threads: int) -> Iterator[None]:
        """Run the body with at most ``threads`` BLAS/OpenMP threads (one Ray task = one CPU)."""
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=threads):
            yield


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., Embedder]
    matches: Callable[[str], bool] | None
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_embedder(name: str, matches: Callable[[str], bool] | None = None,
                      description: str = "") -> Callable[[Callable[..., Embedder]], Callable[..., Embedder]]:
    """Decorator registering ``factory(model_name, **options) -> Embedder`` under ``name``.

    With ``matches`` the entry is a *family*: it also serves ``<name>:<model>`` and every model
    name ``matches`` accepts (the factory receives that model name).
    """

    def decorate(factory: Callable[..., Embedder]) -> Callable[..., Embedder]:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ConfigError(f"embedder {name!r} is registered twice ({_REGISTRY[name].factory} and {factory})")
        _REGISTRY[name] = _Entry(name, factory, matches, description or (factory.__doc__ or "").strip().split("\n")[0])
        return factory

    return decorate


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def list_embedders() -> dict[str, str]:
    """Registered names (families as ``<family>:<model>``, after the exact names) -> one-line description."""
    _load_builtins()
    entries = sorted(_REGISTRY.values(), key=lambda e: (e.matches is not None, e.name))  # exact names first
    return {(f"{e.name}:<model>" if e.matches else e.name): e.description for e in entries}


def embedder_choices() -> str:
    """The choices as one sentence for error and help messages."""
    return "; ".join(f"{name} ({text})" if text else name for name, text in list_embedders().items())


def resolve_embedder(name: str) -> tuple[_Entry, str]:
    """(registry entry, model name its factory receives) for ``name``; ConfigError if unknown."""
    _load_builtins()
    if name in _REGISTRY and _REGISTRY[name].matches is None:
        return _REGISTRY[name], name
    family, sep, model = name.partition(":")
    if sep and family in _REGISTRY and _REGISTRY[family].matches is not None:
        entry = _REGISTRY[family]
        if entry.matches(model):
            return entry, model
        raise ConfigError(f"embed model {name!r}: {model!r} is not a {family} model name; choose one of: "
                          f"{embedder_choices()}")
    for entry in _REGISTRY.values():
        if entry.matches is not None and entry.matches(name):
            return entry, name
    raise ConfigError(f"embed model {name!r} is unknown; choose one of: {embedder_choices()}")


def create_embedder(name: str, **options: Any) -> Embedder:
    """The embedder registered as (or matching) ``name``, built with ``options``."""
    entry, model = resolve_embedder(name)
    parameters = inspect.signature(entry.factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = [p for p in list(parameters)[1:] if parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(options) - set(accepted))
    if unknown and not takes_any:
        raise ConfigError(f"embed model {name!r} takes no option {unknown[0]!r}"
                          + (f" (its options: {', '.join(accepted)})" if accepted else " (it takes no options)"))
    embedder = entry.factory(model, **options)
    embedder.name = name
    return embedder


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    """``x / max(||x||, 1e-12)`` row by row, as float32."""
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
