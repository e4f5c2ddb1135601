"""Packed rows (`tokenize.padding: packed`): examples laid end to end in rows of a token budget, so the GPU computes
little padding, while each example still attends only to itself.

The budget is `tokenize.max_length` tokens a row, the length tokenize cuts every example at, so every example fits a
row whole. Rows are filled best-fit decreasing (longest example first, each into the fullest row it still fits),
decided once from the stored lengths: no example is split, and rows come out nearly full whatever the length
distribution, so its tail no longer sets the width of every row. A row is one sample for the Trainer:
`train.micro_batch_size` rows per forward pass, `train.effective_batch_size` rows per optimizer step (a token budget of
effective_batch_size x max_length), and the Trainer shuffles the rows' order every epoch. Every row is padded to one
fixed width (the fullest row, rounded up to a multiple of 8): the compiled blocks and the CUDA graphs see one shape.

Inside a row, positions restart at 0 for each example and no attention mask is passed: transformers then builds the
block-diagonal causal mask from the positions (`masking_utils.find_packed_sequence_indices`). The examples' bounds go
along too, for attention that computes each example apart (stages/finetuning/packed_attention.py). The first token of
each example is never a target (it would be predicted from the previous example's last token).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stages.common.tokenized import IGNORE_INDEX, TokenizedMeta
from stages.finetuning.packed_attention import BOUND_LENGTHS, BOUND_TENSORS, segment_bounds

WIDTH_MULTIPLE = 8  # tensor-core friendly row widths


def best_fit_packs(lengths: Sequence[int] | np.ndarray, budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `budget` tokens, best-fit decreasing: each example, longest
    first (ties by index), goes into the row with the least room that still holds it, or opens a row. Rows with the
    same room are kept by room, so a step costs a bisection over the distinct rooms (at most `budget`), not a scan of
    the rows: a million examples pack in seconds."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > budget:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a packed row of {budget}")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    smallest = int(lengths.min()) if len(lengths) else 0
    packs: list[list[int]] = []
    rooms: list[int] = []  # the distinct room values some open row has, ascending
    rows_by_room: dict[int, list[int]] = {}
    for index, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            row = rows_by_room[room].pop()
            if not rows_by_room[room]:
                del rows_by_room[room], rooms[at]
        else:
            room, row = budget, len(packs)
            packs.append([])
        packs[row].append(index)
        left = room - length
        if left >= smallest and left > 0:  # a room no example fits is closed for good
            if left not in rows_by_room:
                bisect.insort(rooms, left)
                rows_by_room[left] = []
            rows_by_room[left].append(row)
    return packs


def row_totals(lengths: Sequence[int] | np.ndarray, packs: list[list[int]]) -> np.ndarray:
    """The tokens each row holds, summed in one pass over all rows."""
    if not packs:
        return np.zeros(0, dtype=np.int64)
    sizes = np.fromiter(map(len, packs), dtype=np.int64, count=len(packs))
    members = np.fromiter(itertools.chain.from_iterable(packs), dtype=np.int64, count=int(sizes.sum()))
    return np.add.reduceat(np.asarray(lengths, dtype=np.int64)[members], np.cumsum(sizes) - sizes)


def row_width(totals: np.ndarray) -> int:
    """The fixed width every packed row is padded to: the fullest row, rounded up to a multiple of 8."""
    return WIDTH_MULTIPLE * math.ceil(int(totals.max()) / WIDTH_MULTIPLE)


class PackedRows(Sequence):
    """The Trainer's dataset under packing: item i is the examples of row i (read from `examples` when asked for),
    `totals[i]` its tokens; a slice is the same rows' view."""

    def __init__(self, examples: Sequence[dict[str, Any]], packs: list[list[int]], totals: np.ndarray):
        self.examples, self.packs, self.totals = examples, packs, totals

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return PackedRows(self.examples, self.packs[key], self.totals[key])
        return [self.examples[i] for i in self.packs[key]]


def pack(examples: Sequence[dict[str, Any]], lengths: Any, budget: int) -> tuple[PackedRows, int]:
    """(the packed rows of `examples`, their common width)."""
    packs = best_fit_packs(lengths, budget)
    totals = row_totals(lengths, packs)
    return PackedRows(examples, packs, totals), row_width(totals)


def packed_tensors(examples: list[dict[str, Any]], width: int, meta: TokenizedMeta) -> dict[str, torch.Tensor]:
    """One row of `width` tokens: the examples end to end, then padding as one more segment of its own (so every
    query attends to something); labels ignore padding and each example's first token. A row of no examples is all
    padding, nothing labelled: the filler of a short last batch."""
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
    """Trainer data collator for packed rows: each item of the Trainer's batch is one packed row (a list of
    examples). Besides the rows it passes the segments' bounds, `slots` per row (the most examples a row of the run
    holds, plus its padding), and the row width as the longest a segment can be: every batch of a run has the same
    shapes and that one length. With `batch_rows`, a short batch (the last of an epoch) gets rows of padding only."""

    def __init__(self, meta: TokenizedMeta, width: int, slots: int, batch_rows: int | None = None):
        self.meta, self.width, self.slots, self.batch_rows = meta, width, slots, batch_rows

    def __call__(self, batch: list[list[dict[str, Any]]]) -> dict[str, Any]:
        batch = [*batch, *[[]] * max((self.batch_rows or 0) - len(batch), 0)]
        rows = [packed_tensors(examples, self.width, self.meta) for examples in batch]
        collated: dict[str, Any] = {key: torch.cat([row[key] for row in rows]) for key in rows[0]}
        bounds = segment_bounds([segment_lengths(examples, self.width) for examples in batch], self.slots)
        collated |= dict.fromkeys(BOUND_TENSORS, bounds) | dict.fromkeys(BOUND_LENGTHS, self.width)
        return collated


def collator_for(rows: PackedRows, width: int, meta: TokenizedMeta, batch_rows: int | None = None) -> PackCollator:
    """The collator of these rows: as many slots as their fullest row has examples, plus one for its padding."""
    slots = max((len(p) for p in rows.packs), default=0) + 1
    return PackCollator(meta, width, slots, batch_rows)
