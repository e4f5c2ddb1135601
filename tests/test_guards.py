"""A run that diverges stops with one line and saves nothing: the finite-loss callback and the weight check."""

import math

import pytest
import torch

from stages.common.errors import PipelineError
from stages.finetuning.guards import OutOfMemoryIn, check_finite_run, finite_loss_callback, running_out_in


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


def test_an_out_of_memory_error_is_named_by_its_innermost_phase_read_when_it_happens():
    step = [1]
    with pytest.raises(OutOfMemoryIn) as caught:
        with running_out_in(lambda: f"optimizer step {step[0]}"):
            step[0] = 5
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert caught.value.where == "optimizer step 5"
    with pytest.raises(OutOfMemoryIn) as caught, running_out_in("training"), running_out_in("the evaluation"):
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert caught.value.where == "the evaluation"
    with pytest.raises(ValueError), running_out_in("training"):  # only memory errors are named
        raise ValueError("bad row")


def test_the_stage_says_where_it_ran_out_of_memory_in_one_line():
    from stages.finetune import out_of_memory

    message = out_of_memory(24, "the evaluation (8 rows a pass)")
    assert message.startswith("training ran out of the train.gpu_memory_gib budget of 24 GiB in the evaluation (8 rows")
    assert "no adapter was saved" in message and "\n" not in message
    assert out_of_memory(None, None).startswith("training ran out of the GPU's memory; no adapter was saved")


def test_an_auto_micro_batch_of_which_not_even_one_row_fits_names_the_probe_and_the_row_width(monkeypatch):
    from stages.finetuning import batching
    from stages.finetuning.runtime import Runtime

    monkeypatch.setattr(batching, "fits", lambda *args: False)
    model = type("Model", (), {"device": torch.device("cpu")})()
    probe = lambda micro, device: {"input_ids": torch.zeros(micro, 48, dtype=torch.long)}  # noqa: E731
    with pytest.raises(OutOfMemoryIn, match=r"auto's probe: not even 1 row of 48 tokens fits"):
        batching.pick_micro_batch(model, "auto", 16, Runtime(0, 0, 1, cuda=True), probe, "bf16")
