"""Where a run's time goes: a Trainer callback timing warm-up, steady steps and evaluation (StepClock), and an
optional torch.profiler report of a few steady steps (FINETUNE_PROFILE=<file>)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from stages.finetuning.runtime import Runtime

log = logging.getLogger("pipeline")


class StepClock:
    """Trainer callback timing a run's parts: the first optimizer step (warm-up and compilation), the warm-up up to
    step `steady_from` (later than 1 when CUDA graphs are recorded in step 2, or a profiler slows the steps before
    it), the steady seconds per step after it, and the end-of-epoch evaluation. The GPU is synchronised at those two
    steps and the last only, so the times are the GPU's and no step in between waits on the host."""

    def __init__(self, steady_from: int = 1, cuda: bool | None = None) -> None:
        from transformers import TrainerCallback

        owner, self.cuda = self, torch.cuda.is_available() if cuda is None else cuda
        self.started, self.step_ends, self.eval_s, self.steady_from = 0.0, [], 0.0, steady_from

        class _Callback(TrainerCallback):
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                owner.started = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                timed_step = len(owner.step_ends) + 1 in (1, owner.steady_from) or state.global_step == state.max_steps
                if owner.cuda and timed_step:
                    torch.cuda.synchronize()
                owner.step_ends.append(time.perf_counter())

            def on_evaluate(self, *args: Any, **kwargs: Any) -> None:
                owner.eval_s += time.perf_counter() - owner.step_ends[-1] if owner.step_ends else 0.0

        self.callback = _Callback()

    def summary(self) -> dict[str, float]:
        """Rounded seconds; steady step time is over the steps after step `steady_from` (0 when there are none)."""
        ends, skip = self.step_ends, self.steady_from
        first = ends[0] - self.started if ends else 0.0
        warm_up = ends[min(skip, len(ends)) - 1] - self.started if ends else 0.0
        steady = (ends[-1] - ends[skip - 1]) / (len(ends) - skip) if len(ends) > skip else 0.0
        return {
            "first_step_seconds": round(first, 2),
            "warm_up_steps": min(skip, len(ends)),
            "warm_up_seconds": round(warm_up, 2),
            "step_seconds": round(steady, 4),
            "eval_seconds": round(self.eval_s, 2),
        }


PROFILE_ENV = "FINETUNE_PROFILE"


class StepProfiler:
    """Trainer callback, on when FINETUNE_PROFILE names a file: profiles optimizer steps 4-6 (after compilation and
    warm-up) with torch.profiler and writes where their time went: operators by GPU and by host time, and the GPU's
    busy time against the wall time (a GPU busy for a small part of the step means the host's launching is the
    bottleneck)."""

    first, count = 4, 3

    def __init__(self, report: Path, cuda: bool | None = None) -> None:
        from transformers import TrainerCallback

        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        owner, self.report, self.profiler, self.started = self, report, None, 0.0

        class _Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == owner.first - 1:
                    owner.start()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if owner.profiler is not None and state.global_step == owner.first - 1 + owner.count:
                    owner.stop(owner.count)

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if owner.profiler is not None:  # a run that ended inside the profiled steps: report those it had
                    owner.stop(max(state.global_step - owner.first + 1, 1))

        self.callback = _Callback()

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.synchronize()
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def stop(self, steps: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - self.started) / steps
        self.profiler.__exit__(None, None, None)
        averages = self.profiler.key_averages()
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.self_device_time_total for e in kernels) / 1e6 / steps
        launches = sum(e.count for e in kernels) / steps
        tables = [("self_cpu_time_total", "host time")]
        if self.cuda:
            tables.insert(0, ("self_cuda_time_total", "GPU time"))
        self.report.parent.mkdir(parents=True, exist_ok=True)
        self.report.write_text(
            f"steps {self.first}-{self.first + steps - 1}: wall {wall:.4f} s/step, GPU busy {gpu:.4f} s/step "
            f"({gpu / wall:.0%}), {launches:.0f} kernels/step\n"
            + "".join(
                f"\nby {title}:\n" + averages.table(sort_by=key, row_limit=40, max_name_column_width=70)
                for key, title in tables
            )
        )
        log.info("profile of steps %d-%d written to %s", self.first, self.first + steps - 1, self.report)
        self.profiler = None


def step_profiler(runtime: Runtime) -> StepProfiler | None:
    """A profiler when FINETUNE_PROFILE is set; under several processes each rank writes its own `*.rank<N>` file."""
    report = os.environ.get(PROFILE_ENV)
    if not report:
        return None
    path = Path(report)
    if runtime.world_size > 1:
        path = path.with_name(f"{path.stem}.rank{runtime.rank}{path.suffix}")
    return StepProfiler(path, runtime.cuda)
