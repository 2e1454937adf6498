"""``dist-fair embed --shards IMAGES --out EMBEDDINGS --model NAME --checkpoint FILE``.

Runs a timm backbone over every image shard (one Ray task per shard with ``--workers W``) and
writes L2-normalised embeddings as embedding shards with the same ids and labels. Weights come from
a local checkpoint; without one the model is randomly initialised (for testing only).
"""
from __future__ import annotations

import argparse
import json

HELP = "embed image shards with a timm backbone into embedding shards"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="image shard folder (from `dist-fair shards images|utkface`)")
    parser.add_argument("--out", required=True, help="output embedding shard folder")
    parser.add_argument("--model", default="resnet18", help="timm model name (features = its pooled output)")
    parser.add_argument("--checkpoint", default=None,
                        help="local state_dict file (torch.save) with the model's weights; none = random weights")
    parser.add_argument("--image-size", type=int, default=112, help="images are resized to this many pixels square")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=1, help="shards embedded at a time (Ray tasks, 1 CPU each)")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embedding dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (no checkpoint)")
    parser.add_argument("--address", default=None, help="Ray cluster to join ('auto' or ray://host:10001)")


def main(args: argparse.Namespace) -> int:
    from dist_fair.embed.stage import embed_image_shards
    from dist_fair.ray_runtime import init_ray

    if args.workers > 1:
        init_ray(address=args.address)
    manifest = embed_image_shards(args.shards, args.out, args.model, args.checkpoint, args.image_size,
                                  args.batch_size, args.workers, args.seed, args.dtype)
    print(json.dumps({"out": args.out, "samples": manifest.num_samples, "dim": manifest.dim,
                      "shards": len(manifest.shards), "random_weights": args.checkpoint is None}, indent=2))
    return 0
