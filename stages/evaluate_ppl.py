"""Perplexity of the base and the fine-tuned model on the held-out split, two ways.

    python -m stages.evaluate_ppl

Reads data/tokenized/eval.jsonl + meta.json and models/adapter/; writes metrics/perplexity.json.
- `seed`: labels = input_ids over every position of rows padded to max_length, padding included: the way the
  seed recipe measured (9.61 -> 3.91), comparable with it, and flattered by easy-to-predict padding.
- `response`: only answer tokens count (prompt and padding ignored): what the fine-tune changed.
Both are token-weighted: exp(sum of token losses / number of tokens) over the whole split. One base model is
loaded; the fine-tuned figure runs with the adapter enabled, the base figure with it disabled.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from tqdm import tqdm

from stages.common.errors import run_stage
from stages.common.io import write_json
from stages.common.loss import next_token_losses
from stages.common.models import autocast, load_finetuned
from stages.common.params import load_params
from stages.common.paths import ADAPTER_DIR, PERPLEXITY_METRICS
from stages.common.tokenized import load_meta, load_split, pad_batch

log = logging.getLogger("pipeline")

KINDS = ("seed", "response")


def loss_sums(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, tuple[float, int]]:
    """Summed next-token loss and token count for each kind, from one forward pass.

    `seed` counts every predicted position (padding too); `response` only positions where `response_mask` is set.
    """
    token_loss = next_token_losses(logits, input_ids)
    mask = response_mask[:, 1:]
    return {
        "seed": (token_loss.sum().item(), token_loss.numel()),
        "response": ((token_loss * mask).sum().item(), int(mask.sum().item())),
    }


def response_mask(rows: list[dict[str, Any]], width: int) -> torch.Tensor:
    """1 where a position holds an answer token (after the prompt, before the padding)."""
    mask = torch.zeros((len(rows), width))
    for i, row in enumerate(rows):
        mask[i, row["prompt_len"] : len(row["input_ids"])] = 1
    return mask


@torch.no_grad()
def perplexities(
    model: Any, rows: list[dict[str, Any]], pad_token_id: int, max_length: int, batch_size: int, desc: str
) -> dict[str, dict[str, float]]:
    totals = {kind: [0.0, 0] for kind in KINDS}
    for start in tqdm(range(0, len(rows), batch_size), desc=desc):
        chunk = rows[start : start + batch_size]
        batch = pad_batch(chunk, pad_token_id, pad_token_id, pad_to=max_length)
        ids = batch["input_ids"].to(model.device)
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(model.device)).logits
        for kind, (loss, count) in loss_sums(logits, ids, response_mask(chunk, max_length).to(model.device)).items():
            totals[kind][0] += loss
            totals[kind][1] += count
    return {
        "perplexity": {k: math.exp(loss / count) if count else float("nan") for k, (loss, count) in totals.items()},
        "tokens": {k: count for k, (_, count) in totals.items()},
    }


def evaluation_precision(precision: str) -> contextlib.AbstractContextManager:
    """Evaluate in the precision the adapter was trained in (on a GPU; CPU evaluation stays in float32)."""
    return autocast(precision, "cuda") if torch.cuda.is_available() else contextlib.nullcontext()


def main() -> None:
    params = load_params()
    meta = load_meta()
    rows = load_split("eval")
    model = load_finetuned(params.model, ADAPTER_DIR)
    batch_size = params.eval.ppl.batch_size
    with evaluation_precision(params.train.precision):
        finetuned = perplexities(model, rows, meta.pad_token_id, meta.max_length, batch_size, "perplexity fine-tuned")
        with model.disable_adapter():
            base = perplexities(model, rows, meta.pad_token_id, meta.max_length, batch_size, "perplexity base")
    metrics = {
        "base": base["perplexity"],
        "finetuned": finetuned["perplexity"],
        "tokens": base["tokens"],
        "rows": len(rows),
    }
    for kind in KINDS:
        log.info(
            "%s perplexity: base %.3f -> fine-tuned %.3f (%d tokens)",
            kind,
            metrics["base"][kind],
            metrics["finetuned"][kind],
            metrics["tokens"][kind],
        )
    write_json(PERPLEXITY_METRICS, metrics)


if __name__ == "__main__":
    run_stage("evaluate_ppl", main)
