"""Atomic writes: every out is built under a temporary name and renamed into place only when complete,
so a crash or Ctrl-C never leaves a file that DVC could record as a finished output."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stages.common.errors import PipelineError

log = logging.getLogger("pipeline")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# A temporary sibling of an out: `.<name>.<pid of the writing process>-<8 random characters>.tmp`
TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-[a-z0-9_]{8}\.tmp")


def _writer_gone(match: re.Match) -> bool:
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def _remove_orphans(candidates: Iterable[Path], target: str | None = None) -> None:
    """Remove each of `candidates` that is a temporary (of `target`'s, when given) whose writer process is gone."""
    for leftover in candidates:
        match = TEMPORARY.fullmatch(leftover.name)
        if match and target in (None, match["target"]) and _writer_gone(match):
            log.info("removing %s, left by an interrupted run", leftover)
            _remove(leftover)


def remove_leftovers(target: Path) -> None:
    """Temporary siblings of `target` left by an earlier run that was killed before it could clean up."""
    _remove_orphans(target.parent.glob(f".{target.name}.*.tmp"), target.name)


def remove_stale_temporaries(root: Path = Path(".")) -> None:
    """Every out's temporary sibling whose writer is gone, one or two folders down (models/.adapter...,
    dvclive/plots/...): a stage killed under `dvc repro` may never run again to clean its own (DVC restores its
    outputs from the run cache instead), so every stage clears what any killed stage left. Git ignores them."""
    _remove_orphans([*root.glob("*/.*.tmp"), *root.glob("*/*/.*.tmp")])


def _follow_umask(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; a finished out gets the permissions any new file of the user's would."""
    mask = _umask()
    for item in [path, *path.rglob("*")] if directory else [path]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(target: Path | str, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` (a folder when `directory`); replace `target` with it on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    prefix = f".{target.name}.{os.getpid()}-"  # the writer's pid: a leftover is removed only once it is gone
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _follow_umask(tmp, directory)
        if directory:
            _remove(target)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)
    if not target.parent.name.endswith(".tmp"):  # files inside a folder being built are logged with it
        log.info("wrote %s", target)


def write_json(path: Path | str, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run the stage that writes it first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: not valid JSON: {err}") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; a bad line is an error naming file:line."""
    for number, raw in jsonl_lines(path):
        value = parse_jsonl_line(raw, f"{path}:{number}")
        if value is not BLANK:
            yield number, value


def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each line, unparsed: for readers that parse elsewhere (tokenize's workers)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found") from None
    with handle:
        yield from enumerate(handle, start=1)


BLANK = object()  # what parse_jsonl_line gives for a blank line (a JSON null is None)


def parse_jsonl_line(raw: bytes, where: str) -> Any:
    """One JSONL line's value (BLANK for a blank line), or one line naming `where`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PipelineError(f"{where}: not UTF-8 text") from None
    return parse_json(text, where) if text.strip() else BLANK


def parse_json(text: str, where: str, multiline: bool = False) -> Any:
    """JSON text as Python values, or one line naming `where` (and the line, for `multiline` text): malformed, nested
    past Python's recursion limit, a number too long to convert, or a lone surrogate (an escape such as \\ud800
    that no UTF-8 text can hold)."""
    try:
        value = json.loads(text)
    except (RecursionError, ValueError) as err:
        raise PipelineError(unreadable_json(err, where, multiline)) from None
    return check_json_value(value, where)


def unreadable_json(err: RecursionError | ValueError, where: str, multiline: bool = False) -> str:
    """The one line for JSON the decoder refused at `where`: malformed (with its line, for `multiline` text), nested
    past Python's recursion limit, or a value it cannot convert (an integer past int's digit limit)."""
    if isinstance(err, json.JSONDecodeError):
        return f"{where}{f':{err.lineno}' if multiline else ''}: malformed JSON ({err.msg})"
    if isinstance(err, RecursionError):
        return f"{where}: JSON nested too deeply"
    return f"{where}: unreadable JSON value ({str(err).splitlines()[0]})"


def check_json_value(value: Any, where: str) -> Any:
    """`value`, or one line naming `where` when it cannot be written back as UTF-8 JSON (a lone surrogate)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise PipelineError(f"{where}: text holds a lone surrogate escape (\\ud800-\\udfff)") from None
    except RecursionError:
        raise PipelineError(f"{where}: JSON nested too deeply") from None
    return value
