"""`lora-dvc`: the pipeline's console script (declared in pyproject.toml).

lora-dvc compare            # finished experiments of this commit: changed params and metrics, and their plots
"""

from __future__ import annotations

import argparse
import sys

from lora_dvc import chat, compare
from stages.common.errors import PipelineError, setup_console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-dvc", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chat.add_arguments(commands.add_parser("chat", help=chat.__doc__.splitlines()[0], description=chat.__doc__))
    compare.add_arguments(commands.add_parser("compare", help=compare.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    setup_console(args.command)
    try:
        return args.run(args)
    except (compare.CommandError, PipelineError) as err:
        from stages.common.fragile import close_progress_bars

        close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
