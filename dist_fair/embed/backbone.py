"""The image backbone: any timm model by name, with weights from a local checkpoint.

Face-recognition weights are never downloaded (this machine reaches no model hub): pass
``checkpoint`` (a ``state_dict`` saved with ``torch.save``; loaded with ``weights_only=True``).
Without one the model keeps its seeded random initialisation, which is deterministic and useful
for tests and throughput measurements only - say so in any report.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dist_fair.errors import ConfigError

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
