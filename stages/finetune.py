"""LoRA fine-tune of the base model (4-bit through bitsandbytes when `model.quantization` is nf4/fp4).

    python -m stages.finetune                       # one process
    accelerate launch -m stages.finetune            # several GPUs (DDP); only rank 0 writes outs

Reads data/tokenized/; writes models/adapter/ (adapter, tokenizer, resolved params.json), metrics/train.json and
the loss curves under plots/curves/. Checkpoints go to models/checkpoints/ every epoch; a run killed mid-way resumes
from the last one when params, data and code are unchanged.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from stages.common.errors import PipelineError, run_stage
from stages.common.io import atomic_path, write_json
from stages.common.model_card import model_card
from stages.common.models import load_base_model, load_tokenizer
from stages.common.params import Params, load_params
from stages.common.paths import ADAPTER_DIR, CHECKPOINT_DIR, CURVES_DIR, TOKENIZED_DIR, TRAIN_METRICS
from stages.common.tokenized import Collator, load_meta, load_split
from stages.common.training import (
    StepClock,
    accumulation_steps,
    checkpoint_to_resume,
    compile_layers,
    copy_graphed_gradients,
    fingerprint,
    is_main_process,
    mark_complete,
    pick_micro_batch,
    step_profiler,
    use_all_cpu_cores,
    world_size,
    write_curves,
)
from stages.finetuning.guards import check_finite_weights, finite_loss_callback
from stages.finetuning.launch import inside_launched_job, run_processes

log = logging.getLogger("pipeline")

HERE = Path(__file__).parent
CODE_FILES = [Path(__file__), *sorted(HERE.glob("common/*.py")), *sorted(HERE.glob("finetuning/*.py"))]


def check_device(params: Params) -> None:
    if params.train.precision == "fp16" and not torch.cuda.is_available():
        raise PipelineError("train.precision 'fp16' needs a CUDA GPU; use fp32 or bf16 on CPU")
    if world_size() != params.train.processes:
        log.warning(
            "train.processes is %d but %d process(es) were launched: the launcher's count wins",
            params.train.processes,
            world_size(),
        )


def attach_lora(model: Any, params: Params) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = params.train.gradient_checkpointing
    if params.model.quantization != "none" and params.train.precision == "fp16":
        # peft's QLoRA preparation: every weight that is not 4-bit (norms, embeddings, head, biases) goes to fp32,
        # which fp16 needs for stability. bf16 does not, and fp32 copies make every activation between the layers
        # fp32 too (more memory and traffic): with bf16 the weights stay as loaded and peft freezes them.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise PipelineError(f"lora.target_modules: {str(err).splitlines()[0]}") from None
    describe_base(model, params)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %.2fM trainable of %.1fM params (%.3f%%)", trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


def describe_base(model: Any, params: Params) -> None:
    """What the adapter folder and every checkpoint's adapter_config.json and model card say about the base: the
    params' own name (not the resolved path, which holds the virtual environment's absolute path) and the target
    modules in sorted order (peft keeps them as a set, which JSON writes in a different order per process)."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = params.model.name
    config.revision = params.model.revision
    config.target_modules = sorted(config.target_modules)
    base = model.get_base_model()
    base.name_or_path = base.config._name_or_path = params.model.name  # what peft's checkpoint cards record


def training_arguments(params: Params, micro: int) -> Any:
    from transformers import TrainingArguments

    train = params.train
    args = TrainingArguments(
        output_dir=str(CHECKPOINT_DIR),
        per_device_train_batch_size=micro,
        # Evaluation keeps no activations for backward, so 4x the training micro-batch fits where training does;
        # fewer, larger batches matter because evaluation runs eagerly (stages/common/trainer.py).
        per_device_eval_batch_size=4 * micro,
        gradient_accumulation_steps=accumulation_steps(train.effective_batch_size, micro, world_size()),
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,
        fp16=train.precision == "fp16",
        bf16=train.precision == "bf16",
        logging_steps=train.logging_steps,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        seed=train.seed,
        data_seed=train.seed,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        logging_nan_inf_filter=False,  # the filter reads the loss on the host every step: a sync per step
        dataloader_num_workers=2 if torch.cuda.is_available() else 0,  # collate off the GPU's critical path
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        # Every LoRA weight takes part in every forward. Left unset, the Trainer (which does not recognise a peft
        # model as a transformers one) asks DDP to search the autograd graph for unused weights after each forward.
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,  # the only buffers (rotary tables) are constants: no broadcast per forward
    )
    if world_size() == 1:
        # One process trains on one GPU. Left alone, the Trainer wraps the model in DataParallel over every visible
        # GPU, which doubles the rows per step on a 2-GPU machine (seen in bench: 157 steps, not 313, per epoch).
        args._n_gpu = min(args._n_gpu, 1)
    return args


def save_adapter(model: Any, tokenizer: Any, params: Params) -> None:
    """Adapter + tokenizer + resolved params, so the folder (and its zip) says how it was made."""
    with atomic_path(ADAPTER_DIR, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "params.json", params.to_dict())
        (tmp / "README.md").write_text(model_card(params.to_dict()), encoding="utf-8")  # replaces peft's blank one


def forget_previous_results() -> None:
    """The last run's curves and metrics go before this run's adapter is written: a crash between the writes then
    leaves a missing file, never this run's adapter beside another run's figures."""
    for stale in (TRAIN_METRICS, CURVES_DIR / "train.csv", CURVES_DIR / "eval.csv"):
        stale.unlink(missing_ok=True)


def training_metrics(
    trainer: Any, run_loss: float, rows: list[dict], seconds: float, micro: int, model: Any, resumed_from: int
) -> dict[str, Any]:
    history = trainer.state.log_history
    train_losses = [e["loss"] for e in history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
    # tokens this process's run trained on: a resumed run did only the steps after its checkpoint
    share = (trainer.state.global_step - resumed_from) / max(trainer.state.global_step, 1)
    tokens = sum(len(r["input_ids"]) for r in rows) * trainer.args.num_train_epochs * share
    trainable, total = model.get_nb_trainable_parameters()
    return {
        # the last logged loss; a run shorter than logging_steps logs none, so its mean loss stands in
        "train_loss": train_losses[-1] if train_losses else run_loss,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "steps": trainer.state.global_step,
        "epochs": trainer.args.num_train_epochs,
        "micro_batch_size": micro,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "processes": world_size(),
        "resumed_from_step": resumed_from,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0,
        "trainable_params": trainable,
        "total_params": total,
    }


def main() -> None:
    from transformers import set_seed

    from stages.common.trainer import TokenWeightedTrainer

    params = load_params()
    train = params.train
    if train.processes > 1 and not inside_launched_job():
        sys.exit(run_processes(train.processes, "stages.finetune", torch.cuda.device_count()))
    check_device(params)
    set_seed(train.seed)  # before LoRA is attached: its A matrices are drawn from this generator
    use_all_cpu_cores()
    meta = load_meta()
    train_rows, eval_rows = load_split("train"), load_split("eval")
    tokenizer = load_tokenizer(params.model)
    model = attach_lora(load_base_model(params.model), params)
    if train.compile:  # before the micro-batch probe: compiled blocks need less memory than eager ones
        blocks = compile_layers(model, cuda_graphs=train.cuda_graphs)
        log.info(
            "torch.compile: %d transformer blocks compiled in place%s",
            blocks,
            ", replayed as CUDA graphs" if train.cuda_graphs else "",
        )
    probe_started = time.perf_counter()
    micro = pick_micro_batch(
        model, train.micro_batch_size, train.effective_batch_size, world_size(), meta.max_length, train.precision
    )
    probe_seconds = time.perf_counter() - probe_started
    args = training_arguments(params, micro)
    if train.cuda_graphs and args.gradient_accumulation_steps > 1:
        copy_graphed_gradients(model)
    batches = math.ceil(len(train_rows) / (micro * world_size()))
    steps = math.ceil(batches / args.gradient_accumulation_steps) * math.ceil(train.epochs)
    log.info(
        "%d rows, micro-batch %d x accumulation %d x %d process(es) = %d rows per optimizer step, %d steps",
        len(train_rows),
        micro,
        args.gradient_accumulation_steps,
        world_size(),
        train.effective_batch_size,
        steps,
    )
    profiler = step_profiler()
    # CUDA graphs warm up in step 1 and are recorded in step 2; steps after those are steady
    clock = StepClock(
        steady_from=max(profiler.first + profiler.count if profiler else 1, 2 if train.cuda_graphs else 1)
    )
    trainer = TokenWeightedTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=Collator(meta, batch_rows=micro if train.compile else None),
        callbacks=[clock.callback, finite_loss_callback()] + ([profiler.callback] if profiler else []),
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the micro-batch probe is not part of training
    data_files = [TOKENIZED_DIR / name for name in ("train.jsonl", "eval.jsonl", "meta.json")]
    with args.main_process_first(desc="checkpoints"):  # rank 0 clears stale checkpoints before others look
        resume = checkpoint_to_resume(CHECKPOINT_DIR, fingerprint(params, data_files + CODE_FILES))
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    run_loss = trainer.mean_over_processes(result.training_loss)
    check_finite_weights(model, run_loss, trainer.state.global_step)
    if not is_main_process():
        return
    resumed_from = int(resume.rpartition("-")[2]) if resume else 0
    metrics = training_metrics(trainer, run_loss, train_rows, seconds, micro, model, resumed_from)
    metrics |= clock.summary() | {"probe_seconds": round(probe_seconds, 2)}  # the probe also pays compilation
    log.info(
        "train loss %s, eval loss %s, %.0f tokens/s",
        metrics["train_loss"],
        metrics["eval_loss"],
        metrics["tokens_per_second"],
    )
    forget_previous_results()
    save_adapter(model, tokenizer, params)
    with atomic_path(CURVES_DIR, directory=True) as tmp:
        write_curves(trainer.state.log_history, tmp)
    write_json(TRAIN_METRICS, metrics)
    mark_complete(CHECKPOINT_DIR)


if __name__ == "__main__":
    run_stage("finetune", main)
