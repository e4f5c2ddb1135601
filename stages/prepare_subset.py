"""Pick N train and M eval instruction records, reproducibly.

    python -m stages.prepare_subset

Reads `data.source` (a local JSONL/JSON/Parquet file, or `hub:<dataset id>` such as `hub:tatsu-lab/alpaca`) in
`data.format` (alpaca, messages or sharegpt; auto: the first record's; sharegpt is kept as messages);
writes data/subset/train.jsonl and data/subset/eval.jsonl (disjoint by content, shuffled with `data.seed`) and
source.json (the data params, which travel on with the data to the adapter's params.json and model card).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from stages.common.errors import PipelineError, run_stage
from stages.common.io import atomic_path, write_json, write_jsonl
from stages.common.params import DataParams, load_params
from stages.common.paths import SUBSET_DIR, SUBSET_SOURCE
from stages.common.records import read_records

log = logging.getLogger("pipeline")


def content_key(record: dict[str, Any]) -> tuple[str, ...]:
    """What makes two records the same example: their text (every turn's, with its role, for a conversation),
    compared without case or spacing differences."""
    texts = (
        [f"{m['role']}: {m['content']}" for m in record["messages"]]
        if "messages" in record
        else [record[field] for field in ("instruction", "input", "output")]
    )
    return tuple(" ".join(text.split()).casefold() for text in texts)


def unique_records(records: list[dict[str, str]]) -> list[dict[str, str]]:
    """The first of each group of records with the same content, in file order; a duplicate could otherwise land
    in train and eval both, and the held-out figures would score memorised rows."""
    seen: set[tuple[str, ...]] = set()
    unique = [r for r in records if not (content_key(r) in seen or seen.add(content_key(r)))]
    if len(unique) < len(records):
        log.info("removed %d duplicate records (the same text throughout)", len(records) - len(unique))
    return unique


def split_records(records: list[dict], params: DataParams) -> tuple[list[dict], list[dict]]:
    """Shuffle the unique records with the seed, then take train first and eval right after: no example (by content)
    is in both."""
    records = unique_records(records)
    wanted = params.train_size + params.eval_size
    if wanted > len(records):
        raise PipelineError(
            f"data.train_size + data.eval_size = {params.train_size} + {params.eval_size} = {wanted} "
            f"is more than the {len(records)} unique records in '{params.source}'"
        )
    order = list(range(len(records)))
    random.Random(params.seed).shuffle(order)
    train = [records[i] for i in order[: params.train_size]]
    held_out = [records[i] for i in order[params.train_size : wanted]]
    return train, held_out


def main() -> None:
    params = load_params()
    records = read_records(params.data.source, params.data.split, params.data.revision, params.data.format)
    train, held_out = split_records(records, params.data)
    with atomic_path(SUBSET_DIR, directory=True) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", held_out)
        write_json(tmp / SUBSET_SOURCE.name, params.sections("data")["data"])
    log.info("%d train / %d eval records -> %s", len(train), len(held_out), SUBSET_DIR)


if __name__ == "__main__":
    run_stage("prepare_subset", main)
