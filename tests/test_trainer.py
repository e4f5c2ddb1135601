import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from stages.common.tokenized import IGNORE_INDEX, Collator, TokenizedMeta
from stages.finetuning.trainer import TokenWeightedTrainer, eval_passes

# (length, prompt length): answers of very different lengths, so a mean of per-batch means is off
SHAPES = ((40, 2), (6, 3), (30, 25), (12, 1), (9, 4))


@pytest.fixture(scope="module")
def evaluation(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # a random tiny model predicts every token about equally badly: make losses differ
        model.lm_head.weight.mul_(40)
    rows = [
        {"input_ids": list(range(7, 7 + n)), "labels": [IGNORE_INDEX] * k + list(range(7 + k, 7 + n))}
        for n, k in SHAPES
    ]
    meta = TokenizedMeta(pad_token_id=0, max_length=64, loss_mask="completion", padding="longest", template="alpaca")
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("eval")), per_device_eval_batch_size=2, report_to="none", use_cpu=True
    )
    with torch.no_grad():  # the independent figure: one padded batch, the model's own mean over labelled tokens
        whole = model(**Collator(meta)(rows)).loss.item()
    return model, rows, meta, args, whole


def test_eval_loss_is_token_weighted_over_the_whole_split(evaluation):
    model, rows, meta, args, whole = evaluation
    trainer = TokenWeightedTrainer(model=model, args=args, eval_dataset=rows, data_collator=Collator(meta))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(whole, rel=1e-5)
    assert [e["eval_loss"] for e in trainer.state.log_history] == [pytest.approx(whole, rel=1e-5)]  # for the curves
    # these rows tell the two apart: the stock evaluation (a mean of batch means) would fail the check above
    stock = Trainer(model=model, args=args, eval_dataset=rows, data_collator=Collator(meta)).evaluate()["eval_loss"]
    assert stock != pytest.approx(whole, rel=1e-3)


def test_filler_rows_change_neither_loss_nor_gradients(evaluation):
    model, rows, meta, _, _ = evaluation

    def loss_and_grad(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), model.lm_head.weight.grad.clone()

    plain = Collator(meta)(rows[:3])
    filled = Collator(meta, batch_rows=5)(rows[:3])
    assert filled["input_ids"].shape[0] == 5 and filled["labels"][3:].eq(IGNORE_INDEX).all()
    (loss, grad), (filled_loss, filled_grad) = loss_and_grad(plain), loss_and_grad(filled)
    assert filled_loss == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(filled_grad, grad)
    assert not filled_grad.isnan().any()


def test_evaluation_runs_eagerly_even_on_a_compiled_model(evaluation, monkeypatch):
    from torch._dynamo.testing import CompileCounter

    model, rows, meta, args, whole = evaluation
    counter = CompileCounter()
    monkeypatch.setattr(model, "forward", torch.compile(model.forward, backend=counter))
    trainer = TokenWeightedTrainer(model=model, args=args, eval_dataset=rows, data_collator=Collator(meta))
    assert trainer.evaluate()["eval_loss"] == pytest.approx(whole, rel=1e-5)
    assert counter.frame_count == 0  # compiling a no-grad graph for one evaluation costs more than it saves


@pytest.mark.parametrize(("rows", "processes", "batch"), [(9, 2, 4), (22, 2, 32), (17, 4, 2), (3, 4, 8), (64, 1, 8)])
def test_every_process_runs_as_many_eval_passes_as_the_fullest_share(rows, processes, batch):
    shares = [len(range(rows)[rank::processes]) for rank in range(processes)]
    assert eval_passes(rows, processes, batch) == max(-(-share // batch) for share in shares)


def test_length_grouped_batches_come_from_the_stored_lengths_as_the_stock_sampler_would_measure_them(tmp_path):
    """The sampler reads no row (a million rows: a minute of Python) yet groups exactly as the stock one does."""
    import random

    from transformers.trainer_pt_utils import LengthGroupedSampler

    from tests.conftest import store_split

    rng = random.Random(3)
    rows = [{"input_ids": [5] * rng.randint(3, 200), "answer_spans": [[1, 2]]} for _ in range(300)]
    split = store_split(rows, tmp_path / "train.arrow")
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, use_cpu=True,
        train_sampling_strategy="group_by_length", report_to="none",
    )  # fmt: skip
    trainer = TokenWeightedTrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=split)
    torch.manual_seed(0)
    ours = list(trainer._get_train_sampler())
    torch.manual_seed(0)
    stock = list(LengthGroupedSampler(8, dataset=[{"input_ids": r["input_ids"]} for r in rows]))
    assert ours == stock and sorted(ours) == list(range(300))


def test_running_out_of_memory_names_the_optimizer_step_or_the_evaluation(evaluation, monkeypatch, tmp_path):
    from stages.finetuning.guards import OutOfMemoryIn

    model, rows, meta, _, _ = evaluation
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=3, max_steps=3,
        save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
    )  # fmt: skip
    trainer = TokenWeightedTrainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=Collator(meta)
    )
    forward, calls = model.forward, []

    def running_out_on_the_third_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", running_out_on_the_third_pass)
    with pytest.raises(OutOfMemoryIn) as caught:
        trainer.train()
    assert caught.value.where == "optimizer step 3 of 3 (2 rows a pass, train.micro_batch_size)"
    calls.clear()
    calls.extend([1, 1])
    with pytest.raises(OutOfMemoryIn) as caught:
        trainer.evaluate()
    assert caught.value.where == "the evaluation (3 rows a pass)"
