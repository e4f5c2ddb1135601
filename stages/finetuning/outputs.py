"""What a finished run leaves: the adapter folder (weights, tokenizer, resolved params, model card), the training
curves, metrics/train.json (model figures), reports/train_run.json (timings, throughput, memory: not a metric, so
`dvc metrics diff` shows only what changed the model), and its checkpoints marked complete. Only the main process
calls this."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch

from stages.common.io import atomic_path, read_json, write_json
from stages.common.model_card import model_card
from stages.common.params import Params
from stages.common.paths import ADAPTER_DIR, CHECKPOINT_DIR, CURVES_DIR, PROVENANCE, TRAIN_METRICS, TRAIN_REPORT
from stages.finetuning.checkpoints import mark_complete
from stages.finetuning.loop import FitResult, TrainingData
from stages.finetuning.runtime import Runtime

log = logging.getLogger("pipeline")


def save_outputs(
    model: Any, tokenizer: Any, params: Params, result: FitResult, data: TrainingData, runtime: Runtime
) -> None:
    metrics, run = training_metrics(result, model), run_report(result, data, runtime)
    log.info(
        "train loss %s, eval loss %s, %.0f tokens/s",
        metrics["train_loss"],
        metrics["eval_loss"],
        run["tokens_per_second"],
    )
    forget_previous_results()
    save_adapter(model, tokenizer, params)
    with atomic_path(CURVES_DIR, directory=True) as tmp:
        write_curves(result.log_history, tmp)
    write_json(TRAIN_REPORT, run)
    write_json(TRAIN_METRICS, metrics)
    mark_complete(CHECKPOINT_DIR)


def save_adapter(model: Any, tokenizer: Any, params: Params) -> None:
    """Adapter + tokenizer + how it was made (the data and tokenize params that came with the data, this stage's
    own params), so the folder and its zip say it without the repository."""
    made_with = read_json(PROVENANCE) | params.sections("model", "lora", "train")
    with atomic_path(ADAPTER_DIR, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "params.json", made_with)
        (tmp / "README.md").write_text(model_card(made_with), encoding="utf-8")  # replaces peft's blank one


def forget_previous_results() -> None:
    """The last run's curves and metrics go before this run's adapter is written: a crash between the writes then
    leaves a missing file, never this run's adapter beside another run's figures."""
    for stale in (TRAIN_METRICS, TRAIN_REPORT, CURVES_DIR / "train.csv", CURVES_DIR / "eval.csv"):
        stale.unlink(missing_ok=True)


def training_metrics(result: FitResult, model: Any) -> dict[str, Any]:
    """What the run made of the model, nothing that depends on the machine or on an interruption: `dvc metrics diff`
    between two runs of the same inputs prints nothing."""
    train_losses = [e["loss"] for e in result.log_history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in result.log_history if "eval_loss" in e]
    trainable, total = model.get_nb_trainable_parameters()
    return {
        # the last logged loss; a run shorter than logging_steps logs none, so its mean loss stands in
        "train_loss": train_losses[-1] if train_losses else result.run_loss,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "steps": result.steps,
        "epochs": result.epochs,
        "trainable_params": trainable,
        "total_params": total,
    }


def run_report(result: FitResult, data: TrainingData, runtime: Runtime) -> dict[str, Any]:
    """How this run went on this machine: batch split, timings, throughput, memory, resume."""
    # tokens this process's run trained on: a resumed run did only the steps after its checkpoint
    share = (result.steps - result.resumed_from) / max(result.steps, 1)
    tokens = sum(len(r["input_ids"]) for r in data.train) * result.epochs * share
    return {
        "micro_batch_size": result.micro_batch_size,
        "gradient_accumulation_steps": result.accumulation,
        "processes": runtime.world_size,
        "resumed_from_step": result.resumed_from,
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_second": round(tokens / result.train_seconds, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if runtime.cuda else 0.0,
    } | result.timings


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
