"""Packed rows (`tokenize.padding: packed`): rows filled to a token budget, every example whole in exactly one row,
one row width for the whole run, and the same loss and gradients as the examples padded apart."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from stages.common.tokenized import IGNORE_INDEX, Collator, TokenizedMeta, TokenizedSplit
from stages.finetuning.packing import PackCollator, best_fit_packs, collator_for, pack
from tests.conftest import store_split, stored_training_data

META = TokenizedMeta(pad_token_id=0, max_length=32, loss_mask="completion", padding="packed", template="alpaca")


def example_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length, prompt = rng.randint(4, 32), rng.randint(2, 3)
        ids = [rng.randint(3, 400) for _ in range(length)]
        rows.append(
            {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "answer_spans": [[prompt, length]]}
        )
    return rows


def test_every_example_lands_in_exactly_one_row_within_the_budget_and_rows_are_nearly_full():
    rng = random.Random(0)
    lengths = [min(int(rng.paretovariate(1.2) * 40), 2048) for _ in range(5000)]  # long-tailed, as real data is
    packs = best_fit_packs(lengths, 2048)
    assert sorted(i for pack in packs for i in pack) == list(range(5000))
    totals = [sum(lengths[i] for i in pack) for pack in packs]
    assert max(totals) <= 2048
    assert len(packs) <= math.ceil(sum(lengths) / 2048) + 1  # best fit: at most one row more than a perfect fill
    assert best_fit_packs(lengths, 2048) == packs  # decided by the lengths alone
    with pytest.raises(ValueError, match="an example of 40 tokens does not fit a packed row of 32"):
        best_fit_packs([40, 3], 32)


def test_one_long_example_widens_no_row_but_its_own():
    lengths = [10] * 64 + [120]
    rows, width = pack([{"input_ids": [1] * n} for n in lengths], lengths, 128)
    assert width == 120  # the fullest row: twelve examples of 10, or the one of 120
    assert sorted(len(p) for p in rows.packs) == [1, 4, *[12] * 5]  # 12 of 10 tokens fill a 128 row; the 120 alone
    assert [lengths[i] for i in rows.packs[0]] == [120]
    assert rows.totals.tolist() == [sum(lengths[i] for i in p) for p in rows.packs]  # each row's tokens
    assert rows[2:5].totals.tolist() == rows.totals[2:5].tolist() and rows[2:5].packs == rows.packs[2:5]


def test_packed_rows_share_one_width_that_fits_the_fullest(tmp_path):
    split = store_split(example_rows(50), tmp_path / "train.arrow")
    rows, width = pack(split, split.lengths, 32)
    collate = collator_for(rows, width, META)
    assert {collate([rows[r]])["input_ids"].shape for r in range(len(rows))} == {torch.Size([1, width])}
    assert width % 8 == 0 and width - 8 < max(int(split.lengths[p].sum()) for p in rows.packs)


def test_a_short_batch_is_filled_with_rows_that_change_nothing(tmp_path):
    split = store_split(example_rows(30, seed=2), tmp_path / "train.arrow")
    rows, width = pack(split, split.lengths, 32)
    batch = collator_for(rows, width, META, batch_rows=4)([rows[0]])
    assert batch["input_ids"].shape == (4, width)
    assert (batch["labels"][1:] == IGNORE_INDEX).all() and (batch["input_ids"][1:] == META.pad_token_id).all()


def test_a_packed_row_restarts_positions_and_never_predicts_across_examples():
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PackCollator(META, 8, slots=4)([rows])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    # the second example's first token is not a target of the first example's last one; padding is never a target
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 3]
    assert "attention_mask" not in batch  # transformers then masks attention per example from the positions
    # the examples' bounds for attention per example: the two examples, the padding, one empty slot of the 4
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 8] and batch["max_length_q"] == 8


def test_example_bounds_match_the_positions_and_keep_one_length_for_every_row(tmp_path):
    """The bounds attention reads (packed_attention.py) start a segment exactly where positions restart, in every
    row, and have one length whatever a row holds, so one CUDA graph fits every batch."""
    split = store_split(example_rows(37, seed=5), tmp_path / "train.arrow")
    rows, width = pack(split, split.lengths, 32)
    collate = collator_for(rows, width, META)
    slots = max(len(p) for p in rows.packs) + 1
    assert slots > 2  # rows hold several examples
    lengths = set()
    for batch in [collate([rows[0], rows[1]]), *(collate([rows[r]]) for r in range(len(rows)))]:
        positions = batch["position_ids"].reshape(-1)
        bounds = batch["cu_seq_lens_q"]
        assert bounds[-1] == positions.numel() and bool((bounds.diff() >= 0).all())
        starts = [b for b in torch.unique(bounds).tolist() if b < positions.numel()]
        assert starts == torch.nonzero(positions == 0).reshape(-1).tolist()
        lengths.add((len(bounds) - 1) // len(batch["input_ids"]))
        assert batch["max_length_q"] == width
    assert lengths == {slots}


@pytest.mark.parametrize("kernel_takes_groups", [False, True])
def test_grouped_key_value_heads_reach_the_kernel_as_the_model_groups_them(kernel_takes_groups):
    """Llama 3 shares each key/value head among a group of query heads: whether the kernel takes the groups
    (`enable_gqa`) or gets each head repeated, query head h attends with key/value head h // group, as SDPA does."""
    from stages.finetuning.packed_attention import grouped_heads

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, heads, 6, 8, generator=generator) for heads in (8, 2, 2))
    want = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    query, key, value, options = grouped_heads(query, key, value, kernel_takes_groups)
    got = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, **options)
    assert options == ({"enable_gqa": True} if kernel_takes_groups else {})
    torch.testing.assert_close(got, want)


def test_a_stored_split_reads_back_as_written_and_slices_without_copying(tmp_path):
    rows = example_rows(2500, seed=9)  # more than one written batch: rows span chunks
    path = tmp_path / "train.arrow"
    split = store_split(rows, path)
    assert len(split) == 2500 and list(split) == rows
    assert split.lengths.tolist() == [len(r["input_ids"]) for r in rows]
    view = split[1001::7]
    assert isinstance(view, TokenizedSplit) and list(view) == rows[1001::7]
    # int32 ids: 4 bytes a token, plus offsets and spans, 16 bytes a row (and the file's schema and footer)
    assert path.stat().st_size < 4 * split.tokens() + 16 * len(split) + 4096


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
    lengths = [len(row["input_ids"]) for row in rows]
    packs, width = pack(rows, lengths, 64)
    assert len(packs) < len(rows)  # several examples share a row
    packed = collator_for(packs, width, META)(list(packs))
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
    split = store_split(rows, tmp_path / "eval.arrow")
    padded_meta = TokenizedMeta(0, 32, "completion", "longest", "alpaca")
    with torch.no_grad():
        whole = model(**Collator(padded_meta)(rows)).loss.item()

    packs, collator = BatchShapes(TrainingData(META, split, split)).evaluation()
    assert isinstance(collator, PackCollator) and len(packs) < len(rows)
    assert sorted(i for pack in packs.packs for i in pack) == list(range(21))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    trainer = TokenWeightedTrainer(model=model, args=args, eval_dataset=packs)
    trainer.eval_collator = collator
    assert trainer.evaluate()["eval_loss"] == pytest.approx(whole, rel=1e-5)

    unpacked, padding = BatchShapes(TrainingData(padded_meta, split, split)).evaluation()
    assert list(unpacked) == rows and isinstance(padding, Collator)


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
        r"micro-batch 8 x accumulation 2 .* \(rows packed to a budget of 64 tokens, padded to \d+",
        result.stdout + result.stderr,
    )
    assert json.loads((root / "data/tokenized/meta.json").read_text())["padding"] == "packed"
    live = json.loads((root / "dvclive/metrics.json").read_text())
    assert math.isfinite(live["eval"]["loss"]) and math.isfinite(live["train"]["loss"])
    assert (root / "models/adapter/adapter_model.safetensors").is_file()


def test_the_micro_batch_probe_takes_the_fullest_packed_rows(tmp_path):
    """`auto` sizes the micro-batch on the largest batch training meets: the `micro` rows holding the most tokens."""
    from stages.finetuning.batching import BatchShapes

    data = stored_training_data(tmp_path, META, example_rows(60, seed=3), example_rows(4, seed=4))
    shapes = BatchShapes(data)
    rows, _ = shapes.train_packs
    totals = sorted((int(data.train.lengths[p].sum()) for p in rows.packs), reverse=True)
    assert totals[0] > totals[-1]  # rows of unequal fill, so the choice matters
    for micro in (1, 3):
        batch = shapes.probe_batch(micro, torch.device("cpu"))
        real = int((batch["input_ids"] != META.pad_token_id).sum())
        assert batch["input_ids"].shape[0] == micro and real == sum(totals[:micro])
