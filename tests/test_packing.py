"""Packed rows (`tokenize.padding: packed`): the same loss and gradients as the examples padded apart, one row width
for the whole run, every example in exactly one row."""

from __future__ import annotations

import random
import re

import pytest
import torch

from stages.common.tokenized import IGNORE_INDEX, Collator, TokenizedMeta
from stages.finetuning.packing import PackCollator, pack_rows, stratified_packs

META = TokenizedMeta(pad_token_id=0, max_length=32, loss_mask="completion", padding="packed", template="alpaca")


def example_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length, prompt = rng.randint(4, 32), rng.randint(2, 3)
        ids = [rng.randint(3, 400) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def test_every_example_lands_in_exactly_one_row_and_rows_are_balanced():
    lengths = [random.Random(i).randint(10, 128) for i in range(1000)]
    packs = stratified_packs(lengths, 16, seed=42)
    assert sorted(i for pack in packs for i in pack) == list(range(1000))
    assert [len(pack) for pack in packs] == [16] * 62 + [1000 - 62 * 16]  # 16 examples per row, the rest last
    totals = [sum(lengths[i] for i in pack) for pack in packs[:-1]]
    # one example per length stratum: the fullest row holds barely more than the mean (a random split would not)
    assert max(totals) < 1.1 * sum(totals) / len(totals)
    assert stratified_packs(lengths, 16, seed=42) == packs  # same seed, same rows
    assert stratified_packs(lengths, 16, seed=7) != packs


def test_packed_rows_share_one_width_that_fits_the_fullest():
    rows = example_rows(50)
    packs, width = pack_rows(rows, 8, seed=0)
    collate = PackCollator(META, width, 8)
    shapes = {collate([pack])["input_ids"].shape for pack in packs}
    assert shapes == {torch.Size([1, width])}
    assert width % 8 == 0 and width - 8 < max(sum(len(r["input_ids"]) for r in pack) for pack in packs)


def test_a_packed_row_restarts_positions_and_never_predicts_across_examples():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PackCollator(META, 8, 3)([rows])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    # the second example's first token is not a target of the first example's last one; padding is never a target
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3]
    assert "attention_mask" not in batch  # transformers then masks attention per example from the positions
    # the examples' bounds for attention per example: the two examples, the padding, one empty slot of the 3 + 1
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 8] and batch["max_length_q"] == 8


def test_example_bounds_match_the_positions_and_keep_one_length_for_every_row():
    """The bounds attention reads (packed_attention.py) start a segment exactly where positions restart, in every
    row, and have one length whatever a row holds (the short last row too), so one CUDA graph fits every batch."""
    rows = example_rows(37, seed=5)
    packs, width = pack_rows(rows, 8, seed=1)
    collate = PackCollator(META, width, 8)
    lengths = set()
    for batch in [collate(packs[:2]), *(collate([pack]) for pack in packs)]:  # two rows: bounds run end to end
        positions = batch["position_ids"].reshape(-1)
        bounds = batch["cu_seq_lens_q"]
        assert bounds[-1] == positions.numel() and bool((bounds.diff() >= 0).all())
        starts = [b for b in torch.unique(bounds).tolist() if b < positions.numel()]
        assert starts == torch.nonzero(positions == 0).reshape(-1).tolist()
        lengths.add((len(bounds) - 1) // len(batch["input_ids"]))
        assert batch["max_length_q"] == width
    assert len(packs[-1]) < 8 and lengths == {8 + 1}  # slots per row: 8 examples and the padding


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_examples_padded_apart(tiny_model_dir, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention)
    model.config.use_cache = False
    rows = example_rows(6, seed=3)
    for row in rows:  # first tokens are prompt tokens, as tokenize makes them
        row["labels"][0] = IGNORE_INDEX

    def loss_and_grad(batch: dict) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    padded = Collator(TokenizedMeta(0, 32, "completion", "longest", "alpaca"))(rows)
    packs, width = pack_rows(rows, 6, seed=0)
    packed = PackCollator(META, width, 6)(packs)
    loss_padded, grad_padded = loss_and_grad(padded)
    loss_packed, grad_packed = loss_and_grad(packed)
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    torch.testing.assert_close(grad_packed, grad_padded, rtol=1e-4, atol=1e-6)


def test_evaluation_packs_as_training_does_and_scores_the_padded_splits_loss(tiny_model_dir, tmp_path):
    """The finetune stage's eval loss over packed rows (its positions and bounds passed to the model) is the
    token-weighted loss of the same examples padded apart."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from stages.finetuning.batching import BatchShapes
    from stages.finetuning.loop import TrainingData
    from stages.finetuning.trainer import TokenWeightedTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # peaky predictions: attending across examples would move the loss
        model.lm_head.weight.mul_(40)
    rows = example_rows(21, seed=5)
    padded_meta = TokenizedMeta(0, 32, "completion", "longest", "alpaca")
    with torch.no_grad():
        whole = model(**Collator(padded_meta)(rows)).loss.item()

    packs, collator = BatchShapes(TrainingData(META, rows, rows), seed=1).evaluation(micro=4)
    assert isinstance(collator, PackCollator) and sorted(len(pack) for pack in packs) == [1, 4, 4, 4, 4, 4]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    trainer = TokenWeightedTrainer(model=model, args=args, eval_dataset=packs)
    trainer.eval_collator = collator
    assert trainer.evaluate()["eval_loss"] == pytest.approx(whole, rel=1e-5)

    unpacked, padding = BatchShapes(TrainingData(padded_meta, rows, rows), seed=1).evaluation(micro=4)
    assert unpacked == rows and isinstance(padding, Collator)


@pytest.mark.slow
def test_finetune_trains_on_packed_rows_under_dvc_repro(tmp_path, tiny_model_dir):
    """The stage end to end with `tokenize.padding: packed`: rows packed at one width, evaluation packed too."""
    import json
    import math

    from tests.dvc_project import make_project, run

    root = make_project(
        tmp_path / "project", tiny_model_dir, {"tokenize.padding": "packed", "train.group_by_length": False}
    )
    result = run(root, "dvc", "repro", "finetune")
    assert re.search(
        r"micro-batch 8 x accumulation 2 .* each micro-batch packed into one row of \d+ tokens",
        result.stdout + result.stderr,
    )
    assert json.loads((root / "data/tokenized/meta.json").read_text())["padding"] == "packed"
    live = json.loads((root / "dvclive/metrics.json").read_text())
    assert math.isfinite(live["eval"]["loss"]) and math.isfinite(live["train"]["loss"])
    assert (root / "models/adapter/adapter_model.safetensors").is_file()
