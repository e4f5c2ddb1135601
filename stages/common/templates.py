"""The prompt format a model was trained in, written out for the tools that run it after the pipeline: a Jinja chat
template (transformers' `apply_chat_template`, llama.cpp's `--jinja`) for the merged model and its GGUF, and an
Ollama Modelfile. Both render exactly what `stages.common.prompt` renders, turn after turn."""

from __future__ import annotations

from stages.common.prompt import INSTRUCTION_MARKER, RESPONSE_MARKER

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


def modelfile(gguf_name: str, eos_token: str) -> str:
    """An Ollama Modelfile for the exported GGUF: the trained format, stopping where an answer ends."""
    template = alpaca_ollama_template(eos_token)
    return "\n".join(
        [
            "# Ollama: ollama create <name> -f Modelfile && ollama run <name>",
            f"FROM ./{gguf_name}",
            f'TEMPLATE """{template}"""',
            f'PARAMETER stop "{INSTRUCTION_MARKER}"',
            f'PARAMETER stop "{eos_token}"',
            "",
        ]
    )
