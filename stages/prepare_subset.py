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
    """The source's records spilled to an unnamed temporary file as the JSON lines the subset files hold. In memory
    while reading: each record's length in bytes and content hash, 12 bytes a record; after `unique`, only the
    unique records' start offsets, 8 bytes each (a million records: 12 MB, then 8)."""

    def __init__(self, directory: Path | None = None):
        self.file = tempfile.TemporaryFile(dir=directory)
        self.lengths = array("I")
        self.keys = array("Q")
        self.starts = np.empty(0, dtype=np.int64)

    def __enter__(self) -> RecordPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def add(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        if len(line) >= 2**32:
            raise PipelineError(f"record {len(self.keys) + 1} of data.source holds {len(line):,} bytes: over 4 GiB")
        self.lengths.append(len(line))
        self.keys.append(content_key(record))
        self.file.write(line)

    def unique(self) -> int:
        """Keep the first of each group of records with the same content, in source order, and return how many there
        are (`line` reads them by rank). A duplicate could otherwise land in train and eval both, and the held-out
        figures would score memorised rows."""
        duplicate = _later_duplicates(np.frombuffer(self.keys, dtype=np.uint64))
        self.keys = array("Q")  # the hashes are done with: their 8 bytes a record go back before the offsets come
        self.starts = _kept_starts(np.frombuffer(self.lengths, dtype=np.uint32), ~duplicate)
        self.lengths = array("I")
        removed = len(duplicate) - len(self.starts)
        if removed:
            log.info("removed %d duplicate records (the same text throughout)", removed)
        return len(self.starts)

    def line(self, rank: int) -> bytes:
        """The `rank`-th unique record's JSON line."""
        self.file.seek(int(self.starts[rank]))
        return self.file.readline()


BUCKET_BITS = 8  # duplicates are looked for among keys that share their top byte: 1/256 of the keys at a time


def _later_duplicates(keys: np.ndarray) -> np.ndarray:
    """True for every key that an earlier position already holds. Sorting all keys at once takes 3-4 copies of them
    (np.unique); a bucket of keys with the same top byte at a time takes 1/256 of that."""
    duplicate = np.zeros(len(keys), dtype=bool)
    buckets = np.empty(len(keys), dtype=np.uint8)
    for start in range(0, len(keys), CHUNK):
        buckets[start : start + CHUNK] = keys[start : start + CHUNK] >> np.uint64(64 - BUCKET_BITS)
    for bucket in range(2**BUCKET_BITS):
        members = np.flatnonzero(buckets == bucket)
        if len(members) < 2:
            continue
        bucket_keys = keys[members]
        order = np.argsort(bucket_keys, kind="stable")  # equal keys stay in source order: the first comes first
        ranked = bucket_keys[order]
        repeats = np.flatnonzero(ranked[1:] == ranked[:-1]) + 1
        duplicate[members[order[repeats]]] = True
    return duplicate


CHUNK = 1 << 16  # records per step of the chunked passes: their temporaries stay under a megabyte


def _kept_starts(lengths: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Byte offsets in the spill file of the `kept` records, from every record's length, a chunk at a time."""
    starts = np.empty(int(kept.sum()), dtype=np.int64)
    done, base = 0, 0
    for start in range(0, len(lengths), CHUNK):
        sizes = lengths[start : start + CHUNK].astype(np.int64)
        offsets = base + np.cumsum(sizes) - sizes
        chosen = offsets[kept[start : start + CHUNK]]
        starts[done : done + len(chosen)] = chosen
        done += len(chosen)
        base += int(sizes.sum())
    return starts


def shuffled(count: int, seed: int) -> array:
    """0..count-1 in the order `random.Random(seed).shuffle` puts a list of them (the same Fisher-Yates draws), kept
    in an array of 4-byte integers rather than a list of Python ints (a million: 4 MB, not 36)."""
    order = array("i" if count < 2**31 else "q", range(count))
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


def drawn(pool: RecordPool, records: Iterable[dict], data: DataParams) -> tuple[array, array]:
    """Every record into `pool`, then (the train order, the eval order) over its unique records."""
    for record in records:
        pool.add(record)
    return subset_order(pool.unique(), data, data.source)


def split_records(records: Iterable[dict], params: DataParams) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of `records`, as prepare_subset draws them."""
    with RecordPool() as pool:
        train, held_out = drawn(pool, records, params)
        return [json.loads(pool.line(i)) for i in train], [json.loads(pool.line(i)) for i in held_out]


def write_lines(path: Path, pool: RecordPool, order: array) -> None:
    with path.open("wb") as out:
        for rank in order:
            out.write(pool.line(rank))


def main() -> None:
    params = load_params()
    data = params.data
    with atomic_path(SUBSET_DIR, directory=True) as tmp, RecordPool(tmp) as pool:
        records = iter_records(data.source, data.split, data.revision, data.format)
        train, held_out = drawn(pool, tqdm(records, desc="read", unit=" records"), data)
        write_lines(tmp / "train.jsonl", pool, train)
        write_lines(tmp / "eval.jsonl", pool, held_out)
        write_json(tmp / SUBSET_SOURCE.name, params.sections("data")["data"])
    log.info("%d train / %d eval records -> %s", len(train), len(held_out), SUBSET_DIR)


if __name__ == "__main__":
    run_stage("prepare_subset", main)
