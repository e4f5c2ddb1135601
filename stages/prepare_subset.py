"""Pick N train and M eval instruction records, reproducibly.

    python -m stages.prepare_subset

Reads `data.source` (a local JSONL/JSON/Parquet file, or `hub:<dataset id>` such as `hub:tatsu-lab/alpaca`) in
`data.format` (alpaca, messages or sharegpt; auto: the first record's; sharegpt is kept as messages);
streams it (a record at a time: the source is never held whole), and writes data/subset/train.jsonl and
data/subset/eval.jsonl (disjoint by content, shuffled with `data.seed`; `data.train_size: all` takes every unique
record the eval split leaves) and source.json (the data params, which travel on with the data to the adapter's
params.json and model card).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import tempfile
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stages.common.errors import PipelineError, run_stage
from stages.common.io import atomic_path, write_json
from stages.common.params import DataParams, load_params
from stages.common.paths import SUBSET_DIR, SUBSET_SOURCE
from stages.common.records import iter_records

log = logging.getLogger("pipeline")


WHITESPACE = re.compile(r"\s+")  # runs of whitespace, replaced in place: str.split would hold a list of every word


def content_key(record: dict[str, Any]) -> int:
    """What makes two records the same example, as a 64-bit hash: their text (every turn's, with its role, for a
    conversation), compared without case or spacing differences."""
    texts = (
        [f"{m['role']}: {m['content']}" for m in record["messages"]]
        if "messages" in record
        else [record[field] for field in ("instruction", "input", "output")]
    )
    canonical = "\x1f".join(WHITESPACE.sub(" ", text).strip().casefold() for text in texts)
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class RecordPool:
    """The source's records spilled to an unnamed temporary file as the JSON lines the subset files hold; in memory
    only each record's offset and content hash, 16 bytes a record (a million records: 16 MB)."""

    def __init__(self, directory: Path | None = None):
        self.file = tempfile.TemporaryFile(dir=directory)
        self.offsets = array("q")
        self.keys = array("Q")

    def __enter__(self) -> RecordPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def add(self, record: dict[str, Any]) -> None:
        self.offsets.append(self.file.tell())
        self.keys.append(content_key(record))
        self.file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def unique(self) -> np.ndarray:
        """Positions of the first of each group of records with the same content, in source order. A duplicate could
        otherwise land in train and eval both, and the held-out figures would score memorised rows."""
        _, first = np.unique(np.frombuffer(self.keys, dtype=np.uint64), return_index=True)
        first.sort()
        if len(first) < len(self.keys):
            log.info("removed %d duplicate records (the same text throughout)", len(self.keys) - len(first))
        return first

    def line(self, index: int) -> bytes:
        self.file.seek(self.offsets[index])
        return self.file.readline()


def shuffled(count: int, seed: int) -> array:
    """0..count-1 in the order `random.Random(seed).shuffle` puts a list of them (the same Fisher-Yates draws), kept
    in an array of 8-byte integers rather than a list of Python ints (a million: 8 MB, not 36)."""
    order = array("q", range(count))
    below = random.Random(seed)._randbelow  # what Random.shuffle draws with
    for i in reversed(range(1, count)):
        j = below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def subset_sizes(unique: int, params: DataParams, source: str) -> tuple[int, int]:
    """(train, eval) record counts; `all` takes every unique record the other split leaves."""
    train = unique - params.eval_size if params.train_size == "all" else params.train_size
    held_out = unique - train if params.eval_size == "all" else params.eval_size
    if params.train_size == "all" or params.eval_size == "all":
        for key, size in (("train_size", train), ("eval_size", held_out)):
            if size < 1:
                raise PipelineError(
                    f"data.{key} all leaves {size} records: '{source}' has {unique} unique records, "
                    f"data.train_size {params.train_size}, data.eval_size {params.eval_size}"
                )
    elif train + held_out > unique:
        raise PipelineError(
            f"data.train_size + data.eval_size = {train} + {held_out} = {train + held_out} "
            f"is more than the {unique} unique records in '{source}'"
        )
    return train, held_out


def subset_order(unique: int, params: DataParams, source: str) -> tuple[array, array]:
    """Positions among the unique records, shuffled with the seed: train first, eval right after (no example, by
    content, in both). A pure function of the number of unique records and the data params."""
    train, held_out = subset_sizes(unique, params, source)
    order = shuffled(unique, params.seed)
    return order[:train], order[train : train + held_out]


def drawn(pool: RecordPool, records: Iterable[dict], data: DataParams) -> tuple[np.ndarray, array, array]:
    """Every record into `pool`, then (the unique records' positions, the train order, the eval order over them)."""
    for record in records:
        pool.add(record)
    unique = pool.unique()
    return (unique, *subset_order(len(unique), data, data.source))


def split_records(records: Iterable[dict], params: DataParams) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of `records`, as prepare_subset draws them."""
    with RecordPool() as pool:
        unique, train, held_out = drawn(pool, records, params)
        return [json.loads(pool.line(unique[i])) for i in train], [json.loads(pool.line(unique[i])) for i in held_out]


def write_lines(path: Path, pool: RecordPool, unique: np.ndarray, order: array) -> None:
    with path.open("wb") as out:
        for position in order:
            out.write(pool.line(int(unique[position])))


def main() -> None:
    params = load_params()
    data = params.data
    with atomic_path(SUBSET_DIR, directory=True) as tmp, RecordPool(tmp) as pool:
        records = iter_records(data.source, data.split, data.revision, data.format)
        unique, train, held_out = drawn(pool, tqdm(records, desc="read", unit=" records"), data)
        write_lines(tmp / "train.jsonl", pool, unique, train)
        write_lines(tmp / "eval.jsonl", pool, unique, held_out)
        write_json(tmp / SUBSET_SOURCE.name, params.sections("data")["data"])
    log.info("%d train / %d eval records -> %s", len(train), len(held_out), SUBSET_DIR)


if __name__ == "__main__":
    run_stage("prepare_subset", main)
