"""How many rows each forward pass takes: the micro-batch (given, or the largest that fits the GPU) and the
gradient accumulation that keeps `train.effective_batch_size` rows per optimizer step whatever the process count.
That the effective batch divides evenly is a params rule (stages/common/params.py), checked before anything runs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from stages.common.models import autocast
from stages.finetuning.runtime import Runtime

log = logging.getLogger("pipeline")


def accumulation_steps(effective: int, micro: int, processes: int) -> int:
    """Micro-batches per optimizer step, so each step sees `effective` rows."""
    return effective // (micro * processes)


def probe_step(model: Any, micro: int, max_length: int, precision: str) -> None:
    """One forward+backward on a batch shaped like the Trainer's (micro rows padded to max_length, so with an
    attention mask) under the autocast the Trainer uses: a compiled model compiles here the graph training runs."""
    ids = torch.zeros((micro, max_length), dtype=torch.long, device=model.device)
    mask = torch.ones_like(ids)
    mask[:, -1] = 0  # a padded position, as in (nearly) every batch: the attention mask is a tensor, not None
    model.train()  # the mode training runs in (dropout on)
    with autocast(precision, model.device.type):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()


def fits(model: Any, micro: int, max_length: int, precision: str) -> bool:
    """`probe_step` at the longest shape; False when the GPU runs out of memory."""
    try:
        probe_step(model, micro, max_length, precision)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def pick_micro_batch(
    model: Any, requested: int | str, effective: int, runtime: Runtime, max_length: int, precision: str
) -> int:
    """`auto`: the largest divisor of the per-process batch that fits the GPU (all of it on CPU)."""
    if requested != "auto":
        return int(requested)
    per_process = max(effective // runtime.world_size, 1)
    if not runtime.cuda:
        return per_process
    for micro in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
        if fits(model, micro, max_length, precision):
            log.info("micro_batch_size auto -> %d", micro)
            return micro
    raise torch.OutOfMemoryError("not even a micro-batch of 1 fits this GPU")
