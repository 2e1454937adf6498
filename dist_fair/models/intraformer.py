"""Transformer clusterers over kNN sequences: Intraformer and the Clusformer baseline (METHODS.md §4).

Input for anchor ``i``: its ``L`` nearest neighbours' embeddings in decreasing similarity order,
the anchor itself first (``tokens``: B x L x d), and which positions hold a neighbour (``valid``:
B x L; a missing neighbour, id -1, is padding). With ``sim_features`` each token is concatenated
with its *similarity row*: its cosine similarities to every token of the sequence,
``S = X X^T`` (B x L x L, padding columns zeroed; column 0 is the similarity to the anchor). A
linear projection to width ``h`` plus a learned position embedding (the rank in similarity order)
gives ``x`` (B x L x h).

Intraformer (per layer, pre-LayerNorm blocks with residual connections):

- sub-clusters: the sequence is cut into ``M`` contiguous groups ``F_0 .. F_{M-1}``
  (:func:`sub_cluster_bounds`; ``F_0`` holds the anchor, the "centroid" sub-cluster);
- an intra block: self-attention *inside* each sub-cluster (block-diagonal attention), then FFN;
- an inter block: self-attention over the whole sequence, then FFN;
- the Cross Transformer block (``cross``): queries from one sub-cluster, keys and values from
  ``F_0``, ``x_q <- x_q + Attn(LN(x_q), LN(x_{F_0}))`` then FFN on the query tokens, so far
  positives gain a direct link to the centroid. Options (the paper leaves this open):
  ``"last"`` (``F_{M-1}`` queries ``F_0``, the paper's block), ``"both"`` (also ``F_0`` queries
  ``F_{M-1}``, computed from the same input), ``"all"`` (every ``F_m``, m >= 1, queries ``F_0``),
  ``"none"`` (ablation: no cross block).

Head: ``logit_ij = w^T LN(x_ij) + b``, one logit per token; ``p_ij = sigmoid(logit_ij)`` is the
probability that neighbour ``j`` has the anchor's identity.

Clusformer: the same token input through a plain transformer encoder (``layers`` whole-sequence
self-attention blocks) and the same head, trained with BCE.

Masking: a token never attends to a padding token, except to itself (so that every attention row
has at least one key and padding rows stay finite); the anchor is always valid. The logits of
padding tokens are meaningless and must be masked by the caller (the losses do).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dist_fair.errors import ConfigError

LOG = logging.getLogger(__name__)

KINDS = ("intraformer", "clusformer")
CROSS_MODES = ("none", "last", "both", "all")


def sub_cluster_bounds(length: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` ranges of ``groups`` sub-clusters over a sequence of ``length``
    tokens; sizes differ by at most one, larger groups first (``np.array_split``)."""
    if groups < 1 or length < groups:
        raise ConfigError(f"cannot cut a sequence of {length} tokens into {groups} sub-clusters; "
                          "use 1 <= train.sub_clusters <= the sequence length")
    sizes = [len(part) for part in np.array_split(np.arange(length), groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [(int(s), int(s + n)) for s, n in zip(starts, sizes)]


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model (saved as JSON beside the weights for inference).

    Attributes:
        kind: ``intraformer`` or ``clusformer``.
        in_dim: embedding dimension d of a token.
        seq_len: tokens per sequence L (the anchor and its L - 1 nearest neighbours).
        width: model width h; heads: attention heads (must divide h).
        layers: Intraformer layers (intra + inter + cross blocks each) or Clusformer encoder blocks.
        sub_clusters: M, the number of contiguous sub-clusters (Intraformer).
        cross: Cross Transformer option, one of ``CROSS_MODES`` (Intraformer).
        sim_features: concatenate each token's similarity row (L values) to its embedding.
        ffn_mult: FFN hidden width = ffn_mult * h; dropout: in attention and FFN.
    """

    kind: str = "intraformer"
    in_dim: int = 128
    seq_len: int = 40
    width: int = 64
    heads: int = 4
    layers: int = 1
    sub_clusters: int = 4
    cross: str = "last"
    sim_features: bool = True
    ffn_mult: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"model kind {self.kind!r} is unknown; choose one of {KINDS}")
        if self.cross not in CROSS_MODES:
            raise ConfigError(f"config field 'train.cross': got {self.cross!r}; choose one of {CROSS_MODES}")
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ConfigError(f"config fields 'train.width'={self.width} and 'train.heads'={self.heads}: the width "
                              "must be a positive multiple of the number of heads")
        if self.in_dim < 1 or self.layers < 1 or self.ffn_mult < 1:
            raise ConfigError("model in_dim, layers and ffn_mult must be >= 1")
        if self.seq_len < 2:
            raise ConfigError(f"sequence length {self.seq_len} must be >= 2 (the anchor and at least one neighbour)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config field 'train.dropout': {self.dropout} must be in [0, 1)")
        if self.kind == "intraformer":
            sub_cluster_bounds(self.seq_len, self.sub_clusters)  # validates
            if self.cross != "none" and self.sub_clusters < 2:
                raise ConfigError("the Cross Transformer block needs train.sub_clusters >= 2 "
                                  "(or set train.cross=none)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelSpec":
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})


class Attention(nn.Module):
    """Multi-head attention ``softmax(Q K^T / sqrt(d_h) + mask) V`` with separate query and context
    inputs; ``allowed`` (B x Lq x Lk, True = may attend) is applied as a boolean mask."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, query: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        batch, lq, width = query.shape
        lk = context.shape[1]
        dh = width // self.heads
        q = self.query(query).view(batch, lq, self.heads, dh).transpose(1, 2)
        k, v = self.key_value(context).view(batch, lk, 2, self.heads, dh).unbind(dim=2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        mask = None if allowed is None else allowed[:, None, :, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(batch, lq, width))


class AttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x <- x + Attn(LN(x), LN(c)); x <- x + FFN(LN(x))`` with
    ``c = x`` (self-attention) unless a context is given (cross-attention)."""

    def __init__(self, width: int, heads: int, ffn_mult: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width)
        self.attention = Attention(width, heads, dropout)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_mult * width, width))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.norm_query(x)
        c = q if context is None else self.norm_context(context)
        x = x + self.attention(q, c, allowed)
        return x + self.ffn(self.norm_ffn(x))


def _self_mask(valid: torch.Tensor, structure: torch.Tensor | None = None) -> torch.Tensor:
    """Allowed (B x L x L): valid keys (within ``structure`` if given), and always the token itself."""
    length = valid.shape[1]
    allowed = valid[:, None, :].expand(-1, length, -1)
    if structure is not None:
        allowed = allowed & structure[None]
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return allowed | eye[None]


class CrossBlock(nn.Module):
    """The Cross Transformer block: tokens of the query sub-clusters attend to the centroid
    sub-cluster ``F_0`` (see the module docstring for the options)."""

    def __init__(self, width: int, heads: int, bounds: list[tuple[int, int]], mode: str, ffn_mult: int,
                 dropout: float) -> None:
        super().__init__()
        self.bounds = bounds
        self.mode = mode
        self.to_centroid = AttentionBlock(width, heads, ffn_mult, dropout)
        self.from_centroid = AttentionBlock(width, heads, ffn_mult, dropout) if mode == "both" else None

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        c0, c1 = self.bounds[0]
        q0 = self.bounds[-1][0] if self.mode in ("last", "both") else self.bounds[1][0]
        q1 = x.shape[1]
        centroid, queries = x[:, c0:c1], x[:, q0:q1]
        allowed = valid[:, None, c0:c1].expand(-1, q1 - q0, -1)  # the anchor in F_0 is always valid
        new_queries = self.to_centroid(queries, allowed, context=centroid)
        if self.from_centroid is not None:
            # F_0 queries F_{M-1}; a sequence whose F_{M-1} is all padding keeps F_0 unchanged
            # (its attention row would be empty: it is computed over all keys and discarded).
            present = valid[:, q0:q1].any(dim=1)
            back = valid[:, None, q0:q1].expand(-1, c1 - c0, -1) | ~present[:, None, None]
            updated = self.from_centroid(centroid, back, context=queries)
            centroid = torch.where(present[:, None, None], updated, centroid)
        return torch.cat([centroid, x[:, c1:q0], new_queries], dim=1)


class SequenceClusterer(nn.Module):
    """Intraformer or Clusformer (``spec.kind``): ``forward(tokens, valid) -> logits`` (B x L)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        h = spec.width
        features = spec.in_dim + (spec.seq_len if spec.sim_features else 0)
        self.input = nn.Linear(features, h)
        self.position = nn.Parameter(torch.zeros(spec.seq_len, h))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList()
        if spec.kind == "intraformer":
            self.bounds = sub_cluster_bounds(spec.seq_len, spec.sub_clusters)
            group_of = torch.zeros(spec.seq_len, dtype=torch.long)
            for index, (start, stop) in enumerate(self.bounds):
                group_of[start:stop] = index
            self.register_buffer("same_group", group_of[:, None] == group_of[None, :], persistent=False)
            for _ in range(spec.layers):
                layer = nn.ModuleDict({
                    "intra": AttentionBlock(h, spec.heads, spec.ffn_mult, spec.dropout),
                    "inter": AttentionBlock(h, spec.heads, spec.ffn_mult, spec.dropout),
                })
                if spec.cross != "none":
                    layer["cross"] = CrossBlock(h, spec.heads, self.bounds, spec.cross, spec.ffn_mult, spec.dropout)
                self.blocks.append(layer)
        else:
            self.bounds = [(0, spec.seq_len)]
            for _ in range(spec.layers):
                self.blocks.append(nn.ModuleDict({"inter": AttentionBlock(h, spec.heads, spec.ffn_mult, spec.dropout)}))
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, 1)

    def features(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Token input: the embedding, and with ``sim_features`` its similarity row ``S = X X^T``
        (padding tokens zeroed first, so their rows and columns are 0)."""
        tokens = tokens * valid[..., None].to(tokens.dtype)
        if not self.spec.sim_features:
            return tokens
        similarity = torch.bmm(tokens, tokens.transpose(1, 2))
        return torch.cat([tokens, similarity], dim=2)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[1] != self.spec.seq_len or tokens.shape[2] != self.spec.in_dim:
            raise ValueError(f"tokens must be (batch, {self.spec.seq_len}, {self.spec.in_dim}), got {tuple(tokens.shape)}")
        if valid is None:
            valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        valid = valid.bool()
        x = self.input(self.features(tokens, valid)) + self.position[None].to(tokens.dtype)
        full = _self_mask(valid)
        intra = _self_mask(valid, self.same_group) if self.spec.kind == "intraformer" else None
        for layer in self.blocks:
            if "intra" in layer:
                x = layer["intra"](x, intra)
            x = layer["inter"](x, full)
            if "cross" in layer:
                x = layer["cross"](x, valid)
        return self.head(self.norm(x)).squeeze(-1)


def build_model(spec: ModelSpec | dict[str, Any]) -> SequenceClusterer:
    """The model described by ``spec`` (a :class:`ModelSpec` or its dict)."""
    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    return SequenceClusterer(spec)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


__all__ = ["KINDS", "CROSS_MODES", "ModelSpec", "SequenceClusterer", "AttentionBlock", "CrossBlock", "Attention",
           "sub_cluster_bounds", "build_model", "count_parameters"]
