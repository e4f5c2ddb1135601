"""Perplexity of the base and the fine-tuned model on the held-out split, two ways.

    python -m stages.evaluate_ppl

Reads data/tokenized/eval.jsonl + meta.json and models/adapter/; writes metrics/perplexity.json.
- `seed`: labels = input_ids over every position of rows padded to max_length, padding included: the way the
  seed recipe measured (9.61 -> 3.91), comparable with it, and flattered by easy-to-predict padding.
- `response`: only answer tokens count (prompt and padding ignored): what the fine-tune changed.
`eval.ppl.seed_way: false` leaves the seed figure out: it costs a forward over max_length positions per row, most of
them padding at a long max_length; the answer figure then pads each batch only to its longest row.
Both are token-weighted: exp(sum of token losses / number of tokens) over the whole split. One base model is
loaded; the fine-tuned figure runs with the adapter enabled, the base figure with it disabled.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from stages.common.errors import check_finite_figures, run_stage
from stages.common.io import write_json
from stages.common.models import autocast, load_finetuned
from stages.common.params import load_params
from stages.common.paths import ADAPTER_DIR, PERPLEXITY_METRICS
from stages.common.perplexity import perplexities
from stages.common.tokenized import load_meta, load_split

log = logging.getLogger("pipeline")


def evaluation_precision(precision: str) -> contextlib.AbstractContextManager:
    """Evaluate in the precision the adapter was trained in (on a GPU; CPU evaluation stays in float32)."""
    return autocast(precision, "cuda") if torch.cuda.is_available() else contextlib.nullcontext()


def main() -> None:
    params = load_params()
    meta = load_meta()
    rows = load_split("eval", meta)
    model = load_finetuned(params.model, ADAPTER_DIR)
    scoring = (meta.pad_token_id, meta.max_length, params.eval.ppl.batch_size)
    seed_way = params.eval.ppl.seed_way
    with evaluation_precision(params.train.precision):
        finetuned = perplexities(model, rows, *scoring, "perplexity fine-tuned", seed_way)
        with model.disable_adapter():
            base = perplexities(model, rows, *scoring, "perplexity base", seed_way)
    for name, figures in (("base", base), ("fine-tuned", finetuned)):
        check_finite_figures(figures["perplexity"], f"{name} perplexity")
    metrics = {
        "base": base["perplexity"],
        "finetuned": finetuned["perplexity"],
        "tokens": base["tokens"],
        "rows": len(rows),
    }
    for kind in metrics["tokens"]:
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
