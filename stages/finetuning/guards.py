"""Checks that stop a run before it saves something that looks trained but is not: a loss or a weight that is not a
finite number (a learning rate far too high, an overflow in fp16) ends the stage with one line and no adapter. A run
that runs out of GPU memory says in which phase (the micro-batch probe, recording CUDA graphs, an optimizer step, the
evaluation), since each phase has its own remedy."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from stages.common.errors import PipelineError


def finite_loss_callback() -> Any:
    """Trainer callback: every logged train or eval loss must be finite. The logged losses are already on the host,
    so this costs no GPU sync (checking every step would); the weights are checked once more before saving."""
    from transformers import TrainerCallback

    class _FiniteLoss(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            for key in ("loss", "eval_loss"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(value):
                    raise PipelineError(non_finite_message(f"{key.replace('_', ' ')} {value}", state.global_step))

    return _FiniteLoss()


def non_finite_message(what: str, step: int) -> str:
    return (
        f"training diverged: {what} at optimizer step {step}; no adapter was saved "
        "(lower train.learning_rate or lora.alpha, use bf16 or fp32 instead of fp16, or check the base model's weights)"
    )


def check_finite_run(model: Any, loss: float, step: int) -> None:
    """The trained LoRA weights and the run's loss are finite numbers, or the stage fails without saving."""
    if not math.isfinite(loss):
        raise PipelineError(non_finite_message(f"train loss {loss}", step))
    for name, weight in model.named_parameters():
        if weight.requires_grad and not torch.isfinite(weight).all():
            raise PipelineError(non_finite_message(f"non-finite values in {name}", step))


class OutOfMemoryIn(torch.OutOfMemoryError):
    """A GPU out-of-memory error that knows the phase it happened in (`where`, a phrase for the stage's message)."""

    def __init__(self, where: str) -> None:
        super().__init__(f"out of memory in {where}")
        self.where = where


@contextlib.contextmanager
def running_out_in(where: str | Callable[[], str]) -> Iterator[None]:
    """Name the phase of an out-of-memory error raised inside; `where` may be a function, read when it happens (the
    step number then). An inner phase's name wins over an outer one's."""
    try:
        yield
    except OutOfMemoryIn:
        raise
    except torch.OutOfMemoryError:
        raise OutOfMemoryIn(where() if callable(where) else where) from None
