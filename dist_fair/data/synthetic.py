"""BUPT-style synthetic face embeddings (METHODS.md §2): the built-in data set.

The generator reproduces what makes fair face clustering hard: demographic groups differ in how
separable their identities are.

- group t has a mean direction ``mu_t`` (a random unit vector);
- identity c of group t has the centre ``centre_c = normalise(crowding[t] * mu_t + u_c)`` with
  ``u_c`` a random unit vector, so a larger ``crowding[t]`` packs the group's identities closer
  together (cosine between two centres of group t is about ``crowding^2 / (1 + crowding^2)``);
- an image of identity c is ``normalise(centre_c + spread[t] * g / sqrt(d))`` with g ~ N(0, I), so
  its cosine to another image of the same identity is about ``1 / (1 + spread^2)``;
- images per identity are long-tailed: ``max(min_images, round(LogNormal))`` with the given mean;
- group mix: ``balanced`` (BUPT-BalancedFace: 25% each race), ``global`` (BUPT-GlobalFace mix:
  0.38 Caucasian, 0.31 Asian, 0.18 Indian, 0.13 African), ``skewed`` (Caucasian 50%, the others
  1/6 each), or any user-given mix.

Calibrated presets (``realistic``, or any YAML file written by ``dist-fair shards synth --calibrate``,
:mod:`dist_fair.data.calibration`) add, per cell ``(race, gender)``:

- ``group_cosine = r``: the cells' mean directions are ``mu_t = sqrt(r) e_0 + sqrt(1 - r) e_{1+t}``
  with ``e_0, e_1, ...`` orthonormal (one shared "face" direction; ``cos(mu_t, mu_t') = r`` exactly),
  instead of one independent random direction per race;
- ``identity_dim = m``: identity directions u_c lie in a seeded random m-dimensional subspace
  (``u_c = normalise(w B)``, w ~ N(0, I_m), B an orthonormal m x d basis) while image noise stays
  d-dimensional: real face embeddings spread identities over fewer directions than d (LFW's dlib
  descriptors: participation ratio about 32 of 128), which makes near impostors rarer but closer;
- ``dispersion[t] = sigma``: image i's noise scale is ``spread[t] * exp(sigma * z_i)``, z_i ~ N(0, 1)
  (some images are sharper than others);
- ``gender_mix``: exact gender shares per identity (instead of a fair coin);
- ``images_table``: the images-per-identity distribution as a table (count -> number of people,
  per gender), sampled by stratified quantiles: identity j of the n identities of a gender gets
  ``Q((pi(j) + 1/2) / n)`` with Q the table's quantile function and pi a seeded permutation, so at
  the table's own size the profile is reproduced exactly, and at any size as closely as integers
  allow.
Table keys: ``"Race/gender"`` (a cell), ``"gender"`` or ``"Race"``; the first present applies.

Everything is keyed by ``(seed, identity number)``: the same seed gives byte-identical shards
whatever the number of workers, and ``identity_offset`` draws *unseen* identities from the same
world (same group means and difficulty), e.g. a skewed training set and a balanced test set.
Memory is bounded by one block of rows per writing task; 5M samples stream to disk.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dist_fair.data.schema import Manifest
from dist_fair.data.shards import Block, ShardPlan, write_shard_set
from dist_fair.errors import DataError

LOG = logging.getLogger(__name__)

RACES = ["African", "Asian", "Caucasian", "Indian"]
GENDERS = ["female", "male"]
PRESETS: dict[str, dict[str, float]] = {
    "balanced": {"African": 0.25, "Asian": 0.25, "Caucasian": 0.25, "Indian": 0.25},
    "global": {"African": 0.13, "Asian": 0.31, "Caucasian": 0.38, "Indian": 0.18},
    "skewed": {"African": 1 / 6, "Asian": 1 / 6, "Caucasian": 0.5, "Indian": 1 / 6},
}
#: How closely a group's identities sit together (higher = harder to separate). Calibrated so the
#: kNN + threshold baseline at 128 dims reaches pairwise F about 0.90 at 1K identities and 0.82 at
#: 4K (per-race F from about 0.83 and 0.62 for African to 0.98 and 0.97 for Caucasian).
DEFAULT_CROWDING = {"African": 1.1, "Asian": 1.05, "Caucasian": 0.85, "Indian": 0.95}
#: Within-identity noise of a group (higher = harder).
DEFAULT_SPREAD = {"African": 0.9, "Asian": 0.88, "Caucasian": 0.8, "Indian": 0.85}
LOGNORMAL_SIGMA = 0.6
#: Built-in presets stored as YAML package data (dist_fair/data/presets/<name>.yaml).
FILE_PRESETS = ("realistic",)


@dataclass
class SyntheticSpec:
    """All parameters of one synthetic set; its ``to_dict`` goes into the manifest."""

    preset: str = "balanced"
    identities: int = 1000
    images_per_identity: float = 46.0
    min_images: int = 2
    dim: int = 512
    seed: int = 0
    identity_offset: int = 0
    mix: dict[str, float] | None = None
    crowding: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CROWDING))
    spread: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPREAD))
    dispersion: dict[str, float] = field(default_factory=dict)
    group_cosine: float | None = None
    identity_dim: int | None = None
    gender_mix: dict[str, float] | None = None
    images_table: dict[str, dict[str, list[int]]] | None = None

    def __post_init__(self) -> None:
        if self.mix is None:
            if self.preset not in PRESETS:
                raise DataError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)} or pass a mix "
                                f"(YAML presets {list(FILE_PRESETS)} or a preset file: use spec_from_preset)")
            self.mix = dict(PRESETS[self.preset])
        unknown = set(self.mix) - set(RACES)
        if unknown:
            raise DataError(f"mix names unknown group(s) {sorted(unknown)}; groups are {RACES}")
        if any(v < 0 for v in self.mix.values()) or abs(sum(self.mix.values()) - 1) > 1e-6:
            raise DataError(f"mix {self.mix} must be non-negative and sum to 1")
        if self.identities < 1:
            raise DataError("identities must be >= 1")
        if self.min_images < 1 or self.images_per_identity < self.min_images:
            raise DataError(f"images_per_identity ({self.images_per_identity}) must be >= min_images ({self.min_images}) >= 1")
        if self.dim < 2:
            raise DataError("dim must be >= 2")
        for name, table in (("crowding", self.crowding), ("spread", self.spread), ("dispersion", self.dispersion)):
            unknown_keys = sorted(k for k in table if k not in _CELL_KEYS)
            if unknown_keys:
                raise DataError(f"{name} names unknown group(s) {unknown_keys}; keys are a race {RACES}, a gender "
                                f"{GENDERS} or a cell 'Race/gender'")
            if name == "dispersion":
                continue
            missing = sorted(f"{r}/{g}" for r in RACES for g in GENDERS if _cell_lookup(table, r, g) is None)
            if missing:
                raise DataError(f"{name} lacks group(s) {missing}")
        if self.group_cosine is not None and not 0.0 <= self.group_cosine < 1.0:
            raise DataError(f"group_cosine {self.group_cosine} must lie in [0, 1)")
        if self.group_cosine is not None and self.dim < len(RACES) * len(GENDERS) + 1:
            raise DataError(f"dim {self.dim} is too small for group_cosine: it needs {len(RACES) * len(GENDERS) + 1} "
                            "orthonormal directions")
        if self.identity_dim is not None and not 1 <= self.identity_dim <= self.dim:
            raise DataError(f"identity_dim {self.identity_dim} must lie in [1, dim = {self.dim}]")
        if self.gender_mix is not None:
            if set(self.gender_mix) - set(GENDERS) or any(v < 0 for v in self.gender_mix.values()) \
                    or abs(sum(self.gender_mix.values()) - 1) > 1e-6:
                raise DataError(f"gender_mix {self.gender_mix} must give non-negative shares of {GENDERS} summing to 1")
        if self.images_table is not None:
            _check_images_table(self.images_table)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_CELL_KEYS = set(RACES) | set(GENDERS) | {f"{r}/{g}" for r in RACES for g in GENDERS}


def _cell_lookup(table: dict[str, float], race: str, gender: str) -> float | None:
    """The value of cell ``race/gender``: the cell key, else the gender key, else the race key."""
    for key in (f"{race}/{gender}", gender, race):
        if key in table:
            return float(table[key])
    return None


def cell_parameters(spec: SyntheticSpec, group: int, gender: int) -> tuple[float, float, float]:
    """``(crowding, spread, dispersion)`` of the cell (race ``group``, gender ``gender``)."""
    race, sex = RACES[group], GENDERS[gender]
    dispersion = _cell_lookup(spec.dispersion, race, sex)
    return _cell_lookup(spec.crowding, race, sex), _cell_lookup(spec.spread, race, sex), dispersion or 0.0


def _check_images_table(table: dict[str, dict[str, list[int]]]) -> None:
    keys = set(table)
    if not (keys <= set(GENDERS) or keys <= set(RACES) or keys == {"all"}):
        raise DataError(f"images_table keys {sorted(keys)} must be genders {GENDERS}, races {RACES} or 'all'")
    for key, entry in table.items():
        counts, people = entry.get("counts"), entry.get("people")
        if not counts or people is None or len(counts) != len(people):
            raise DataError(f"images_table[{key!r}] needs equal-length non-empty 'counts' and 'people' lists")
        if min(counts) < 1 or min(people) < 0 or sum(people) < 1 or list(counts) != sorted(set(counts)):
            raise DataError(f"images_table[{key!r}]: counts must be increasing integers >= 1 and people "
                            "non-negative with a positive total")
    if keys <= set(GENDERS) and keys != set(GENDERS):
        raise DataError(f"images_table gives genders {sorted(keys)} only; give both {GENDERS} or 'all'")
    if keys <= set(RACES) and keys != set(RACES):
        raise DataError(f"images_table gives races {sorted(keys)} only; give all of {RACES} or 'all'")


def exact_shares(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts ``floor(share_t * total)``, the remainder to the largest fractional parts."""
    raw = np.asarray(shares, np.float64) * total
    counts = np.floor(raw + 1e-9).astype(np.int64)
    remainder = total - counts.sum()
    counts[np.argsort(-(raw - counts), kind="stable")[:remainder]] += 1
    return counts


def stratified_counts(counts: Sequence[int], people: Sequence[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` images-per-identity values by stratified quantiles of the table ``counts -> people``:
    value j is ``Q((pi(j) + 1/2) / n)``, Q the table's quantile function, pi a random permutation.
    With ``n == sum(people)`` every count appears exactly ``people`` times."""
    cdf = np.cumsum(np.asarray(people, np.float64))
    cdf /= cdf[-1]
    u = (rng.permutation(n) + 0.5) / max(n, 1)
    return np.asarray(counts, np.int64)[np.minimum(np.searchsorted(cdf, u - 1e-12, side="left"), len(counts) - 1)]


def identity_plan(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per identity: group index, gender index and number of images (deterministic in the seed).

    Groups get exact shares: ``floor(mix_t * I)`` each, the remainder to the largest fractional
    parts, then a seeded permutation (genders the same way when ``gender_mix`` is set, otherwise a
    fair coin). Images: lognormal with the given mean and at least ``min_images``, or stratified
    quantiles of ``images_table`` (module docstring).
    """
    rng = np.random.default_rng([spec.seed, 7, spec.identity_offset])
    counts = exact_shares(np.array([spec.mix.get(r, 0.0) for r in RACES]), spec.identities)
    groups = rng.permutation(np.repeat(np.arange(len(RACES)), counts)).astype(np.int16)
    if spec.gender_mix is None:
        genders = rng.integers(0, 2, spec.identities).astype(np.int16)
    else:
        gender_counts = exact_shares(np.array([spec.gender_mix.get(g, 0.0) for g in GENDERS]), spec.identities)
        genders = rng.permutation(np.repeat(np.arange(len(GENDERS)), gender_counts)).astype(np.int16)
    if spec.images_table is None:
        mu = np.log(spec.images_per_identity) - LOGNORMAL_SIGMA**2 / 2
        images = np.maximum(spec.min_images, np.round(rng.lognormal(mu, LOGNORMAL_SIGMA, spec.identities))).astype(np.int64)
        return groups, genders, images
    images = np.zeros(spec.identities, np.int64)
    keys = set(spec.images_table)
    strata = ([(np.ones(spec.identities, bool), "all")] if keys == {"all"} else
              [(genders == i, g) for i, g in enumerate(GENDERS)] if keys <= set(GENDERS) else
              [(groups == i, r) for i, r in enumerate(RACES)])
    for members, key in strata:
        table = spec.images_table[key]
        images[members] = stratified_counts(table["counts"], table["people"], int(members.sum()), rng)
    return groups, genders, images


def group_means(seed: int, dim: int) -> np.ndarray:
    """One random unit direction per group; depends on the seed only (the "world")."""
    rng = np.random.default_rng([seed, 11])
    mu = rng.standard_normal((len(RACES), dim))
    return mu / np.linalg.norm(mu, axis=1, keepdims=True)


def world_means(seed: int, dim: int, groups: int, group_cosine: float) -> np.ndarray:
    """``groups`` unit mean directions ``mu_t = sqrt(r) e_0 + sqrt(1 - r) e_{1+t}`` with ``e``
    orthonormal (QR of a seeded Gaussian matrix), so ``mu_t . mu_t' = r`` exactly for t != t'."""
    if dim < groups + 1:
        raise DataError(f"dim {dim} is too small for {groups} groups with a shared direction (needs {groups + 1})")
    rng = np.random.default_rng([seed, 17, groups])
    basis, _ = np.linalg.qr(rng.standard_normal((dim, groups + 1)))
    basis = basis.T
    return np.sqrt(group_cosine) * basis[0][None, :] + np.sqrt(1.0 - group_cosine) * basis[1:]


def spec_means(spec: SyntheticSpec) -> np.ndarray:
    """The mean directions a spec uses: per race (classic presets) or per cell ``race * 2 + gender``
    (``group_cosine`` set)."""
    if spec.group_cosine is None:
        return group_means(spec.seed, spec.dim)
    return world_means(spec.seed, spec.dim, len(RACES) * len(GENDERS), spec.group_cosine)


def identity_basis(seed: int, dim: int, identity_dim: int | None) -> np.ndarray | None:
    """Orthonormal ``identity_dim x dim`` basis of the identity directions (None: all of R^d)."""
    if identity_dim is None:
        return None
    rng = np.random.default_rng([seed, 19, identity_dim])
    basis, _ = np.linalg.qr(rng.standard_normal((dim, identity_dim)))
    return basis.T


def identity_images(rng: np.random.Generator, mean: np.ndarray, crowding: float, spread: float, dispersion: float,
                    count: int, basis: np.ndarray | None = None) -> np.ndarray:
    """``count`` images of one identity: centre ``normalise(crowding * mean + u)`` with u uniform on
    the sphere (or on the unit sphere of the span of ``basis``), image
    ``normalise(centre + spread * exp(dispersion * z) * g / sqrt(d))``."""
    dim = mean.shape[0]
    if basis is None:
        direction = _normalise(rng.standard_normal(dim))
    else:
        direction = _normalise(rng.standard_normal(basis.shape[0]) @ basis)
    centre = _normalise(crowding * mean + direction)
    noise = rng.standard_normal((count, dim)) * (spread / np.sqrt(dim))
    if dispersion > 0:
        noise *= np.exp(dispersion * rng.standard_normal(count))[:, None]
    return _normalise(centre[None, :] + noise).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def identity_embeddings(spec: SyntheticSpec, identity: int, group: int, count: int, mu: np.ndarray,
                        gender: int = 0, basis: np.ndarray | None = None) -> np.ndarray:
    """The ``count`` image embeddings of one identity (its own random stream)."""
    rng = np.random.default_rng([spec.seed, 13, spec.identity_offset + identity])
    crowding, spread, dispersion = cell_parameters(spec, group, gender)
    mean = mu[group] if spec.group_cosine is None else mu[group * len(GENDERS) + gender]
    return identity_images(rng, mean, crowding, spread, dispersion, count, basis)


@dataclass
class SyntheticProducer:
    """Producer for ``write_shard_set``: a shard holds a contiguous range of identities."""

    spec: SyntheticSpec
    block_rows: int = 4096

    def __call__(self, plan: ShardPlan) -> Iterator[Block]:
        groups, genders, images = identity_plan(self.spec)
        first_ident, stop_ident = plan.payload
        mu = spec_means(self.spec)
        basis = identity_basis(self.spec.seed, self.spec.dim, self.spec.identity_dim)
        chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # emb, identity, race, gender
        pending, next_id = 0, plan.first_id
        for ident in range(first_ident, stop_ident):
            count, group = int(images[ident]), int(groups[ident])
            chunks.append((identity_embeddings(self.spec, ident, group, count, mu, int(genders[ident]), basis),
                           np.full(count, self.spec.identity_offset + ident, np.int64),
                           np.full(count, group, np.int16), np.full(count, genders[ident], np.int16)))
            pending += count
            while pending >= self.block_rows:
                block, chunks = _cut(chunks, self.block_rows, next_id)
                pending -= len(block)
                next_id += len(block)
                yield block
        if pending:
            yield _cut(chunks, pending, next_id)[0]


def _cut(chunks: list[tuple[np.ndarray, ...]], rows: int, first_id: int) -> tuple[Block, list[tuple[np.ndarray, ...]]]:
    """The first ``rows`` rows of the pending chunks as a Block, and the rest as one chunk."""
    emb, ident, race, gender = (np.concatenate([c[i] for c in chunks]) for i in range(4))
    block = Block(ids=np.arange(first_id, first_id + rows, dtype=np.int64), emb=emb[:rows], identity=ident[:rows],
                  attrs={"race": race[:rows], "gender": gender[:rows]})
    rest = [(emb[rows:], ident[rows:], race[rows:], gender[rows:])] if emb.shape[0] > rows else []
    return block, rest


def plan_synthetic_shards(spec: SyntheticSpec, shard_rows: int, prefix: str = "synth") -> list[ShardPlan]:
    """Cut the identities into contiguous ranges of about ``shard_rows`` samples (an identity is
    never split across shards)."""
    _, _, images = identity_plan(spec)
    plans: list[ShardPlan] = []
    start_ident, rows, first_id = 0, 0, 0
    for ident, count in enumerate(images.tolist()):
        if rows and rows + count > shard_rows:
            plans.append(ShardPlan(len(plans), f"{prefix}-{len(plans):06d}.tar", first_id, rows, (start_ident, ident)))
            first_id += rows
            start_ident, rows = ident, 0
        rows += count
    plans.append(ShardPlan(len(plans), f"{prefix}-{len(plans):06d}.tar", first_id, rows, (start_ident, len(images))))
    return plans


def _override(table: dict[str, float], changes: dict[str, float] | None) -> dict[str, float]:
    """``table`` with ``changes`` applied; a race or gender key replaces every cell key it covers."""
    table = dict(table)
    for key, value in (changes or {}).items():
        if key in RACES:
            covered = {key} | {f"{key}/{g}" for g in GENDERS}
        elif key in GENDERS:
            covered = {key} | {f"{r}/{key}" for r in RACES}
        else:
            covered = {key}
        for old in covered:
            table.pop(old, None)
        table[key] = float(value)
    return table


def spec_from_preset(preset: str = "balanced", *, identities: int = 1000, images_per_identity: float | None = None,
                     min_images: int = 2, dim: int | None = None, seed: int = 0, identity_offset: int = 0,
                     mix: dict[str, float] | None = None, crowding: dict[str, float] | None = None,
                     spread: dict[str, float] | None = None, dispersion: dict[str, float] | None = None
                     ) -> SyntheticSpec:
    """The spec of a preset: a classic mix (``balanced``, ``global``, ``skewed``; dim 512, 46 images
    per identity by default) or a calibrated YAML preset (``realistic`` or a file path; its fit for
    ``dim``, default the preset's own dim, and its images-per-identity table unless
    ``images_per_identity`` is given). ``crowding`` / ``spread`` / ``dispersion`` override single keys."""
    if preset in PRESETS:
        return SyntheticSpec(preset=preset, identities=identities, images_per_identity=images_per_identity or 46.0,
                             min_images=min_images, dim=dim or 512, seed=seed, identity_offset=identity_offset,
                             mix=mix, crowding=_override(DEFAULT_CROWDING, crowding),
                             spread=_override(DEFAULT_SPREAD, spread), dispersion=dict(dispersion or {}))
    from dist_fair.data.presets import load_preset

    data = load_preset(preset)
    dim = int(dim or data["default_dim"])
    if dim not in data["dims"]:
        raise DataError(f"preset {preset!r} has fits for dims {sorted(data['dims'])}, not {dim}; pick one of them "
                        f"or fit one: dist-fair shards synth --calibrate SHARDS --fit-dims {dim} --out-preset FILE")
    fit = data["dims"][dim]
    table = None if images_per_identity is not None else data.get("images_table")
    if table is not None:
        people = sum(sum(t["people"]) for t in table.values())
        mean = sum(c * n for t in table.values() for c, n in zip(t["counts"], t["people"])) / people
        images_per_identity, min_images = max(1.0, mean), 1
    return SyntheticSpec(preset=str(data.get("name", preset)), identities=identities,
                         images_per_identity=images_per_identity or 46.0, min_images=min_images, dim=dim, seed=seed,
                         identity_offset=identity_offset, mix=dict(mix or data.get("mix") or PRESETS["balanced"]),
                         crowding=_override(fit["crowding"], crowding), spread=_override(fit["spread"], spread),
                         dispersion=_override(fit.get("dispersion", {}), dispersion),
                         group_cosine=fit.get("group_cosine"), identity_dim=fit.get("identity_dim"),
                         gender_mix=data.get("gender_mix"), images_table=table)


def generate_synthetic_shards(out_dir: str | Path, preset: str = "balanced", identities: int = 1000,
                              images_per_identity: float | None = None, dim: int | None = None, seed: int = 0,
                              identity_offset: int = 0, shard_rows: int = 65536, block_rows: int = 4096,
                              dtype: str = "float16", workers: int = 1, mix: dict[str, float] | None = None,
                              crowding: dict[str, float] | None = None, spread: dict[str, float] | None = None,
                              min_images: int = 2, progress: bool = True,
                              dispersion: dict[str, float] | None = None) -> Manifest:
    """Write a BUPT-style synthetic set as embedding shards and return its manifest (``preset`` and
    the other parameters as in :func:`spec_from_preset`)."""
    spec = spec_from_preset(preset, identities=identities, images_per_identity=images_per_identity,
                            min_images=min_images, dim=dim, seed=seed, identity_offset=identity_offset, mix=mix,
                            crowding=crowding, spread=spread, dispersion=dispersion)
    dim = spec.dim
    plans = plan_synthetic_shards(spec, shard_rows)
    LOG.info("synth %s: %d identities, %d samples, %d shards -> %s", preset, identities,
             sum(p.rows for p in plans), len(plans), out_dir)
    return write_shard_set(out_dir, plans, SyntheticProducer(spec, block_rows), "embeddings",
                           {"race": list(RACES), "gender": list(GENDERS)}, dim=dim, dtype=dtype, workers=workers,
                           source={"source": "synth", **spec.to_dict(), "block_rows": block_rows,
                                   "shard_rows": shard_rows},
                           num_identities=identities, progress=progress)


def synthetic_arrays(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole set in memory (small sets, tests): embeddings, identity, race, gender - identical
    to what the shards hold (up to the shard dtype)."""
    groups, genders, images = identity_plan(spec)
    mu = spec_means(spec)
    basis = identity_basis(spec.seed, spec.dim, spec.identity_dim)
    embs = [identity_embeddings(spec, i, int(groups[i]), int(images[i]), mu, int(genders[i]), basis)
            for i in range(spec.identities)]
    ident = np.repeat(np.arange(spec.identities, dtype=np.int64) + spec.identity_offset, images)
    return np.concatenate(embs), ident, np.repeat(groups, images), np.repeat(genders, images)


def parse_group_table(text: str | None, name: str) -> dict[str, float] | None:
    """Parse ``African=1.0,Asian=0.9,...`` (CLI form of mix/crowding/spread)."""
    if not text:
        return None
    table: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in RACES:
            raise DataError(f"--{name}: unknown group {key.strip()!r}; groups are {RACES}")
        try:
            table[key.strip()] = float(value)
        except ValueError as err:
            raise DataError(f"--{name}: {part!r} is not group=number") from err
    return table


def parse_cell_table(text: str | None, name: str) -> dict[str, float] | None:
    """Parse ``African=1.0,male=0.2,Asian/female=0.9`` (race, gender or cell keys)."""
    if not text:
        return None
    table: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in _CELL_KEYS:
            raise DataError(f"--{name}: unknown group {key.strip()!r}; keys are a race {RACES}, a gender {GENDERS} "
                            "or a cell Race/gender")
        try:
            table[key.strip()] = float(value)
        except ValueError as err:
            raise DataError(f"--{name}: {part!r} is not group=number") from err
    return table


def describe_groups(groups: Sequence[str] = RACES) -> str:
    return ", ".join(f"{g} (crowding {DEFAULT_CROWDING[g]}, spread {DEFAULT_SPREAD[g]})" for g in groups)
