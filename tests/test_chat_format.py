"""Training on data in chat form, through the real CLI on the tiny model (SmolLM2's tokenizer, which has a chat
template): the bundled data's chat-format twin runs the whole pipeline in the base's own template, from subset to
GGUF and `lora-dvc chat`; a bad conversation is one line naming file:line."""

from __future__ import annotations

import json
import re
import sys
import zipfile

import pytest

from stages.common.tokenized import TokenizedSplit
from tests.doc_blocks import run_block
from tests.dvc_project import ALL_STAGES, copy_project, run, set_params

pytestmark = pytest.mark.slow
TWIN = "data/raw/seed_tasks_messages.jsonl"


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_project):
    root = copy_project(trained_project[0], tmp_path_factory.mktemp("chat-format") / "project")
    alpaca_subset = jsonl(root / "data/subset/train.jsonl")
    _, ran = run_block(root, "README.md", "your-data")  # the twin as the user's file, then dvc exp run on it
    return root, alpaca_subset, ran


def test_the_twin_holds_the_same_examples_as_conversations(project):
    root, alpaca_subset, result = project
    assert set(re.findall(r"Running stage '(\w+)'", result)) == ALL_STAGES
    twin_subset = jsonl(root / "data/subset/train.jsonl")
    asked = [r["messages"][0]["content"] for r in twin_subset]
    assert asked == [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in alpaca_subset]
    assert [r["messages"][1]["content"] for r in twin_subset] == [r["output"] for r in alpaca_subset]


def test_auto_trains_and_judges_in_the_bases_chat_template(project, tokenizer):
    root, _, _ = project
    assert json.loads((root / "data/tokenized/meta.json").read_text())["template"] == "chat"
    assert json.loads((root / "models/adapter/params.json").read_text())["tokenize"]["template"] == "chat"
    row = TokenizedSplit.open(root / "data/tokenized/train.arrow", "completion")[0]
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\n")
    [[start, end]] = row["answer_spans"]
    assert tokenizer.decode(row["input_ids"][:start]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(row["input_ids"][start:end]).rstrip().endswith("<|im_end|>")
    cosine = json.loads((root / "metrics/cosine.json").read_text())
    assert set(cosine["run_on_rules"]["base"]) >= {"token_limit", "heading_echo", "turn_marker"}
    assert all("base_run_on_rule" in row for row in cosine["per_prompt"])


def test_the_exports_keep_the_bases_template(project, tokenizer):
    root, _, _ = project
    merged = json.loads((root / "models/merged/tokenizer_config.json").read_text())
    template = merged.get("chat_template") or (root / "models/merged/chat_template.jinja").read_text()
    assert template == tokenizer.chat_template
    modelfile = (root / "models/gguf/Modelfile").read_text()
    assert 'TEMPLATE """' not in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert json.loads((root / "models/gguf/round_trip.json").read_text())["same_greedy_answer"] is True
    card = zipfile.ZipFile(root / "models/adapter.zip").read("README.md").decode()
    [snippet] = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert "apply_chat_template" in snippet  # asked in the template it was trained in
    assert (
        "user\nTell me a story about a brave warrior.\nassistant\n" in run(root, sys.executable, "-c", snippet).stdout
    )


def test_chat_asks_in_the_trained_template(project):
    root, _, _ = project
    result = run(root, "lora-dvc", "chat", "--max-new-tokens", "8", "--greedy", "--prompt", "Name three colours.")
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr
    assert "asking in the chat format, as the adapter was trained" in result.stderr  # not the alpaca default


def test_a_bad_conversation_is_one_line_naming_file_and_line(project):
    root, _, _ = project
    good = (root / TWIN).read_text().splitlines()[0]
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]})
    (root / "data/raw/bad.jsonl").write_text(f"{good}\n{bad}\n")
    set_params(root, {"data.source": "data/raw/bad.jsonl"})
    try:
        result = run(root, sys.executable, "-m", "stages.prepare_subset", check=False)
    finally:
        (root / "data/raw/bad.jsonl").unlink()
        set_params(root, {"data.source": "data/raw/my_tasks.jsonl"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [
        "error: data/raw/bad.jsonl:2: messages[1]: expected the assistant turn here, got user (a system turn may "
        "come first, then user and assistant alternate)"
    ], result.stderr[-2000:]
