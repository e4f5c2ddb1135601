import json
import random

import numpy as np
import pytest

from stages.common.errors import PipelineError
from stages.common.params import DataParams
from stages.common.records import iter_records
from stages.prepare_subset import content_key, split_records


def read_records(*args, **kwargs):
    return list(iter_records(*args, **kwargs))


def write_lines(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


GOOD = json.dumps({"instruction": "Add 2 and 2.", "input": "", "output": "4"})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"instruction": "x", "output": ', "rows.jsonl:2: malformed JSON"),
        (json.dumps({"instruction": "x"}), "rows.jsonl:2: missing field 'output'"),
        (json.dumps({"instruction": "x", "output": 3}), "rows.jsonl:2: field 'output' must be a string, got int"),
        (json.dumps({"instruction": " ", "output": "y"}), "rows.jsonl:2: field 'instruction' is empty"),
        (json.dumps(["x", "y"]), "rows.jsonl:2: fits none of the formats: alpaca (instruction, output), messages"),
        (json.dumps({"prompt": "x", "completion": "y"}), "rows.jsonl:2: fits none of the formats"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "rows.jsonl:2: not in the alpaca format"),
        (b'{"instruction": "caf\xe9", "output": "y"}', "rows.jsonl:2: not UTF-8 text"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "rows.jsonl", [GOOD, line])
    with pytest.raises(PipelineError) as err:
        read_records(str(path))
    assert message in str(err.value)


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


CONVERSATION = [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello."), turn("user", "2+2?")]
CONVERSATION += [turn("assistant", "4")]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.mark.parametrize("fmt", ["auto", "messages", "sharegpt"])
def test_messages_and_sharegpt_read_as_the_same_conversation(tmp_path, fmt):
    messages = write_lines(tmp_path / "m.jsonl", [json.dumps({"messages": CONVERSATION})])
    sharegpt = [{"from": SHAREGPT_ROLES[t["role"]], "value": t["content"]} for t in CONVERSATION]
    shared = write_lines(tmp_path / "s.jsonl", [json.dumps({"conversations": sharegpt, "id": "x1"})])
    expected = [{"messages": CONVERSATION}]
    if fmt in ("auto", "messages"):
        assert read_records(str(messages), fmt=fmt) == expected
    if fmt in ("auto", "sharegpt"):
        assert read_records(str(shared), fmt=fmt) == expected


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([], "m.jsonl:2: field 'messages' must be a non-empty list"),
        ([turn("assistant", "x")], "m.jsonl:2: messages[0]: expected the user turn here, got assistant"),
        ([turn("user", "a"), turn("user", "b")], "m.jsonl:2: messages[1]: expected the assistant turn here, got user"),
        ([turn("user", "a")], "m.jsonl:2: messages must end with an assistant turn"),
        ([turn("user", "a"), turn("tool", "b")], "m.jsonl:2: messages[1].role is 'tool'; expected one of system"),
        ([turn("user", "a"), {"role": "assistant"}], "m.jsonl:2: messages[1] must be an object with 'role' and"),
        ([turn("user", "a"), turn("assistant", " ")], "m.jsonl:2: field 'messages[1].content' is empty"),
    ],
)
def test_a_bad_conversation_names_file_line_and_turn(tmp_path, turns, message):
    good = json.dumps({"messages": CONVERSATION})
    path = write_lines(tmp_path / "m.jsonl", [good, json.dumps({"messages": turns})])
    with pytest.raises(PipelineError) as err:
        read_records(str(path))
    assert message in str(err.value)


def test_auto_takes_the_first_records_format_and_holds_the_rest_to_it(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps({"messages": CONVERSATION}), GOOD])
    with pytest.raises(PipelineError) as err:  # auto: no suggestion to set what is already set
        read_records(str(path))
    assert str(err.value) == (
        f"{path}:2: not in the messages format of the first record ({path}:1; it has 'instruction', as alpaca "
        "records do); every record of a file must be in one format: convert it, or split the file"
    )
    with pytest.raises(
        PipelineError, match=r"mixed.jsonl:1: not in the sharegpt format .*set data.format: messages, or auto"
    ):
        read_records(str(path), fmt="sharegpt")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("")
    with pytest.raises(PipelineError, match="no records"):
        read_records(str(path))


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(PipelineError, match="data.source '.*nope.jsonl': file not found"):
        read_records(str(tmp_path / "nope.jsonl"))


def test_json_and_parquet_give_the_same_records(tmp_path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "rows.parquet")
    assert read_records(str(tmp_path / "rows.json")) == read_records(str(tmp_path / "rows.parquet")) == records


def test_hub_loader_reads_a_local_stand_in(tmp_path, records):
    """`hub:<id>` goes through datasets.load_dataset, which reads a folder laid out like a hub dataset repo."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "alpaca-stand-in" / "data"
    repo.mkdir(parents=True)
    extra = [{**r, "text": "ignored column"} for r in records]
    pq.write_table(pa.Table.from_pylist(extra), repo / "train-00000-of-00001.parquet")
    assert read_records(f"hub:{repo.parent}", split="train") == records


def test_hub_loader_failure_is_one_line(tmp_path):
    with pytest.raises(PipelineError) as err:
        read_records(f"hub:{tmp_path / 'no-such-dataset'}", split="train")
    assert str(err.value).startswith("data.source 'hub:") and "\n" not in str(err.value)


def test_split_is_seeded_and_disjoint(records):
    params = DataParams("x", "auto", None, "train", 8, 3, seed=7)
    train, held_out = split_records(records, params)
    assert (len(train), len(held_out)) == (8, 3)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}
    assert split_records(records, params) == (train, held_out)
    assert split_records(records, DataParams("x", "auto", None, "train", 8, 3, seed=8)) != (train, held_out)


def test_eval_size_above_the_data_names_the_keys(records):
    with pytest.raises(PipelineError, match=r"data.train_size \+ data.eval_size = 8 \+ 5 = 13 is more than the 12"):
        split_records(records, DataParams("x", "auto", None, "train", 8, 5, seed=0))


def test_duplicates_never_straddle_the_split(records, caplog):
    """Copies of one example (differing only in case and spacing) are kept once, so no eval row is a train row."""
    copies = [{**records[0], "instruction": "  " + records[0]["instruction"].upper() + " "} for _ in range(6)]
    pool = records + copies
    for seed in range(10):
        with caplog.at_level("INFO", logger="pipeline"):
            train, held_out = split_records(pool, DataParams("x", "auto", None, "train", 9, 3, seed=seed))
        keys = {content_key(r) for r in train}
        assert not keys & {content_key(r) for r in held_out}
        assert len(keys) == len(train)
    assert "removed 6 duplicate records" in caplog.text


def test_the_first_of_each_duplicate_is_kept_bucket_by_bucket_and_chunk_by_chunk(monkeypatch):
    """The memory-lean dedupe (keys compared a bucket of equal top bytes at a time, offsets summed a chunk at a
    time) keeps exactly what np.unique's first occurrences keep, at the offsets the lengths add up to."""
    from stages import prepare_subset

    monkeypatch.setattr(prepare_subset, "CHUNK", 7)  # chunks that cut through the data
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 2**64, size=300, dtype=np.uint64, endpoint=False)
    keys = distinct[rng.integers(0, len(distinct), size=2000)]  # every key several times, in random places
    keys[:5] = keys[100]  # a run of copies at the start too
    _, first = np.unique(keys, return_index=True)
    kept = ~prepare_subset._later_duplicates(keys)
    assert np.flatnonzero(kept).tolist() == sorted(first.tolist())
    lengths = rng.integers(1, 10_000, size=len(keys)).astype(np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]])
    assert prepare_subset._kept_starts(lengths, kept).tolist() == offsets[kept].tolist()


def test_unique_records_only_shrinks_the_pool_for_real_duplicates(records):
    with pytest.raises(PipelineError, match=r"= 13 is more than the 12 unique records"):
        split_records(records + records[:3], DataParams("x", "auto", None, "train", 10, 3, seed=0))


def test_conversations_differing_only_in_case_and_spacing_are_one_example():
    other = [{**t, "content": "  " + t["content"].upper()} for t in CONVERSATION]
    assert content_key({"messages": CONVERSATION}) == content_key({"messages": other})
    reordered = [CONVERSATION[0], CONVERSATION[3], CONVERSATION[2], CONVERSATION[1], CONVERSATION[4]]
    assert content_key({"messages": CONVERSATION}) != content_key({"messages": reordered})


def test_the_subset_order_is_the_shuffle_of_earlier_versions_in_an_array():
    """The order is kept in an array of 4-byte integers (a million records: 4 MB, not a list's 36) but drawn exactly as
    random.Random(seed).shuffle draws it, so a subset drawn before is drawn again."""
    from stages.prepare_subset import shuffled

    for count, seed in [(0, 1), (1, 1), (175, 42), (1000, 7)]:
        expected = list(range(count))
        random.Random(seed).shuffle(expected)
        assert list(shuffled(count, seed)) == expected


def test_train_size_all_takes_every_unique_record_the_eval_split_leaves(records):
    train, held_out = split_records(records + records[:2], DataParams("x", "auto", None, "train", "all", 3, seed=0))
    assert (len(train), len(held_out)) == (len(records) - 3, 3)
    with pytest.raises(PipelineError, match=r"data.train_size all leaves 0 records: 'x' has 12 unique records"):
        split_records(records, DataParams("x", "auto", None, "train", "all", 12, seed=0))


def test_a_json_list_is_read_a_record_at_a_time_and_a_record_larger_than_a_read_still_parses(tmp_path):
    big = {"instruction": "Repeat.", "input": "", "output": "word " * 600_000}  # 3 MB: several reads of 1 MB
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "A.", "output": "B."}, big, {"instruction": "C.", "output": "D."}]))
    assert [r["instruction"] for r in read_records(str(path))] == ["A.", "Repeat.", "C."]
    path.write_text('[{"instruction": "A.", "output": "B."} {"instruction": "C.", "output": "D."}]')
    with pytest.raises(PipelineError, match=r"rows.json: record 2: malformed JSON \(expected ',' or '\]'"):
        read_records(str(path))
