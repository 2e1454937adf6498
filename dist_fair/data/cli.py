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


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output shard folder (created; finished shards are kept on re-run)")
    parser.add_argument("--shard-rows", type=int, default=65536, help="samples per shard file")
    parser.add_argument("--workers", type=int, default=1,
                        help="parallel writers: one Ray task per shard, this many at a time (1 = in this process)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or ray://host:10001); default: a private local instance")


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--preset", choices=["balanced", "global", "skewed"], default="balanced",
                        help="group mix: balanced (25%% each race), global (BUPT-GlobalFace mix), skewed (Caucasian 50%%)")
    parser.add_argument("--identities", type=int, default=1000, help="number of identities")
    parser.add_argument("--images-per-identity", type=float, default=46.0,
                        help="mean images per identity (long-tailed lognormal, at least --min-images)")
    parser.add_argument("--min-images", type=int, default=2, help="fewest images of an identity")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical shards)")
    parser.add_argument("--identity-offset", type=int, default=0,
                        help="number of the first identity: a different offset draws unseen identities "
                             "from the same world (e.g. a test set)")
    parser.add_argument("--block-rows", type=int, default=4096, help="rows per tar sample (block)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embedding dtype")
    parser.add_argument("--mix", default=None, help="custom group mix, e.g. African=0.1,Asian=0.2,Caucasian=0.6,Indian=0.1")
    parser.add_argument("--crowding", default=None, help="per-group crowding, e.g. African=1.0,Caucasian=0.5 (higher = harder)")
    parser.add_argument("--spread", default=None, help="per-group within-identity spread (higher = harder)")


def run_synth(args: argparse.Namespace):
    from dist_fair.data.synthetic import generate_synthetic_shards, parse_group_table

    return generate_synthetic_shards(
        args.out, preset=args.preset, identities=args.identities, images_per_identity=args.images_per_identity,
        min_images=args.min_images, dim=args.dim, seed=args.seed, identity_offset=args.identity_offset,
        shard_rows=args.shard_rows, block_rows=args.block_rows, dtype=args.dtype, workers=args.workers,
        mix=parse_group_table(args.mix, "mix"), crowding=parse_group_table(args.crowding, "crowding"),
        spread=parse_group_table(args.spread, "spread"),
    )


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
    summary = {"out": args.out, "kind": manifest.kind, "samples": manifest.num_samples,
               "identities": manifest.num_identities, "shards": len(manifest.shards), "dim": manifest.dim,
               "groups": manifest.group_counts()}
    print(json.dumps(summary, indent=2))
    return 0
