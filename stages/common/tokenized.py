"""The tokenized data set on disk (data/tokenized/): how records become rows, how rows are stored, and how rows become
padded batches.

Each split is one Arrow IPC file (`train.arrow`, `eval.arrow`) holding, per row, its token ids (int32) and its answer
spans ([start, end) of each answer's tokens); labels are not stored, they follow from the ids, the spans and
`loss_mask`. The files are read memory-mapped: a process touches only the pages of the rows it reads, and the
processes of one machine share those pages instead of each holding a copy. meta.json records the choices tokenize
made (template, pad id, label padding, target length) so that finetune and the evaluations pad and prompt exactly as
tokenize intended.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.io import read_json
from stages.common.params import TokenizeParams
from stages.common.paths import TOKENIZED_DIR
from stages.common.templates import EOS, pieces

IGNORE_INDEX = -100
SPLIT_SUFFIX = ".arrow"


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


def token_rows(
    records: list[dict[str, Any]], tokenizer: Any, params: TokenizeParams, template: str
) -> list[tuple[list[int], list[list[int]]]]:
    """(input_ids, answer_spans) of each record, its texts encoded in two batched calls.

    Each record's pieces are encoded one by one (so an answer's tokens never merge with the prompt's) and the row cut
    at max_length. A piece is cut to (max_length + 1) x the longest token's characters first: no token spells more
    characters than its vocabulary string, so text past that cannot reach the row, and a 100 MB answer costs the
    tokenizer no more than a short one. Only the first piece gets the tokenizer's own special tokens (a BOS), and only
    under `alpaca`: a chat template writes its own."""
    split = [pieces(record, template, tokenizer) for record in records]
    budget = (params.max_length + 1) * longest_token(tokenizer)
    firsts = [(r, 0) for r, parts in enumerate(split) if parts[0][0] is not EOS]
    rests = [(r, k) for r, parts in enumerate(split) for k in range(1, len(parts)) if parts[k][0] is not EOS]
    encoded: dict[tuple[int, int], list[int]] = {}
    for where, special in ((firsts, template == "alpaca"), (rests, False)):
        if where:
            texts = [split[r][k][0][:budget] for r, k in where]
            ids = tokenizer(texts, add_special_tokens=special, return_attention_mask=False)["input_ids"]
            encoded.update(zip(where, ids, strict=True))
    rows = []
    for r, parts in enumerate(split):
        ids = [[tokenizer.eos_token_id] if text is EOS else encoded[(r, k)] for k, (text, _) in enumerate(parts)]
        rows.append(_cut(ids, [trained for _, trained in parts], params.max_length))
    return rows


@functools.cache
def longest_token(tokenizer: Any) -> int:
    """Characters of the longest string in the tokenizer's vocabulary."""
    return max(map(len, tokenizer.get_vocab()))


def _cut(piece_ids: list[list[int]], trained: list[bool], max_length: int) -> tuple[list[int], list[list[int]]]:
    input_ids: list[int] = []
    answer_spans: list[list[int]] = []
    for ids, is_answer in zip(piece_ids, trained, strict=True):
        if is_answer:
            answer_spans.append([len(input_ids), len(input_ids) + len(ids)])
        input_ids += ids
    input_ids = input_ids[:max_length]
    spans = [[start, min(end, len(input_ids))] for start, end in answer_spans if start < len(input_ids)]
    merged: list[list[int]] = []  # an answer and its eos are one span
    for span in spans:
        if merged and merged[-1][1] == span[0]:
            merged[-1][1] = span[1]
        else:
            merged.append(span)
    return input_ids, merged


def tokenize_records(
    records: list[dict[str, Any]], tokenizer: Any, params: TokenizeParams, template: str
) -> list[dict[str, Any]]:
    """Rows as training reads them: ids, labels (every token under `loss_mask: full`, the answers' only under
    `completion`) and answer spans."""
    return [
        {"input_ids": ids, "labels": labels_of(ids, spans, params.loss_mask), "answer_spans": spans}
        for ids, spans in token_rows(records, tokenizer, params, template)
    ]


def tokenize_record(record: dict[str, Any], tokenizer: Any, params: TokenizeParams, template: str) -> dict[str, Any]:
    """One record's row (tokenize_records of one)."""
    return tokenize_records([record], tokenizer, params, template)[0]


def labels_of(input_ids: list[int], answer_spans: list[list[int]], loss_mask: str) -> list[int]:
    """Every token under `full`; under `completion` the answers' tokens, everything else ignored."""
    if loss_mask == "full":
        return list(input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in answer_spans:
        labels[start:end] = input_ids[start:end]
    return labels


@dataclass(frozen=True)
class RowBatch:
    """Rows as flat arrays, the way the split files hold them (cheap to pass between processes and to write)."""

    ids: np.ndarray  # int32, every row's ids end to end
    offsets: np.ndarray  # int32, rows + 1: row i is ids[offsets[i]:offsets[i + 1]]
    spans: np.ndarray  # int32 (spans, 2): [start, end) pairs, every row's end to end
    span_offsets: np.ndarray  # int32, rows + 1

    @classmethod
    def of(cls, rows: list[tuple[list[int], list[list[int]]]]) -> RowBatch:
        lengths = [len(ids) for ids, _ in rows]
        span_counts = [len(spans) for _, spans in rows]
        ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in rows), np.int32, sum(lengths))
        spans = np.fromiter(
            itertools.chain.from_iterable(itertools.chain.from_iterable(s for _, s in rows)),
            np.int32,
            2 * sum(span_counts),
        )
        return cls(ids, _offsets(lengths), spans.reshape(-1, 2), _offsets(span_counts))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def span_counts(self) -> np.ndarray:
        return np.diff(self.span_offsets)

    def select(self, keep: np.ndarray) -> RowBatch:
        """The rows where `keep` is true."""
        rows = np.flatnonzero(keep)
        ids = [self.ids[self.offsets[r] : self.offsets[r + 1]] for r in rows]
        spans = [self.spans[self.span_offsets[r] : self.span_offsets[r + 1]] for r in rows]
        return RowBatch(
            np.concatenate([np.zeros(0, np.int32), *ids]),
            _offsets(self.lengths[rows]),
            np.concatenate([np.zeros((0, 2), np.int32), *spans]),
            _offsets(self.span_counts[rows]),
        )


def _offsets(counts: Any) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32)


def split_path(name: str, directory: Path = TOKENIZED_DIR) -> Path:
    return directory / f"{name}{SPLIT_SUFFIX}"


class SplitWriter:
    """Rows appended in batches to one Arrow IPC file: ids as int32, spans as [start, end] pairs."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.schema = pa.schema(
            [("input_ids", pa.list_(pa.int32())), ("answer_spans", pa.list_(pa.list_(pa.int32(), 2)))]
        )
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_file(self.sink, self.schema)

    def write(self, batch: RowBatch) -> None:
        import pyarrow as pa

        ids = pa.ListArray.from_arrays(pa.array(batch.offsets), pa.array(batch.ids))
        pairs = pa.FixedSizeListArray.from_arrays(pa.array(batch.spans.reshape(-1)), 2)
        spans = pa.ListArray.from_arrays(pa.array(batch.span_offsets), pairs)
        self.writer.write_batch(pa.record_batch([ids, spans], schema=self.schema))

    def close(self) -> None:
        self.writer.close()
        self.sink.close()


def _offsets_of(chunk: Any) -> np.ndarray:
    """A list column chunk's offsets, a view of its buffer in the memory map."""
    return np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]


def _ints_of(chunk: Any) -> np.ndarray:
    """The int32 values under a list column chunk (pairs flattened), a view of their buffer in the memory map: pyarrow's
    own to_numpy pages the whole column in (a million rows: ~500 MB resident in every process)."""
    return np.frombuffer(chunk.buffers()[-1], dtype=np.int32)


class _Columns:
    """One split file's columns as numpy views of the memory map, chunk by chunk (one chunk per written batch)."""

    def __init__(self, path: Path):
        import pyarrow as pa

        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except FileNotFoundError:
            from stages.common.errors import PipelineError

            raise PipelineError(f"{path}: not found (run the tokenize stage first)") from None
        self.ids = [(_offsets_of(c), _ints_of(c)) for c in table.column("input_ids").chunks]
        self.spans = [(_offsets_of(c), _ints_of(c).reshape(-1, 2)) for c in table.column("answer_spans").chunks]
        counts = [len(offsets) - 1 for offsets, _ in self.ids]
        self.chunk_starts = np.cumsum([0, *counts])
        lengths = [np.diff(offsets) for offsets, _ in self.ids]
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        chunk = int(np.searchsorted(self.chunk_starts, index, side="right")) - 1
        at = index - self.chunk_starts[chunk]
        offsets, values = self.ids[chunk]
        span_offsets, spans = self.spans[chunk]
        return values[offsets[at] : offsets[at + 1]], spans[span_offsets[at] : span_offsets[at + 1]]


class TokenizedSplit(Sequence):
    """The rows of one split, read from the memory map as they are asked for: `split[i]` is {input_ids, labels,
    answer_spans} as lists; a slice is a view (nothing is copied); `lengths` are the rows' token counts."""

    def __init__(self, columns: _Columns, loss_mask: str, index: np.ndarray | None = None):
        self._columns, self._loss_mask = columns, loss_mask
        self._index = np.arange(len(columns.lengths)) if index is None else index

    @classmethod
    def open(cls, path: Path, loss_mask: str) -> TokenizedSplit:
        return cls(_Columns(path), loss_mask)

    @property
    def lengths(self) -> np.ndarray:
        return self._columns.lengths[self._index]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return TokenizedSplit(self._columns, self._loss_mask, self._index[key])
        ids, spans = self._columns.row(int(self._index[key]))
        input_ids, answer_spans = ids.tolist(), spans.tolist()
        return {
            "input_ids": input_ids,
            "labels": labels_of(input_ids, answer_spans, self._loss_mask),
            "answer_spans": answer_spans,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def tokens(self) -> int:
        return int(self.lengths.sum())


def load_meta(directory: Path = TOKENIZED_DIR) -> TokenizedMeta:
    return TokenizedMeta(**read_json(directory / "meta.json"))


def load_split(name: str, meta: TokenizedMeta, directory: Path = TOKENIZED_DIR) -> TokenizedSplit:
    return TokenizedSplit.open(split_path(name, directory), meta.loss_mask)


def files_digest(paths: list[Path]) -> bytes:
    """sha256 over the files' bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.digest()


def pad_batch(
    rows: Sequence[dict[str, Any]], pad_token_id: int, label_pad: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad rows to `pad_to` (or to the longest row) into input_ids, attention_mask, labels tensors."""
    rows = list(rows)
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
