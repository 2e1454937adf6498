"""Backbone networks of the deep clustering methods (METHODS.md §5; dissertation §6.5.1).

- :class:`MLP`: stacked fully connected layers for embeddings and tables (the dissertation uses
  ``d-50-50-K`` on Census/Bank/Credit and ``d-1200-1200-K`` on HAR).
- :class:`SmallConvNet`: the dissertation's network for digits: two blocks, 8 then 4 filters of
  5x5, each followed by BatchNorm, ReLU and 2x2 max pooling, then one fully connected layer with
  K units (28x28 input: 28 -> 24 -> 12 -> 8 -> 4, so 4 * 4 * 4 = 64 features).
- :func:`timm_backbone`: any timm model by name (``timm.create_model(name, num_classes=K)``),
  imported through :func:`dist_fair.compat.torchvision_cpu.import_timm`.
- :func:`create_backbone`: the one factory; a spec is ``"mlp"``, ``"conv"`` or ``"timm:<name>"``.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from dist_fair.errors import ConfigError

LOG = logging.getLogger(__name__)

__all__ = ["MLP", "SmallConvNet", "timm_backbone", "create_backbone", "BACKBONES"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Module):
    """``in_dim -> hidden[0] -> ... -> hidden[-1] -> out_dim``: each hidden layer is Linear,
    optional BatchNorm1d, activation; the output layer is a plain Linear (logits or a code).

    Inputs with more than two dimensions (e.g. images ``[n, 1, 28, 28]``) are flattened.

    Args:
        in_dim: input features ``d``.
        hidden: widths of the hidden layers (may be empty: a linear map).
        out_dim: output units (``K`` for a clustering head, the code size for an encoder).
        batchnorm: BatchNorm after each hidden Linear (IMSAT's MLP uses it; DEC's autoencoder not).
        activation: ``"relu"``, ``"gelu"``, ``"tanh"`` or ``"leaky_relu"``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, batchnorm: bool = True,
                 activation: str = "relu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"MLP activation {activation!r}: choose one of {sorted(_ACTIVATIONS)}")
        if in_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
            raise ConfigError(f"MLP sizes must be >= 1, got in_dim={in_dim}, hidden={list(hidden)}, out_dim={out_dim}")
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batchnorm:
                layers.append(nn.BatchNorm1d(size))
            layers.append(_ACTIVATIONS[activation]())
            width = size
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1) if x.dim() > 2 else x)


class SmallConvNet(nn.Module):
    """The dissertation's digit network: ``[Conv(c->8, 5x5), BN, ReLU, MaxPool 2] ->
    [Conv(8->4, 5x5), BN, ReLU, MaxPool 2] -> Linear(4 * s * s -> K)`` (no padding; ``s`` = 4 for
    28x28 input). Flat inputs ``[n, c * side * side]`` are reshaped to images.

    Args:
        num_outputs: units of the final layer (K).
        in_channels: image channels (1 for digits).
        side: image height = width (28).
        filters: filters of the two blocks (8, 4).
        kernel: filter size (5).
    """

    def __init__(self, num_outputs: int = 10, in_channels: int = 1, side: int = 28,
                 filters: tuple[int, int] = (8, 4), kernel: int = 5) -> None:
        super().__init__()
        spatial = side
        for _ in range(2):
            spatial = (spatial - kernel + 1) // 2
        if spatial < 1:
            raise ConfigError(f"SmallConvNet: images of side {side} are too small for two {kernel}x{kernel} "
                              "convolutions with 2x2 pooling; use side >= 16 or the MLP backbone")
        self.in_channels, self.side = in_channels, side
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, filters[0], kernel), nn.BatchNorm2d(filters[0]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(filters[0], filters[1], kernel), nn.BatchNorm2d(filters[1]), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(filters[1] * spatial * spatial, num_outputs)
        self.out_dim = num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.view(x.shape[0], self.in_channels, self.side, self.side)
        return self.head(self.features(x).flatten(1))


def timm_backbone(name: str, num_outputs: int, in_channels: int = 3, pretrained: bool = False,
                  **kwargs) -> nn.Module:
    """Any timm model by name with a K-unit head: ``timm.create_model(name, num_classes=K,
    in_chans=c, pretrained=...)`` (pretrained weights need network access or a local cache)."""
    from dist_fair.compat.torchvision_cpu import import_timm

    timm = import_timm()
    try:
        return timm.create_model(name, num_classes=num_outputs, in_chans=in_channels, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "unknown model" in str(err).lower():
            raise ConfigError(f"backbone 'timm:{name}': timm has no model {name!r}; list them with "
                              "timm.list_models('*pattern*')") from err
        raise


#: Backbone names understood by :func:`create_backbone` (besides ``timm:<name>``).
BACKBONES = ("mlp", "conv")


def create_backbone(spec: str, input_shape: Sequence[int], num_outputs: int, hidden: Sequence[int] = (50, 50),
                    batchnorm: bool = True, pretrained: bool = False) -> nn.Module:
    """The backbone named by ``spec`` for samples of shape ``input_shape`` (without the batch).

    Args:
        spec: ``"mlp"`` (any input, flattened), ``"conv"`` (:class:`SmallConvNet`; images
            ``(c, s, s)``) or ``"timm:<model name>"`` (images ``(c, h, w)``).
        input_shape: e.g. ``(784,)``, ``(1, 28, 28)``, ``(3, 224, 224)``.
        num_outputs: K.
        hidden: MLP hidden widths.
        batchnorm: MLP BatchNorm.
        pretrained: timm pretrained weights.
    """
    shape = tuple(int(s) for s in input_shape)
    flat = 1
    for size in shape:
        flat *= size
    if spec == "mlp":
        return MLP(flat, hidden, num_outputs, batchnorm=batchnorm)
    if spec == "conv":
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ConfigError(f"backbone 'conv' needs square images (channels, side, side), got samples of shape {shape}; "
                              "pass images as [n, c, s, s] (or set image_shape) or use backbone='mlp'")
        return SmallConvNet(num_outputs, in_channels=shape[0], side=shape[1])
    if spec.startswith("timm:"):
        if len(shape) != 3:
            raise ConfigError(f"backbone {spec!r} needs images (channels, height, width), got samples of shape {shape}")
        return timm_backbone(spec[len("timm:"):], num_outputs, in_channels=shape[0], pretrained=pretrained)
    raise ConfigError(f"unknown backbone {spec!r}; choose 'mlp', 'conv' or 'timm:<model name>'")
