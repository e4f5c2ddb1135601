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

from stages.common.params import Params

log = logging.getLogger("pipeline")


class StepClock:
    """Trainer callback timing a run's parts: the first optimizer step (warm-up and compilation), the steady
    seconds per step after it, and the end-of-epoch evaluation. The GPU is synchronised at the first and the last
    step only, so the times are the GPU's and no step in between waits on the host."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        owner = self
        self.started, self.step_ends, self.eval_s = 0.0, [], 0.0

        class _Callback(TrainerCallback):
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                owner.started = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if torch.cuda.is_available() and (not owner.step_ends or state.global_step == state.max_steps):
                    torch.cuda.synchronize()
                owner.step_ends.append(time.perf_counter())

            def on_evaluate(self, *args: Any, **kwargs: Any) -> None:
                owner.eval_s += time.perf_counter() - owner.step_ends[-1] if owner.step_ends else 0.0

        self.callback = _Callback()

    def summary(self) -> dict[str, float]:
        """Rounded seconds; steady step time is over the steps after the first (0 when there is only one)."""
        ends = self.step_ends
        first = ends[0] - self.started if ends else 0.0
        steady = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else 0.0
        return {
            "first_step_seconds": round(first, 2),
            "step_seconds": round(steady, 4),
            "eval_seconds": round(self.eval_s, 2),
        }


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


def fits(model: Any, micro: int, max_length: int) -> bool:
    """One forward+backward at the longest shape; False when the GPU runs out of memory."""
    ids = torch.zeros((micro, max_length), dtype=torch.long, device=model.device)
    model.train()  # the mode training runs in (dropout on), so a compiled model compiles the graph training uses
    try:
        model(input_ids=ids, labels=ids).loss.backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def pick_micro_batch(model: Any, requested: int | str, effective: int, processes: int, max_length: int) -> int:
    """`auto`: the largest divisor of the per-process batch that fits the GPU (all of it on CPU)."""
    if requested != "auto":
        return int(requested)
    per_process = max(effective // processes, 1)
    if not torch.cuda.is_available():
        return per_process
    for micro in sorted((d for d in range(1, per_process + 1) if per_process % d == 0), reverse=True):
        if fits(model, micro, max_length):
            log.info("micro_batch_size auto -> %d", micro)
            return micro
    raise torch.OutOfMemoryError("not even a micro-batch of 1 fits this GPU")


def compile_layers(model: Any) -> int:
    """Compile each transformer block in place (regional compilation): the blocks share one compiled graph, so
    compile time is that of one block, and the Trainer still sees the plain (quantized) model it accepts. The
    compiled code is cached on disk (torch's inductor cache), so a rerun on the same machine compiles in seconds.
    Pays with fixed shapes (`tokenize.padding: max_length`); rows padded per batch make it recompile for shapes."""
    blocks = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len({type(c) for c in m}) == 1),
        key=len,
        default=[],
    )
    for block in blocks:
        block.compile()
    # Frozen embeddings give the first block an input that does not require grad, every later block one that does:
    # two graphs. Marking the embeddings' output (when grad is on; evaluation stays one graph too) makes it one.
    model.get_input_embeddings().register_forward_hook(_require_grad_when_training)
    return len(blocks)


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
