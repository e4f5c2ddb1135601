"""`lora-dvc chat`'s conversation and streaming, without a model: earlier turns go back into the prompt in the trained
format (oldest dropped first when too long), and a run-on into a new `### ` section never reaches the screen."""

from __future__ import annotations

import io

import pytest

from lora_dvc.chat import Conversation, Printer
from stages.common.errors import PipelineError
from stages.common.prompt import format_prompt


def test_earlier_turns_go_back_into_the_prompt_in_the_trained_format(tokenizer):
    """As training saw a conversation: each answer ended by eos, then the next instruction; or the chat template."""
    conversation = Conversation(tokenizer, "alpaca", [("Name a colour.", "Blue. ")])
    expected = format_prompt("Name a colour.") + f"Blue.{tokenizer.eos_token}\n\n" + format_prompt("Another?")
    assert conversation.prompt("Another?") == expected
    chat = Conversation(tokenizer, "chat", [("Name a colour.", "Blue.")])
    expected = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n"
    assert expected in chat.prompt("Another?") and chat.prompt("Another?").endswith("<|im_start|>assistant\n")


def test_the_oldest_turns_go_first_when_the_prompt_is_too_long(tokenizer):
    conversation = Conversation(tokenizer, "alpaca", [("a " * 50, "x"), ("b", "y")])
    prompt = conversation.fit("c", lambda text: text.split(), budget=12)
    assert conversation.turns == [("b", "y")] and "a a" not in prompt and prompt.endswith(format_prompt("c"))


def test_a_run_on_into_a_new_section_is_cut_where_it_starts_even_across_chunks():
    out = io.StringIO()
    printer = Printer(out)
    for chunk in ["Blue is calm", ".\n#", "## Instr", "uction:\nmore"]:
        printer.put(chunk)
    assert printer.end() == "Blue is calm." and out.getvalue() == "Blue is calm.\n"


def test_under_a_chat_template_nothing_is_held_back():
    out = io.StringIO()
    printer = Printer(out, stop=None)
    printer.put("Use C#\n#")
    assert out.getvalue() == "Use C#\n#" and printer.end() == "Use C#\n#"


def test_text_that_only_looks_like_the_start_of_a_section_is_shown_in_the_end():
    out = io.StringIO()
    printer = Printer(out)
    printer.put("Use C#\n#")
    assert out.getvalue() == "Use C#"  # "\n#" could start "\n### ": held back for now
    printer.put(" is a heading")
    assert printer.end() == "Use C#\n# is a heading" and out.getvalue() == "Use C#\n# is a heading\n"


def test_reset_forgets_the_conversation_the_model_is_asked_with(tokenizer):
    """What the model is sent for each message: earlier turns before /reset, none after it."""
    from lora_dvc.chat import converse

    sent: list[str] = []

    def respond(conversation: Conversation, message: str) -> None:
        sent.append(conversation.prompt(message))
        conversation.turns.append((message, f"answer to {message}"))

    typed = iter(["Name a colour.", "Another?", "/reset", "Hello", "/exit", "never read"])
    assert converse(Conversation(tokenizer, "alpaca"), respond, lambda _: next(typed)) == 0
    assert len(sent) == 3 and "Name a colour." in sent[1]  # the second message goes with the first turn
    assert sent[2] == format_prompt("Hello")  # after /reset: the new message alone
    assert next(typed) == "never read"  # /exit ended it


def test_greedy_is_greedy_decoding_without_a_repetition_penalty():
    """`--greedy` gives the answer the merged model and the GGUF give under greedy decoding: no penalty."""
    import argparse

    from lora_dvc.chat import add_arguments, sampling_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert sampling_options(parser.parse_args(["--greedy"])) == {"do_sample": False, "repetition_penalty": 1.0}
    sampled = sampling_options(parser.parse_args(["--temperature", "0.5"]))
    assert sampled == {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "repetition_penalty": 1.1}
    with pytest.raises(PipelineError, match="--greedy takes the likeliest token: drop --repetition-penalty"):
        sampling_options(parser.parse_args(["--greedy", "--repetition-penalty", "1.3"]))


def test_help_texts_read_as_written():
    """`lora-dvc --help` gives each command's whole one-sentence summary; a command's help keeps its examples."""
    import contextlib

    from lora_dvc import chat, cli, compare

    def help_of(*argv: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            cli.main([*argv, "--help"])
        return " ".join(out.getvalue().split()) if not argv else out.getvalue()

    summary = help_of()
    assert chat.SUMMARY in summary and compare.SUMMARY in summary
    assert chat.SUMMARY.endswith(".") and compare.SUMMARY.endswith(".")
    assert "\n    lora-dvc chat --compare                       # a conversation;" in help_of("chat")
