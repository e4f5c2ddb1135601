"""Instruction records ({instruction, input, output}) from a local JSONL/JSON/Parquet file or the Hugging Face hub.

Only data formats are read (never pickles or code); every record is checked, and a bad one is an error naming
where it came from (file:line for JSONL, file:record N otherwise).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from stages.common.errors import PipelineError
from stages.common.io import read_jsonl

log = logging.getLogger("pipeline")

HUB_PREFIX = "hub:"
REQUIRED = ("instruction", "output")


def check_record(raw: Any, where: str) -> dict[str, str]:
    """Return the record as {instruction, input, output} strings, or raise naming `where` and the field."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for name in REQUIRED:
        if name not in raw:
            raise PipelineError(f"{where}: missing field '{name}'")
    record = {}
    for name in ("instruction", "input", "output"):
        value = (raw.get(name) or "") if name == "input" else raw[name]
        if not isinstance(value, str):
            raise PipelineError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        record[name] = value
    for name in REQUIRED:
        if not record[name].strip():
            raise PipelineError(f"{where}: field '{name}' is empty")
    return record


def _read_file(path: Path) -> list[dict[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [check_record(raw, f"{path}:{line}") for line, raw in read_jsonl(path)]
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise PipelineError(f"{path}: not UTF-8 text") from None
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(rows, list):
            raise PipelineError(f"{path}: expected a JSON list of records")
        return [check_record(raw, f"{path}: record {i + 1}") for i, raw in enumerate(rows)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise PipelineError(f"{path}: not a readable Parquet file ({err})") from None
        return [check_record(raw, f"{path}: record {i + 1}") for i, raw in enumerate(rows)]
    raise PipelineError(f"{path}: unsupported data format '{suffix}' (use .jsonl, .json or .parquet)")


def _read_hub(dataset_id: str, split: str, revision: str | None) -> list[dict[str, str]]:
    """Load through `datasets` (hub id or a local dataset folder laid out like a hub repo)."""
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, split=split, revision=revision)
    except Exception as err:  # datasets raises many types: network, missing split, missing repo
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PipelineError(
            f"data.source '{HUB_PREFIX}{dataset_id}': could not load split '{split}': {first}"
        ) from None
    return [check_record(raw, f"{HUB_PREFIX}{dataset_id} record {i + 1}") for i, raw in enumerate(rows)]


def read_records(source: str, split: str = "train", revision: str | None = None) -> list[dict[str, str]]:
    if source.startswith(HUB_PREFIX):
        records = _read_hub(source[len(HUB_PREFIX) :], split, revision)
    else:
        path = Path(source)
        if not path.is_file():
            raise PipelineError(f"data.source '{source}': file not found (use 'hub:<id>' for a hub dataset)")
        records = _read_file(path)
    if not records:
        raise PipelineError(f"data.source '{source}': no records")
    log.info("read %d records from %s", len(records), source)
    return records
