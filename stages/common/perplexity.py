"""Perplexity of a model on tokenized rows, two ways at once (evaluate_ppl's figures; the bench scores with it too).

- `seed`: labels = input_ids over every position of rows padded to max_length, padding included: the way the seed
  recipe measured, comparable with its 9.61 -> 3.91 only.
- `response`: only answer tokens count (prompt and padding ignored).
Both are token-weighted: exp(sum of token losses / number of tokens) over all rows, whatever the batching.
The seed figure costs a forward over `max_length` positions per row whatever the row's length; without it
(`eval.ppl.seed_way: false`) rows go longest first and each batch is padded to its own longest row only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stages.common.loss import next_token_losses
from stages.common.output_head import OutputHead, head_outside
from stages.common.tokenized import TokenizedSplit, pad_batch

KINDS = ("seed", "response")


def loss_sums(
    token_loss: torch.Tensor, response_mask: torch.Tensor, kinds: Sequence[str] = KINDS
) -> dict[str, tuple[float, int]]:
    """Summed next-token loss and token count of each of `kinds`, from one batch's per-position losses
    (next_token_losses): `seed` counts every predicted position (padding too); `response` only positions where
    `response_mask` is set."""
    sums = {}
    if "seed" in kinds:
        sums["seed"] = (token_loss.sum().item(), token_loss.numel())
    if "response" in kinds:
        mask = response_mask[:, 1:]
        sums["response"] = ((token_loss * mask).sum().item(), int(mask.sum().item()))
    return sums


def batch_order(rows: Sequence[dict[str, Any]], seed_way: bool) -> np.ndarray:
    """The order rows are scored in: as they come when every row is padded to max_length anyway (the seed figure),
    else longest first, so each batch holds rows of like length and little padding."""
    if seed_way:
        return np.arange(len(rows))
    if isinstance(rows, TokenizedSplit):  # its lengths are stored: no row is read twice
        lengths = rows.lengths
    else:
        lengths = np.fromiter((len(row["input_ids"]) for row in rows), dtype=np.int64, count=len(rows))
    return np.argsort(-lengths, kind="stable")


def response_mask(rows: list[dict[str, Any]], width: int) -> torch.Tensor:
    """1 where a position holds an answer token (an assistant turn, not the prompt, not the padding)."""
    mask = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        for start, end in row["answer_spans"]:
            mask[i, start:end] = 1
    return mask


def batch_token_losses(
    model: Any, ids: torch.Tensor, attention_mask: torch.Tensor, head: OutputHead | None
) -> torch.Tensor:
    """Per-position next-token losses of one batch: through `head` a chunk of positions at a time when the head is
    outside the model (its forward then returns hidden states), else from the whole logits."""
    outputs = model(input_ids=ids, attention_mask=attention_mask).logits
    return head.token_losses(outputs, ids) if head else next_token_losses(outputs, ids)


def ambient_autocast(device_type: str) -> torch.dtype | None:
    """The dtype the caller's autocast computes in (evaluate_ppl evaluates in the training precision), else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@torch.no_grad()
def perplexities(
    model: Any,
    rows: Sequence[dict[str, Any]],
    pad_token_id: int,
    max_length: int,
    batch_size: int,
    desc: str,
    seed_way: bool = True,
) -> dict[str, dict[str, float]]:
    """Both kinds over `rows` (`response` only unless `seed_way`), `batch_size` rows per forward, padded to
    `max_length` for the seed figure, else to the batch's longest row. Memory is bounded by the batch: the output head
    runs outside the model, so no batch's logits exist whole (stages/common/output_head.py). `positions`: how many
    the forwards covered (rows x their batch's width), what the way of padding costs."""
    kinds = KINDS if seed_way else ("response",)
    totals = {kind: [0.0, 0] for kind in kinds}
    positions = 0
    order = batch_order(rows, seed_way)
    with head_outside(model, ambient_autocast(model.device.type), sharded=False, training=False) as head:
        for start in tqdm(range(0, len(rows), batch_size), desc=desc):
            chunk = [rows[int(i)] for i in order[start : start + batch_size]]
            batch = pad_batch(chunk, pad_token_id, pad_token_id, pad_to=max_length if seed_way else None)
            ids = batch["input_ids"].to(model.device)
            token_loss = batch_token_losses(model, ids, batch["attention_mask"].to(model.device), head)
            answers = response_mask(chunk, ids.shape[1]).to(model.device)
            for kind, (loss, count) in loss_sums(token_loss, answers, kinds).items():
                totals[kind][0] += loss
                totals[kind][1] += count
            positions += ids.numel()
    return {
        "perplexity": {k: math.exp(loss / count) if count else float("nan") for k, (loss, count) in totals.items()},
        "tokens": {k: count for k, (_, count) in totals.items()},
        "positions": positions,
    }
