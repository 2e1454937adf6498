"""The ``--no-verify`` option shared by every command that reads shards (standard library only, so
the CLI modules can import it at module level)."""
from __future__ import annotations

import argparse


def add_no_verify_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check each shard's sha256 against the manifest before reading it "
                             "(default: checked; a mismatch is an error). Only if you accept wrong results "
                             "from a corrupt file")


def apply_no_verify(args: argparse.Namespace) -> None:
    """Turn shard verification off for this process and the Ray workers it starts, if asked."""
    if getattr(args, "no_verify", False):
        from dist_fair.data.shards import set_shard_verification

        set_shard_verification(False)
