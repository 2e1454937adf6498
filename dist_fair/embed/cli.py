"""``dist-fair embed --shards IMAGES --out EMBEDDINGS --model NAME [--workers W]``.

Runs a registered embedder over every image shard (one Ray task per shard, ``--workers`` at a time)
and writes L2-normalised embeddings as embedding shards with the same ids, identities and
protected attributes. Models: ``dlib-resnet`` (dlib's real 128-d face descriptor; needs
``pip install 'dist_fair[faces]'``; images without a detected face are embedded from their centre
and counted as ``no_face`` in the manifest and in ``no_face.npy``) or any timm model name (weights
from ``--checkpoint``; without one the weights are random: tests and throughput only). A killed
run keeps its finished shards: run the same command again to finish it. Prints a JSON summary
with the throughput (images/s).
"""
from __future__ import annotations

import argparse
import json

from dist_fair.verify_option import add_no_verify_argument, apply_no_verify

HELP = "embed image shards with a face model (dlib-resnet) or a timm backbone into embedding shards"
DESCRIPTION = __doc__

#: Options only some models take; left out of the call unless given (the model's default applies).
MODEL_OPTIONS = ("checkpoint", "image_size", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True,
                        help="image shard folder (from `dist-fair shards images|utkface|lfw`)")
    parser.add_argument("--out", required=True,
                        help="output embedding shard folder (finished shards of an identical earlier run are kept)")
    parser.add_argument("--model", default="resnet18",
                        help="embedder: dlib-resnet (real face descriptor, 128 dims) or a timm model name such as "
                             "resnet18 / timm:resnet50 (its pooled features); unknown names list the choices")
    parser.add_argument("--checkpoint", default=argparse.SUPPRESS,
                        help="timm models only: local state_dict file (torch.save) with the weights; "
                             "without it the weights are random")
    parser.add_argument("--image-size", type=int, default=argparse.SUPPRESS,
                        help="timm models only: images are resized to this many pixels square (default 112); "
                             "dlib-resnet aligns faces itself")
    parser.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                        help="timm models only: seed of the random initialisation when there is no --checkpoint "
                             "(default 0)")
    parser.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                        help="images per embedder call (and per progress update); default: the model's own "
                             "(64 for timm, 16 for dlib-resnet)")
    parser.add_argument("--workers", type=int, default=1,
                        help="shards embedded at a time (Ray tasks, 1 CPU each; 1 = in this process)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embedding dtype")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto' or ray://host:10001); default: a private local instance")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_no_verify_argument(parser)


def main(args: argparse.Namespace) -> int:
    apply_no_verify(args)
    from dist_fair.embed.stage import run_embed
    from dist_fair.ray_runtime import init_ray

    if args.workers > 1:
        init_ray(address=args.address)
    options = {name: getattr(args, name) for name in MODEL_OPTIONS if hasattr(args, name)}
    run = run_embed(args.shards, args.out, args.model, batch_size=getattr(args, "batch_size", None),
                    workers=args.workers, dtype=args.dtype, progress=not args.no_progress, **options)
    print(json.dumps({"out": args.out, "model": args.model, "workers": args.workers,
                      "random_weights": run.manifest.source.get("random_weights"), **run.summary()}, indent=2))
    return 0
