"""Compare the finished experiments of this commit: a table of the params and metrics that differ, and one plots
page with every experiment's curves and perplexity bars.

After `dvc exp run --queue -S 'lora.r=4,8,16'` and `dvc queue start -j 2`, once `dvc queue status` shows them
done, this is `dvc exp show --only-changed` (finished experiments only, metric columns of the model, never
timings) plus `dvc plots diff <baseline> <experiments>` in one command."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

SUMMARY = "Compare this commit's finished experiments: the params and metrics that differ, and their plots."
# Dropped columns: the file hashes of every dep and out (their names are paths with no ":"; a param or metric
# column is file:key, and dvclive/metrics.json:train.learning_rate holds a "/" too) and the run's bookkeeping; what
# stays is the params and metrics that differ between the experiments.
DROPPED = "^[^:]*/[^:]*$|Created|State|Executor"


class CommandError(Exception):
    """A one-line error for the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plots", default="dvc_plots/compare", help="folder of the plots page (default: %(default)s)")
    parser.add_argument("--md", action="store_true", help="Markdown table (for a pull request or a note)")
    parser.set_defaults(run=run)


def dvc(*args: str, show: bool = False) -> str:
    """Run dvc; with `show`, its output goes straight to the terminal (the table then takes the terminal's width)."""
    result = subprocess.run(["dvc", *args], capture_output=not show, text=True)
    if result.returncode:
        message = (result.stderr or result.stdout or "").strip().splitlines() or ["failed"]
        raise CommandError(f"dvc {' '.join(args)}: {message[-1]}")
    return result.stdout or ""


def finished_experiments() -> list[str]:
    """Experiments of the current commit that ran to the end (a failed or queued one has no result to compare)."""
    return dvc("exp", "ls", "--name-only").split()


def run(args: argparse.Namespace) -> int:
    names = finished_experiments()
    if not names:
        raise CommandError("no finished experiment on this commit: `dvc queue status` shows queued and failed ones")
    table = ["exp", "show", "--only-changed", "--hide-failed", "--hide-queued", "--hide-workspace", "--no-pager"]
    dvc(*table, "--drop", DROPPED, *(["--md"] if args.md else []), show=True)
    dvc("plots", "diff", "HEAD", *names, "-o", args.plots)
    print(f"\n{len(names)} experiment(s) against HEAD; plots: {Path(args.plots) / 'index.html'}")
    return 0
