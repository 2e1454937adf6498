"""dist_fair.models.intraformer: shapes, sub-clusters, masking, the Cross Transformer options and the
attention against a brute-force reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_fair.errors import ConfigError
from dist_fair.models.intraformer import (CROSS_MODES, Attention, CrossBlock, ModelSpec, build_model, count_parameters,
                                          sub_cluster_bounds)

DIM, LENGTH = 12, 10


def tokens(batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LENGTH, DIM, generator=g)
    return x / x.norm(dim=2, keepdim=True)


def model(kind: str = "intraformer", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = ModelSpec(kind=kind, in_dim=DIM, seq_len=LENGTH, width=16, heads=2, **kwargs)
    return build_model(spec).eval()


def test_sub_cluster_bounds_are_contiguous_and_cover_the_sequence():
    assert sub_cluster_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert sub_cluster_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert sub_cluster_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ConfigError, match="sub-clusters"):
        sub_cluster_bounds(3, 4)


@pytest.mark.parametrize("kind,cross", [("intraformer", c) for c in CROSS_MODES] + [("clusformer", "none")])
def test_one_logit_per_token(kind, cross):
    net = model(kind, cross=cross)
    out = net(tokens(), torch.ones(3, LENGTH, dtype=torch.bool))
    assert out.shape == (3, LENGTH) and torch.isfinite(out).all()
    assert build_model(net.spec.to_dict()).spec == net.spec  # rebuildable from its JSON spec


def test_cross_options_change_the_architecture():
    counts = {c: count_parameters(model(cross=c)) for c in CROSS_MODES}
    assert counts["none"] < counts["last"] == counts["all"] < counts["both"]
    with pytest.raises(ConfigError, match="train.cross"):
        ModelSpec(cross="sideways")
    with pytest.raises(ConfigError, match="sub_clusters"):
        ModelSpec(seq_len=8, sub_clusters=1, cross="last")
    with pytest.raises(ConfigError, match="heads"):
        ModelSpec(width=10, heads=4)


def test_padding_tokens_do_not_influence_valid_tokens():
    x = tokens()
    valid = torch.ones(3, LENGTH, dtype=torch.bool)
    valid[0, 7:] = False  # anchor 0 has only 7 neighbours (ids -1 beyond)
    valid[1, 4:] = False  # the last sub-clusters of anchor 1 are all padding
    for kind, cross in [("intraformer", "last"), ("intraformer", "both"), ("intraformer", "all"), ("clusformer", "none")]:
        net = model(kind, cross=cross)
        base = net(x, valid)
        changed = x.clone()
        changed[~valid] = torch.randn(int((~valid).sum()), DIM) * 10
        again = net(changed, valid)
        assert torch.isfinite(base).all()
        assert torch.allclose(base[valid], again[valid], atol=1e-5), (kind, cross)


def test_intra_block_attends_within_sub_clusters_only():
    net = model(cross="none")
    layer = net.blocks[0]
    x = torch.randn(2, LENGTH, 16)
    valid = torch.ones(2, LENGTH, dtype=torch.bool)
    from dist_fair.models.intraformer import _self_mask

    allowed = _self_mask(valid, net.same_group)
    out = layer["intra"](x, allowed)
    changed = x.clone()
    changed[:, 6:] += 5.0  # the last two sub-clusters (6..7, 8..9) for L = 10, M = 4
    out2 = layer["intra"](changed, allowed)
    assert torch.allclose(out[:, :6], out2[:, :6], atol=1e-6)  # F_0, F_1 untouched
    assert not torch.allclose(out[:, 6:], out2[:, 6:])


def test_cross_block_updates_only_query_sub_clusters():
    bounds = sub_cluster_bounds(LENGTH, 4)  # F_0 = 0..2, F_3 = 8..9
    x = torch.randn(2, LENGTH, 16)
    valid = torch.ones(2, LENGTH, dtype=torch.bool)
    torch.manual_seed(0)
    last = CrossBlock(16, 2, bounds, "last", 2, 0.0).eval()
    out = last(x, valid)
    assert torch.equal(out[:, :8], x[:, :8]) and not torch.allclose(out[:, 8:], x[:, 8:])
    # the queries see only F_0: changing F_1..F_2 does not change them
    changed = x.clone()
    changed[:, 3:8] += 3.0
    assert torch.allclose(last(changed, valid)[:, 8:], out[:, 8:], atol=1e-6)
    every = CrossBlock(16, 2, bounds, "all", 2, 0.0).eval()
    out = every(x, valid)
    assert torch.equal(out[:, :3], x[:, :3]) and not torch.allclose(out[:, 3:], x[:, 3:])
    both = CrossBlock(16, 2, bounds, "both", 2, 0.0).eval()
    out = both(x, valid)
    assert not torch.allclose(out[:, :3], x[:, :3]) and torch.equal(out[:, 3:8], x[:, 3:8])


def test_attention_matches_brute_force_softmax():
    torch.manual_seed(1)
    attention = Attention(8, 2).eval()
    q_in, c_in = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    allowed = torch.tensor([[[True, True, False, True, False], [True] * 5, [False, True, False, False, False]]])
    out = attention(q_in, c_in, allowed)
    q = attention.query(q_in)[0].detach().numpy()
    kv = attention.key_value(c_in)[0].detach().numpy()
    k, v = kv[:, :8], kv[:, 8:]
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        scores = q[:, s] @ k[:, s].T / np.sqrt(4)
        scores[~allowed[0].numpy()] = -np.inf
        w = np.exp(scores - scores.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        heads.append(w @ v[:, s])
    expected = np.concatenate(heads, axis=1) @ attention.out.weight.detach().numpy().T + attention.out.bias.detach().numpy()
    assert np.allclose(out[0].detach().numpy(), expected, atol=1e-5)


def test_similarity_features_are_the_cosine_rows():
    net = model(sim_features=True)
    x = tokens(2)
    valid = torch.ones(2, LENGTH, dtype=torch.bool)
    valid[1, -2:] = False
    feats = net.features(x, valid)
    assert feats.shape == (2, LENGTH, DIM + LENGTH)
    expected = torch.einsum("bid,bjd->bij", x * valid[..., None], x * valid[..., None])
    assert torch.allclose(feats[..., DIM:], expected, atol=1e-6)
    assert torch.allclose(feats[0, :, DIM + 0], (x[0] @ x[0, 0]), atol=1e-6)  # column 0: similarity to the anchor
    assert model(sim_features=False).features(x, valid).shape == (2, LENGTH, DIM)


def test_wrong_token_shape_names_the_expected_shape():
    with pytest.raises(ValueError, match=f"\\(batch, {LENGTH}, {DIM}\\)"):
        model()(torch.zeros(2, LENGTH + 1, DIM))
