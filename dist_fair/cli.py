"""The ``dist-fair`` command.

Each sub-command lives in its stage's package as a module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``main(args) -> int``. Those modules import only the standard library
at module level, so ``dist-fair --help`` and light commands such as ``evaluate`` never pay for
importing torch, Ray or DeepSpeed.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

#: sub-command name -> module implementing it (see the module docstring for the protocol).
COMMANDS: dict[str, str] = {
    "run": "dist_fair.pipeline_cli",
    "shards": "dist_fair.data.cli",
    "embed": "dist_fair.embed.cli",
    "knn": "dist_fair.knn.cli",
    "train": "dist_fair.pipeline.train_cli",
    "fair-assign": "dist_fair.fair.cli",
    "evaluate": "dist_fair.eval.cli",
    "scale": "dist_fair.scale.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-fair",
        description=(
            "Fair clustering of million-scale face data sets. Stages: shards -> knn -> train -> "
            "cluster -> evaluate; `dist-fair run` does them all."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a stage not built yet must not break the others
            if err.name is None or not module_name.startswith(err.name):
                raise
            continue
        command_parser = sub.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(command_parser)
        command_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from dist_fair.errors import DistFairError

    try:
        return int(args._module.main(args) or 0)
    except DistFairError as err:
        print(f"dist-fair {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
