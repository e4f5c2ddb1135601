"""The training loop, behind one seam: `fit(model, data, params, runtime)` trains and returns what happened. It is the
one module that knows the Hugging Face Trainer (its arguments, callbacks, checkpoints and resume), so swapping the
loop for another touches this module only."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stages.common.fragile import limit_trainer_to_one_gpu
from stages.common.models import AUTOCAST_DTYPES
from stages.common.output_head import CHUNK_POSITIONS, OutputHead, head_outside
from stages.common.params import Params
from stages.common.paths import CHECKPOINT_DIR, TOKENIZED_DIR
from stages.common.tokenized import TokenizedMeta, TokenizedSplit, files_digest, load_meta, load_split, split_path
from stages.finetuning.batching import BatchShapes, accumulation_steps, pick_micro_batch
from stages.finetuning.checkpoints import checkpoint_to_resume, run_fingerprint
from stages.finetuning.compiled import copy_graphed_gradients
from stages.finetuning.graphed import graph_blocks
from stages.finetuning.guards import check_finite_run, finite_loss_callback, running_out_in
from stages.finetuning.live import short_run_callback
from stages.finetuning.packed_attention import use_for_packed_rows
from stages.finetuning.runtime import Runtime
from stages.finetuning.timing import StepClock, step_profiler

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class TrainingData:
    meta: TokenizedMeta
    train: TokenizedSplit
    eval: TokenizedSplit
    directory: Path = TOKENIZED_DIR

    @classmethod
    def load(cls, directory: Path = TOKENIZED_DIR) -> TrainingData:
        """data/tokenized/ as tokenize wrote it, memory-mapped."""
        meta = load_meta(directory)
        return cls(meta, load_split("train", meta, directory), load_split("eval", meta, directory), directory)

    def digest(self) -> bytes:
        """What identifies this data for resuming: a checkpoint of a run on other rows is not resumed."""
        meta = json.dumps(dataclasses.asdict(self.meta), sort_keys=True).encode()
        files = files_digest([split_path(name, self.directory) for name in ("train", "eval")])
        return hashlib.sha256(meta + files).digest()


@dataclass(frozen=True)
class FitResult:
    log_history: list[dict[str, Any]]  # the Trainer's: losses, learning rate, grad norm per logged step
    run_loss: float  # mean train loss of the run over the processes
    steps: int
    epochs: float
    micro_batch_size: int
    accumulation: int
    resumed_from: int  # 0 unless a killed run was resumed from checkpoint-<step>
    train_seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # warm-up, steady step, eval, probe seconds


def fit(model: Any, data: TrainingData, params: Params, runtime: Runtime, live: Any = None) -> FitResult:
    """Train; `live` (a Trainer callback, main process only) gets the logged metrics as they come. The output head
    works outside the model throughout, where it can (stages/common/output_head.py)."""
    train = params.train
    if train.compile:  # the longest silent stretch of a GPU run otherwise
        graphs = " and records the CUDA graphs in step 2" if train.cuda_graphs else ""
        log.info("the first forward compiles the blocks%s: tens of seconds on a cold compile cache", graphs)
    sharded = runtime.shards_base(train.parallelism)
    with head_outside(model, AUTOCAST_DTYPES.get(train.precision), sharded) as head:
        if head:
            log.info("loss: the output head over labelled positions only, %d at a time", CHUNK_POSITIONS)
        return _fit(model, data, params, runtime, live, head)


def _fit(
    model: Any, data: TrainingData, params: Params, runtime: Runtime, live: Any, head: OutputHead | None
) -> FitResult:
    train = params.train
    probe_started = time.perf_counter()
    shapes = BatchShapes(data)
    if shapes.packed and train.packed_attention == "per_example":  # before the probe: it measures its memory
        use_for_packed_rows(model)
    micro = pick_micro_batch(
        model, train.micro_batch_size, train.effective_batch_size, runtime, shapes.probe_batch, train.precision, head
    )
    probe_seconds = time.perf_counter() - probe_started
    args = training_arguments(params, micro, runtime)
    graphs_seconds = 0.0
    if train.cuda_graphs and not train.compile and runtime.cuda:  # recorded now, on the batch shape training runs
        graphs_started = time.perf_counter()
        model.train()
        with running_out_in(f"recording train.cuda_graphs ({micro} rows a pass)"):
            graph_blocks(model, shapes.probe_batch(micro, model.device), train.precision)
        graphs_seconds = time.perf_counter() - graphs_started
    if train.cuda_graphs and args.gradient_accumulation_steps > 1:
        copy_graphed_gradients(model)
    log_plan(shapes.rows, micro, args.gradient_accumulation_steps, runtime, params, shapes.width())
    profiler = step_profiler(runtime)
    # compiled CUDA graphs warm up in step 1 and are recorded in step 2; steps after those are steady
    recorded_in_step_2 = train.cuda_graphs and train.compile
    steady_from = max(profiler.first + profiler.count if profiler else 1, 2 if recorded_in_step_2 else 1)
    clock = StepClock(steady_from, runtime.cuda)
    trainer = build_trainer(model, args, shapes, micro, train.compile, [clock.callback, profiler, live])
    trainer.use_output_head(head)
    if runtime.cuda:
        torch.cuda.reset_peak_memory_stats()  # the micro-batch probe is not part of training
    with args.main_process_first(desc="checkpoints"):  # rank 0 clears stale checkpoints before others look
        resume = checkpoint_to_resume(CHECKPOINT_DIR, run_fingerprint(params, data.digest()))
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    run_loss = trainer.mean_over_processes(result.training_loss)
    check_finite_run(model, run_loss, trainer.state.global_step)
    return FitResult(
        log_history=trainer.state.log_history,
        run_loss=run_loss,
        steps=trainer.state.global_step,
        epochs=args.num_train_epochs,
        micro_batch_size=micro,
        accumulation=args.gradient_accumulation_steps,
        resumed_from=int(resume.rpartition("-")[2]) if resume else 0,
        train_seconds=seconds,
        # the probe also pays compilation; graphs_seconds: recording the eager blocks' CUDA graphs
        timings=clock.summary()
        | {"probe_seconds": round(probe_seconds, 2), "graphs_seconds": round(graphs_seconds, 2)},
    )


def build_trainer(model: Any, args: Any, shapes: BatchShapes, micro: int, compiled: bool, callbacks: list) -> Any:
    """The Trainer with this pipeline's evaluation (token-weighted, in packed rows when training packs) and collation
    (as tokenize said: packed rows, or rows padded per batch or to max_length; compiled, a short last batch is filled
    up to the one shape the blocks were compiled for), failing on a non-finite loss."""
    from stages.finetuning.trainer import TokenWeightedTrainer

    train_rows, collator = shapes.training(micro, fill=compiled)
    eval_rows, eval_collator = shapes.evaluation()
    trainer = TokenWeightedTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collator,
        callbacks=[
            finite_loss_callback(),
            short_run_callback(),
            *(c.callback if hasattr(c, "callback") else c for c in callbacks if c),
        ],
    )
    trainer.eval_collator = eval_collator
    return trainer


def log_plan(rows: int, micro: int, accumulation: int, runtime: Runtime, params: Params, width: int | None) -> None:
    batches = math.ceil(rows / (micro * runtime.world_size))
    steps = math.ceil(batches / accumulation) * math.ceil(params.train.epochs)
    if runtime.world_size != params.train.processes:
        log.warning(
            "train.processes is %d but %d process(es) were launched: the launcher's count wins",
            params.train.processes,
            runtime.world_size,
        )
    log.info(
        "%d rows, micro-batch %d x accumulation %d x %d process(es) = %d rows per optimizer step, %d steps%s",
        rows,
        micro,
        accumulation,
        runtime.world_size,
        params.train.effective_batch_size,
        steps,
        f" (rows packed to a budget of {params.tokenize.max_length} tokens, padded to {width})" if width else "",
    )


def training_arguments(params: Params, micro: int, runtime: Runtime) -> Any:
    """`micro` rows per forward pass (examples, or packed rows of several)."""
    from transformers import TrainingArguments

    train = params.train
    args = TrainingArguments(
        output_dir=str(CHECKPOINT_DIR),
        per_device_train_batch_size=micro,
        # Evaluation keeps no activations for backward, so 4x the training micro-batch fits where training keeps
        # them all; fewer, larger batches matter because evaluation runs eagerly (stages/finetuning/trainer.py).
        # Under activation checkpointing training keeps few: evaluation takes the micro-batch, which surely fits.
        per_device_eval_batch_size=micro if train.gradient_checkpointing else 4 * micro,
        gradient_accumulation_steps=accumulation_steps(train.effective_batch_size, micro, runtime.world_size),
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,
        fp16=train.precision == "fp16",
        bf16=train.precision == "bf16",
        logging_steps=train.logging_steps,
        eval_strategy="epoch",
        # transformers cannot yet checkpoint the optimizer of a base sharded as it loads: such a run keeps no
        # checkpoints, and a killed one starts over (README, Several GPUs)
        save_strategy="no" if runtime.shards_base(train.parallelism) else "epoch",
        save_total_limit=2,
        seed=train.seed,
        data_seed=train.seed,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        logging_nan_inf_filter=False,  # the filter reads the loss on the host every step: a sync per step
        dataloader_num_workers=2 if runtime.cuda else 0,  # collate off the GPU's critical path
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not runtime.cuda,
        # Every LoRA weight takes part in every forward. Left unset, the Trainer (which does not recognise a peft
        # model as a transformers one) asks DDP to search the autograd graph for unused weights after each forward.
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,  # the only buffers (rotary tables) are constants: no broadcast per forward
    )
    if runtime.world_size == 1:
        limit_trainer_to_one_gpu(args)
    return args
