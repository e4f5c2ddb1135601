"""The finetune stage's Trainer: the stock one, with an evaluation loss that is the same number whatever the
batch size and the number of processes."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm import tqdm
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from stages.common.output_head import OutputHead, labelled_loss_sum
from stages.finetuning.guards import running_out_in


def eval_passes(rows: int, processes: int, batch: int) -> int:
    """Forward passes every process runs over its share of `rows` (every `processes`-th row): as many as the fullest
    share needs, since a base sharded with FSDP gathers its weights from all processes in each pass. A process out of
    rows runs a pass that counts nothing."""
    return math.ceil(math.ceil(rows / processes) / batch)


class TokenWeightedTrainer(Trainer):
    """eval_loss = sum of token losses / number of labelled tokens over the whole eval split.

    The stock evaluation averages per-batch means, so its figure moves with the batch size; under DDP it also scales
    each rank's loss by the rank's share of tokens and then drops the last batch's padding rows, which skews the
    mean (the same adapter scored 10.85 on one process and 10.95 on two).
    Evaluation collates with `eval_collator` when one is set (packed rows pass their positions and example bounds).
    With `output_head` set, the model returns hidden states and both losses go through the head outside it
    (stages/common/output_head.py).
    """

    eval_collator: Any = None
    output_head: OutputHead | None = None

    def use_output_head(self, head: OutputHead | None) -> None:
        """Training's loss through `head`: the sum over labelled positions over the Trainer's `num_items_in_batch`,
        the division the model's own loss makes (the Trainer scales it for accumulation and processes as before)."""
        self.output_head = head
        if head is None:
            return

        def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            total, count = head.losses(outputs.logits, labels)
            return total / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))

        self.compute_loss_func = loss

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """Length-grouped batches from the split's stored lengths: the stock sampler would read every row to measure
        it (a million rows: a minute of Python before the first step)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return LengthGroupedSampler(batch, lengths=dataset.lengths.tolist())

    def mean_over_processes(self, value: float) -> float:
        """`value` averaged over the processes (every process must call this). Each process's `training_loss` is its
        own rows' loss scaled by its share of the step's tokens (the Trainer's token averaging across devices), so
        only their mean is the run's loss; one process's figure is off by its share (11.9 vs 10.9 seen)."""
        if self.args.world_size == 1:
            return value
        return self.accelerator.reduce(torch.tensor(value, device=self.args.device), reduction="mean").item()

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        def where() -> str:
            step, rows = self.state.global_step + 1, self.args.per_device_train_batch_size
            return f"optimizer step {step} of {self.state.max_steps} ({rows} rows a pass, train.micro_batch_size)"

        with running_out_in(where):
            return super().training_step(*args, **kwargs)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        rows = self.args.per_device_eval_batch_size
        with running_out_in(f"the evaluation ({rows} rows a pass)"):
            return self._token_weighted_evaluation(eval_dataset, metric_key_prefix)

    def _token_weighted_evaluation(self, eval_dataset: Any, metric_key_prefix: str) -> dict[str, float]:
        rows = self.eval_dataset if eval_dataset is None else eval_dataset
        shard = rows[self.args.process_index :: self.args.world_size]
        size, device = self.args.per_device_eval_batch_size, self.args.device
        collate = self.eval_collator or self.data_collator
        totals = torch.zeros(2, device=device)
        was_training = self.model.training
        self.model.eval()
        started = time.perf_counter()
        # Eager, even when the blocks are compiled: compiling the no-grad graph costs more than it saves on 500 rows.
        passes = eval_passes(len(rows), self.args.world_size, size)
        with torch.no_grad(), self.autocast_smart_context_manager(), torch.compiler.set_stance("force_eager"):
            for index in tqdm(range(passes), desc="eval loss", disable=not self.is_world_process_zero()):
                part = shard[index * size : (index + 1) * size]
                batch = collate(part or rows[:size])
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                summed, labelled = labelled_loss_sum(self.model, inputs, self.output_head)
                if part:
                    totals += torch.stack([summed, labelled.float()])
        self.model.train(was_training)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        loss = {f"{metric_key_prefix}_loss": (totals[0] / totals[1]).item()}
        # Only the loss enters the log history, which checkpoints save: a run time there would make every
        # checkpoint's bytes differ between two runs of the same inputs.
        self.log(loss)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, loss)
        return loss | {f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4)}
