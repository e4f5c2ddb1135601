"""The tokenized data set on disk (data/tokenized/): how a record becomes a row, and rows become padded batches.

Rows are stored unpadded ({input_ids, labels, answer_spans}: [start, end) of each answer's tokens); meta.json
records the choices tokenize made (template, pad id, label padding, target length) so that finetune and the
evaluations pad and prompt exactly as tokenize intended.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.io import read_json, read_jsonl
from stages.common.params import TokenizeParams
from stages.common.paths import TOKENIZED_DIR
from stages.common.templates import EOS, pieces

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedMeta:
    pad_token_id: int
    max_length: int
    loss_mask: str  # "full": labels are every token, padding included (the seed); "completion": response only
    padding: str  # "max_length" (the seed), "longest" (per batch) or "packed" (stages/finetuning/packing.py)
    template: str  # "alpaca" or "chat": tokenize.template as resolved for this tokenizer

    @property
    def label_pad(self) -> int:
        return self.pad_token_id if self.loss_mask == "full" else IGNORE_INDEX


def tokenize_record(record: dict[str, Any], tokenizer: Any, params: TokenizeParams, template: str) -> dict[str, Any]:
    """One row: the record's pieces tokenized one by one (so an answer's tokens never merge with the prompt's), cut at
    max_length; labels are every token (`loss_mask: full`) or the answers' only (`completion`). Only the first piece
    gets the tokenizer's own special tokens (a BOS), and only under `alpaca`: a chat template writes its own."""
    input_ids: list[int] = []
    answer_spans: list[list[int]] = []
    for i, (text, trained) in enumerate(pieces(record, template, tokenizer)):
        if text is EOS:
            ids = [tokenizer.eos_token_id]
        else:
            ids = tokenizer(text, add_special_tokens=i == 0 and template == "alpaca")["input_ids"]
        if trained:
            answer_spans.append([len(input_ids), len(input_ids) + len(ids)])
        input_ids += ids
    input_ids = input_ids[: params.max_length]
    spans = [[start, min(end, len(input_ids))] for start, end in answer_spans if start < len(input_ids)]
    merged: list[list[int]] = []  # an answer and its eos are one span
    for span in spans:
        if merged and merged[-1][1] == span[0]:
            merged[-1][1] = span[1]
        else:
            merged.append(span)
    labels = list(input_ids)
    if params.loss_mask == "completion":
        labels = [IGNORE_INDEX] * len(input_ids)
        for start, end in merged:
            labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids, "labels": labels, "answer_spans": merged}


def load_split(name: str, directory: Path = TOKENIZED_DIR) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl(directory / f"{name}.jsonl")]


def load_meta(directory: Path = TOKENIZED_DIR) -> TokenizedMeta:
    return TokenizedMeta(**read_json(directory / "meta.json"))


def pad_batch(
    rows: list[dict[str, Any]], pad_token_id: int, label_pad: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad rows to `pad_to` (or to the longest row) into input_ids, attention_mask, labels tensors."""
    width = pad_to or max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), label_pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def add_filler_rows(batch: dict[str, torch.Tensor], count: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """`count` extra rows that change no loss and no gradient: every label ignored. Each attends to its first
    token, so attention never meets a row with nothing to attend to (a softmax over nothing is NaN)."""
    width = batch["input_ids"].shape[1]
    input_ids = torch.full((count, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    attention_mask[:, 0] = 1
    labels = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    extra = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {key: torch.cat([batch[key], extra[key]]) for key in batch}


class Collator:
    """Trainer data collator that pads as tokenize's meta.json says. With `batch_rows`, a short batch (the last of
    an epoch) gets filler rows, so a compiled model sees one batch size and does not compile again for it."""

    def __init__(self, meta: TokenizedMeta, batch_rows: int | None = None):
        self.meta, self.batch_rows = meta, batch_rows

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad_to = self.meta.max_length if self.meta.padding == "max_length" else None
        batch = pad_batch(rows, self.meta.pad_token_id, self.meta.label_pad, pad_to)
        missing = (self.batch_rows or 0) - len(rows)
        return add_filler_rows(batch, missing, self.meta.pad_token_id) if missing > 0 else batch
