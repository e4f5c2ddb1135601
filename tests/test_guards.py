"""A run that diverges stops with one line and saves nothing: the finite-loss callback and the weight check."""

import math

import pytest
import torch

from stages.common.errors import PipelineError
from stages.finetuning.guards import check_finite_run, finite_loss_callback


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lora = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.full((3,), math.nan), requires_grad=False)


@pytest.mark.parametrize("key", ["loss", "eval_loss"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_logged_loss_stops_training(key, value):
    state = type("State", (), {"global_step": 7})()
    with pytest.raises(PipelineError, match=r"training diverged: .* at optimizer step 7; no adapter was saved"):
        finite_loss_callback().on_log(None, state, None, logs={key: value})


def test_a_non_finite_gradient_norm_is_not_a_divergence():
    """Under fp16 loss scaling a step whose gradients overflowed logs grad_norm inf and is skipped while the scale
    drops: the run goes on as long as the losses are finite."""
    state = type("State", (), {"global_step": 7})()
    logs = {"loss": 2.3, "eval_loss": 2.1, "grad_norm": math.inf, "learning_rate": 0.0}
    assert finite_loss_callback().on_log(None, state, None, logs=logs) is None


def test_trained_weights_must_be_finite_frozen_ones_are_not_checked():
    model = Tiny()
    check_finite_run(model, 2.0, 3)  # the NaN sits in a frozen weight: not this run's doing
    with torch.no_grad():
        model.lora[1] = math.inf
    with pytest.raises(PipelineError, match="non-finite values in lora"):
        check_finite_run(model, 2.0, 3)
    with pytest.raises(PipelineError, match="train loss nan"):
        check_finite_run(Tiny(), math.nan, 3)


def test_more_processes_than_gpus_is_one_line_before_anything_starts():
    from stages.finetuning.launch import run_processes

    with pytest.raises(PipelineError, match=r"train.processes is 4 but this machine has 2 GPU\(s\)"):
        run_processes(4, "stages.finetune", gpus=2)
