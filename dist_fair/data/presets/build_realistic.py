"""Build the packaged ``realistic`` preset from the LFW reference descriptors (issue 14).

    python -m dist_fair.data.presets.build_realistic --lfw ../shared/data/lfw \
        --out dist_fair/data/presets/realistic.yaml

1. Per gender (female / male from ``lfw_female_names.txt`` / ``lfw_male_names.txt``; images in both
   lists or neither are unknown and left out), the model of :mod:`dist_fair.data.calibration` is
   fitted to ``lfw_dlib128.npz`` (L2-normalised; identity = the person part of ``Name_0001.jpg``)
   at every dimension asked (the fit is a function of the dimension). These are the Caucasian
   cells: LFW is mostly Caucasian (672 of the 775 people with one race label in
   ``lfw_race_dict.json``), so the pooled fit stands for the Caucasian population.
2. Race factors: the same fit on the race-labelled subset (people with exactly one of african,
   asianindian, caucasian, eastasian), averaged over ``--race-seeds`` replica seeds; the factor of a
   race is its crowding over Caucasian crowding. African and Asian (= eastasian) use their measured
   factor; Indian (asianindian: 10 people, 16 images in LFW) is too small to measure and is assumed
   (see ``race_factors``). Spread and dispersion are not race-dependent (the subset's fitted spreads
   differ by under 10 %, within their noise).
3. Cells: ``crowding[race/gender] = crowding_gender * factor_race``; spread, dispersion and the
   group cosine from step 1; the images-per-identity tables and the gender shares of LFW; the race
   mix balanced (BUPT-BalancedFace, 25 % each).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dist_fair.data.calibration import DimFit, calibrate, calibration_report, preset_yaml
from dist_fair.data.synthetic import GENDERS, PRESETS, RACES
from dist_fair.io_atomic import atomic_write_text

LOG = logging.getLogger(__name__)

#: LFW race label -> generator race.
LFW_RACES = {"african": "African", "eastasian": "Asian", "caucasian": "Caucasian", "asianindian": "Indian"}
#: RFW (Wang et al., ICCV 2019, Table 1): mean verification accuracy of four commercial APIs (%).
RFW_COMMERCIAL_ACCURACY = {"Caucasian": 90.27, "Indian": 86.28, "Asian": 86.82, "African": 81.89}


def load_lfw(lfw_dir: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, list[str]]]:
    """Descriptors, person codes, attribute codes (-1 unknown) and attribute names of LFW."""
    from dist_fair.data.features import npz_array, person_of_image_name
    from dist_fair.data.lfw import DESCRIPTORS, lfw_attributes_for_names

    path = Path(lfw_dir) / DESCRIPTORS
    names = np.asarray(npz_array(path, "names"))
    emb = np.asarray(npz_array(path, "emb"), np.float32)
    join = lfw_attributes_for_names(names.tolist(), lfw_dir)
    _, person = np.unique([person_of_image_name(str(n), i) for i, n in enumerate(names)], return_inverse=True)
    return emb, person.astype(np.int64), join.codes, join.names


def race_codes(codes: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """LFW race codes mapped onto the generator's races (other labels and unknown -> -1)."""
    out = np.full(codes.shape, -1, np.int64)
    for lfw_name, race in LFW_RACES.items():
        if lfw_name in names:
            out[codes == names.index(lfw_name)] = RACES.index(race)
    return out, list(RACES)


def race_factors(fits: Sequence[DimFit]) -> tuple[dict[str, float], dict[str, Any]]:
    """Crowding factor per race (Caucasian 1) from race-subset fits, and the numbers behind them."""
    ratios = {r: [f.by_name()[r].crowding / f.by_name()["Caucasian"].crowding for f in fits] for r in RACES}
    measured = {r: float(np.mean(v)) for r, v in ratios.items()}
    factors = {"Caucasian": 1.0, "African": measured["African"], "Asian": measured["Asian"]}
    factors["Indian"] = (factors["African"] + factors["Asian"]) / 2
    first = fits[0].by_name()
    detail = {r: {"people": first[r].identities, "images": first[r].samples, "same_identity_pairs": first[r].same_pairs,
                  "crowding_per_seed": [round(f.by_name()[r].crowding, 4) for f in fits],
                  "spread_per_seed": [round(f.by_name()[r].spread, 4) for f in fits],
                  "factor_measured": round(measured[r], 4), "factor_used": round(factors[r], 4)}
              for r in RACES}
    return {r: round(v, 4) for r, v in factors.items()}, detail


def build_preset(lfw_dir: str | Path, dims: Sequence[int] = (128, 512), race_seeds: Sequence[int] = (0, 1, 2),
                 seed: int = 0) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The ``realistic`` preset and its per-key comments."""
    emb, person, codes, names = load_lfw(lfw_dir)
    gender_fits = calibrate(emb, person, codes["gender"], names["gender"], dims=dims, seed=seed)
    race, race_names = race_codes(codes["race"], names["race"])
    race_fits = [calibrate(emb, person, race, race_names, dims=[128], seed=s)[128] for s in race_seeds]
    factors, race_detail = race_factors(race_fits)
    preset: dict[str, Any] = {"name": "realistic", "default_dim": 128, "dims": {}}
    for dim, fit in sorted(gender_fits.items()):
        by = fit.by_name()
        preset["dims"][int(dim)] = {
            "crowding": {f"{r}/{g}": round(by[g].crowding * factors[r], 5) for r in RACES for g in GENDERS},
            "spread": {g: by[g].spread for g in GENDERS},
            "dispersion": {g: by[g].dispersion for g in GENDERS},
            "group_cosine": fit.group_cosine,
            "identity_dim": fit.identity_dim,
        }
    first = gender_fits[min(gender_fits)].by_name()
    total = sum(first[g].identities for g in GENDERS)
    preset["mix"] = dict(PRESETS["balanced"])
    preset["gender_mix"] = {g: round(first[g].identities / total, 9) for g in GENDERS}
    preset["images_table"] = {g: {"counts": first[g].images[0], "people": first[g].images[1]} for g in GENDERS}
    report = calibration_report(gender_fits, "gender", "LFW lfw_dlib128.npz (dlib ResNet 128-d), L2-normalised")
    report["race_factors"] = race_detail
    report["rfw_commercial_accuracy"] = RFW_COMMERCIAL_ACCURACY
    preset["calibration"] = report
    return preset, comments(gender_fits, race_detail, factors, first)


def comments(gender_fits: dict[int, DimFit], race_detail: dict[str, Any], factors: dict[str, float],
             first: dict[str, Any]) -> dict[str, list[str]]:
    cauc = race_detail["Caucasian"]
    return {
        "name": [
            "realistic: the synthetic generator calibrated on real face embeddings (issue 14).",
            "Written by `python -m dist_fair.data.presets.build_realistic --lfw ../shared/data/lfw` (do not edit by",
            "hand: rebuild). Model and fit: dist_fair/data/calibration.py. Use: dist-fair shards synth --preset",
            "realistic [--dim D, one of the dims below] [--mix ...] [--images-per-identity M].",
        ],
        "default_dim": ["LFW's reference descriptors (dlib's ResNet) are 128-d."],
        "dims": [
            "Per dimension d (the fitted values depend on d):",
            "crowding - FITTED per gender on all of LFW (female/male from lfw_female_names.txt / lfw_male_names.txt;",
            f"  {first['female'].identities} female and {first['male'].identities} male identities, "
            f"{first['female'].samples} / {first['male'].samples} images; the 8 images in both lists or",
            "  neither left out) by matching the 5..95 % percentiles of the nearest different-identity similarity",
            "  on a replica of LFW (same people, same images per person). These are the Caucasian cells: LFW is",
            f"  mostly Caucasian ({cauc['people']} of the {sum(d['people'] for d in race_detail.values())} people "
            "of the race subset used below).",
            "  The other races: crowding_gender * factor_race, with factor_race MEASURED for African and Asian as",
            "  the crowding fitted on the race-labelled LFW subset (lfw_race_dict.json, people with exactly one of",
            "  african / eastasian / caucasian / asianindian; mean over 3 replica seeds) over Caucasian's:",
            f"  African {factors['African']} ({race_detail['African']['people']} people, "
            f"{race_detail['African']['images']} images), Asian = eastasian {factors['Asian']} "
            f"({race_detail['Asian']['people']} people, {race_detail['Asian']['images']} images),",
            f"  Caucasian 1 ({cauc['people']} people, {cauc['images']} images). Small samples: the factors are "
            "vary by up to ~10 % between replica seeds (calibration.race_factors).",
            f"  Indian {factors['Indian']} is ASSUMED (mean of the African and Asian factors): LFW has "
            f"{race_detail['Indian']['people']} asianindian people ({race_detail['Indian']['images']} images,",
            f"  {race_detail['Indian']['same_identity_pairs']} same-person pairs; measured factor "
            f"{race_detail['Indian']['factor_measured']}, too few to use), and RFW (Wang et al., ICCV 2019, Table 1)",
            "  puts Indian faces between Caucasian and the hardest races for commercial APIs (mean verification",
            "  accuracy Caucasian 90.27, Indian 86.28, Asian 86.82, African 81.89 %). Note: for dlib on LFW Asian",
            "  faces are the most crowded and African second, while RFW's APIs find African hardest.",
            "  The factors were measured at d = 128 and are applied unchanged at other d (assumed).",
            "spread, dispersion - FITTED per gender on all of LFW: the 5..95 % percentiles of the same-person",
            "  cosine similarity (every same-person pair once). Not race-dependent: the race subset's fitted",
            "  spreads differ by under 10 % (within their noise).",
            "group_cosine - FITTED: the cosine between the female and the male mean embedding of LFW "
            f"({gender_fits[min(gender_fits)].group_cosine_real:.4f}), reproduced",
            "  on the replica; applied to every pair of (race, gender) cells (assumed: the LFW race subset's",
            "  race-mean cosines are 0.92-0.97).",
            "identity_dim - FITTED: identities spread over a random subspace of this many directions, matched to",
            "  the participation ratio of LFW's identity means (people with >= 2 images, gender means removed): "
            + ", ".join(f"d = {d}: m = {f.identity_dim} (ratio {f.participation_real:.1f} on LFW, "
                        f"{f.participation_fit:.1f} on the replica)" for d, f in sorted(gender_fits.items())) + ".",
        ],
        "mix": ["Race mix: balanced like BUPT-BalancedFace (25 % each; ASSUMED, not LFW's). --mix overrides."],
        "gender_mix": ["Gender shares of identities: LFW's (FITTED: people per gender over all gender-known people)."],
        "images_table": [
            "Images per identity: LFW's table per gender (FITTED: counts -> number of people, single-image people",
            "included), drawn by stratified quantiles, so at LFW's size (5,744 gender-known identities) the",
            "profile is exactly LFW's. --images-per-identity M replaces it by the lognormal of the classic presets.",
        ],
        "calibration": ["The fit report: per dim and gender, LFW vs replica percentiles (the generator ignores it)."],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lfw", default="../shared/data/lfw", help="the LFW folder with lfw_dlib128.npz")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "realistic.yaml"))
    parser.add_argument("--dims", default="128,512", help="comma-separated dimensions to fit")
    parser.add_argument("--race-seeds", default="0,1,2", help="replica seeds of the race-subset fit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    preset, notes = build_preset(args.lfw, [int(d) for d in args.dims.split(",")],
                                 [int(s) for s in args.race_seeds.split(",")])
    atomic_write_text(args.out, preset_yaml(preset, notes))
    LOG.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
