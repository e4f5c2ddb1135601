import pytest

from stages.common.params import TokenizeParams
from stages.common.prompt import RESPONSE_MARKER, format_prompt
from stages.common.tokenized import IGNORE_INDEX, Collator, TokenizedMeta, TokenizedSplit, tokenize_record

RECORD = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}


def test_prompt_puts_instruction_then_optional_input_then_response_marker():
    assert format_prompt("Do X.") == "### Instruction:\nDo X.\n\n### Response:\n"
    with_input = format_prompt("Translate.", "bonjour")
    assert (
        with_input.index("### Instruction:")
        < with_input.index("### Input:\nbonjour")
        < with_input.index(RESPONSE_MARKER)
    )


def test_full_mask_labels_every_token_and_ends_with_eos(tokenizer):
    row = tokenize_record(RECORD, tokenizer, TokenizeParams(128, "alpaca", "full", "max_length"), "alpaca")
    assert row["labels"] == row["input_ids"]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    [[start, end]] = row["answer_spans"]
    assert end == len(row["input_ids"])
    assert tokenizer.decode(row["input_ids"][start:], skip_special_tokens=True) == "Red."


def test_completion_mask_ignores_the_prompt_only(tokenizer):
    row = tokenize_record(RECORD, tokenizer, TokenizeParams(128, "alpaca", "completion", "longest"), "alpaca")
    [[n, _]] = row["answer_spans"]
    assert row["labels"][:n] == [IGNORE_INDEX] * n
    assert row["labels"][n:] == row["input_ids"][n:]
    assert tokenizer.decode(row["input_ids"][:n]) == format_prompt(RECORD["instruction"])


def test_rows_are_cut_at_max_length(tokenizer):
    long = {**RECORD, "output": "word " * 200}
    row = tokenize_record(long, tokenizer, TokenizeParams(32, "alpaca", "completion", "longest"), "alpaca")
    assert len(row["input_ids"]) == len(row["labels"]) == 32
    assert row["answer_spans"][-1][1] == 32


@pytest.mark.parametrize(
    ("loss_mask", "padding", "width", "label_pad"),
    [("full", "max_length", 16, 2), ("completion", "longest", 5, IGNORE_INDEX)],
)
def test_collator_pads_as_meta_says(loss_mask, padding, width, label_pad):
    rows = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7], "answer_spans": [[1, 3]]},
        {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "answer_spans": [[2, 5]]},
    ]
    meta = TokenizedMeta(pad_token_id=2, max_length=16, loss_mask=loss_mask, padding=padding, template="alpaca")
    batch = Collator(meta)(rows)
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0, 3:].eq(2).all()
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * (width - 3)
    assert batch["labels"][0, 3:].eq(label_pad).all()
    assert batch["labels"][1, :5].tolist() == [5, 6, 7, 8, 9]


def subset_file(tmp_path, records):
    import json

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_rows_without_an_answer_token_are_counted_and_dropped_under_completion(tmp_path, tokenizer, caplog):
    from stages.tokenize import tokenize_file

    long_prompt = {**RECORD, "instruction": "Explain " * 60}
    path = subset_file(tmp_path, [RECORD, long_prompt, RECORD])
    out = tmp_path / "train.arrow"
    with caplog.at_level("WARNING", logger="pipeline"):
        counts = tokenize_file(path, out, tokenizer, TokenizeParams(32, "alpaca", "completion", "longest"), "alpaca")
    rows = list(TokenizedSplit.open(out, "completion"))
    assert counts == {
        "rows_read": 3,
        "rows_cut_at_max_length": 1,
        "rows_without_answer": 1,
        "rows": 2,
        "tokens": sum(len(r["input_ids"]) for r in rows),
    }
    assert len(rows) == 2 and all(any(label != IGNORE_INDEX for label in r["labels"]) for r in rows)
    assert "1 of 3 rows have no answer token left" in caplog.text
    counts = tokenize_file(path, out, tokenizer, TokenizeParams(32, "alpaca", "full", "longest"), "alpaca")
    assert (len(TokenizedSplit.open(out, "full")), counts["rows_without_answer"]) == (3, 1)  # full keeps them


def test_no_row_with_an_answer_left_is_an_error(tmp_path, tokenizer):
    from stages.common.errors import PipelineError
    from stages.tokenize import tokenize_file

    path = subset_file(tmp_path, [{**RECORD, "instruction": "Explain " * 60}])
    with pytest.raises(PipelineError, match=r"train.jsonl: none of its 1 rows has an answer token within"):
        tokenize_file(
            path, tmp_path / "out.arrow", tokenizer, TokenizeParams(16, "alpaca", "completion", "longest"), "alpaca"
        )


def test_tokenizing_on_several_processes_writes_the_same_file_and_names_a_bad_line(tmp_path, tokenizer, records):
    import json

    from stages.common.errors import PipelineError
    from stages.tokenize import tokenize_file

    params = TokenizeParams(64, "alpaca", "full", "longest")  # full: every row kept, row i is line i + 1
    lines = [json.dumps({**records[i % len(records)], "output": f"Answer {i}."}) for i in range(5500)]  # 6 batches
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    one, two = tmp_path / "one.arrow", tmp_path / "two.arrow"
    counts = tokenize_file(path, one, tokenizer, params, "alpaca", workers=1)
    assert tokenize_file(path, two, tokenizer, params, "alpaca", workers=2) == counts
    assert one.read_bytes() == two.read_bytes() and counts["rows_read"] == 5500
    split = TokenizedSplit.open(two, "full")
    assert len(split) == 5500 and split[1700] == tokenize_record(json.loads(lines[1700]), tokenizer, params, "alpaca")
    lines[1799] = '{"instruction": "x"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PipelineError, match=r"train.jsonl:1800: missing field 'output'"):
        tokenize_file(path, two, tokenizer, params, "alpaca", workers=2)


def test_a_huge_answer_gives_the_row_its_whole_text_would(tokenizer):
    """Pieces are cut to a character budget before encoding (a 100 MB answer costs no more than a short one); the
    row is the one the whole text gives, cut at max_length."""
    from stages.common.prompt import format_prompt
    from stages.common.tokenized import longest_token

    params = TokenizeParams(32, "alpaca", "full", "longest")
    answer = "Rivers:" + "ĊĠ####################" * 3 + " water flows down" * 20_000  # long tokens first
    row = tokenize_record({**RECORD, "output": answer}, tokenizer, params, "alpaca")
    prompt = tokenizer(format_prompt(RECORD["instruction"]))["input_ids"]
    whole = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(answer) > 10 * (params.max_length + 1) * longest_token(tokenizer)  # the cut is in play
    assert row["input_ids"] == whole[: params.max_length]
