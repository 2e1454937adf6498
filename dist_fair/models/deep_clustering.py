"""Deep clustering modules (METHODS.md §5): autoencoder + DEC, IMSAT, and their fair variants.

Two model families; both map a batch ``x`` to soft cluster assignments ``y`` ``[n, K]`` through
``probs(outputs)`` so that training loops, the fair assignment and prediction treat them alike:

- discriminative (:class:`IMSATModel`, also DFDC's): ``outputs = logits = f(x)``,
  ``y = softmax(logits)``;
- centroid-based (:class:`DECModel`, also Fair-DEC's and :class:`FairoidsModel`): an encoder
  ``z = g(x)`` and K centroids ``mu_j``; ``outputs = (z, q)`` with ``q`` the Student-t assignment
  (:func:`dist_fair.losses.deep_clustering.student_t_assignment`).

Centroids are ``mu = centroid_init + centroid_delta``: the k-means initialisation is a buffer and
only the offset is a trained parameter. Writing the initialisation into a buffer is safe under any
optimiser that keeps its own copy of the parameters (DeepSpeed ZeRO's fp32 partitions would
overwrite an in-place change of a parameter at the next step), and Adam's update is the same for
the offset as for the centroids themselves.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dist_fair.losses.deep_clustering import student_t_assignment
from dist_fair.models.backbones import MLP

LOG = logging.getLogger(__name__)

__all__ = ["Autoencoder", "IMSATModel", "DFDCModel", "DECModel", "FairDECModel", "FairoidsModel",
           "DEC_HIDDEN"]

#: DEC's autoencoder widths: d-500-500-2000-z (METHODS.md §5).
DEC_HIDDEN = (500, 500, 2000)


class Autoencoder(nn.Module):
    """DEC's fully connected autoencoder ``d-500-500-2000-z`` and its mirror (METHODS.md §5).

    ``z = encoder(x)`` (ReLU hidden layers, linear code), ``x_rec = decoder(z)`` (linear output);
    pre-trained on the reconstruction error ``mean ||x - x_rec||^2``. Inputs are flattened.

    Args:
        in_dim: input features d.
        latent_dim: code size z (DEC: K).
        hidden: encoder widths (the decoder uses them reversed).
    """

    def __init__(self, in_dim: int, latent_dim: int, hidden: Sequence[int] = DEC_HIDDEN) -> None:
        super().__init__()
        self.encoder = MLP(in_dim, hidden, latent_dim, batchnorm=False)
        self.decoder = MLP(latent_dim, tuple(reversed(tuple(hidden))), in_dim, batchnorm=False)
        self.in_dim, self.latent_dim = in_dim, latent_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.flatten(1) if x.dim() > 2 else x
        z = self.encoder(flat)
        return z, self.decoder(z)

    @staticmethod
    def reconstruction_loss(x: Tensor, x_rec: Tensor) -> Tensor:
        """``(1/n) sum_i ||x_i - x_rec_i||^2 / d`` (mean squared error)."""
        flat = x.flatten(1) if x.dim() > 2 else x
        return (flat - x_rec).pow(2).mean()


class IMSATModel(nn.Module):
    """IMSAT's discriminative clusterer: ``logits = f(x)``, ``y = softmax(logits)`` (METHODS.md §5).

    Args:
        backbone: any module mapping a batch to ``[n, K]`` logits (see
            :func:`dist_fair.models.backbones.create_backbone`).
        n_clusters: K (checked against the backbone's output on the first call).
    """

    family = "discriminative"

    def __init__(self, backbone: nn.Module, n_clusters: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_clusters = n_clusters

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @staticmethod
    def probs(outputs: Tensor) -> Tensor:
        return torch.softmax(outputs.float(), dim=1)

    def soft_assign(self, x: Tensor) -> Tensor:
        return self.probs(self(x))


#: DFDC trains the IMSAT model with the extra fairness loss; the module is the same.
DFDCModel = IMSATModel


class DECModel(nn.Module):
    """DEC: an encoder and K centroids; ``outputs = (z, q)``, ``q_ij`` the Student-t assignment of
    ``z_i`` to ``mu_j`` (METHODS.md §5).

    Args:
        encoder: module mapping a batch to codes ``[n, d]`` (the pre-trained autoencoder's encoder).
        n_clusters: K.
        latent_dim: d.
        alpha: Student-t degrees of freedom (1).
    """

    family = "centroid"

    def __init__(self, encoder: nn.Module, n_clusters: int, latent_dim: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.n_clusters, self.latent_dim, self.alpha = n_clusters, latent_dim, alpha
        self.register_buffer("centroid_init", torch.zeros(n_clusters, latent_dim))
        self.centroid_delta = nn.Parameter(torch.zeros(n_clusters, latent_dim))

    @property
    def centroids(self) -> Tensor:
        """``mu = centroid_init + centroid_delta`` ``[K, d]``."""
        return self.centroid_init + self.centroid_delta

    def set_centroids(self, centroids: Any) -> None:
        """Initialise the centroids (e.g. from k-means on the codes): the buffer takes the values and
        the trained offset is reset to 0."""
        values = torch.as_tensor(centroids, dtype=self.centroid_init.dtype, device=self.centroid_init.device)
        if tuple(values.shape) != tuple(self.centroid_init.shape):
            raise ValueError(f"set_centroids: expected shape {tuple(self.centroid_init.shape)}, got {tuple(values.shape)}")
        with torch.no_grad():
            self.centroid_init.copy_(values)
            self.centroid_delta.zero_()

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x.flatten(1) if x.dim() > 2 else x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        return z, student_t_assignment(z.float(), self.centroids.float(), self.alpha)

    @staticmethod
    def probs(outputs: tuple[Tensor, Tensor]) -> Tensor:
        return outputs[1]

    def soft_assign(self, x: Tensor) -> Tensor:
        return self(x)[1]


#: Fair-DEC trains the DEC model with the extra fairness loss; the module is the same.
FairDECModel = DECModel


class FairoidsModel(DECModel):
    """DEC plus what the Fairoids loss needs to know about the protected groups: their number T and
    the target shares ``rho`` (a buffer; uniform by default). The fairoids themselves (group means of
    the codes) are computed from each batch by the loss, so that gradients flow through them."""

    def __init__(self, encoder: nn.Module, n_clusters: int, latent_dim: int, num_groups: int,
                 rho: Sequence[float] | None = None, alpha: float = 1.0) -> None:
        super().__init__(encoder, n_clusters, latent_dim, alpha)
        self.num_groups = num_groups
        shares = torch.full((num_groups,), 1.0 / num_groups) if rho is None else torch.as_tensor(rho, dtype=torch.float32)
        if shares.shape != (num_groups,) or bool((shares <= 0).any()):
            raise ValueError(f"FairoidsModel: rho must hold {num_groups} positive shares, got {shares.tolist()}")
        self.register_buffer("rho", shares / shares.sum())
