"""Next-token cross-entropy per position: the one definition behind finetune's eval loss and evaluate_ppl."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.common.tokenized import IGNORE_INDEX


def next_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of predicting `targets[:, t + 1]` from `logits[:, t]`, in float32; 0 where the target is IGNORE_INDEX."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
