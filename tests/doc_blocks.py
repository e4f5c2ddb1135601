"""The shell blocks of README.md and docs/*.md, and how a test runs one.

Every ```bash block carries a marker on the line above it:

    <!-- command: <label> run by tests/<file>.py -->    that test runs the block (run_block(..., "<label>"))
    <!-- command: needs <what> -->                        it needs what a test machine lacks (NEEDS), words
                                                          separated by spaces

The README's two CI blocks are marked by their pipeline-command / test-command markers instead: .ci/run runs them.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import REPO
from tests.dvc_project import env

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")
MARKER = re.compile(
    r"^<!-- command: (?:(?P<label>[\w-]+) run by (?P<test>tests/\w+\.py)|needs (?P<needs>[\w. -]+)) -->$"
)
CI_MARKERS = ("<!-- pipeline-command:start -->", "<!-- test-command:start -->")
# What CI's machine has not: a CUDA GPU, the internet, those programs, and the quiet a benchmark's timings need
NEEDS = {"gpu", "network", "ollama", "llama.cpp", "quiet-machine"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    marker: str  # the line above the fence
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def commands(self) -> list[str]:
        """The block's command lines, comments and blank lines dropped."""
        lines = (line.split("  #")[0].strip() for line in self.text.splitlines())
        return [line for line in lines if line and not line.startswith("#")]


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        if SHELL_FENCE.match(lines[index]):
            end = lines.index("```", index + 1)
            marker = lines[index - 1] if index else ""
            found.append(Block(page, index + 1, marker, "\n".join(lines[index + 1 : end])))
            index = end
        index += 1
    return found


def labelled(page: str, label: str) -> Block:
    """The block of REPO/`page` marked with `label`."""
    for block in blocks(REPO / page):
        match = MARKER.match(block.marker)
        if match and match["label"] == label:
            return block
    raise LookupError(f"{page} has no block labelled {label}")


def run_block(root: Path, page: str, label: str, after: dict[str, Callable[[Path], Any]] | None = None) -> list[str]:
    """Run the commands of the block `label` of `page` in `root`, one at a time as a user types them (each must
    succeed); `after` maps a command's first words to a function called with `root` once it ran (to wait for a
    queue, say). Returns each command's output."""
    outputs = []
    for command in labelled(page, label).commands():
        done = subprocess.run(["bash", "-c", command], cwd=root, env=env(), capture_output=True, text=True)
        assert done.returncode == 0, f"{page} [{label}] {command!r} failed:\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout + done.stderr)
        for start, then in (after or {}).items():
            if command.startswith(start):
                then(root)
    return outputs
