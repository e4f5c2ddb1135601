"""Checks that stop a run before it saves something that looks trained but is not: a loss or a weight that is not a
finite number (a learning rate far too high, an overflow in fp16) ends the stage with one line and no adapter."""

from __future__ import annotations

import math
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
