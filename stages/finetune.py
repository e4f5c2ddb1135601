"""LoRA fine-tune of the base model (4-bit through bitsandbytes when `model.quantization` is nf4/fp4).

    python -m stages.finetune        # as dvc.yaml runs it; with train.processes > 1 it starts the processes itself

Reads data/tokenized/; writes models/adapter/ (adapter, tokenizer, resolved params.json, model card),
dvclive/ (live curves and the model figures, metrics.json) and reports/train_run.json (timings).
Checkpoints go to models/checkpoints/ every epoch; a run killed mid-way resumes from the last one when params, data
and code are unchanged. The parts live in
stages/finetuning/: launch (processes), runtime, model (base + LoRA + compile), loop (the Trainer, behind `fit`),
outputs (what is saved), live (dvclive); batching, compiled, fourbit, checkpoints, timing and guards serve the loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from stages.common.errors import PipelineError, one_at_a_time, run_stage
from stages.common.params import Params, load_params
from stages.finetuning.launch import inside_launched_job, run_processes
from stages.finetuning.live import live_metrics
from stages.finetuning.loop import TrainingData, fit
from stages.finetuning.model import build_model
from stages.finetuning.outputs import save_outputs
from stages.finetuning.runtime import Runtime


def main() -> None:
    params = load_params()
    if inside_launched_job():  # one of the processes the run below started: the stage holds the lock
        return train(params)
    with one_at_a_time(Path(__file__), "finetune"):
        if params.train.processes > 1:
            sys.exit(run_processes(params.train.processes, "stages.finetune"))
        train(params)


def train(params: Params) -> None:
    runtime = Runtime.detect()
    runtime.use_cpu_cores()
    runtime.cap_gpu_memory(params.train.gpu_memory_gib)
    data = TrainingData.load()
    try:
        model, tokenizer = build_model(params, runtime)
        live = live_metrics() if runtime.is_main else None
        result = fit(model, data, params, runtime, live)
    except torch.OutOfMemoryError as err:
        raise PipelineError(out_of_memory(params.train.gpu_memory_gib, getattr(err, "where", None))) from None
    if live:
        save_outputs(model, tokenizer, params, result, data, runtime, live)


def out_of_memory(budget_gib: float | None, where: str | None) -> str:
    within = f"the train.gpu_memory_gib budget of {budget_gib:g} GiB" if budget_gib else "the GPU's memory"
    phase = f" in {where}" if where else ""
    return (
        f"training ran out of {within}{phase}; no adapter was saved (lower train.micro_batch_size, set "
        "train.gradient_checkpointing true with train.cuda_graphs false, load the base in 4-bit with "
        "model.quantization nf4, or shard it over several GPUs with train.parallelism fsdp)"
    )


if __name__ == "__main__":
    run_stage("finetune", main)
