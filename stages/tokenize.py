"""Turn instruction records into token ids with labels: prompt (instruction, optional input) then the answer + eos.

    python -m stages.tokenize

Reads data/subset/{train,eval}.jsonl and the tokenizer of `model.name`; writes data/tokenized/{train,eval}.jsonl
(unpadded `input_ids`, `labels`, `prompt_len`) and meta.json (pad id, max length, loss mask, padding).
`tokenize.loss_mask: full` makes labels every token, padding included, as the seed recipe did;
`completion` ignores prompt and padding in the loss.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages.common.errors import run_stage
from stages.common.io import atomic_path, read_jsonl, write_json, write_jsonl
from stages.common.models import load_tokenizer
from stages.common.params import TokenizeParams, load_params
from stages.common.paths import SUBSET_DIR, TOKENIZED_DIR
from stages.common.prompt import format_prompt
from stages.common.records import check_record
from stages.common.tokenized import IGNORE_INDEX, TokenizedMeta

log = logging.getLogger("pipeline")


def tokenize_record(record: dict[str, str], tokenizer: Any, params: TokenizeParams) -> dict[str, Any]:
    """One row: prompt ids then answer ids + eos, cut at max_length; labels follow `params.loss_mask`."""
    prompt_ids = tokenizer(format_prompt(record["instruction"], record["input"]))["input_ids"]
    answer_ids = tokenizer(record["output"].strip(), add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids + [tokenizer.eos_token_id])[: params.max_length]
    prompt_len = min(len(prompt_ids), params.max_length)
    labels = list(input_ids)
    if params.loss_mask == "completion":
        labels[:prompt_len] = [IGNORE_INDEX] * prompt_len
    return {"input_ids": input_ids, "labels": labels, "prompt_len": prompt_len}


def tokenize_file(path: Path, tokenizer: Any, params: TokenizeParams) -> list[dict[str, Any]]:
    records = [check_record(raw, f"{path}:{line}") for line, raw in read_jsonl(path)]
    rows = [tokenize_record(r, tokenizer, params) for r in tqdm(records, desc=f"tokenize {path.name}")]
    no_answer = sum(r["prompt_len"] == len(r["input_ids"]) for r in rows)
    truncated = sum(len(r["input_ids"]) == params.max_length for r in rows)
    log.info("%s: %d rows, %d cut at max_length, %d with no answer token left", path, len(rows), truncated, no_answer)
    return rows


def main() -> None:
    params = load_params()
    tokenizer = load_tokenizer(params.model)
    meta = TokenizedMeta(
        pad_token_id=tokenizer.pad_token_id,
        max_length=params.tokenize.max_length,
        loss_mask=params.tokenize.loss_mask,
        padding=params.tokenize.padding,
    )
    with atomic_path(TOKENIZED_DIR, directory=True) as tmp:
        for split in ("train", "eval"):
            write_jsonl(
                tmp / f"{split}.jsonl", tokenize_file(SUBSET_DIR / f"{split}.jsonl", tokenizer, params.tokenize)
            )
        write_json(tmp / "meta.json", asdict(meta))


if __name__ == "__main__":
    run_stage("tokenize", main)
