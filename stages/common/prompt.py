"""The instruction-then-output prompt, shared by tokenize (training) and evaluate_cosine (generation)."""

from __future__ import annotations

RESPONSE_MARKER = "### Response:\n"
INSTRUCTION_MARKER = "### Instruction:"


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The text the model sees before its answer; the optional input gets its own section, as in Alpaca."""
    prompt = f"{INSTRUCTION_MARKER}\n{instruction.strip()}\n\n"
    if input_text.strip():
        prompt += f"### Input:\n{input_text.strip()}\n\n"
    return prompt + RESPONSE_MARKER
