"""BUPT-style generator (METHODS.md §2): determinism, group mix, per-group difficulty, unseen ids."""
import numpy as np
import pytest

from dist_fair.data import shards as S
from dist_fair.data.synthetic import (PRESETS, RACES, SyntheticSpec, generate_synthetic_shards, identity_plan,
                                      plan_synthetic_shards, synthetic_arrays)
from dist_fair.errors import DataError


def _write(path, workers=1, **kw):
    args = dict(identities=120, images_per_identity=12, dim=16, seed=5, shard_rows=400, block_rows=128,
                progress=False)
    args.update(kw)
    return generate_synthetic_shards(path, workers=workers, **args)


def test_shards_equal_in_memory_arrays(tmp_path):
    manifest = _write(tmp_path / "a", dtype="float32")
    X, ident, race, gender = synthetic_arrays(SyntheticSpec(identities=120, images_per_identity=12, dim=16, seed=5))
    assert manifest.num_samples == X.shape[0] and manifest.num_identities == 120
    assert np.array_equal(S.load_embeddings(tmp_path / "a"), X)
    labels = S.load_labels(tmp_path / "a")
    assert np.array_equal(labels.identity, ident)
    assert np.array_equal(labels.attrs["race"], race) and np.array_equal(labels.attrs["gender"], gender)
    assert np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    # no identity is split across shards
    for info in manifest.shards:
        block = S.read_shard(tmp_path / "a", info.name, with_emb=False)
        inside = set(block.identity.tolist())
        others = set(np.delete(ident, np.arange(info.first_id, info.first_id + info.samples)).tolist())
        assert not inside & others


def test_same_seed_identical_bytes_any_worker_count(tmp_path, ray_cluster):
    one = _write(tmp_path / "one", workers=1)
    two = _write(tmp_path / "two", workers=2)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    other = _write(tmp_path / "other", seed=6)
    assert [s.sha256 for s in other.shards] != [s.sha256 for s in one.shards]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_group_mix_is_exact_per_identity(preset):
    spec = SyntheticSpec(preset=preset, identities=600, images_per_identity=10, dim=8)
    groups, _, images = identity_plan(spec)
    counts = np.bincount(groups, minlength=4)
    expected = np.array([PRESETS[preset][r] for r in RACES]) * 600
    assert np.all(np.abs(counts - expected) < 1)
    assert images.min() >= 2 and abs(images.mean() - 10) < 1.0


def test_groups_differ_in_separability():
    X, ident, race, _ = synthetic_arrays(SyntheticSpec(identities=200, images_per_identity=15, dim=128, seed=1))
    margins = []
    for t in range(4):
        idx = np.nonzero(race == t)[0][:500]
        sims = X[idx] @ X[idx].T
        same = ident[idx][:, None] == ident[idx][None, :]
        np.fill_diagonal(same, False)
        diff = ident[idx][:, None] != ident[idx][None, :]
        margins.append(sims[same].mean() - sims[diff].mean())
    caucasian, african = margins[RACES.index("Caucasian")], margins[RACES.index("African")]
    assert caucasian > african + 0.05  # the easy group separates clearly better than the hard one
    assert min(margins) > 0.15  # still clusterable


def test_identity_offset_gives_unseen_identities_from_same_world():
    a = synthetic_arrays(SyntheticSpec(identities=40, images_per_identity=5, dim=32, seed=2))
    b = synthetic_arrays(SyntheticSpec(identities=40, images_per_identity=5, dim=32, seed=2, identity_offset=10_000))
    assert not set(a[1].tolist()) & set(b[1].tolist())
    # same world: group mean directions shared, so same-group cross-set similarity beats cross-group
    same_group = (a[0][a[2] == 0].mean(0) @ b[0][b[2] == 0].mean(0))
    cross_group = (a[0][a[2] == 0].mean(0) @ b[0][b[2] == 2].mean(0))
    assert same_group > cross_group


def test_plans_are_contiguous_and_bounded():
    spec = SyntheticSpec(identities=300, images_per_identity=20, dim=8)
    plans = plan_synthetic_shards(spec, shard_rows=500)
    assert plans[0].first_id == 0
    for a, b in zip(plans, plans[1:]):
        assert b.first_id == a.first_id + a.rows and b.payload[0] == a.payload[1]
    assert all(p.rows <= 500 or p.payload[1] - p.payload[0] == 1 for p in plans)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(preset="tiny"), "unknown preset"),
    (dict(mix={"Martian": 1.0}), "unknown group"),
    (dict(mix={"Asian": 0.5, "African": 0.2}), "sum to 1"),
    (dict(images_per_identity=1), "images_per_identity"),
])
def test_bad_specs(kwargs, needle):
    with pytest.raises(DataError, match=needle):
        SyntheticSpec(**kwargs)


# --------------------------------------------------------------------------- calibrated-preset features

def _digest(arrays):
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_classic_presets_unchanged_by_the_calibrated_features():
    """The classic generator's output is pinned (digest computed with the generator before the
    calibrated features existed), so the default job's data does not move."""
    from dist_fair.data.synthetic import spec_from_preset

    arrays = synthetic_arrays(spec_from_preset("skewed", identities=50, images_per_identity=6, dim=16, seed=7))
    assert _digest(arrays) == "3c09fe638e1990d9bfdbecb364fe00972d6f100190a72631e7ad481d2daa5324"


def test_world_means_have_the_exact_group_cosine():
    from dist_fair.data.synthetic import world_means

    mu = world_means(seed=3, dim=20, groups=8, group_cosine=0.7)
    gram = mu @ mu.T
    assert np.allclose(np.diag(gram), 1, atol=1e-12)
    assert np.allclose(gram[~np.eye(8, dtype=bool)], 0.7, atol=1e-12)
    with pytest.raises(DataError, match="too small"):
        world_means(seed=3, dim=8, groups=8, group_cosine=0.7)


def test_gender_mix_cells_and_dispersion():
    from dist_fair.data.synthetic import cell_parameters, identity_plan

    spec = SyntheticSpec(identities=400, images_per_identity=6, dim=64, seed=2, mix={"Asian": 0.5, "Caucasian": 0.5},
                         gender_mix={"female": 0.25, "male": 0.75}, group_cosine=0.5,
                         crowding={"African": 1.0, "Indian": 1.0, "Asian": 1.0, "Caucasian/female": 2.0,
                                   "Caucasian/male": 0.5},
                         spread={"female": 0.3, "male": 0.6}, dispersion={"male": 0.4})
    _, genders, _ = identity_plan(spec)
    assert np.bincount(genders).tolist() == [100, 300]
    assert cell_parameters(spec, RACES.index("Caucasian"), 0) == (2.0, 0.3, 0.0)
    assert cell_parameters(spec, RACES.index("Asian"), 1) == (1.0, 0.6, 0.4)
    X, ident, race, gender = synthetic_arrays(spec)
    same = {}
    for g in range(2):
        sims = []
        for i in np.unique(ident[gender == g])[:60]:
            rows = X[ident == i]
            sims.extend((rows @ rows.T)[np.triu_indices(len(rows), 1)])
        same[g] = np.array(sims)
    # spread 0.3 -> same-identity cosine about 1 / 1.09; spread 0.6 with dispersion -> lower and wider
    assert abs(np.median(same[0]) - 1 / 1.09) < 0.02
    assert np.median(same[1]) < np.median(same[0]) - 0.1 and same[1].std() > 2 * same[0].std()


def test_overrides_replace_the_cells_they_cover():
    from dist_fair.data.synthetic import cell_parameters, spec_from_preset

    spec = spec_from_preset("realistic", identities=20, crowding={"African": 9.0}, spread={"female": 0.5})
    assert cell_parameters(spec, RACES.index("African"), 0)[0] == 9.0
    assert cell_parameters(spec, RACES.index("African"), 1)[0] == 9.0
    assert cell_parameters(spec, RACES.index("Asian"), 0)[1] == 0.5
    assert cell_parameters(spec, RACES.index("Asian"), 0)[0] != 9.0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(crowding={"Martian": 1.0}), "unknown group"),
    (dict(gender_mix={"female": 0.7}), "gender_mix"),
    (dict(group_cosine=1.0), "group_cosine"),
    (dict(images_table={"female": {"counts": [1, 2], "people": [3, 4]}}), "give both"),
    (dict(images_table={"all": {"counts": [2, 1], "people": [3, 4]}}), "increasing"),
])
def test_bad_calibrated_specs(kwargs, needle):
    with pytest.raises(DataError, match=needle):
        SyntheticSpec(**kwargs)


def test_identity_dim_confines_identities_to_a_subspace():
    from dist_fair.data.calibration import identity_participation_ratio
    from dist_fair.data.synthetic import identity_basis

    common = dict(identities=300, images_per_identity=6, dim=48, seed=4, mix={"Caucasian": 1.0},
                  crowding={"Caucasian": 1.0, "African": 1.0, "Asian": 1.0, "Indian": 1.0},
                  spread={"Caucasian": 0.05, "African": 0.05, "Asian": 0.05, "Indian": 0.05})
    low = synthetic_arrays(SyntheticSpec(identity_dim=6, **common))
    full = synthetic_arrays(SyntheticSpec(**common))
    ratio_low = identity_participation_ratio(low[0], low[1], low[2])
    ratio_full = identity_participation_ratio(full[0], full[1], full[2])
    assert 4.5 < ratio_low < 7.5 and ratio_full > 30
    basis = identity_basis(4, 48, 6)
    assert np.allclose(basis @ basis.T, np.eye(6), atol=1e-12)
    with pytest.raises(DataError, match="identity_dim"):
        SyntheticSpec(identity_dim=0, **common)
