"""Prompt formats: what a record trains on under each template, that generation prompts and the exported templates
render the same text training saw, and that `auto` follows the base (SmolLM2's real tokenizer, which has a chat
template)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess

import pytest

from stages.common.errors import PipelineError
from stages.common.params import TokenizeParams
from stages.common.templates import (
    ALPACA_JINJA,
    EOS,
    generation_prompt,
    modelfile,
    pieces,
    render_chat,
    resolve_template,
)
from stages.common.tokenized import IGNORE_INDEX, tokenize_record

TURNS = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Blue."},
]
CONVERSATION = {"messages": TURNS}


def text_of(parts, tokenizer) -> str:
    return "".join(tokenizer.eos_token if text is EOS else text for text, _ in parts)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_conversation_trains_on_every_assistant_turn_and_nothing_else(tokenizer, template):
    row = tokenize_record(CONVERSATION, tokenizer, TokenizeParams(256, template, "completion", "longest"), template)
    trained = [tokenizer.decode(row["input_ids"][start:end]) for start, end in row["answer_spans"]]
    assert trained == [f"Red.{tokenizer.eos_token}", f"Blue.{tokenizer.eos_token}"]  # no label after the end marker
    labelled = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    assert labelled == [i for start, end in row["answer_spans"] for i in range(start, end)]
    full = tokenize_record(CONVERSATION, tokenizer, TokenizeParams(256, template, "full", "longest"), template)
    assert full["labels"] == full["input_ids"] == row["input_ids"]


def test_chat_pieces_are_the_tokenizers_own_rendering(tokenizer):
    assert text_of(pieces(CONVERSATION, "chat", tokenizer), tokenizer) == tokenizer.apply_chat_template(
        TURNS, tokenize=False
    )


def test_alpaca_pieces_are_what_the_exported_jinja_template_renders(tokenizer):
    """The merged model and its GGUF carry ALPACA_JINJA: it must render a conversation as training saw it."""
    rendered = tokenizer.apply_chat_template(TURNS, chat_template=ALPACA_JINJA, tokenize=False)
    assert rendered == text_of(pieces(CONVERSATION, "alpaca", tokenizer), tokenizer) + "\n\n"
    assert rendered.startswith("Answer in one word.\n\n### Instruction:\nName a primary colour.\n\n### Response:\nRed.")


def test_an_alpaca_record_keeps_the_seed_prompt_with_its_input_section(tokenizer):
    record = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    prompt = "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n"
    assert pieces(record, "alpaca", tokenizer) == [(prompt, False), ("hello", True), (EOS, True)]
    chat_prompt, reference = generation_prompt(record, "chat", tokenizer)
    assert "Translate.\n\nbonjour" in chat_prompt and chat_prompt.endswith("<|im_start|>assistant\n")
    assert reference == "hello"


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_held_out_conversation_is_asked_with_its_earlier_turns_and_judged_on_its_last_answer(tokenizer, template):
    prompt, reference = generation_prompt(CONVERSATION, template, tokenizer)
    assert reference == "Blue."
    assert prompt == render_chat(TURNS[:-1], tokenizer, template)
    training_text = text_of(pieces(CONVERSATION, template, tokenizer), tokenizer)
    assert training_text.startswith(prompt) and "Red." in prompt and "Blue." not in prompt


def test_auto_is_chat_for_a_base_with_a_chat_template_else_alpaca(tokenizer):
    assert resolve_template("auto", tokenizer) == "chat"
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert resolve_template("auto", plain) == "alpaca"
    with pytest.raises(PipelineError, match="tokenize.template is chat, but the tokenizer of model.name has no chat"):
        resolve_template("chat", plain)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    forgetful = copy.deepcopy(tokenizer)  # keeps only the last exchange, as some reasoning models' templates do
    forgetful.chat_template = (
        "{% for m in messages[-2:] %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(PipelineError, match="rewrites earlier turns"):
        pieces(CONVERSATION, "chat", forgetful)


def test_the_modelfile_says_the_trained_format(tokenizer):
    alpaca = modelfile("model.gguf", "alpaca", tokenizer.eos_token)
    assert "FROM ./model.gguf" in alpaca and "### Instruction:\n{{ .Content }}\n\n### Response:\n" in alpaca
    assert 'PARAMETER stop "### Instruction:"' in alpaca and f'PARAMETER stop "{tokenizer.eos_token}"' in alpaca
    assert "{{-" not in alpaca  # Go's trim marker would eat the newlines the format needs
    chat = modelfile("model.gguf", "chat", tokenizer.eos_token)
    assert "TEMPLATE" not in chat.replace("# TEMPLATE", "") and f'PARAMETER stop "{tokenizer.eos_token}"' in chat


GO_RENDER = """package main

import (
\t"encoding/json"
\t"os"
\t"text/template"
)

type Message struct {
\tRole    string `json:"role"`
\tContent string `json:"content"`
}

func main() {
\tsource, _ := os.ReadFile(os.Args[1])
\tvar messages []Message
\tjson.Unmarshal([]byte(os.Args[2]), &messages)
\ttmpl := template.Must(template.New("modelfile").Parse(string(source)))
\tif err := tmpl.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil {
\t\tpanic(err)
\t}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (apt install golang-go) to run Ollama's templating")
def test_the_modelfile_template_renders_in_go_what_training_saw(tmp_path, tokenizer):
    """Ollama renders TEMPLATE with Go's text/template over .Messages: run the real thing on a conversation."""
    body = re.search(r'TEMPLATE """(.*?)"""', modelfile("model.gguf", "alpaca", tokenizer.eos_token), re.S).group(1)
    (tmp_path / "template.txt").write_text(body)
    (tmp_path / "render.go").write_text(GO_RENDER)
    asked = TURNS[:-1]
    go_env = {**os.environ, "GOCACHE": str(tmp_path / "cache"), "GOPATH": str(tmp_path / "go")}
    rendered = subprocess.run(
        ["go", "run", str(tmp_path / "render.go"), str(tmp_path / "template.txt"), json.dumps(asked)],
        capture_output=True, text=True, check=True, env=go_env,
    ).stdout  # fmt: skip
    assert rendered == render_chat(asked, tokenizer, "alpaca")
