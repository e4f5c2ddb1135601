"""The output head applied outside the model, a chunk of positions at a time: in training only where a label is, in
evaluation (stages/common/perplexity.py) at every position, keeping the loss and dropping each chunk's logits.

A model's forward turns every position's hidden state into logits over the whole vocabulary before the loss picks the
labelled ones: at 2,048 tokens and Llama 3's 128,256 classes that is 0.5 GiB of bf16 logits per row, kept for
backward, plus the float32 copy and its gradient the loss makes. Here the model returns its hidden states (the head
module is swapped for an identity while training runs), and the loss applies the head to the labelled positions only,
`CHUNK_POSITIONS` at a time, recomputing each chunk's logits in backward instead of keeping them (the chunked loss of
torchtune and Liger's fused linear cross-entropy, in plain torch). The loss is the same sum of next-token losses over
the same positions, so training and its eval loss keep their meaning. Evaluation without the head outside would hold a
batch's logits whole: at 8,192 tokens, 8 rows and 128,256 classes, 31 GiB in float32.

Left as it was (the whole logits inside the forward) where moving the head would change the result: in training, a
head with trainable weights (LoRA on `lm_head`, whose checkpoints must keep it in the module tree); always, a model
that rescales its logits after the head (`final_logit_softcapping`, `logit_scale`), and a base sharded with FSDP (the
head's weights are only whole inside the sharded forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stages.common.loss import next_token_losses
from stages.common.tokenized import IGNORE_INDEX

CHUNK_POSITIONS = 1024  # logits of this many positions exist at once: 0.5 GiB in float32 at 128,256 classes
LOGIT_RESCALING = ("final_logit_softcapping", "logit_scale")  # config fields of heads followed by more arithmetic


class OutputHead:
    """The model's head, applied by `losses` to the hidden states the model now returns in place of logits."""

    def __init__(self, head: torch.nn.Module, autocast_dtype: torch.dtype | None):
        self.head, self.autocast_dtype = head, autocast_dtype

    def _autocast(self, device_type: str) -> torch.autocast:
        """The precision the head computes in: the training's autocast dtype, or as it is (fp32) with none."""
        enabled = self.autocast_dtype is not None
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled)

    def _chunk_loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(states)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the loss of predicting `labels[:, t + 1]` from `hidden[:, t]` over labelled positions, their
        number). Under grad, each chunk's logits are recomputed in backward rather than kept."""
        targets = labels[:, 1:].reshape(-1)
        labelled = targets != IGNORE_INDEX
        states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[labelled]
        targets = targets[labelled]
        total = hidden[..., :0].sum().float()  # 0, but part of the graph: a micro-batch of filler rows backs up too
        with self._autocast(hidden.device.type):
            for chunk, wanted in zip(states.split(CHUNK_POSITIONS), targets.split(CHUNK_POSITIONS), strict=True):
                if torch.is_grad_enabled():
                    total = total + checkpoint(self._chunk_loss, chunk, wanted, use_reentrant=False)
                else:
                    total = total + self._chunk_loss(chunk, wanted)
        return total, labelled.sum()

    @torch.no_grad()
    def token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of predicting `targets[:, t + 1]` from `hidden[:, t]` at every position, float32, 0 where the target
        is IGNORE_INDEX: stages/common/loss.py's next_token_losses, with no more than `CHUNK_POSITIONS` positions'
        logits at a time."""
        states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        wanted = targets[:, 1:].reshape(-1)
        with self._autocast(hidden.device.type):
            parts = [
                F.cross_entropy(self.head(chunk).float(), goal, ignore_index=IGNORE_INDEX, reduction="none")
                for chunk, goal in zip(states.split(CHUNK_POSITIONS), wanted.split(CHUNK_POSITIONS), strict=True)
            ]
        return torch.cat(parts).view(hidden.shape[0], -1)


def _head_slot(model: Any) -> tuple[Any, str, torch.nn.Module] | None:
    """(the module holding the head, its attribute name, the head) of `model` (under peft's wrapper), if found."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return None
    for name, child in base.named_children():
        if child is head:
            return base, name, head
    return None


def movable(model: Any, sharded: bool, training: bool) -> bool:
    """Whether the head can leave the forward without changing the loss (module docstring); with no training to
    checkpoint, a head with trainable weights can."""
    slot = _head_slot(model)
    if slot is None or sharded:
        return False
    base, _, head = slot
    rescaled = any(getattr(base.config, name, None) not in (None, 1.0) for name in LOGIT_RESCALING)
    return not rescaled and not (training and any(p.requires_grad for p in head.parameters()))


@contextlib.contextmanager
def head_outside(
    model: Any, autocast_dtype: torch.dtype | None, sharded: bool, training: bool = True
) -> Iterator[OutputHead | None]:
    """While open, `model`'s forward returns hidden states as `logits` and the yielded OutputHead scores them; None
    (and the model untouched) where the head must stay (`movable`)."""
    if not movable(model, sharded, training):
        yield None
        return
    base, name, head = _head_slot(model)
    setattr(base, name, torch.nn.Identity())
    try:
        yield OutputHead(head, autocast_dtype)
    finally:
        setattr(base, name, head)


def batch_loss(model: Any, batch: dict[str, Any], head: OutputHead | None) -> torch.Tensor:
    """The mean token loss of `batch` (with its labels), through `head` when the head is outside the model."""
    if head is None:
        return model(**batch).loss
    total, count = labelled_loss_sum(model, batch, head)
    return total / count.clamp(min=1)


def labelled_loss_sum(model: Any, batch: dict[str, Any], head: OutputHead | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token losses over the labelled positions of `batch`, their number), through `head` when the
    head is outside the model, else from the whole logits: a sum, so batches of any size add up token-weighted."""
    labels = batch["labels"]
    outputs = model(**without_labels(batch)).logits
    if head is not None:
        return head.losses(outputs, labels)
    return next_token_losses(outputs, labels).sum(), (labels[:, 1:] != IGNORE_INDEX).sum()


def without_labels(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` for a forward that must not compute the model's own loss (its `logits` may be hidden states)."""
    return {key: value for key, value in batch.items() if key != "labels"}
