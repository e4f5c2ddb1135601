"""The best peer, measured in the same run: TRL's SFTTrainer (QLoRA nf4 bf16, and bf16 with Liger kernels) on the
very records the pipeline trains on, 16 examples per optimizer step, loss on the completion only.

TRL, datasets and liger-kernel are bench-only extras (`pip install -e '.[bench]'`), never pipeline dependencies.
Each row runs `steps` optimizer steps; its epoch is estimated as first step + steady step x (steps in an epoch - 1)
+ its per-epoch evaluation, each measured, as for the seed recipe (bench/finetune_speed.py).
Choices that make the peer faster than its defaults, so the ratio is not flattered: one micro-batch of 16 (no
accumulation), no activation checkpointing (TRL's default turns it on; memory is not short here).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from finetune_speed import free_gpu_memory

from stages.common.models import WITHOUT_HUB_KERNELS
from stages.common.prompt import format_prompt
from stages.finetuning.timing import StepClock

ROWS_PER_STEP = 16
# The seed recipe's optimisation and bookkeeping (TrainingArguments keywords), shared with its own rows
SEED_OPTIMISATION = {
    "learning_rate": 3e-4,
    "weight_decay": 0.01,
    "num_train_epochs": 1,
    "logging_steps": 10,
    "eval_strategy": "no",  # each row times one evaluation itself, after its steps
    "save_strategy": "no",
    "report_to": "none",
}


def estimated_epoch(trainer: Any, clock: StepClock, rows: int) -> dict[str, float]:
    """Every baseline row's epoch: its one evaluation timed now, plus first step + steady step x (steps in an epoch of
    `rows` examples - 1), each measured (`clock` timed the row's steps)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    started = time.perf_counter()
    trainer.evaluate()  # the seed evaluated every epoch: part of its epoch time
    sync()
    eval_s = time.perf_counter() - started
    timing = clock.summary()
    first, steady = timing["first_step_seconds"], timing["step_seconds"]
    return {
        "epoch_s": first + steady * (math.ceil(rows / ROWS_PER_STEP) - 1) + eval_s,
        "first_step_s": first,
        "s_per_step": steady,
        "eval_s": eval_s,
    }


def prompt_completion(records: list[dict[str, str]]) -> Any:
    """The records as TRL's prompt-completion dataset: the pipeline's Alpaca prompt, the answer as the completion."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": format_prompt(r["instruction"], r.get("input", "")), "completion": r["output"]} for r in records]
    )


def peer_model(model_dir: Path, quantized: bool, smoke: bool, double_quant: bool = True) -> tuple[Any, Any]:
    """Tokenizer and base as a TRL user loads them: QLoRA's nf4 with double quantization and bf16 compute, or bf16.
    `double_quant` False: the pipeline's own 4-bit load (nf4 without it), where a row must start from its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32 if smoke else torch.bfloat16} | WITHOUT_HUB_KERNELS
    if not smoke:
        kwargs["device_map"] = {"": 0}
    if quantized and not smoke:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=double_quant,
        )
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def trl_baseline(
    model_dir: Path,
    train: list[dict[str, str]],
    evaluation: list[dict[str, str]],
    steps: int,
    quantized: bool,
    liger: bool,
    smoke: bool,
) -> dict[str, Any]:
    """One TRL row; `train`/`evaluation` are the subset's records (instruction, input, output)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer, model = peer_model(model_dir, quantized, smoke)
    config = SFTConfig(
        output_dir=str(model_dir.parent / "trl-out"),
        per_device_train_batch_size=ROWS_PER_STEP,
        gradient_accumulation_steps=1,
        per_device_eval_batch_size=ROWS_PER_STEP * 4,
        max_length=128,
        completion_only_loss=True,
        gradient_checkpointing=False,
        bf16=not smoke,
        max_steps=steps,
        use_liger_kernel=liger and not smoke,
        use_cpu=smoke,
        seed=42,
        **SEED_OPTIMISATION,
    )
    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=prompt_completion(train),
        eval_dataset=prompt_completion(evaluation),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM"),
        callbacks=[clock.callback],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    # Liger has kernels for some architectures only (none for Phi-2's `phi`): say whether any was applied
    liger_layers = sum("Liger" in type(m).__name__ for m in trainer.model.modules())
    epoch = estimated_epoch(trainer, clock, len(train))
    del trainer, model
    free_gpu_memory()
    return {
        "steps": steps,
        "epoch_s": epoch["epoch_s"],
        "epoch_s_is_estimate": True,
        "warm_up_s": epoch["first_step_s"],
        "s_per_step": epoch["s_per_step"],
        "eval_s": epoch["eval_s"],
        "peak_gib": peak,
        "setup": "nf4 double-quant, bf16" if quantized else "bf16, no quantization",
        "liger_layers": liger_layers,
    }


def trl_packed_epoch(
    model_dir: Path,
    train: list[dict[str, str]],
    adapter_dir: Path,
    max_length: int,
    rows_per_step: int,
    smoke: bool,
    seed: int = 42,
) -> dict[str, Any]:
    """TRL as its documentation sets it up for long examples: its own packing (best-fit decreasing into rows of
    `max_length`, padding-free), its defaults for the micro-batch (8 rows) and activation checkpointing (on), the
    recipe's LoRA and optimizer, `rows_per_step` packed rows per optimizer step, one whole epoch timed end to end.
    The base is loaded as the pipeline loads it (nf4, no double quantization), so both start from the same weights.
    The trained adapter goes to `adapter_dir`: scored there, on a base loaded afresh, as the pipeline's adapter is
    (TRL's model in memory computes in other precisions: its QLoRA preparation made norms and embeddings float32)."""
    from peft import LoraConfig
    from transformers import TrainingArguments
    from trl import SFTConfig, SFTTrainer

    # the pipeline's 4-bit load, not QLoRA's double quantization: both rows train from the same weights
    tokenizer, model = peer_model(model_dir, quantized=True, smoke=smoke, double_quant=False)
    micro = TrainingArguments.per_device_train_batch_size  # the dataclass default TRL keeps: 8
    config = SFTConfig(
        output_dir=str(model_dir.parent / "trl-packed-out"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(rows_per_step // micro, 1),
        max_length=max_length,
        packing=True,
        completion_only_loss=True,
        bf16=not smoke,
        use_cpu=smoke,
        seed=seed,
        **SEED_OPTIMISATION,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=prompt_completion(train),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM"),
    )
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    started = time.perf_counter()
    result = trainer.train()
    sync()
    epoch_s = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    trainer.model.save_pretrained(adapter_dir)
    steps = result.global_step
    del trainer, model
    free_gpu_memory()
    return {
        "epoch_s": epoch_s,
        "steps": steps,
        "s_per_step": epoch_s / max(steps, 1),
        "train_loss": result.training_loss,
        "peak_gib": peak,
        "micro_batch_size": micro,
        "gradient_checkpointing": config.gradient_checkpointing,
        "setup": "TRL SFTTrainer, packing bfd (padding-free), nf4, bf16, SDPA",
    }
