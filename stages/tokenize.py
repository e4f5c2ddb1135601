"""Turn records into token ids with labels, in the prompt format `tokenize.template` names (stages/common/templates.py):
the seed's instruction-then-response text, or the tokenizer's chat template.

    python -m stages.tokenize

Reads data/subset/{train,eval}.jsonl and the tokenizer of `model.name`; writes data/tokenized/{train,eval}.jsonl
(unpadded `input_ids`, `labels`, `answer_spans`) and meta.json (template, pad id, max length, loss mask, padding), and
metrics/data.json (rows per split, rows cut at max_length, rows left without an answer token).
`tokenize.loss_mask: full` makes labels every token, padding included, as the seed recipe did;
`completion` trains on the answers only: every assistant turn of a conversation, nothing of the prompts or padding.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages.common.errors import PipelineError, run_stage
from stages.common.io import atomic_path, read_json, read_jsonl, write_json, write_jsonl
from stages.common.models import check_token_budget, load_tokenizer
from stages.common.params import TokenizeParams, load_params
from stages.common.paths import DATA_METRICS, PROVENANCE, SUBSET_DIR, SUBSET_SOURCE, TOKENIZED_DIR
from stages.common.records import check_record
from stages.common.templates import resolve_template
from stages.common.tokenized import TokenizedMeta, tokenize_record

log = logging.getLogger("pipeline")


def tokenize_file(
    path: Path, tokenizer: Any, params: TokenizeParams, template: str
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of one split and their counts. A row whose answer was cut away entirely (its prompt fills max_length)
    teaches nothing about answering: counted and warned about always, dropped under `loss_mask: completion`, where
    it would have no labelled token at all."""
    records = [check_record(raw, f"{path}:{line}") for line, raw in read_jsonl(path)]
    rows = [tokenize_record(r, tokenizer, params, template) for r in tqdm(records, desc=f"tokenize {path.name}")]
    no_answer = [r for r in rows if not r["answer_spans"]]
    counts = {
        "rows_read": len(rows),
        "rows_cut_at_max_length": sum(len(r["input_ids"]) == params.max_length for r in rows),
        "rows_without_answer": len(no_answer),
    }
    if no_answer:
        action = "dropped" if params.loss_mask == "completion" else "kept (loss_mask full trains on their prompt)"
        log.warning(
            "%s: %d of %d rows have no answer token left within tokenize.max_length %d: %s",
            path,
            len(no_answer),
            len(rows),
            params.max_length,
            action,
        )
        if params.loss_mask == "completion":
            rows = [r for r in rows if r["answer_spans"]]
    if len(no_answer) == counts["rows_read"]:
        raise PipelineError(
            f"{path}: none of its {counts['rows_read']} rows has an answer token within tokenize.max_length "
            f"{params.max_length}; raise it"
        )
    counts["rows"] = len(rows)
    log.info("%s: %d rows, %d cut at max_length", path, len(rows), counts["rows_cut_at_max_length"])
    return rows, counts


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
    with atomic_path(TOKENIZED_DIR, directory=True) as tmp:
        for split in ("train", "eval"):
            rows, counts[split] = tokenize_file(SUBSET_DIR / f"{split}.jsonl", tokenizer, params.tokenize, template)
            write_jsonl(tmp / f"{split}.jsonl", rows)
        write_json(tmp / "meta.json", asdict(meta))
        tokenize = params.sections("tokenize")["tokenize"] | {"template": template}  # resolved: what it was made with
        write_json(tmp / PROVENANCE.name, {"data": read_json(SUBSET_SOURCE), "tokenize": tokenize})
    write_json(DATA_METRICS, counts)


if __name__ == "__main__":
    run_stage("tokenize", main)
