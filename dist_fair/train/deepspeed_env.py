"""Importing DeepSpeed the way dist_fair needs it (DESIGN.md, "Engines and how they start").

DeepSpeed is imported only inside training workers and only through :func:`import_deepspeed`, so
commands that do not train never pay for it. Before the import:

- ``DS_ACCELERATOR=cpu`` is set when no CUDA device is visible (DeepSpeed would otherwise probe for
  accelerators and may pick the wrong one);
- ``TORCH_EXTENSIONS_DIR`` is pointed at ``<sys.prefix>/torch_extensions`` unless the user set it.
  DeepSpeed's CPU communication path JIT-compiles a small C++ op (``deepspeed_shm_comm``, about
  40 s with g++) on first use; with the cache inside the virtual environment it is built once per
  environment and reused by every later run, worker and test.

Only the standard library is imported at module level.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import ModuleType

LOG = logging.getLogger(__name__)

#: Name of the op cache folder created inside the virtual environment (``sys.prefix``).
EXTENSIONS_FOLDER = "torch_extensions"


def extensions_dir() -> Path:
    """Where compiled DeepSpeed/torch C++ ops are cached: ``$TORCH_EXTENSIONS_DIR`` if the user set
    it, else ``<sys.prefix>/torch_extensions`` (one cache per virtual environment)."""
    user = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(user) if user else Path(sys.prefix) / EXTENSIONS_FOLDER


def cuda_visible() -> bool:
    """True when torch sees at least one CUDA device (imports torch, not DeepSpeed)."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def prepare_deepspeed_env(use_gpu: bool | None = None) -> dict[str, str]:
    """Set the environment DeepSpeed reads at import time; return what was set.

    Args:
        use_gpu: whether this process trains on a GPU; ``None`` asks torch.

    Must run before the first ``import deepspeed`` in the process (later calls still fix the
    environment for child processes but cannot change an already imported DeepSpeed).
    """
    if use_gpu is None:
        use_gpu = cuda_visible()
    changed: dict[str, str] = {}
    if not use_gpu and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = changed["DS_ACCELERATOR"] = "cpu"
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        folder = extensions_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # read-only environment: fall back to torch's default cache
            LOG.warning("cannot create the op cache %s (%s); DeepSpeed ops will use torch's default cache", folder, err)
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = changed["TORCH_EXTENSIONS_DIR"] = str(folder)
    if "deepspeed" in sys.modules and changed:
        LOG.warning("DeepSpeed was imported before prepare_deepspeed_env(); %s may not take effect", sorted(changed))
    return changed


def import_deepspeed(use_gpu: bool | None = None) -> ModuleType:
    """Prepare the environment (see :func:`prepare_deepspeed_env`) and import DeepSpeed."""
    prepare_deepspeed_env(use_gpu)
    import deepspeed

    return deepspeed


def build_cpu_ops() -> list[str]:
    """Compile (or load from the cache) the C++ ops DeepSpeed's CPU path needs; return their names.

    Running this once after installing (``dist-fair train --build-ops``) moves the one-off ~40 s
    compile out of the first training run. Needs g++ on the PATH.
    """
    import_deepspeed(use_gpu=False)
    from deepspeed.accelerator import get_accelerator

    built = []
    for builder_name in ("ShareMemCommBuilder",):
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is None:
            continue
        builder.load(verbose=False)
        built.append(builder.NAME)
    LOG.info("DeepSpeed CPU ops ready in %s: %s", extensions_dir(), ", ".join(built) or "none needed")
    return built
