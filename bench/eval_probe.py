"""Where the finetune stage's end-of-epoch evaluation spends its time, one variant per line (each run 3 times: the
first pays the eager kernels' warm-up), then a GPU profile of the first and the stage's own.

    python bench/eval_probe.py /tmp/benchwork/pipeline    # after --part wholerun: its data, model and bf16 params

Variants over the same 500 eval rows: rows padded per batch of 64 with the loss's log-softmax over (rows, classes,
positions) (before), the same with the classes last, packed rows as training packs them, and the head applied only
at labelled positions (not adopted: shown for what the rest costs).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.common.loss import next_token_losses  # noqa: E402
from stages.common.models import autocast  # noqa: E402
from stages.common.params import load_params  # noqa: E402
from stages.common.tokenized import IGNORE_INDEX, Collator  # noqa: E402
from stages.finetuning.batching import BatchShapes  # noqa: E402
from stages.finetuning.graphed import graph_blocks  # noqa: E402
from stages.finetuning.loop import TrainingData  # noqa: E402
from stages.finetuning.model import build_model  # noqa: E402
from stages.finetuning.packed_attention import use_for_packed_rows  # noqa: E402
from stages.finetuning.runtime import Runtime  # noqa: E402


def classes_second(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss as stages/common/loss.py computed it before: log-softmax over (rows, classes, positions)."""
    shifted = logits[:, :-1].float().transpose(1, 2)
    return F.cross_entropy(shifted, targets[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")


def main() -> None:
    os.chdir(sys.argv[1])
    params, runtime, data = load_params(), Runtime.detect(), TrainingData.load()
    model, _ = build_model(params, runtime)
    shapes = BatchShapes(data)
    use_for_packed_rows(model)
    graph_blocks(model, shapes.probe_batch(16, model.device), params.train.precision)  # as the stage leaves it
    base = model.get_base_model()

    def evaluate(batches: list[dict[str, Any]], loss: Any = next_token_losses, labelled_head: bool = False) -> tuple:
        model.eval()
        totals = torch.zeros(2, device=model.device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad(), autocast(params.train.precision, "cuda"):
            for batch in batches:
                inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                labels = inputs.pop("labels")
                targets = labels[:, 1:]
                if labelled_head:
                    hidden, keep = base.model(**inputs).last_hidden_state[:, :-1], targets != IGNORE_INDEX
                    summed = F.cross_entropy(base.lm_head(hidden[keep]).float(), targets[keep], reduction="sum")
                else:
                    summed = loss(model(**inputs).logits, labels).sum()
                totals += torch.stack([summed, (targets != IGNORE_INDEX).sum().float()])
        torch.cuda.synchronize()
        return (totals[0] / totals[1]).item(), time.perf_counter() - started

    padded = [Collator(data.meta)(data.eval[s : s + 64]) for s in range(0, len(data.eval), 64)]
    packs, collate = shapes.evaluation()  # rows packed to max_length tokens, as the stage packs them
    width = collate.width
    packed = [collate(list(packs[s : s + 4])) for s in range(0, len(packs), 4)]
    variants = {
        "padded, 64 rows a batch, classes second (before)": lambda: evaluate(padded, classes_second),
        "padded, 64 rows a batch, classes last": lambda: evaluate(padded),
        "packed to max_length, 4 rows a batch (the stage)": lambda: evaluate(packed),
        "packed, head at labelled positions only": lambda: evaluate(packed, labelled_head=True),
    }
    tokens = sum(len(row["input_ids"]) for row in data.eval)
    print(
        f"{params.model.quantization}, {params.train.precision}; {len(data.eval)} rows, {tokens} tokens "
        f"({sum(b['input_ids'].numel() for b in padded)} padded; packed rows of {width})"
    )
    for name, run in variants.items():
        runs = [run() for _ in range(3)]
        print(f"{name:52} eval loss {runs[-1][0]:.6f}  s: " + ", ".join(f"{s:.3f}" for _, s in runs), flush=True)
    from torch.profiler import ProfilerActivity, profile

    for name in list(variants)[::2]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            variants[name]()
        print(f"\n== GPU profile: {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))


if __name__ == "__main__":
    main()
