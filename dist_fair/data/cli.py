"""``dist-fair shards SOURCE ... --out DIR``: write a WebDataset shard folder with its manifest.

Sources: ``synth`` (the built-in BUPT-style generator, METHODS.md §2), ``images`` (a
``<group>/<identity>/*.jpg`` folder, the BUPT-BalancedFace layout), ``utkface`` (the UTKFace tar
files or folder), ``table`` (a CSV with a protected column) and ``digits`` (MNIST-USPS or
Reverse-MNIST). ``--workers W`` writes with one Ray task per shard, W at a time, on the local Ray
instance or the cluster given by ``--address``.
"""
from __future__ import annotations

import argparse
import importlib
import json

HELP = "write a shard folder (WebDataset tars + manifest.json) from a data source"
DESCRIPTION = __doc__

#: source name -> (module, add-arguments function, run function, one-line help)
SOURCES: dict[str, tuple[str, str, str, str]] = {
    "synth": ("dist_fair.data.cli", "add_synth_arguments", "run_synth",
              "BUPT-style synthetic face embeddings (presets balanced, global, skewed)"),
    "images": ("dist_fair.data.images", "add_images_arguments", "run_images",
               "a folder laid out <group>/<identity>/*.jpg (BUPT-BalancedFace layout)"),
    "utkface": ("dist_fair.data.images", "add_utkface_arguments", "run_utkface",
                "UTKFace face crops from its tar files or folder (race, gender, age from file names)"),
    "table": ("dist_fair.data.table", "add_table_arguments", "run_table",
              "a CSV table with feature columns, a protected column and an optional label column"),
    "lfw": ("dist_fair.data.lfw", "add_lfw_arguments", "run_lfw",
            "Labeled Faces in the Wild (tar files or folder): identities, gender and race from its side files"),
    "faces": ("dist_fair.data.identity_folders", "add_faces_arguments", "run_faces",
              "face images one folder per person (<Person>/<image>.jpg, folders or tar files) with attribute files"),
    "features": ("dist_fair.data.features", "add_features_arguments", "run_features",
                 "precomputed embeddings (.npy, .npz, learn-to-cluster .bin + .meta), L2-normalised"),
    "digits": ("dist_fair.data.digits", "add_digits_arguments", "run_digits",
               "MNIST-USPS or Reverse-MNIST from mnist_usps.npz (protected attribute: source)"),
}


def add_common_arguments(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    parser.add_argument("--out", required=out_required,
                        help="output shard folder (created; finished shards are kept on re-run)")
    parser.add_argument("--shard-rows", type=int, default=65536, help="samples per shard file")
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel writers: one Ray task per shard, this many at a time (1 = in this process)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or ray://host:10001); default: a private local instance")


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, out_required=False)
    parser.add_argument("--preset", default="balanced",
                        help="balanced (25%% each race), global (BUPT-GlobalFace mix), skewed (Caucasian 50%%), "
                             "realistic (calibrated on LFW's face embeddings, dist_fair/data/presets/realistic.yaml) "
                             "or a preset YAML file written by --calibrate")
    parser.add_argument("--identities", type=int, default=1000, help="number of identities")
    parser.add_argument("--images-per-identity", type=float, default=None,
                        help="mean images per identity (long-tailed lognormal, at least --min-images); default 46, "
                             "or a calibrated preset's images-per-identity table")
    parser.add_argument("--min-images", type=int, default=2, help="fewest images of an identity")
    parser.add_argument("--dim", type=int, default=None, help="embedding dimension (default 512, or a calibrated "
                                                              "preset's own dimension)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical shards)")
    parser.add_argument("--identity-offset", type=int, default=0,
                        help="number of the first identity: a different offset draws unseen identities "
                             "from the same world (e.g. a test set)")
    parser.add_argument("--block-rows", type=int, default=4096, help="rows per tar sample (block)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embedding dtype")
    parser.add_argument("--mix", default=None, help="custom group mix, e.g. African=0.1,Asian=0.2,Caucasian=0.6,Indian=0.1")
    parser.add_argument("--crowding", default=None,
                        help="per-group crowding, e.g. African=1.0,Caucasian=0.5 or Asian/female=4.3 (higher = harder)")
    parser.add_argument("--spread", default=None, help="per-group within-identity spread (higher = harder)")
    parser.add_argument("--dispersion", default=None,
                        help="per-group log-normal spread of the image noise scale, e.g. female=0.2 (0 = none)")
    calibrate = parser.add_argument_group(
        "calibration", "--calibrate SHARDS fits the generator to a labelled embedding shard folder and writes a "
                       "preset instead of shards (dist_fair/data/calibration.py)")
    calibrate.add_argument("--calibrate", default=None, metavar="SHARDS",
                           help="labelled embedding shard folder to fit (e.g. `dist-fair shards lfw --descriptors`)")
    calibrate.add_argument("--out-preset", default=None, metavar="FILE.yaml", help="preset file to write")
    calibrate.add_argument("--attribute", default="gender",
                           help="protected attribute whose groups are fitted (gender: female/male, or race: "
                                "African/Asian/Caucasian/Indian)")
    calibrate.add_argument("--rename", default=None,
                           help="map the shards' group names onto the generator's, e.g. eastasian=Asian,"
                                "asianindian=Indian (unmatched groups are left out of the fit)")
    calibrate.add_argument("--fit-dims", default=None,
                           help="comma-separated generator dimensions to fit (none: the shards' own dimension)")
    calibrate.add_argument("--preset-name", default=None, help="name stored in the preset (none: the file stem)")


def run_synth(args: argparse.Namespace):
    from dist_fair.data.synthetic import generate_synthetic_shards, parse_cell_table, parse_group_table
    from dist_fair.errors import DataError

    if args.calibrate is not None:
        return run_calibrate(args)
    if args.out is None:
        raise DataError("dist-fair shards synth needs --out DIR (or --calibrate SHARDS --out-preset FILE.yaml)")
    return generate_synthetic_shards(
        args.out, preset=args.preset, identities=args.identities, images_per_identity=args.images_per_identity,
        min_images=args.min_images, dim=args.dim, seed=args.seed, identity_offset=args.identity_offset,
        shard_rows=args.shard_rows, block_rows=args.block_rows, dtype=args.dtype, workers=args.workers,
        mix=parse_group_table(args.mix, "mix"), crowding=parse_cell_table(args.crowding, "crowding"),
        spread=parse_cell_table(args.spread, "spread"), dispersion=parse_cell_table(args.dispersion, "dispersion"),
    )


def run_calibrate(args: argparse.Namespace) -> dict:
    """``--calibrate SHARDS --out-preset FILE``: fit the generator per group of ``--attribute`` and write
    the preset; returns the JSON summary."""
    from pathlib import Path

    import numpy as np

    from dist_fair.data import shards as S
    from dist_fair.data.calibration import calibrate, preset_from_fits, preset_yaml
    from dist_fair.data.synthetic import GENDERS, RACES
    from dist_fair.errors import DataError
    from dist_fair.io_atomic import atomic_write_text

    if not args.out_preset:
        raise DataError("--calibrate needs --out-preset FILE.yaml (where the fitted preset is written)")
    labels = S.load_labels(args.calibrate)
    if args.attribute not in labels.attrs:
        raise DataError(f"{args.calibrate}: no protected attribute {args.attribute!r}; it has {sorted(labels.attrs)}")
    rename = {}
    for part in (args.rename or "").split(","):
        if part.strip():
            old, _, new = part.partition("=")
            rename[old.strip()] = new.strip()
    targets = GENDERS if args.attribute == "gender" else RACES
    source_names = labels.attribute_names[args.attribute]
    codes = np.full(labels.identity.shape, -1, np.int64)
    left_out = []
    for code, name in enumerate(source_names):
        target = rename.get(name, name)
        match = [t for t in targets if t.lower() == target.lower()]
        if match:
            codes[labels.attrs[args.attribute] == code] = targets.index(match[0])
        else:
            left_out.append(name)
    missing = [t for t in targets if not np.any(codes == targets.index(t))]
    if missing:
        raise DataError(f"{args.calibrate}: attribute {args.attribute!r} has no samples of {missing} (its groups: "
                        f"{source_names}); the generator needs all of {targets}: use --rename old=new")
    dims = [int(d) for d in args.fit_dims.split(",")] if args.fit_dims else None
    fits = calibrate(S.load_embeddings(args.calibrate), labels.identity, codes, targets, dims=dims, seed=args.seed)
    name = args.preset_name or Path(args.out_preset).stem
    preset = preset_from_fits(fits, name, args.attribute, str(args.calibrate))
    if left_out:
        preset["calibration"]["left_out_groups"] = left_out
    header = [f"Preset {name!r}: the synthetic generator fitted to {args.calibrate} per {args.attribute} by",
              "`dist-fair shards synth --calibrate` (model and fit: dist_fair/data/calibration.py). Every value is",
              "fitted; tables keyed by group apply to every race (or gender) of the generator."]
    atomic_write_text(args.out_preset, preset_yaml(preset, header=header))
    return {"preset": str(args.out_preset), "attribute": args.attribute, "left_out_groups": left_out,
            "fits": {dim: {"group_cosine": fit.group_cosine,
                           "groups": {g.name: {"crowding": g.crowding, "spread": g.spread, "dispersion": g.dispersion,
                                               "max_quantile_error": round(g.max_error(), 4)} for g in fit.groups}}
                     for dim, fit in fits.items()}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    for name, (module_name, add_name, _, help_text) in SOURCES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is None or not module_name.startswith(err.name):
                raise
            continue
        source_parser = sub.add_parser(name, help=help_text, description=help_text,
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        getattr(module, add_name)(source_parser)


def main(args: argparse.Namespace) -> int:
    from dist_fair.ray_runtime import init_ray

    module_name, _, run_name, _ = SOURCES[args.source]
    if getattr(args, "workers", 1) > 1:
        init_ray(address=getattr(args, "address", None))
    manifest = getattr(importlib.import_module(module_name), run_name)(args)
    if isinstance(manifest, dict):  # a command that writes no shards (synth --calibrate) returns its summary
        print(json.dumps(manifest, indent=2))
        return 0
    summary = {"out": args.out, "kind": manifest.kind, "samples": manifest.num_samples,
               "identities": manifest.num_identities, "shards": len(manifest.shards), "dim": manifest.dim,
               "groups": manifest.group_counts()}
    print(json.dumps(summary, indent=2))
    return 0
