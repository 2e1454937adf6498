"""Make ``import torchvision`` (and so ``import timm``) work with a CUDA-linked torchvision wheel
on a CPU-only machine.

The registry's torchvision wheel ships a ``_C`` extension linked against CUDA. Without the CUDA
libraries it fails to load, and torchvision's own ``_meta_registrations`` then raises
``operator torchvision::nms does not exist`` while registering fake kernels for ``nms`` and
``qnms``. ``ensure_torchvision_ops()`` - called before torchvision is first imported - does
nothing when the native ops load; otherwise it defines the two missing op schemas and registers
a pure-torch CPU ``nms`` (greedy non-maximum suppression, boxes as (x1, y1, x2, y2)). The other
torchvision ops stay unavailable, exactly as torchvision reports them. Site-packages is never
modified.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

LOG = logging.getLogger(__name__)

_LIBRARY = None  # keeps the torch.library registration alive
NMS_SCHEMA = "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
QNMS_SCHEMA = "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def nms_reference(boxes, scores, iou_threshold: float):
    """Greedy NMS: keep the highest-scoring box, drop boxes with IoU > threshold, repeat.

    Returns the kept indices (int64) sorted by decreasing score, like ``torchvision.ops.nms``.
    """
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    x1, y1, x2, y2 = boxes.float().unbind(dim=1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = torch.argsort(scores, descending=True, stable=True)
    suppressed = torch.zeros(boxes.shape[0], dtype=torch.bool)
    keep = []
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        xx1 = torch.maximum(x1[idx], x1)
        yy1 = torch.maximum(y1[idx], y1)
        xx2 = torch.minimum(x2[idx], x2)
        yy2 = torch.minimum(y2[idx], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[idx] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _native_ops_load() -> bool:
    import torch

    if hasattr(torch.ops, "torchvision") and _has_op("nms"):
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for candidate in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(candidate))
                return _has_op("nms")
            except (OSError, RuntimeError):
                return False
    return False


def _has_op(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def ensure_torchvision_ops() -> bool:
    """Prepare torchvision's ops before its import. Returns True if the CPU shim was installed."""
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return _LIBRARY is not None
    if _native_ops_load():
        return False
    import torch

    LOG.debug("torchvision's native ops do not load on this machine; registering CPU nms schemas")
    library = torch.library.Library("torchvision", "DEF")
    library.define(NMS_SCHEMA)
    library.define(QNMS_SCHEMA)
    library.impl("nms", nms_reference, "CPU")
    _LIBRARY = library
    return True


def import_timm():
    """``import timm`` after preparing torchvision; returns the module."""
    ensure_torchvision_ops()
    import timm

    return timm
