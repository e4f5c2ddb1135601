import itertools
from typing import Any

import pytest
import torch
from transformers import TrainerState

from stages.finetuning import timing
from stages.finetuning.batching import accumulation_steps, fits, pick_micro_batch
from stages.finetuning.checkpoints import checkpoint_to_resume, mark_complete
from stages.finetuning.compiled import compile_layers
from stages.finetuning.runtime import Runtime
from stages.finetuning.timing import StepClock, StepProfiler

CPU = Runtime(rank=0, local_rank=0, world_size=1, cuda=False)


@pytest.mark.parametrize(("micro", "processes", "accumulation"), [(2, 1, 8), (16, 1, 1), (8, 2, 1), (2, 2, 4)])
def test_effective_batch_is_kept_whatever_the_split(micro, processes, accumulation):
    assert accumulation_steps(16, micro, processes) == accumulation


def test_auto_micro_batch_on_cpu_is_the_whole_per_process_batch():
    assert pick_micro_batch(None, "auto", 16, Runtime(0, 0, 2, cuda=False), None, "fp32") == 8
    assert pick_micro_batch(None, 4, 16, CPU, None, "fp32") == 4


def test_resume_takes_the_last_complete_checkpoint_of_the_same_run(tmp_path):
    folder = tmp_path / "checkpoints"
    assert checkpoint_to_resume(folder, "run-a") is None
    for step in (5, 10, 15):
        (folder / f"checkpoint-{step}").mkdir()
    for step in (5, 10):  # checkpoint-15 was being written when the run was killed
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert checkpoint_to_resume(folder, "run-a") == str(folder / "checkpoint-10")
    assert not (folder / "checkpoint-15").exists()
    assert checkpoint_to_resume(folder, "run-b") is None  # other params, data or code: start over
    assert not (folder / "checkpoint-10").exists()


def test_a_finished_run_is_never_resumed(tmp_path):
    folder = tmp_path / "checkpoints"
    checkpoint_to_resume(folder, "run-a")
    (folder / "checkpoint-30").mkdir()
    (folder / "checkpoint-30" / "trainer_state.json").write_text("{}")
    mark_complete(folder)
    assert checkpoint_to_resume(folder, "run-a") is None  # `dvc repro -f` trains again


def test_compile_layers_compiles_each_transformer_block(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert compile_layers(model) == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    # every block gets an input that requires grad in training (one compiled graph), none in evaluation
    ids = torch.tensor([[1, 2, 3]])
    assert model.get_input_embeddings()(ids).requires_grad
    with torch.no_grad():
        assert not model.get_input_embeddings()(ids).requires_grad


def test_the_micro_batch_probe_compiles_the_graph_training_runs(tiny_model_dir, monkeypatch):
    from torch._dynamo.testing import CompileCounter
    from transformers import AutoModelForCausalLM

    from stages.common.tokenized import Collator, TokenizedMeta

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    counter, compile_as_is = CompileCounter(), torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **_: compile_as_is(self, backend=counter))
    torch._dynamo.reset()
    compile_layers(model)
    ids = torch.zeros((2, 16), dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[:, -1] = 0  # the probe batch as BatchShapes makes it: a padded position
    assert fits(model, {"input_ids": ids, "attention_mask": mask, "labels": ids}, "bf16")
    probed = counter.frame_count
    assert probed >= 1
    # a training step as the Trainer takes it: a collated batch, under the autocast it runs in
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9, 10, 11], "labels": [-100, 9, 10, 11]},
    ]
    meta = TokenizedMeta(pad_token_id=0, max_length=16, loss_mask="completion", padding="max_length", template="alpaca")
    batch = Collator(meta)(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert counter.frame_count == probed  # nothing compiled again: the probe's graph is the training graph


def test_cpu_training_uses_every_core_even_under_accelerate(monkeypatch):
    """accelerate launch sets OMP_NUM_THREADS=1; one CPU process must still use all its cores."""
    import os

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        CPU.use_cpu_cores()
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(previous)


def test_step_clock_splits_warm_up_steady_steps_and_evaluation(monkeypatch):
    # train begins at 0; steps end at 10 (warm-up), 11, 12, 13; evaluation ends at 18
    times = iter([0.0, 10.0, 11.0, 12.0, 13.0, 18.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(times))
    clock, state = StepClock(), TrainerState(max_steps=4)
    clock.callback.on_train_begin(None, None, None)
    for state.global_step in range(1, 5):
        clock.callback.on_step_end(None, state, None)
    clock.callback.on_evaluate(None, None, None)
    assert clock.summary() == {
        "first_step_seconds": 10.0,
        "warm_up_steps": 1,
        "warm_up_seconds": 10.0,
        "step_seconds": 1.0,
        "eval_seconds": 5.0,
    }


def test_step_clock_measures_steady_steps_after_the_slow_ones(monkeypatch):
    # steps 2 and 3 are slow (profiled, or CUDA graphs recorded): steady time is over steps 4 and 5 only
    times = iter([0.0, 10.0, 15.0, 20.0, 21.0, 22.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(times))
    clock, state = StepClock(steady_from=3), TrainerState(max_steps=5)
    clock.callback.on_train_begin(None, None, None)
    for state.global_step in range(1, 6):
        clock.callback.on_step_end(None, state, None)
    summary = clock.summary()
    assert summary["step_seconds"] == 1.0
    assert (summary["warm_up_steps"], summary["warm_up_seconds"]) == (3, 20.0)


def run_profiled_steps(profiler: StepProfiler, steps: int, extra_work: dict[int, Any]) -> TrainerState:
    """`steps` Trainer steps of a small matmul, plus `extra_work[step]()` in the steps named there."""
    state = TrainerState(max_steps=steps)
    for step in range(steps):
        profiler.callback.on_step_begin(None, state, None)
        torch.randn(64, 64) @ torch.randn(64, 64)
        extra_work.get(step, lambda: None)()
        state.global_step = step + 1
        profiler.callback.on_step_end(None, state, None)
    return state


def test_step_profiler_reports_the_profiled_steps_operators(tmp_path):
    report = tmp_path / "profile.txt"
    in_profiled_step = lambda: torch.linalg.qr(torch.randn(32, 32))  # noqa: E731
    after_profiled_steps = lambda: torch.linalg.svd(torch.randn(32, 32))  # noqa: E731
    run_profiled_steps(StepProfiler(report), 8, {4: in_profiled_step, 7: after_profiled_steps})
    text = report.read_text()
    assert text.startswith("steps 4-6: wall ")
    assert "aten::mm" in text and "aten::linalg_qr" in text and "aten::linalg_svd" not in text


def test_step_profiler_of_a_run_that_ends_inside_the_profiled_steps_reports_them(tmp_path):
    # left running at exit, the profiler crashed the process (SIGSEGV) after training had written its outputs
    report = tmp_path / "profile.txt"
    profiler = StepProfiler(report)
    state = run_profiled_steps(profiler, 4, {})
    profiler.callback.on_train_end(None, state, None)
    assert profiler.profiler is None
    assert report.read_text().startswith("steps 4-4: wall ")


def test_each_process_profiles_to_its_own_file(monkeypatch, tmp_path):
    monkeypatch.setenv(timing.PROFILE_ENV, str(tmp_path / "ddp.txt"))
    assert (
        timing.step_profiler(Runtime(rank=1, local_rank=1, world_size=2, cuda=False)).report
        == tmp_path / "ddp.rank1.txt"
    )
    assert timing.step_profiler(CPU).report == tmp_path / "ddp.txt"


def test_step_clock_of_a_one_step_run_has_no_steady_rate(monkeypatch):
    times = itertools.count(0.0, 2.0)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(times))
    clock, state = StepClock(), TrainerState(max_steps=1, global_step=1)
    clock.callback.on_train_begin(None, None, None)
    clock.callback.on_step_end(None, state, None)
    assert clock.summary() == {
        "first_step_seconds": 2.0,
        "warm_up_steps": 1,
        "warm_up_seconds": 2.0,
        "step_seconds": 0.0,
        "eval_seconds": 0.0,
    }


@pytest.mark.parametrize(("checkpointing", "eval_rows"), [(False, 8), (True, 2)])
def test_evaluation_passes_are_4x_the_micro_batch_unless_training_checkpoints(checkpointing, eval_rows, monkeypatch):
    from stages.common.params import parse_params, with_overrides
    from stages.finetuning.loop import training_arguments
    from tests.conftest import REPO, load_yaml

    overrides = {"train.gradient_checkpointing": checkpointing, "train.micro_batch_size": 2}
    params = parse_params(with_overrides(load_yaml(REPO / "params.yaml"), overrides))
    args = training_arguments(params, 2, CPU)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (2, eval_rows)
