"""How many rows each forward pass takes: the micro-batch (given, or the largest that fits the GPU) and the
gradient accumulation that keeps `train.effective_batch_size` rows per optimizer step whatever the process count.
That the effective batch divides evenly is a params rule (stages/common/params.py), checked before anything runs."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stages.common.models import autocast
from stages.common.output_head import OutputHead, batch_loss
from stages.common.tokenized import Collator
from stages.finetuning.guards import OutOfMemoryIn
from stages.finetuning.packing import PackedRows, collator_for, pack
from stages.finetuning.runtime import Runtime

if TYPE_CHECKING:
    from stages.finetuning.loop import TrainingData

log = logging.getLogger("pipeline")


def accumulation_steps(effective: int, micro: int, processes: int) -> int:
    """Micro-batches per optimizer step, so each step sees `effective` rows."""
    return effective // (micro * processes)


class BatchShapes:
    """The batches a run trains on, `micro` rows per forward pass: rows padded as tokenize said, or, under
    `tokenize.padding: packed`, rows of examples packed to a budget of max_length tokens (stages/finetuning/packing.py),
    packed once for the run."""

    def __init__(self, data: TrainingData):
        self.data = data
        self.packed = data.meta.padding == "packed"

    @functools.cached_property
    def train_packs(self) -> tuple[PackedRows, int]:
        return pack(self.data.train, self.data.train.lengths, self.data.meta.max_length)

    @property
    def rows(self) -> int:
        """Rows the Trainer samples from: the examples, or the packed rows."""
        return len(self.train_packs[0]) if self.packed else len(self.data.train)

    def width(self) -> int | None:
        """The packed row width (None when rows are not packed)."""
        return self.train_packs[1] if self.packed else None

    def training(self, micro: int, fill: bool) -> tuple[Any, Any]:
        """(the Trainer's train dataset, its collator). `fill`: short batches get ignored filler rows (one shape)."""
        batch_rows = micro if fill else None
        if self.packed:
            rows, width = self.train_packs
            return rows, collator_for(rows, width, self.data.meta, batch_rows)
        return self.data.train, Collator(self.data.meta, batch_rows=batch_rows)

    def evaluation(self) -> tuple[Any, Any]:
        """(the eval dataset, its collator): packed as training packs (no padding to compute; the eval loss is the
        same token-weighted figure), else rows padded per batch."""
        if self.packed:
            rows, width = pack(self.data.eval, self.data.eval.lengths, self.data.meta.max_length)
            return rows, collator_for(rows, width, self.data.meta)
        return self.data.eval, Collator(self.data.meta)

    def probe_batch(self, micro: int, device: torch.device) -> dict[str, torch.Tensor]:
        """A batch of the largest shape training meets at `micro`, as the Trainer collates it: the `micro` fullest
        packed rows, or `micro` rows padded to max_length with a padded position (so the attention mask is a tensor)."""
        if self.packed:
            rows, width = self.train_packs
            fullest = np.argsort(-rows.totals, kind="stable")[:micro].tolist()
            batch = collator_for(rows, width, self.data.meta, micro)([rows[r] for r in fullest])
        else:
            ids = torch.full((micro, self.data.meta.max_length), self.data.meta.pad_token_id, dtype=torch.long)
            mask = torch.ones_like(ids)
            mask[:, -1] = 0
            batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def probe_step(model: Any, batch: dict[str, torch.Tensor], precision: str, head: OutputHead | None = None) -> None:
    """One forward+backward on `batch` under the autocast the Trainer uses, in training mode (dropout on), its loss
    computed as training computes it (`head`): a compiled model compiles here the graph training runs."""
    model.train()
    with autocast(precision, model.device.type):
        loss = batch_loss(model, batch, head)
    loss.backward()


def fits(model: Any, batch: dict[str, torch.Tensor], precision: str, head: OutputHead | None = None) -> bool:
    """`probe_step`; False when the GPU runs out of memory."""
    try:
        probe_step(model, batch, precision, head)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def pick_micro_batch(
    model: Any,
    requested: int | str,
    effective: int,
    runtime: Runtime,
    probe_batch: Callable[[int, torch.device], dict[str, torch.Tensor]],
    precision: str,
    head: OutputHead | None = None,
) -> int:
    """`auto`: the largest divisor of the per-process batch whose largest batch (`probe_batch`) fits the GPU (all of
    it on CPU)."""
    if requested != "auto":
        return int(requested)
    per_process = max(effective // runtime.world_size, 1)
    if not runtime.cuda:
        return per_process
    for micro in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
        batch = probe_batch(micro, model.device)
        if fits(model, batch, precision, head):
            log.info("micro_batch_size auto -> %d", micro)
            return micro
    raise OutOfMemoryIn(
        f"train.micro_batch_size auto's probe: not even 1 row of {batch['input_ids'].shape[1]} tokens fits"
    )
