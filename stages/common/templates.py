"""The prompt format (`tokenize.template`) a record is trained and judged in, and the same format written out for the
tools that run the model after the pipeline.

- `alpaca`: the seed's "### Instruction:\n...\n\n### Response:\n" text (stages/common/prompt.py), answer + eos; the
  turns of a conversation follow one another, each answer ended by eos and a blank line.
- `chat`: the tokenizer's own chat template (an instruct base was trained in it).
- `auto`: `chat` when the tokenizer has a chat template, else `alpaca`.

A record becomes pieces of text, each trained on or not: under `loss_mask: completion` only the assistant turns
(with their end marker) carry labels, every assistant turn of a conversation. Generation prompts (evaluation, the
chat command, the GGUF round trip) are rendered by the same code, so the base is judged in the format it was trained
for. For the merged model and its GGUF the alpaca format is written as a Jinja chat template, and for Ollama as a
Modelfile."""

from __future__ import annotations

from typing import Any

from stages.common.errors import PipelineError
from stages.common.prompt import INSTRUCTION_MARKER, RESPONSE_MARKER, format_prompt

# System text first, then per turn "### Instruction:\n{user}\n\n### Response:\n{answer}<eos>\n\n"
ALPACA_JINJA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] | trim }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    f"{{{{ '{INSTRUCTION_MARKER}\\n' }}}}{{{{ message['content'] | trim }}}}"
    f"{{{{ '\\n\\n{RESPONSE_MARKER.strip()}\\n' }}}}"
    "{%- else -%}{{ message['content'] | trim }}{{ eos_token }}{{ '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def alpaca_ollama_template(eos_token: str) -> str:
    """The same format in Ollama's Go template language (it has no Jinja). No `{{-`: it would trim the newlines."""
    return (
        "{{ range .Messages }}"
        '{{ if eq .Role "system" }}{{ .Content }}\n\n'
        f'{{{{ else if eq .Role "user" }}}}{INSTRUCTION_MARKER}\n{{{{ .Content }}}}\n\n{RESPONSE_MARKER}'
        f"{{{{ else }}}}{{{{ .Content }}}}{eos_token}\n\n"
        "{{ end }}{{ end }}"
    )


def modelfile(gguf_name: str, template: str, eos_token: str) -> str:
    """An Ollama Modelfile for the exported GGUF: the trained format, stopping where an answer ends. For `chat` it
    names no TEMPLATE: Ollama takes the template from the GGUF's own chat template (the base's), which Jinja-to-Go
    translation by hand would only approximate."""
    lines = ["# Ollama: ollama create <name> -f Modelfile && ollama run <name>", f"FROM ./{gguf_name}"]
    if template == "alpaca":
        lines += [f'TEMPLATE """{alpaca_ollama_template(eos_token)}"""', f'PARAMETER stop "{INSTRUCTION_MARKER}"']
    else:
        lines.append("# TEMPLATE: none here; Ollama uses the chat template stored in the GGUF (the base's)")
    return "\n".join([*lines, f'PARAMETER stop "{eos_token}"', ""])


EOS = None  # a piece that is the tokenizer's end-of-sequence token, not text
Piece = tuple[str | None, bool]  # (text, or EOS; trained on)


def resolve_template(setting: str, tokenizer: Any) -> str:
    """`auto` is `chat` when the tokenizer has a chat template (an instruct base), else `alpaca`."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return "chat" if has_template else "alpaca"
    if setting == "chat" and not has_template:
        raise PipelineError(
            "tokenize.template is chat, but the tokenizer of model.name has no chat template; use alpaca or auto"
        )
    return setting


def trained_template(made_with: dict[str, Any], tokenizer: Any) -> str:
    """The format an adapter was trained in, from its params.json (older adapters have no template: alpaca)."""
    return resolve_template(made_with["tokenize"].get("template", "alpaca"), tokenizer)


def as_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A record as a conversation: an alpaca record is one user turn (instruction, then the input) and its answer."""
    if "messages" in record:
        return record["messages"]
    user = record["instruction"].strip()
    if record["input"].strip():
        user += "\n\n" + record["input"].strip()
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _alpaca_pieces(record: dict[str, Any]) -> list[Piece]:
    if "messages" not in record:  # the seed's prompt, with its Input section
        return [
            (format_prompt(record["instruction"], record["input"]), False),
            (record["output"].strip(), True),
            (EOS, True),
        ]
    pieces: list[Piece] = []
    for message in record["messages"]:
        if message["role"] == "system":
            pieces.append((message["content"].strip() + "\n\n", False))
        elif message["role"] == "user":
            pieces.append((format_prompt(message["content"]), False))
        else:
            pieces += [(message["content"].strip(), True), (EOS, True), ("\n\n", False)]
    return pieces[:-1]


def _chat_pieces(messages: list[dict[str, str]], tokenizer: Any) -> list[Piece]:
    """Text before each assistant turn (not trained on) and the turn itself up to its end marker (trained on), cut
    out of the tokenizer's own renderings of the conversation up to that turn. Whitespace after an end marker (the
    newline between ChatML turns) belongs to the next prompt: no label on an always-the-same token."""
    pieces: list[Piece] = []
    done = full = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(messages[:k], tokenizer)
        full = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise PipelineError(
                "tokenize.template chat: the tokenizer's chat template rewrites earlier turns when a turn is added, "
                "so the answers cannot be told apart from the prompt; use tokenize.template: alpaca"
            )
        answer = full[len(prompt) :].rstrip()
        pieces += [(prompt[len(done) :], False), (answer, True)]
        done = prompt + answer
    if full[len(done) :]:
        pieces.append((full[len(done) :], False))
    return pieces


def pieces(record: dict[str, Any], template: str, tokenizer: Any) -> list[Piece]:
    if template == "alpaca":
        return _alpaca_pieces(record)
    return _chat_pieces(as_messages(record), tokenizer)


def render_chat(messages: list[dict[str, str]], tokenizer: Any, template: str = "chat") -> str:
    """The prompt for the next assistant turn after `messages` (ending on a user turn)."""
    chat_template = ALPACA_JINJA if template == "alpaca" else None
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )


def generation_prompt(record: dict[str, Any], template: str, tokenizer: Any) -> tuple[str, str]:
    """(prompt, reference answer) for a held-out record: everything before its last answer, and that answer."""
    if template == "alpaca" and "messages" not in record:
        return format_prompt(record["instruction"], record["input"]), record["output"]
    messages = as_messages(record)
    return render_chat(messages[:-1], tokenizer, template), messages[-1]["content"]
