"""Use what the pipeline made: talk to a fine-tune, or compare the experiments of this commit.

lora-dvc chat --prompt "Tell me a story about a brave warrior."
lora-dvc compare          # finished experiments of this commit: changed params and metrics, and their plots
"""

from __future__ import annotations

import argparse
import sys

from lora_dvc import chat, compare
from stages.common.errors import PipelineError, setup_console


def main(argv: list[str] | None = None) -> int:
    texts = argparse.RawDescriptionHelpFormatter  # the descriptions' example lines stay lines
    parser = argparse.ArgumentParser(prog="lora-dvc", description=__doc__, formatter_class=texts)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (("chat", chat), ("compare", compare)):
        command = commands.add_parser(name, help=module.SUMMARY, description=module.__doc__, formatter_class=texts)
        module.add_arguments(command)
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
