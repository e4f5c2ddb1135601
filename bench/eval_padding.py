"""evaluate_ppl's cost at a long max_length: rows padded to max_length (the seed's figure, the default) against
`eval.ppl.seed_way: false` (the answer figure only, rows longest first, each batch padded to its longest row).

    python bench/eval_padding.py                          # 8 rows, max_length 2,048, batches of 2
    python bench/eval_padding.py --rows 16 --max-length 8192

The default's base (params.yaml's model, SmolLM2-135M on a machine without a GPU) scores the same rows both ways in
one process, one after the other. Row lengths are drawn log-normally (median 230 tokens, sigma 1.2, seeded: the
long-context profile's shape, bench/long_context.py), each cut at max_length, the second half of each row its
answer. Prints each way's seconds, the positions its forwards covered, the answer perplexity (the same both ways)
and the time ratio, all from this run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scale import machine  # noqa: E402

from stages.common.models import load_base_model  # noqa: E402
from stages.common.params import load_params  # noqa: E402
from stages.common.perplexity import perplexities  # noqa: E402

MEDIAN_TOKENS, SIGMA = 230, 1.2


def long_tailed_rows(count: int, max_length: int, vocabulary: int, seed: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.maximum(rng.lognormal(math.log(MEDIAN_TOKENS), SIGMA, count).round(), 8), max_length)
    rows = []
    for length in lengths.astype(int):
        ids = rng.integers(10, vocabulary, length).tolist()
        rows.append({"input_ids": ids, "labels": ids, "answer_spans": [[length // 2, length]]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    params = load_params(REPO / "params.yaml")
    model = load_base_model(params.model).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    rows = long_tailed_rows(args.rows, args.max_length, model.config.vocab_size)
    lengths = sorted(len(row["input_ids"]) for row in rows)
    print(f"machine: {machine()}")
    print(f"{args.rows} rows of {lengths[0]} to {lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), ", end="")
    print(f"max_length {args.max_length}, batches of {args.batch_size}, {params.model.name}")

    results = {}
    for seed_way in (True, False):
        started = time.perf_counter()
        figures = perplexities(model, rows, pad, args.max_length, args.batch_size, f"seed_way {seed_way}", seed_way)
        results[seed_way] = (time.perf_counter() - started, figures["positions"], figures["perplexity"]["response"])
    print(f"\n{'eval.ppl.seed_way':18} {'seconds':>8} {'positions':>10} {'answer ppl':>11} {'time':>7}")
    for seed_way, (seconds, positions, answer) in results.items():
        print(
            f"{str(seed_way).lower():18} {seconds:>8.1f} {positions:>10} {answer:>11.4f} "
            f"{seconds / results[True][0]:>6.3f}x"
        )


if __name__ == "__main__":
    with torch.inference_mode():
        main()
