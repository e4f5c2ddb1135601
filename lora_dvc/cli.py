"""`lora-dvc`: the pipeline's console script (declared in pyproject.toml).

lora-dvc compare            # finished experiments of this commit: changed params and metrics, and their plots
"""

from __future__ import annotations

import argparse
import sys

from lora_dvc import compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-dvc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compare.add_arguments(commands.add_parser("compare", help=compare.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except compare.CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
