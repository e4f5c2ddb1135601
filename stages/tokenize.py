"""Turn records into token ids with labels, in the prompt format `tokenize.template` names (stages/common/templates.py):
the seed's instruction-then-response text, or the tokenizer's chat template.

    python -m stages.tokenize

Reads data/subset/{train,eval}.jsonl a batch at a time and the tokenizer of `model.name`; writes
data/tokenized/{train,eval}.arrow (Arrow IPC files, read memory-mapped: unpadded int32 `input_ids` and the
`answer_spans`; labels follow from them), meta.json (template, pad id, max length, loss mask, padding), and
metrics/data.json (rows and tokens per split, rows cut at max_length, rows left without an answer token).
`tokenize.loss_mask: full` makes labels every token, padding included, as the seed recipe did;
`completion` trains on the answers only: every assistant turn of a conversation, nothing of the prompts or padding.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages.common.errors import PipelineError, run_stage
from stages.common.io import BLANK, atomic_path, jsonl_lines, parse_jsonl_line, read_json, write_json
from stages.common.models import check_token_budget, load_tokenizer
from stages.common.params import TokenizeParams, load_params
from stages.common.paths import DATA_METRICS, PROVENANCE, SUBSET_DIR, SUBSET_SOURCE, TOKENIZED_DIR
from stages.common.records import check_record
from stages.common.templates import resolve_template
from stages.common.tokenized import RowBatch, SplitWriter, TokenizedMeta, split_path, token_rows

log = logging.getLogger("pipeline")


BATCH_RECORDS = 1000  # records per tokenizer call and per Arrow batch: memory stays flat whatever the split's size
COUNTS = ("rows_read", "rows_cut_at_max_length", "rows_without_answer", "rows", "tokens")
_job: dict[str, Any] = {}  # what every batch is tokenized with: set before the workers fork, so they inherit it


def tokenize_lines(lines: list[tuple[int, bytes]]) -> tuple[RowBatch, dict[str, int]]:
    """One batch of a split's JSONL lines: parsed, checked, tokenized, and the rows without an answer token dropped
    under `loss_mask: completion` (where they would have no labelled token at all); the batch's counts."""
    path, tokenizer, params, template = _job["path"], _job["tokenizer"], _job["params"], _job["template"]
    records = []
    for number, raw in lines:
        value = parse_jsonl_line(raw, f"{path}:{number}")
        if value is not BLANK:
            records.append(check_record(value, f"{path}:{number}"))
    batch = RowBatch.of(token_rows(records, tokenizer, params, template)) if records else RowBatch.of([])
    answered = batch.span_counts > 0
    counts = {
        "rows_read": len(batch),
        "rows_cut_at_max_length": int((batch.lengths == params.max_length).sum()),
        "rows_without_answer": int((~answered).sum()),
    }
    if params.loss_mask == "completion" and not answered.all():
        batch = batch.select(answered)
    return batch, counts | {"rows": len(batch), "tokens": int(batch.lengths.sum())}


def _one_thread_each() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # a worker per core already: the tokenizer's own threads would contend


def tokenized_batches(path: Path, workers: int) -> Iterator[tuple[RowBatch, dict[str, int]]]:
    """tokenize_lines over the file's batches, in file order, on `workers` processes (forked: they inherit the
    tokenizer), with at most two batches in flight per worker, so memory stays flat."""
    lines = jsonl_lines(path)
    chunks = iter(lambda: list(itertools.islice(lines, BATCH_RECORDS)), [])
    if workers < 2:
        yield from map(tokenize_lines, chunks)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread_each) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.submit(tokenize_lines, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def tokenize_file(
    path: Path, out: Path, tokenizer: Any, params: TokenizeParams, template: str, workers: int = 1
) -> dict[str, int]:
    """Tokenize one split into `out` (Arrow, stages/common/tokenized.py); its counts. A row whose answer was cut
    away entirely (its prompt fills max_length) teaches nothing about answering: counted and warned about always,
    dropped under `loss_mask: completion`."""
    _job.update(path=path, tokenizer=tokenizer, params=params, template=template)
    counts = dict.fromkeys(COUNTS, 0)
    writer = SplitWriter(out)
    try:
        with tqdm(desc=f"tokenize {path.name}", unit=" records") as bar:
            for batch, batch_counts in tokenized_batches(path, workers):
                writer.write(batch)
                counts = {key: counts[key] + batch_counts[key] for key in COUNTS}
                bar.update(batch_counts["rows_read"])
    finally:
        writer.close()
    dropped = counts["rows_without_answer"]
    if dropped:
        action = "dropped" if params.loss_mask == "completion" else "kept (loss_mask full trains on their prompt)"
        log.warning(
            "%s: %d of %d rows have no answer token left within tokenize.max_length %d: %s",
            path,
            dropped,
            counts["rows_read"],
            params.max_length,
            action,
        )
    if dropped == counts["rows_read"]:
        raise PipelineError(
            f"{path}: none of its {counts['rows_read']} rows has an answer token within tokenize.max_length "
            f"{params.max_length}; raise it"
        )
    log.info("%s: %d rows, %d cut at max_length", path, counts["rows"], counts["rows_cut_at_max_length"])
    return counts


def main() -> None:
    params = load_params()
    tokenizer = load_tokenizer(params.model)
    check_token_budget(params.model, params.tokenize.max_length, "tokenize.max_length")
    template = resolve_template(params.tokenize.template, tokenizer)
    log.info("template: %s (tokenize.template %s)", template, params.tokenize.template)
    meta = TokenizedMeta(
        pad_token_id=tokenizer.pad_token_id,
        max_length=params.tokenize.max_length,
        loss_mask=params.tokenize.loss_mask,
        padding=params.tokenize.padding,
        template=template,
    )
    counts = {}
    workers = len(os.sched_getaffinity(0))
    log.info("tokenizing on %d processes, %d records a batch", workers, BATCH_RECORDS)
    with atomic_path(TOKENIZED_DIR, directory=True) as tmp:
        for split in ("train", "eval"):
            source, out = SUBSET_DIR / f"{split}.jsonl", split_path(split, tmp)
            counts[split] = tokenize_file(source, out, tokenizer, params.tokenize, template, workers)
        write_json(tmp / "meta.json", asdict(meta))
        tokenize = params.sections("tokenize")["tokenize"] | {"template": template}  # resolved: what it was made with
        write_json(tmp / PROVENANCE.name, {"data": read_json(SUBSET_SOURCE), "tokenize": tokenize})
    write_json(DATA_METRICS, counts)


if __name__ == "__main__":
    run_stage("tokenize", main)
