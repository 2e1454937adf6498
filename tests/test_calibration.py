"""Calibration of the synthetic generator on real embeddings (issue 14, dist_fair/data/calibration.py):
exact statistics against brute force, the fit recovering a known preset, the CLI round trip, the
packaged ``realistic`` preset, and - on real LFW descriptors - its quantiles and kNN baseline F."""
import argparse
import json

import numpy as np
import pytest
import yaml

from dist_fair.data import calibration as C
from dist_fair.data.presets import load_preset
from dist_fair.data.synthetic import GENDERS, RACES, identity_images, spec_from_preset, synthetic_arrays
from dist_fair.errors import DataError

KNOWN = dict(crowding={"female": 2.5, "male": 2.0}, spread={"female": 0.45, "male": 0.35},
             dispersion={"female": 0.2, "male": 0.1}, group_cosine=0.5, identity_dim=24)
TABLE = {"counts": [1, 2, 3, 4, 6, 9, 14], "people": [120, 90, 60, 40, 30, 20, 12]}


def _known_preset(tmp_path, dim=64):
    preset = {"name": "known", "default_dim": dim, "mix": {"Caucasian": 1.0},
              "gender_mix": {"female": 0.5, "male": 0.5},
              "images_table": {"female": TABLE, "male": TABLE}, "dims": {dim: KNOWN}}
    path = tmp_path / "known.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def _random_unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- statistics vs brute force

def test_statistics_match_brute_force():
    x = _random_unit(70, 6, 0).astype(np.float32)
    identity = np.random.default_rng(1).integers(0, 15, 70)
    groups = identity % 3
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    same = sorted(sims[i, j] for i in range(70) for j in range(i + 1, 70) if identity[i] == identity[j])
    impostor = [max(sims[i, j] for j in range(70) if identity[j] != identity[i]) for i in range(70)]
    assert np.allclose(np.sort(C.same_identity_similarities(x, identity)), same, atol=1e-6)
    assert np.allclose(C.nearest_impostor_similarities(x, identity, block=16), impostor, atol=1e-6)
    top3 = [sorted((sims[i, j] for j in range(70) if identity[j] != identity[i]), reverse=True)[:3] for i in range(70)]
    assert np.allclose(C.nearest_impostors(x, identity, k=3, block=16), top3, atol=1e-6)
    means = [x[groups == t].astype(np.float64).mean(0) for t in range(3)]
    cos = [means[a] @ means[b] / np.linalg.norm(means[a]) / np.linalg.norm(means[b])
           for a in range(3) for b in range(a + 1, 3)]
    assert C.mean_group_cosine(x, groups, 3) == pytest.approx(np.mean(cos), abs=1e-9)
    assert C.images_table(np.array([5, 5, 7, 9, 9, 9, 2])) == ([1, 2, 3], [2, 1, 1])
    # participation ratio of the identity means (>= 2 images, group means removed) vs eigenvalues
    ids = np.unique(identity)
    keep = [i for i in ids if np.sum(identity == i) >= 2]
    means = np.stack([x[identity == i].astype(np.float64).mean(0) for i in keep])
    mean_groups = np.array([groups[identity == i][0] for i in keep])
    for t in range(3):
        means[mean_groups == t] -= means[mean_groups == t].mean(0)
    eig = np.linalg.eigvalsh(np.cov(means.T, bias=True))
    assert C.identity_participation_ratio(x, identity, groups) == pytest.approx(eig.sum() ** 2 / np.square(eig).sum())


def test_simulated_pairs_follow_the_generator():
    """Step 1's vectorised pair simulation (centre e_1) has the distribution of the generator's own
    same-identity pairs (any centre, any crowding): rotation invariance."""
    dim, spread, dispersion = 48, 0.5, 0.25
    fast = C.simulate_same_pairs(spread, dispersion, dim, pairs=20000, seed=3)
    mean = _random_unit(1, dim, 4)[0]
    pairs = [identity_images(np.random.default_rng([9, j]), mean, 1.7, spread, dispersion, 2) for j in range(6000)]
    slow = np.array([a @ b for a, b in pairs], np.float64)
    assert np.max(np.abs(np.percentile(fast, C.FIT_PERCENTILES) - np.percentile(slow, C.FIT_PERCENTILES))) < 0.01


def test_stratified_images_reproduce_the_table_exactly(tmp_path):
    path = _known_preset(tmp_path)
    people = sum(TABLE["people"])
    spec = spec_from_preset(str(path), identities=2 * people, seed=4)
    from dist_fair.data.synthetic import identity_plan

    groups, genders, images = identity_plan(spec)
    assert np.all(groups == RACES.index("Caucasian")) and np.bincount(genders).tolist() == [people, people]
    for g in range(2):
        assert C.images_table(np.repeat(np.arange(people), images[genders == g])) == (TABLE["counts"], TABLE["people"])
    # another size: the same distribution as closely as integers allow
    _, genders, images = identity_plan(spec_from_preset(str(path), identities=1000, seed=5))
    share_single = np.mean(images == 1)
    assert abs(share_single - TABLE["people"][0] / people) < 2 / 1000


# --------------------------------------------------------------------------- fit recovers a known preset

def test_fit_recovers_known_parameters(tmp_path):
    spec = spec_from_preset(str(_known_preset(tmp_path)), identities=2 * sum(TABLE["people"]), seed=11)
    emb, identity, _, gender = synthetic_arrays(spec)
    fit = C.calibrate(emb, identity, gender, GENDERS, seed=2)[64]  # another seed: other random numbers
    for g in fit.groups:
        assert g.crowding == pytest.approx(KNOWN["crowding"][g.name], rel=0.05)
        assert g.spread == pytest.approx(KNOWN["spread"][g.name], rel=0.03)
        assert g.dispersion == pytest.approx(KNOWN["dispersion"][g.name], abs=0.04)
        assert g.images == (TABLE["counts"], TABLE["people"])
        assert g.max_error() < 0.02
    assert fit.group_cosine == pytest.approx(KNOWN["group_cosine"], abs=0.05)
    assert KNOWN["identity_dim"] / 1.5 <= fit.identity_dim <= KNOWN["identity_dim"] * 1.5
    # a different truth gives a clearly different fit (the test can fail)
    assert fit.by_name()["female"].crowding > fit.by_name()["male"].crowding * 1.1


def test_fit_rejects_a_group_without_pairs():
    x = _random_unit(30, 8, 0)
    identity = np.arange(30)
    identity[:10] = np.repeat(np.arange(5), 2)
    with pytest.raises(DataError, match="group 'male'.*1 pair"):
        C.prepare_reference(x, identity, (np.arange(30) >= 10).astype(int), GENDERS)


# --------------------------------------------------------------------------- presets and CLI

def _run_shards(argv):
    from dist_fair.data import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(argv))


def test_cli_calibrate_writes_a_preset_the_generator_reproduces(tmp_path, capsys):
    from dist_fair.data.synthetic import generate_synthetic_shards

    known = _known_preset(tmp_path)
    generate_synthetic_shards(tmp_path / "ref", preset=str(known), identities=744, seed=3, dtype="float32",
                              progress=False)
    capsys.readouterr()
    out = tmp_path / "fitted.yaml"
    assert _run_shards(["synth", "--calibrate", str(tmp_path / "ref"), "--out-preset", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["preset"] == str(out) and summary["left_out_groups"] == []
    fitted = load_preset(out)
    assert fitted["default_dim"] == 64 and set(fitted["gender_mix"]) == set(GENDERS)
    assert fitted["dims"][64]["crowding"]["female"] == pytest.approx(2.5, rel=0.06)
    assert out.read_text().startswith("# Preset 'fitted'")
    assert _run_shards(["synth", "--preset", str(out), "--identities", "50", "--out", str(tmp_path / "gen")]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["dim"] == 64 and generated["identities"] == 50
    with pytest.raises(DataError, match="--out-preset"):
        _run_shards(["synth", "--calibrate", str(tmp_path / "ref")])
    with pytest.raises(DataError, match="no samples of"):
        _run_shards(["synth", "--calibrate", str(tmp_path / "ref"), "--attribute", "race",
                     "--out-preset", str(tmp_path / "x.yaml")])


def test_realistic_preset_is_packaged_with_its_sources():
    from dist_fair.data.presets import preset_path

    preset = load_preset("realistic")
    assert preset["default_dim"] == 128 and 128 in preset["dims"]
    for fit in preset["dims"].values():
        assert set(fit["crowding"]) == {f"{r}/{g}" for r in RACES for g in GENDERS}
        assert 0 < fit["group_cosine"] < 1 and 2 <= fit["identity_dim"] <= 128
    text = preset_path("realistic").read_text()
    for needle in ("FITTED", "ASSUMED", "lfw_race_dict.json", "RFW", "people"):
        assert needle in text
    spec = spec_from_preset("realistic", identities=40)
    assert spec.dim == 128 and spec.images_table is not None and spec.group_cosine is not None
    assert spec.identity_dim is not None
    emb, identity, race, gender = synthetic_arrays(spec)
    assert emb.shape[1] == 128 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    with pytest.raises(DataError, match="fits for dims"):
        spec_from_preset("realistic", dim=77)
    with pytest.raises(DataError, match="neither a packaged preset"):
        spec_from_preset("no-such-preset")


def test_race_cells_differ_in_crowding_as_the_preset_says():
    fit = load_preset("realistic")["dims"][128]["crowding"]
    for g in GENDERS:
        assert fit[f"Caucasian/{g}"] < min(fit[f"{r}/{g}"] for r in ("African", "Asian", "Indian"))


# --------------------------------------------------------------------------- real data: LFW

@pytest.fixture(scope="module")
def lfw_vs_realistic(shared_data):
    """LFW's gender-known descriptors and a fresh draw of the realistic preset at LFW's size
    (Caucasian cells = LFW's pooled fit, same gender counts and images per identity)."""
    from dist_fair.data.presets.build_realistic import load_lfw

    emb, person, codes, names = load_lfw(shared_data / "lfw")
    ref = C.prepare_reference(emb, person, codes["gender"], names["gender"])
    identities = int(np.unique(ref.identity).size)
    spec = spec_from_preset("realistic", identities=identities, mix={"Caucasian": 1.0}, dim=128, seed=1)
    gen_emb, gen_identity, _, gen_gender = synthetic_arrays(spec)
    gen = C.prepare_reference(gen_emb, gen_identity, gen_gender, GENDERS)
    return ref, gen


def test_realistic_quantiles_within_002_of_lfw(lfw_vs_realistic):
    ref, gen = lfw_vs_realistic
    assert ref.names == GENDERS
    assert np.array_equal(np.sort(np.bincount(ref.identity)), np.sort(np.bincount(gen.identity)))
    for t, name in enumerate(GENDERS):
        for real, synth in ((ref.same[t], gen.same[t]), (ref.impostor[t], gen.impostor[t])):
            diff = np.percentile(synth, C.REPORT_QUANTILES) - np.percentile(real, C.REPORT_QUANTILES)
            assert np.max(np.abs(diff)) <= 0.02, (name, diff)


def matched_validation(identity, groups, seed, fraction=0.3):
    """Validation mask: the identities at a seeded random 30 % of the ranks of the order (group,
    images, identity). Two sets with the same groups and images-per-identity profile (LFW and the
    generator at LFW's size) thus hold out identities of the same sizes - pairwise F is dominated by
    the few largest people, so unmatched splits would compare different problems."""
    ids, first, counts = np.unique(identity, return_index=True, return_counts=True)
    order = np.lexsort((ids, counts, groups[first]))
    chosen = order[np.random.default_rng(seed).permutation(ids.size)[: int(round(fraction * ids.size))]]
    return np.isin(identity, ids[chosen])


def _knn_threshold_f(emb, identity, groups, k=20, splits=tuple(range(10))):
    """kNN (exact, faiss flat) + threshold baseline: tau chosen on 30 % held-out identities (whole
    graph decoded), pairwise F on the other identities; mean over the splits."""
    import faiss

    from dist_fair.cluster.edges import choose_decoding, decode_edges
    from dist_fair.eval.metrics import pairwise_fscore

    x = np.ascontiguousarray(emb, np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nbrs = index.search(x, k)
    grid = [round(v, 4) for v in np.arange(0.90, 0.99, 0.0025)]
    scores = []
    for seed in splits:
        val = matched_validation(identity, groups, seed)
        tau = choose_decoding(nbrs, sims, identity, val, grid, context="graph").tau
        labels = decode_edges(nbrs, sims, "threshold", tau)
        scores.append(pairwise_fscore(identity[~val], labels[~val])[2])
    return float(np.mean(scores))


def test_knn_baseline_f_within_003_of_lfw(lfw_vs_realistic):
    ref, gen = lfw_vs_realistic
    f_lfw = _knn_threshold_f(ref.emb, ref.identity, ref.groups)
    f_gen = _knn_threshold_f(gen.emb, gen.identity, gen.groups)
    assert 0.5 < f_lfw < 1.0
    assert abs(f_gen - f_lfw) <= 0.03, (f_lfw, f_gen)
