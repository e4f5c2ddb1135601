import copy

import pytest

from stages.common.errors import PipelineError
from stages.common.params import parse_params
from stages.evaluate_cosine import Generation, build_prompts, runs_on, word_count
from tests.conftest import REPO, load_yaml


@pytest.mark.parametrize(
    ("text", "hit_limit", "expected"),
    [
        ("Paris is the capital of France.", False, False),
        ("Paris.\n\n### Instruction:\nName another city.", False, True),
        ("Paris is the capital of France.", True, True),
        ("the brave warrior fought the dragon " * 3, False, True),
    ],
)
def test_run_on_detection(text, hit_limit, expected):
    assert runs_on(Generation(text, hit_limit)) is expected


def test_word_count_counts_words_not_punctuation():
    assert word_count("Hello, brave world!  ") == 3


def params_with(**generate):
    raw = copy.deepcopy(load_yaml(REPO / "params.yaml"))
    raw["eval"]["generate"].update(generate)
    raw["tokenize"]["max_length"] = 64
    return parse_params(raw)


@pytest.fixture
def subset(tmp_path, monkeypatch, records):
    import json

    (tmp_path / "data/subset").mkdir(parents=True)
    (tmp_path / "data/subset/eval.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    monkeypatch.chdir(tmp_path)


def test_prompts_are_configured_then_held_out_with_references(subset, tokenizer, records):
    prompts = build_prompts(params_with(prompts=["Tell me a story."], held_out_prompts=2), tokenizer)
    assert [p.reference for p in prompts][0] is None
    assert len(prompts) == 3 and all(p.reference for p in prompts[1:])
    assert all(len(tokenizer(p.model_input)["input_ids"]) <= 64 for p in prompts)


@pytest.mark.parametrize(
    ("generate", "message"),
    [
        ({"prompts": ["ok", " "]}, r"eval.generate.prompts\[1\] is empty"),
        ({"prompts": ["word " * 100]}, r"eval.generate.prompts\[0\] is \d+ tokens, longer than tokenize.max_length"),
        ({"prompts": [], "held_out_prompts": 0}, "eval.generate.prompts is empty"),
    ],
)
def test_bad_prompts_are_one_line_naming_the_key(subset, tokenizer, generate, message):
    with pytest.raises(PipelineError, match=message):
        build_prompts(params_with(**generate), tokenizer)
