"""Pieces of the finetune stage that carry their own logic: batch sizing, checkpoint fingerprints, curves."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from stages.common.fourbit import inline_4bit_layers
from stages.common.models import autocast
from stages.common.params import Params

log = logging.getLogger("pipeline")


class StepClock:
    """Trainer callback timing a run's parts: the first optimizer step (warm-up and compilation), the warm-up up to
    step `steady_from` (later than 1 when CUDA graphs are recorded in step 2, or a profiler slows the steps before
    it), the steady seconds per step after it, and the end-of-epoch evaluation. The GPU is synchronised at those two
    steps and the last only, so the times are the GPU's and no step in between waits on the host."""

    def __init__(self, steady_from: int = 1) -> None:
        from transformers import TrainerCallback

        owner = self
        self.started, self.step_ends, self.eval_s, self.steady_from = 0.0, [], 0.0, steady_from

        class _Callback(TrainerCallback):
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                owner.started = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                timed_step = len(owner.step_ends) + 1 in (1, owner.steady_from) or state.global_step == state.max_steps
                if torch.cuda.is_available() and timed_step:
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

    def __init__(self, report: Path) -> None:
        from transformers import TrainerCallback

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

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.started = time.perf_counter()

    def stop(self, steps: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - self.started) / steps
        self.profiler.__exit__(None, None, None)
        averages = self.profiler.key_averages()
        kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.self_device_time_total for e in kernels) / 1e6 / steps
        launches = sum(e.count for e in kernels) / steps
        tables = [("self_cpu_time_total", "host time")]
        if torch.cuda.is_available():
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


def step_profiler() -> StepProfiler | None:
    """A profiler when FINETUNE_PROFILE is set; under several processes each rank writes its own `*.rank<N>` file."""
    report = os.environ.get(PROFILE_ENV)
    if not report:
        return None
    path = Path(report)
    if world_size() > 1:
        path = path.with_name(f"{path.stem}.rank{os.environ.get('RANK', '0')}{path.suffix}")
    return StepProfiler(path)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_all_cpu_cores() -> None:
    """On CPU, give each process its share of the cores: `accelerate launch` sets OMP_NUM_THREADS=1 when it is
    unset, which halves CPU training speed on two cores."""
    if not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // world_size()))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def accumulation_steps(effective: int, micro: int, processes: int) -> int:
    """Optimizer steps see `effective` rows whatever the micro-batch and process count."""
    per_step = micro * processes
    if effective % per_step:
        raise ValueError(
            f"train.effective_batch_size ({effective}) is not a multiple of "
            f"micro_batch_size x processes ({micro} x {processes})"
        )
    return effective // per_step


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
    model: Any, requested: int | str, effective: int, processes: int, max_length: int, precision: str
) -> int:
    """`auto`: the largest divisor of the per-process batch that fits the GPU (all of it on CPU)."""
    if requested != "auto":
        return int(requested)
    per_process = max(effective // processes, 1)
    if not torch.cuda.is_available():
        return per_process
    for micro in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
        if fits(model, micro, max_length, precision):
            log.info("micro_batch_size auto -> %d", micro)
            return micro
    raise torch.OutOfMemoryError("not even a micro-batch of 1 fits this GPU")


def compile_layers(model: Any, cuda_graphs: bool = False) -> int:
    """Compile each transformer block in place (regional compilation): the blocks share one compiled graph, so
    compile time is that of one block, and the Trainer still sees the plain (quantized) model it accepts. The
    compiled code is cached on disk (torch's inductor cache), so a rerun on the same machine compiles in seconds.
    4-bit layers are rewritten in torch operations first (stages/common/fourbit.py), so they compile too.
    Pays with fixed shapes (`tokenize.padding: max_length`); rows padded per batch make it recompile for shapes.
    `cuda_graphs`: each block's forward and backward are replayed as CUDA graphs (torch.compile's reduce-overhead
    mode), one launch instead of ~60 kernels per block: the step stops waiting on the host (GPU only)."""
    blocks = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len({type(c) for c in m}) == 1),
        key=len,
        default=[],
    )
    inlined = inline_4bit_layers(model)
    if inlined:
        log.info("%d 4-bit layers dequantised in torch operations, inside the compiled graphs", inlined)
    for block in blocks:
        block.compile(mode="reduce-overhead" if cuda_graphs else None)
    # Frozen embeddings give the first block an input that does not require grad, every later block one that does:
    # two graphs. Marking the embeddings' output (when grad is on; evaluation stays one graph too) makes it one.
    model.get_input_embeddings().register_forward_hook(_require_grad_when_training)
    return len(blocks)


def copy_graphed_gradients(model: Any) -> None:
    """For CUDA-graphed blocks under gradient accumulation. A gradient computed inside a graph lives in that graph's
    memory, which its next replay rewrites: accumulated as is (the first micro-batch's gradient becomes .grad), it
    would be overwritten by the next micro-batch (pytorch/pytorch#96693), so the accumulator gets a copy. Without
    accumulation the optimizer reads .grad before the next replay and nothing needs copying: the copies cost ~10 ms
    of host time per step (one per LoRA weight, 256 on Phi-2)."""
    for param in model.parameters():
        if param.requires_grad:
            param.register_hook(torch.clone)


def _require_grad_when_training(module: Any, inputs: Any, output: torch.Tensor) -> None:
    if torch.is_grad_enabled():
        output.requires_grad_(True)


def fingerprint(params: Params, files: list[Path]) -> str:
    """Identity of a training run: its params, its data and the training code. Checkpoints resume only on a match."""
    digest = hashlib.sha256()
    relevant = {k: v for k, v in params.to_dict().items() if k in ("model", "tokenize", "lora", "train")}
    digest.update(json.dumps(relevant, sort_keys=True).encode())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def checkpoint_to_resume(checkpoints: Path, run_id: str) -> str | None:
    """The last complete checkpoint of the same run, if any. Checkpoints of any other run, and one cut short
    while being written (no trainer_state.json yet), are removed."""
    stamp = checkpoints / "fingerprint.txt"
    if checkpoints.is_dir() and (not stamp.is_file() or stamp.read_text() != run_id):
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    stamp.write_text(run_id)
    saved = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    complete = [p for p in saved if (p / "trainer_state.json").is_file()]
    for partial in set(saved) - set(complete):
        shutil.rmtree(partial)
    if complete:
        log.info("resuming from %s", complete[-1])
        return str(complete[-1])
    return None


def mark_complete(checkpoints: Path) -> None:
    """A finished run's checkpoints are kept (and pushed) but never resumed: a forced rerun trains again."""
    (checkpoints / "fingerprint.txt").write_text("complete")


def write_curves(log_history: list[dict[str, Any]], directory: Path) -> None:
    """Train and eval loss per optimizer step as CSV for `dvc plots`, from the Trainer's history (which a resumed
    run restores from its checkpoint, so the curves stay whole across an interruption)."""
    directory.mkdir(parents=True, exist_ok=True)
    train = [(e["step"], e["loss"], e.get("learning_rate", 0.0)) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    with (directory / "train.csv").open("w", newline="") as out:
        csv.writer(out).writerows([("step", "loss", "learning_rate"), *train])
    with (directory / "eval.csv").open("w", newline="") as out:
        csv.writer(out).writerows([("step", "loss"), *evals])
