"""Next-token cross-entropy per position: the one definition behind finetune's eval loss and evaluate_ppl."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.common.tokenized import IGNORE_INDEX


def next_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of predicting `targets[:, t + 1]` from `logits[:, t]`, in float32; 0 where the target is IGNORE_INDEX.
    The classes stay the last dimension: over (rows, classes, positions) CUDA's log-softmax runs a strided kernel that
    took a third of an evaluation's GPU time (bench/results/eval_probe_h200_s10e.txt)."""
    rows = logits.shape[0]
    flat = logits[:, :-1].float().flatten(0, 1)
    return F.cross_entropy(flat, targets[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none").view(rows, -1)
