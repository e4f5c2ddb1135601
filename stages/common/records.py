"""Training records from a local JSONL/JSON/Parquet file or the Hugging Face hub, in one of three formats:

- `alpaca`: {instruction, input, output} (input optional), the seed recipe's;
- `messages`: {"messages": [{role, content}, ...]}, the OpenAI-style chat format (roles system, user, assistant);
- `sharegpt`: {"conversations": [{from, value}, ...]} (from: system, human/user, gpt/assistant).

`data.format: auto` takes the format of the first record; every record must then fit it. Only data formats are read
(never pickles or code); a bad record is an error naming where it came from (file:line for JSONL, file:record N
otherwise) and the field. An alpaca record stays {instruction, input, output}; a conversation becomes
{"messages": [...]}, system turn first if any, then user and assistant turns alternating, ending on an assistant
turn: every assistant turn is an answer to train on."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stages.common.errors import PipelineError
from stages.common.io import check_json_value, read_jsonl, unreadable_json
from stages.common.paths import inside_repository

log = logging.getLogger("pipeline")

HUB_PREFIX = "hub:"
FORMATS = {  # format -> the key that marks it
    "alpaca": "instruction",
    "messages": "messages",
    "sharegpt": "conversations",
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FITS_NONE = (
    "fits none of the formats: alpaca (instruction, output), messages (a list of {role, content}), "
    "sharegpt (conversations of {from, value})"
)


def detect_format(raw: Any, where: str) -> str:
    if isinstance(raw, dict):
        for name, key in FORMATS.items():
            if key in raw:
                return name
    raise PipelineError(f"{where}: {FITS_NONE}")


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise PipelineError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise PipelineError(f"{where}: field '{field}' is empty")
    return value


def _alpaca(raw: dict, where: str) -> dict[str, str]:
    for name in ("instruction", "output"):
        if name not in raw:
            raise PipelineError(f"{where}: missing field '{name}'")
    extra = raw.get("input") or ""
    if not isinstance(extra, str):
        raise PipelineError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
    return {
        "instruction": _text(raw["instruction"], where, "instruction"),
        "input": extra,
        "output": _text(raw["output"], where, "output"),
    }


def _turns(raw: dict, where: str, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    turns = raw[key]
    if not isinstance(turns, list) or not turns:
        raise PipelineError(f"{where}: field '{key}' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise PipelineError(f"{where}: {field} must be an object with '{role_key}' and '{text_key}'")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise PipelineError(
                f"{where}: {field}.{role_key} is {turn[role_key]!r}; expected one of {', '.join(roles)}"
            )
        messages.append({"role": role, "content": _text(turn[text_key], where, f"{field}.{text_key}")})
    _check_order(messages, where, key)
    return messages


def _check_order(messages: list[dict], where: str, key: str) -> None:
    """System first (optional), then user/assistant alternating from a user turn, ending on an assistant turn."""
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise PipelineError(
                f"{where}: {key}[{i}]: expected the {expected} turn here, got {message['role']} "
                "(a system turn may come first, then user and assistant alternate)"
            )
    if messages[-1]["role"] != "assistant":
        raise PipelineError(f"{where}: {key} must end with an assistant turn (the answer to train on)")


def check_record(raw: Any, where: str, fmt: str = "auto", format_from: str | None = None) -> dict[str, Any]:
    """The record in its kept shape ({instruction, input, output} or {messages}), or raise naming `where`.
    `format_from`: the record `fmt` was taken from, under `data.format: auto`."""
    found = detect_format(raw, where)
    if fmt != "auto" and found != fmt:
        has = f"it has '{FORMATS[found]}', as {found} records do"
        if format_from:
            raise PipelineError(
                f"{where}: not in the {fmt} format of the first record ({format_from}; {has}); every record of a "
                "file must be in one format: convert it, or split the file"
            )
        raise PipelineError(f"{where}: not in the {fmt} format ({has}); set data.format: {found}, or auto")
    if found == "alpaca":
        return _alpaca(raw, where)
    if found == "messages":
        roles = {r: r for r in ("system", "user", "assistant")}
        return {"messages": _turns(raw, where, "messages", "role", "content", roles)}
    return {"messages": _turns(raw, where, "conversations", "from", "value", SHAREGPT_ROLES)}


def check_records(rows: Iterable[tuple[str, Any]], fmt: str) -> Iterator[dict[str, Any]]:
    """Each (where, raw) row checked against `fmt`; under `auto`, the format of the first row."""
    format_from = None
    for where, raw in rows:
        if fmt == "auto":
            fmt, format_from = detect_format(raw, where), where
            log.info("data.format auto: %s (from %s)", fmt, where)
        yield check_record(raw, where, fmt, format_from)


def _json_list_items(path: Path) -> Iterator[tuple[str, Any]]:
    """The items of a file holding one JSON list, read a megabyte at a time (a record larger than that grows the
    read geometrically): the list is never held whole."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as handle:
        text, at, done, read_size = "", 0, False, 1 << 20

        def more() -> None:
            nonlocal text, at, done, read_size
            chunk = handle.read(read_size)
            done = not chunk
            text, at = text[at:] + chunk, 0

        def skip_space() -> str:
            nonlocal at
            while True:
                while at < len(text) and text[at] in " \t\r\n":
                    at += 1
                if at < len(text) or done:
                    return text[at : at + 1]
                more()

        more()
        if skip_space() != "[":
            raise PipelineError(f"{path}: expected a JSON list of records")
        at += 1
        for number in itertools.count(1):
            where = f"{path}: record {number}"
            separator = skip_space()
            if separator == "]":
                return
            if number > 1:
                if separator != ",":
                    raise PipelineError(f"{where}: malformed JSON (expected ',' or ']' after the previous record)")
                at += 1
                skip_space()
            while True:
                try:
                    value, end = decoder.raw_decode(text, at)
                    break
                except json.JSONDecodeError as err:
                    if done:
                        raise PipelineError(unreadable_json(err, where)) from None
                    read_size = max(read_size, 2 * len(text))  # a record larger than the read: double it
                    more()
                except (RecursionError, ValueError) as err:
                    raise PipelineError(unreadable_json(err, where)) from None
            yield where, check_json_value(value, where)
            at = end


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return ((f"{path}:{line}", raw) for line, raw in read_jsonl(path))
    if suffix == ".json":
        return _checked_text(path, _json_list_items(path))
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise PipelineError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .json or .parquet)")


def _checked_text(path: Path, rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    try:
        yield from rows
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A Parquet file a thousand rows at a time."""
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            for raw in batch.to_pylist():
                number += 1
                yield f"{path}: record {number}", raw
    except PipelineError:
        raise
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise PipelineError(f"{path}: not a readable Parquet file ({err})") from None


def _read_hub(dataset_id: str, split: str, revision: str | None) -> Iterator[tuple[str, Any]]:
    """Stream through `datasets` (hub id or a local dataset folder laid out like a hub repo): records arrive as the
    files download, none is held beyond its batch."""
    import datasets

    where = f"data.source '{HUB_PREFIX}{dataset_id}'"
    try:
        rows = iter(datasets.load_dataset(dataset_id, split=split, revision=revision, streaming=True))
        number = 0
        for raw in rows:
            number += 1
            yield f"{HUB_PREFIX}{dataset_id} record {number}", raw
    except PipelineError:
        raise
    except Exception as err:  # datasets raises many types: network, missing split, missing repo
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PipelineError(f"{where}: could not load split '{split}': {first}") from None


def iter_records(
    source: str, split: str = "train", revision: str | None = None, fmt: str = "auto"
) -> Iterator[dict[str, Any]]:
    """The source's records, checked, one at a time (never the whole source in memory)."""
    if source.startswith(HUB_PREFIX):
        rows = _read_hub(source[len(HUB_PREFIX) :], split, revision)
    else:
        path = Path(source)
        if not path.is_file():
            raise PipelineError(f"data.source '{source}': file not found (use 'hub:<id>' for a hub dataset)")
        inside_repository(path, "data.source")
        rows = _read_file(path)
    count = 0
    for record in check_records(rows, fmt):
        count += 1
        yield record
    if not count:
        raise PipelineError(f"data.source '{source}': no records")
    log.info("read %d records from %s", count, source)
