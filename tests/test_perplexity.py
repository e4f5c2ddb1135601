import math

import torch

from stages.common import output_head
from stages.common.loss import next_token_losses
from stages.common.perplexity import loss_sums, perplexities, response_mask
from stages.common.tokenized import pad_batch


def test_loss_sums_match_hand_computed_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[1, 3, 0, 2]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    by_hand = [-torch.log_softmax(logits[0, t], dim=-1)[ids[0, t + 1]].item() for t in range(3)]
    sums = loss_sums(next_token_losses(logits, ids), mask)
    assert sums["seed"][1] == 3 and math.isclose(sums["seed"][0], sum(by_hand), rel_tol=1e-6)
    assert sums["response"][1] == 2 and math.isclose(sums["response"][0], by_hand[1] + by_hand[2], rel_tol=1e-6)


def test_response_mask_covers_answer_tokens_only():
    rows = [{"input_ids": [1, 2, 3, 4], "answer_spans": [[2, 4]]}, {"input_ids": [1, 2, 3], "answer_spans": [[1, 3]]}]
    assert response_mask(rows, 6).tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]
    two_turns = [{"input_ids": [1, 2, 3, 4, 5, 6, 7], "answer_spans": [[1, 3], [5, 7]]}]  # every assistant turn
    assert response_mask(two_turns, 8).tolist() == [[0, 1, 1, 0, 0, 1, 1, 0]]


def rows_for(tokenizer):
    texts = [("### Instruction:\nSay hi.\n\n### Response:\n", "Hi there."), ("### Instruction:\nCount.\n\n", "1 2 3")]
    rows = []
    for prompt, answer in texts:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": p + a, "labels": p + a, "answer_spans": [[len(p), len(p + a)]]})
    return rows


def test_reported_perplexity_is_exp_of_token_weighted_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = rows_for(tokenizer)
    pad = tokenizer.pad_token_id
    result = perplexities(model, rows, pad, 32, batch_size=1, desc="test")
    batch = pad_batch(rows, pad, pad, pad_to=32)
    with torch.no_grad():
        hf_loss = model(**batch).loss  # HF: mean over every shifted position, labels = input_ids incl. padding
    assert math.isclose(result["perplexity"]["seed"], math.exp(hf_loss.item()), rel_tol=1e-4)
    assert result["tokens"]["seed"] == 2 * 31


def test_response_perplexity_ignores_what_padding_holds(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = rows_for(tokenizer)
    first = perplexities(model, rows, tokenizer.pad_token_id, 32, batch_size=2, desc="test")
    other = perplexities(model, rows, tokenizer.pad_token_id + 7, 32, batch_size=2, desc="test")
    assert math.isclose(first["perplexity"]["response"], other["perplexity"]["response"], rel_tol=1e-5)
    assert first["perplexity"]["seed"] != other["perplexity"]["seed"]
    assert first["tokens"]["response"] == sum(len(r["input_ids"]) - r["answer_spans"][0][0] for r in rows)


def test_token_losses_over_a_large_vocabulary_match_float64():
    """Perplexity is exp of a mean over thousands of tokens, so a per-token bias adds up: over SmolLM2's 49,152
    classes, CPU's log-softmax across a middle dimension was off by ~5e-5 per token; with the classes last, ~4e-6 in
    ATen's AVX-512 kernels and ~7e-6 in the AVX2 ones the stages pin (stages/__init__.py)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 65, 49152) * 5
    targets = torch.randint(0, 49152, (2, 65))
    exact = torch.nn.functional.cross_entropy(
        logits[:, :-1].double().flatten(0, 1), targets[:, 1:].flatten(), reduction="none"
    ).view(2, -1)
    error = next_token_losses(logits, targets).double() - exact
    assert error.abs().max() < 2e-5 and abs(error.mean()) < 1e-5


def test_response_perplexity_weighs_every_token_alike_across_batches_of_unequal_size(tiny_model_dir, tokenizer):
    """One row a batch, answers of different lengths: the split's figure is exp(all token losses / all tokens),
    not the mean of the batches' figures (which weighs a short answer's tokens more)."""
    import statistics

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows, pad = rows_for(tokenizer), tokenizer.pad_token_id
    alone = [perplexities(model, [row], pad, 32, batch_size=1, desc="test") for row in rows]
    tokens = [result["tokens"]["response"] for result in alone]
    assert tokens[0] != tokens[1]
    losses = [math.log(result["perplexity"]["response"]) * count for result, count in zip(alone, tokens, strict=True)]
    split = perplexities(model, rows, pad, 32, batch_size=1, desc="test")
    assert split["tokens"]["response"] == sum(tokens)
    assert math.isclose(split["perplexity"]["response"], math.exp(sum(losses) / sum(tokens)), rel_tol=1e-9)
    by_batch = statistics.fmean(result["perplexity"]["response"] for result in alone)
    assert not math.isclose(split["perplexity"]["response"], by_batch, rel_tol=1e-4)


def test_long_rows_are_scored_a_chunk_of_positions_at_a_time_with_the_whole_logits_figures(
    tiny_model_dir, tokenizer, monkeypatch
):
    """Evaluation memory is bounded by the chunk, not the row: the head never sees more than CHUNK_POSITIONS
    positions at once, the model's own forward builds no logits, and both figures equal those of the whole logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (3, 300)).tolist()
    cut = [row[:length] for row, length in zip(ids, (300, 170, 41), strict=True)]
    rows = [{"input_ids": row, "labels": row, "answer_spans": [[len(row) // 2, len(row)]]} for row in cut]
    pad, width = tokenizer.pad_token_id, 320
    seen = []
    monkeypatch.setattr(output_head, "CHUNK_POSITIONS", 128)
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    chunked = perplexities(model, rows, pad, width, batch_size=3, desc="test")
    hook.remove()
    assert max(shape[0] for shape in seen) == 128 and all(len(shape) == 2 for shape in seen)
    assert sum(shape[0] for shape in seen) == 3 * (width - 1)  # every position, once; no (rows, width) pass
    batch = pad_batch(rows, pad, pad, pad_to=width)
    with torch.no_grad():
        whole = next_token_losses(model(**batch).logits, batch["input_ids"])
    expected = loss_sums(whole, response_mask(rows, width))
    for kind, (loss, count) in expected.items():
        assert chunked["tokens"][kind] == count
        assert math.isclose(chunked["perplexity"][kind], math.exp(loss / count), rel_tol=1e-5)


def test_without_the_seed_figure_batches_are_padded_to_their_longest_row_for_the_same_answer_figure(
    tiny_model_dir, tokenizer
):
    """eval.ppl.seed_way off: rows go longest first and each forward is only as wide as its longest row, far less
    than max_length; the answer figure and its token count stay those of rows padded to max_length."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    lengths = (20, 90, 35, 60, 12)
    rows = []
    for length in lengths:
        row = torch.randint(10, 1000, (length,)).tolist()
        rows.append({"input_ids": row, "labels": row, "answer_spans": [[length // 3, length]]})
    pad, max_length = tokenizer.pad_token_id, 256
    widths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    answers_only = perplexities(model, rows, pad, max_length, batch_size=2, desc="test", seed_way=False)
    hook.remove()
    padded = perplexities(model, rows, pad, max_length, batch_size=2, desc="test")
    assert widths == [(2, 90), (2, 35), (1, 12)]  # longest first: 90 and 60, then 35 and 20, then 12
    assert answers_only["positions"] == 2 * 90 + 2 * 35 + 12 and padded["positions"] == len(rows) * max_length
    assert set(answers_only["perplexity"]) == {"response"} and set(padded["perplexity"]) == {"seed", "response"}
    assert answers_only["tokens"]["response"] == padded["tokens"]["response"]
    assert math.isclose(answers_only["perplexity"]["response"], padded["perplexity"]["response"], rel_tol=1e-5)


def test_figures_without_the_seed_way_perplexity_are_drawn_and_reported_without_it(tmp_path):
    """eval.ppl.seed_way off: metrics/perplexity.json holds the answer figure only, and the chart, the dvc plots
    table, the results report and the model card show that one and no seed-way row."""
    import csv

    from stages import plot
    from stages.common import model_card
    from stages.common.io import read_json
    from tests.conftest import REPO

    perplexity = read_json(REPO / "metrics/perplexity.json")
    answers_only = {
        key: ({"response": value["response"]} if isinstance(value, dict) else value)
        for key, value in perplexity.items()
    }
    cosine, train = read_json(REPO / "metrics/cosine.json"), read_json(REPO / "dvclive/metrics.json")
    harness = read_json(REPO / "metrics/harness.json")
    for figures, seed_rows in ((perplexity, 1), (answers_only, 0)):
        report = plot.results_markdown(figures, cosine, train, harness)
        card = "\n".join(model_card.figures({"perplexity": figures, "cosine": cosine}))
        assert report.count("perplexity, seed way") == card.count("perplexity, seed way") == seed_rows
        assert "perplexity, response only" in report and "perplexity, answer tokens only" in card
        plot.perplexity_table(figures, tmp_path / "table.csv")
        with (tmp_path / "table.csv").open() as table:
            kinds = {row["kind"] for row in csv.DictReader(table)}
        assert kinds == ({"seed", "response"} if seed_rows else {"response"})
        plot.perplexity_chart(figures, tmp_path / "chart.png", dpi=40)
        assert (tmp_path / "chart.png").stat().st_size > 0
