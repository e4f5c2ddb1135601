"""What a finished run leaves: the adapter folder (weights, tokenizer, resolved params, model card), the model
figures completing dvclive's summary (dvclive/metrics.json, the stage's metric), reports/train_run.json (timings,
throughput, memory: not a metric, so `dvc metrics diff` shows only what changed the model), and its checkpoints
marked complete. Only the main process calls this."""

from __future__ import annotations

import logging
from typing import Any

import torch

from stages.common.io import atomic_path, read_json, write_json
from stages.common.model_card import model_card
from stages.common.params import Params
from stages.common.paths import ADAPTER_DIR, CHECKPOINT_DIR, PROVENANCE, TRAIN_METRICS, TRAIN_REPORT
from stages.finetuning.checkpoints import mark_complete
from stages.finetuning.loop import FitResult, TrainingData
from stages.finetuning.runtime import Runtime

log = logging.getLogger("pipeline")


def save_outputs(
    model: Any, tokenizer: Any, params: Params, result: FitResult, data: TrainingData, runtime: Runtime, live: Any
) -> None:
    run = run_report(result, data, runtime)
    TRAIN_REPORT.unlink(missing_ok=True)  # the last run's timings never sit beside this run's adapter
    save_adapter(model, tokenizer, params)
    write_json(TRAIN_REPORT, run)
    live.finish(model_figures(result, model), result.run_loss)
    log.info("wrote %s (train loss, eval loss, step, figures), %.0f tokens/s", TRAIN_METRICS, run["tokens_per_second"])
    mark_complete(CHECKPOINT_DIR)


def save_adapter(model: Any, tokenizer: Any, params: Params) -> None:
    """Adapter + tokenizer + how it was made (the data and tokenize params that came with the data, this stage's
    own params), so the folder and its zip say it without the repository."""
    made_with = read_json(PROVENANCE) | params.sections("model", "lora", "train")
    # The adapter is the trained weights: given them, peft reads nothing else, so a base sharded over processes
    # (train.parallelism fsdp) is not gathered to save from rank 0 alone, which would wait for the other processes
    trained = {name: weight.detach() for name, weight in model.named_parameters() if weight.requires_grad}
    with atomic_path(ADAPTER_DIR, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=trained)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "params.json", made_with)
        (tmp / "README.md").write_text(model_card(made_with), encoding="utf-8")  # replaces peft's blank one


def model_figures(result: FitResult, model: Any) -> dict[str, Any]:
    """What the run made of the model beside the logged losses, nothing that depends on the machine or on an
    interruption: `dvc metrics diff` between two runs of the same inputs prints nothing."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"epochs": result.epochs, "trainable_params": trainable, "total_params": total}


def run_report(result: FitResult, data: TrainingData, runtime: Runtime) -> dict[str, Any]:
    """How this run went on this machine: batch split, timings, throughput, memory, resume."""
    # tokens this process's run trained on: a resumed run did only the steps after its checkpoint
    share = (result.steps - result.resumed_from) / max(result.steps, 1)
    tokens = data.train.tokens() * result.epochs * share
    return {
        "micro_batch_size": result.micro_batch_size,
        "gradient_accumulation_steps": result.accumulation,
        "processes": runtime.world_size,
        "resumed_from_step": result.resumed_from,
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_second": round(tokens / result.train_seconds, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if runtime.cuda else 0.0,
    } | result.timings
