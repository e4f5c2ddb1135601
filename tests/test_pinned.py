"""Numbers pinned to stored values: a silent change in the training or evaluation maths fails here, not in a
reader's comparison weeks later. Tiny seeded model (conftest), fixed data, CPU, float32.

If a change is meant to move them (a new loss, a new default), rerun with PIN_PRINT=1, check the new values make
sense, and store them with the reason in the commit."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

from stages.common.params import ModelParams, parse_params, with_overrides
from stages.common.perplexity import perplexities
from stages.common.tokenized import TokenizedMeta, tokenize_record
from tests.conftest import REPO, load_yaml, stored_training_data

# Stored from the runs below (CPU, torch 2.13, transformers 5.24); rel. tolerance covers CPU kernel differences.
PINNED_TRAIN_LOSSES = [10.81640625, 10.812183380126953, 10.771690368652344, 10.753482818603516]
PINNED_EVAL_LOSS = 10.764470100402832
PINNED_PERPLEXITY = {"seed": 48431.95507393906, "response": 51071.73512980547}
TOLERANCE = 2e-5  # the learning shows from the 3rd decimal on; CPU kernels differ far below that


def tiny_params(tiny_model_dir, **changes):
    raw = with_overrides(
        load_yaml(REPO / "params.yaml"),
        {
            "tokenize.max_length": 64,
            "train.epochs": 1,
            "train.effective_batch_size": 8,
            "train.micro_batch_size": 4,
            "train.logging_steps": 1,
            "train.group_by_length": False,
            **changes,
        },
    )
    params = parse_params(raw)
    return dataclasses.replace(params, model=ModelParams(str(tiny_model_dir), None, "none", "float32", False))


def tiny_rows(tokenizer, records, params):
    return [tokenize_record(r, tokenizer, params.tokenize, "alpaca") for r in records]


def report(name, value):
    if os.environ.get("PIN_PRINT"):
        print(f"{name} = {value!r}")


def test_the_loss_of_a_tiny_seeded_run_is_pinned(tiny_model_dir, tokenizer, records, tmp_path, monkeypatch):
    from stages.finetuning.loop import fit
    from stages.finetuning.model import build_model
    from stages.finetuning.runtime import Runtime

    monkeypatch.chdir(tmp_path)  # checkpoints go to models/checkpoints here
    # a high learning rate over 4 steps, so the optimizer's maths shows in the losses, not only the loss's
    params = tiny_params(tiny_model_dir, **{"train.learning_rate": 0.01, "train.epochs": 2})
    rows = tiny_rows(tokenizer, records, params)
    meta = TokenizedMeta(tokenizer.pad_token_id, 64, "completion", "longest", "alpaca")
    runtime = Runtime(rank=0, local_rank=0, world_size=1, cuda=False)
    model, _ = build_model(params, runtime)
    result = fit(model, stored_training_data(tmp_path / "tokenized", meta, rows[:8] * 2, rows[8:]), params, runtime)
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    eval_loss = [entry["eval_loss"] for entry in result.log_history if "eval_loss" in entry][-1]
    report("PINNED_TRAIN_LOSSES", losses)
    report("PINNED_EVAL_LOSS", eval_loss)
    assert result.steps == 4 and len(losses) == 4
    assert losses == pytest.approx(PINNED_TRAIN_LOSSES, rel=TOLERANCE)
    assert eval_loss == pytest.approx(PINNED_EVAL_LOSS, rel=TOLERANCE)


def test_the_perplexity_of_a_fixed_batch_is_pinned(tiny_model_dir, tokenizer, records):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = tiny_rows(tokenizer, records[:6], tiny_params(tiny_model_dir))
    figures = perplexities(model, rows, tokenizer.pad_token_id, 64, batch_size=4, desc="test")
    report("PINNED_PERPLEXITY", figures["perplexity"])
    assert figures["perplexity"] == pytest.approx(PINNED_PERPLEXITY, rel=TOLERANCE)


def test_perplexity_is_token_weighted_over_batches_of_unequal_token_counts(tiny_model_dir, tokenizer, records):
    """Rows with very different answer lengths: the figure must not depend on how rows are batched, and must be
    exp(total loss / total tokens), which a mean of per-batch figures is not."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.common.loss import next_token_losses
    from stages.common.tokenized import pad_batch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # make per-token losses differ a lot
    params = tiny_params(tiny_model_dir)
    short, long = dict(records[0], output="Yes."), dict(records[1], output=" ".join(["word"] * 40))
    rows = tiny_rows(tokenizer, [short, long, short], params)
    by_batch = {size: perplexities(model, rows, tokenizer.pad_token_id, 64, size, "t") for size in (1, 2, 3)}
    response = [figures["perplexity"]["response"] for figures in by_batch.values()]
    assert response == pytest.approx([response[0]] * 3, rel=1e-5)
    batch = pad_batch(rows, tokenizer.pad_token_id, tokenizer.pad_token_id, pad_to=64)
    with torch.no_grad():
        losses = next_token_losses(
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["input_ids"]
        )
    answer = torch.zeros_like(losses)
    for i, row in enumerate(rows):
        [[start, end]] = row["answer_spans"]
        answer[i, start - 1 : end - 1] = 1
    by_hand = math.exp((losses * answer).sum().item() / answer.sum().item())
    assert response[0] == pytest.approx(by_hand, rel=1e-5)
    per_batch_mean = (
        sum(perplexities(model, [r], tokenizer.pad_token_id, 64, 1, "t")["perplexity"]["response"] for r in rows) / 3
    )
    assert abs(per_batch_mean - by_hand) / by_hand > 0.01  # the wrong way really gives another number here
