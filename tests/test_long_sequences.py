"""Long sequences through the real pipeline: `tokenize.max_length` 2,048 and 8,192 on a tiny model with 8,192
positions, records with a long-tailed length distribution, rows packed to the token budget, one optimizer step and the
perplexity of the eval split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stages.common.tokenized import TokenizedSplit
from tests.dvc_project import TINY, make_project, run, set_params, stages_run

pytestmark = pytest.mark.slow

WORDS = 1, 40, 300, 700, 1500, 2600, 5000, 9000  # answer lengths (~1 token a word): short ones and a long tail


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir):
    """The tiny model with 8,192 positions."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-long")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.max_position_embeddings = 8192
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def long_records() -> list[dict]:
    return [
        {
            "instruction": f"Write {n} words about rivers, take {k}.",
            "input": "",
            "output": "water flows " * (n // 2 + 1),
        }
        for k in range(2)
        for n in WORDS
    ]


@pytest.mark.parametrize("max_length", [2048, 8192])
def test_long_rows_are_cut_packed_trained_and_scored(tmp_path, long_model_dir, max_length):
    root = make_project(
        tmp_path / "project",
        long_model_dir,
        {
            **TINY,
            "data.source": "data/raw/long.jsonl",
            "data.train_size": 12,
            "data.eval_size": 4,
            "tokenize.max_length": max_length,
            "tokenize.padding": "packed",
            "train.group_by_length": False,
            "train.micro_batch_size": 1,
            "train.effective_batch_size": 2,
            "train.epochs": 0.2,  # a step or two: the point is the shapes
            "eval.ppl.batch_size": 1,
        },
    )
    (root / "data/raw/long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_records()))
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "long records")
    run(root, "dvc", "repro", "evaluate_ppl")

    split = TokenizedSplit.open(root / "data/tokenized/train.arrow", "completion")
    lengths = split.lengths
    assert lengths.max() == max_length  # the longest records are cut at max_length, whole rows otherwise
    assert (lengths < max_length).sum() >= 4  # the short ones stay short: nothing pads them on disk
    row = split[int(np.argmax(lengths))]
    assert row["answer_spans"][-1][1] == max_length and row["labels"][-1] == row["input_ids"][-1]
    counts = json.loads((root / "metrics/data.json").read_text())
    assert counts["train"]["rows_cut_at_max_length"] == int((lengths == max_length).sum())
    assert counts["train"]["tokens"] == int(lengths.sum())

    live = json.loads((root / "dvclive/metrics.json").read_text())
    assert math.isfinite(live["train"]["loss"]) and math.isfinite(live["eval"]["loss"])
    perplexity = json.loads((root / "metrics/perplexity.json").read_text())
    assert all(math.isfinite(v) for side in ("base", "finetuned") for v in perplexity[side].values())
    assert perplexity["tokens"]["seed"] == 4 * (max_length - 1)  # every eval row padded to max_length, as the seed

    # eval.ppl.seed_way off: only evaluate_ppl reruns, each batch padded to its own longest row, the same answer figure
    set_params(root, {"eval.ppl.seed_way": False})
    reran = stages_run(run(root, "dvc", "repro", "evaluate_ppl"))
    answers_only = json.loads((root / "metrics/perplexity.json").read_text())
    assert reran == {"evaluate_ppl"}
    assert set(answers_only["finetuned"]) == set(answers_only["tokens"]) == {"response"}
    assert answers_only["tokens"]["response"] == perplexity["tokens"]["response"]
    for side in ("base", "finetuned"):
        assert math.isclose(answers_only[side]["response"], perplexity[side]["response"], rel_tol=1e-4)
