"""The output head outside the model (stages/common/output_head.py): the same loss and gradients as the model's
own loss over the whole logits, chunk by chunk, in training and in the Trainer's evaluation; left in place where
moving it would change the result."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from stages.common import output_head
from stages.common.output_head import batch_loss, head_outside
from stages.common.tokenized import IGNORE_INDEX, Collator, TokenizedMeta
from stages.finetuning.trainer import TokenWeightedTrainer

META = TokenizedMeta(pad_token_id=0, max_length=64, loss_mask="completion", padding="longest", template="alpaca")


def lora_model(tiny_model_dir, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # a random tiny model predicts every token about equally badly: make losses differ
        base.lm_head.weight.mul_(40)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(base, lora)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in ((40, 2), (6, 3), (30, 25), (12, 1)):
        ids = torch.randint(7, 400, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return Collator(META)(rows)


def loss_and_gradients(model, inputs, head=None):
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, inputs, head)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_head_outside_gives_the_models_loss_and_gradients_chunk_by_chunk(tiny_model_dir, monkeypatch):
    model = lora_model(tiny_model_dir)
    inputs = batch()
    want_loss, want = loss_and_gradients(model, inputs)
    monkeypatch.setattr(output_head, "CHUNK_POSITIONS", 7)  # 75 labelled positions: 11 chunks, the last short
    with head_outside(model, None, sharded=False) as head:
        assert head is not None
        assert model(**{"input_ids": inputs["input_ids"]}).logits.shape[-1] == model.config.hidden_size
        got_loss, got = loss_and_gradients(model, inputs, head)
    torch.testing.assert_close(got_loss, want_loss)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, msg=name)
    assert model(**inputs).logits.shape[-1] == model.config.vocab_size  # the head is back


def test_a_batch_with_no_labelled_position_backs_up_a_zero_loss(tiny_model_dir):
    """Filler rows only (a short last batch under compile): a zero loss that still runs backward."""
    model = lora_model(tiny_model_dir)
    inputs = batch()
    inputs["labels"] = torch.full_like(inputs["labels"], IGNORE_INDEX)
    with head_outside(model, None, sharded=False) as head:
        loss, gradients = loss_and_gradients(model, inputs, head)
    assert loss.item() == 0.0 and all(not g.any() for g in gradients.values())


def test_the_trainers_losses_are_the_same_through_the_head_outside(tiny_model_dir, tmp_path):
    """One optimizer step and the evaluation after it, with the head in the model and outside it."""
    rows = [
        {"input_ids": row[row != 0].tolist(), "labels": labels[row != 0].tolist()}
        for row, labels in zip(batch()["input_ids"], batch()["labels"], strict=True)
    ]
    results = []
    for outside in (False, True):
        model = lora_model(tiny_model_dir)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(outside)), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=1, per_device_eval_batch_size=3, report_to="none", use_cpu=True, save_strategy="no",
            logging_steps=1, remove_unused_columns=False, learning_rate=1e-2,
        )  # fmt: skip
        with head_outside(model, None, sharded=False) if outside else contextlib.nullcontext() as head:
            trainer = TokenWeightedTrainer(
                model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=Collator(META)
            )
            trainer.use_output_head(head)
            train_loss = trainer.train().training_loss
            results.append((train_loss, trainer.evaluate()["eval_loss"]))
    (train_in, eval_in), (train_out, eval_out) = results
    assert train_out == pytest.approx(train_in, rel=1e-5)
    assert eval_out == pytest.approx(eval_in, rel=1e-5)


@pytest.mark.parametrize("why", ["trainable head", "softcapped logits", "sharded base"])
def test_the_head_stays_where_moving_it_would_change_the_result(tiny_model_dir, why):
    model = lora_model(tiny_model_dir, ("q_proj", "v_proj", "lm_head") if why == "trainable head" else ("q_proj",))
    if why == "softcapped logits":
        model.config.final_logit_softcapping = 30.0
    head_before = model.get_base_model().lm_head
    with head_outside(model, None, sharded=why == "sharded base") as head:
        assert head is None
        assert model.get_base_model().lm_head is head_before


def test_the_head_is_put_back_when_training_fails(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    head_before = model.get_base_model().lm_head
    with pytest.raises(RuntimeError), head_outside(model, None, sharded=False):
        assert model.get_base_model().lm_head is not head_before
        raise RuntimeError("a failed step")
    assert model.get_base_model().lm_head is head_before
    assert copy.deepcopy(model)(**batch()).logits.shape[-1] == model.config.vocab_size
