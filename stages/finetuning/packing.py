"""Packed rows (`tokenize.padding: packed`): the examples of one micro-batch laid end to end in one row, so the GPU
computes no padding, while each example still attends only to itself.

Which examples share a row is decided once per run: sorted by length and cut into as many strata as a row holds
examples, each row takes one random example of each stratum. Every row then holds about the same number of tokens,
so one fixed row width (the longest row, rounded up to a multiple of 8) fits them all with little left over: the
compiled blocks and the CUDA graphs see one shape. Each optimizer step still sees `train.effective_batch_size`
examples; the Trainer shuffles the rows' order every epoch.

Inside a row, positions restart at 0 for each example and no attention mask is passed: transformers then builds the
block-diagonal causal mask from the positions (`masking_utils.find_packed_sequence_indices`). The examples' bounds go
along too, for attention that computes each example apart (stages/finetuning/packed_attention.py). The first token of
each example is never a target (it would be predicted from the previous example's last token).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from stages.common.tokenized import IGNORE_INDEX, TokenizedMeta
from stages.finetuning.packed_attention import BOUND_LENGTHS, BOUND_TENSORS, segment_bounds

WIDTH_MULTIPLE = 8  # tensor-core friendly row widths


def stratified_packs(lengths: list[int], per_row: int, seed: int) -> list[list[int]]:
    """Indices of `lengths`, `per_row` to a row, each row one example per length stratum; when the count does not
    divide, a last row holds the random remainder (like an unpacked epoch's short last batch)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    remainder, order = order[: len(order) % per_row], order[len(order) % per_row :]
    rows = len(order) // per_row
    by_length = sorted(order, key=lambda i: (lengths[i], i))
    strata = [by_length[k * rows : (k + 1) * rows] for k in range(per_row)]
    for stratum in strata:
        rng.shuffle(stratum)
    packs = [[stratum[r] for stratum in strata] for r in range(rows)]
    return packs + [sorted(remainder)] if remainder else packs


def row_width(rows: list[dict[str, Any]], packs: list[list[int]]) -> int:
    """The fixed width every packed row is padded to: the fullest row, rounded up to a multiple of 8."""
    fullest = max(sum(len(rows[i]["input_ids"]) for i in pack) for pack in packs)
    return WIDTH_MULTIPLE * math.ceil(fullest / WIDTH_MULTIPLE)


def pack_rows(rows: list[dict[str, Any]], per_row: int, seed: int) -> tuple[list[list[dict[str, Any]]], int]:
    """(the packed rows, each a list of examples; their common width)."""
    packs = stratified_packs([len(r["input_ids"]) for r in rows], per_row, seed)
    return [[rows[i] for i in pack] for pack in packs], row_width(rows, packs)


def packed_tensors(examples: list[dict[str, Any]], width: int, meta: TokenizedMeta) -> dict[str, torch.Tensor]:
    """One row of `width` tokens: the examples end to end, then padding as one more segment of its own (so every
    query attends to something); labels ignore padding and each example's first token."""
    lengths = segment_lengths(examples, width)
    fill = lengths[-1] if len(lengths) > len(examples) else 0
    input_ids = [token for example in examples for token in example["input_ids"]] + [meta.pad_token_id] * fill
    labels = [label for example in examples for label in [IGNORE_INDEX, *example["labels"][1:]]]
    labels += [IGNORE_INDEX] * fill
    positions = [position for length in lengths for position in range(length)]
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(input_ids), "labels": as_row(labels), "position_ids": as_row(positions)}


def segment_lengths(examples: list[dict[str, Any]], width: int) -> list[int]:
    """The lengths of a packed row's segments: its examples, then its padding (when there is any)."""
    lengths = [len(example["input_ids"]) for example in examples]
    fill = width - sum(lengths)
    if fill < 0:
        raise ValueError(f"{sum(lengths)} tokens do not fit a packed row of {width}")
    return [*lengths, fill] if fill else lengths


class PackCollator:
    """Trainer data collator for packed rows: the Trainer's batch is one packed row (a list of up to `per_row`
    examples). Besides the row it passes the segments' bounds, `per_row` + 1 slots per row (the padding's included),
    and the row width as the longest a segment can be: every batch of a run has the same shapes and that one length."""

    def __init__(self, meta: TokenizedMeta, width: int, per_row: int):
        self.meta, self.width, self.per_row = meta, width, per_row

    def __call__(self, batch: list[list[dict[str, Any]]]) -> dict[str, Any]:
        rows = [packed_tensors(examples, self.width, self.meta) for examples in batch]
        collated: dict[str, Any] = {key: torch.cat([row[key] for row in rows]) for key in rows[0]}
        bounds = segment_bounds([segment_lengths(examples, self.width) for examples in batch], self.per_row + 1)
        collated |= dict.fromkeys(BOUND_TENSORS, bounds) | dict.fromkeys(BOUND_LENGTHS, self.width)
        return collated
