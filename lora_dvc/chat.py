"""Talk to the fine-tuned model: the base plus an adapter (models/adapter, a zip of it, or what `dvc get` fetched),
answering one `--prompt` or a conversation typed at the prompt, tokens printed as they come; `--compare` answers
with the base too (base first, then fine-tuned, each under its name).

    lora-dvc chat --prompt "Tell me a story about a brave warrior."
    lora-dvc chat --compare                       # a conversation; /reset forgets it, /exit (or Ctrl-D) ends it
    lora-dvc chat --adapter adapter.zip --greedy  # a zip as `dvc get` or the package stage made it

The base is the one the adapter was trained on (its params.json); the prompt is the format it was trained in
(`tokenize.template` in params.json: the instruction-then-response text or the base's chat template), earlier turns
included, so the model is asked the way it was trained."""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.errors import PipelineError
from stages.common.made_with import read_made_with, untrusted
from stages.common.paths import ADAPTER_DIR
from stages.common.prompt import INSTRUCTION_MARKER
from stages.common.templates import render_chat, trained_template

log = logging.getLogger("pipeline")
SUMMARY = "Talk to the fine-tuned model, or to it and the base side by side."
REPETITION_PENALTY = 1.1  # when sampling: small models loop without it

STOP = "\n" + INSTRUCTION_MARKER.split()[0] + " "  # "\n### ": the start of a new section the model may run on into


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter", type=Path, default=ADAPTER_DIR, help="adapter folder or .zip (default: %(default)s)"
    )
    parser.add_argument("--base", help="base model to load instead of the one in the adapter's params.json")
    parser.add_argument("--prompt", help="answer this once and exit (default: a conversation on the terminal)")
    parser.add_argument("--compare", action="store_true", help="answer with the base model too, before the fine-tune")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the base run code from its model folder or repository (an adapter's params.json never can)",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=whole(1), default=256, help="default: %(default)s")
    sampling.add_argument("--temperature", type=positive, default=0.7, help="default: %(default)s")
    sampling.add_argument("--top-p", type=share, default=0.9, help="in (0, 1]; default: %(default)s")
    sampling.add_argument(
        "--repetition-penalty", type=positive, help=f"default: {REPETITION_PENALTY} when sampling, none with --greedy"
    )
    sampling.add_argument(
        "--greedy",
        action="store_true",
        help="always the likeliest token, no repetition penalty: the answer the merged and GGUF exports give",
    )
    sampling.add_argument("--seed", type=whole(0), default=0, help="sampling seed (default: %(default)s)")
    parser.set_defaults(run=run)


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """generate()'s sampling arguments. --greedy is greedy decoding itself (no penalty reshaping the likeliest
    token), so it answers as the merged model and the GGUF export do under greedy decoding."""
    if args.greedy:
        if args.repetition_penalty is not None:
            raise PipelineError("--greedy takes the likeliest token: drop --repetition-penalty, or --greedy to sample")
        return {"do_sample": False, "repetition_penalty": 1.0}
    penalty = REPETITION_PENALTY if args.repetition_penalty is None else args.repetition_penalty
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "repetition_penalty": penalty}


def whole(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g} (--greedy for the likeliest token)")
    return value


def share(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


@dataclass
class Conversation:
    """Earlier turns go back into the prompt in the trained format, oldest dropped first when it gets too long."""

    tokenizer: Any
    template: str  # "alpaca" or "chat" (stages/common/templates.py)
    turns: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, message: str) -> str:
        messages = [
            {"role": role, "content": text}
            for asked, answer in self.turns
            for role, text in (("user", asked), ("assistant", answer))
        ]
        return render_chat([*messages, {"role": "user", "content": message}], self.tokenizer, self.template)

    def fit(self, message: str, tokens: Any, budget: int) -> str:
        while self.turns and len(tokens(self.prompt(message))) > budget:
            self.turns.pop(0)
        return self.prompt(message)


class Printer:
    """Prints streamed text as it comes, holding back only a tail that could be the start of `stop` (under the alpaca
    format a new `### ` section, where the answer ends), so a run-on never shows; `text` is the answer without it.
    Under a chat template the end-of-turn token ends the answer and nothing is held back (`stop` None)."""

    def __init__(self, out: Any = sys.stdout, stop: str | None = STOP) -> None:
        self.out, self.text, self.shown, self.stopped, self.stop = out, "", 0, False, stop

    def put(self, chunk: str) -> None:
        if self.stopped:
            return
        self.text += chunk
        cut = self.text.find(self.stop) if self.stop else -1
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        safe = len(self.text) if self.stopped else self._safe_length()
        self.out.write(self.text[self.shown : safe])
        self.out.flush()
        self.shown = safe

    def _safe_length(self) -> int:
        for keep in range(min(len(self.stop or ""), len(self.text)), 0, -1):
            if self.stop.startswith(self.text[-keep:]):
                return len(self.text) - keep
        return len(self.text)

    def end(self) -> str:
        self.out.write(self.text[self.shown :] + "\n")
        self.out.flush()
        return self.text.strip()


MAX_UNPACKED_BYTES = 8 * 2**30  # an adapter zip unpacks to far less (a 7B base at rank 64: about 0.3 GiB)


@contextmanager
def adapter_folder(path: Path) -> Iterator[Path]:
    """The adapter as a folder: a zip is unpacked (top-level files only, as the package stage writes it), streamed
    to disk in bounded memory, and refused before anything is written when it would unpack to more than the cap."""
    if path.is_dir() or not path.exists():
        yield path
        return
    if not zipfile.is_zipfile(path):
        raise PipelineError(f"{path}: neither an adapter folder nor a zip")
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp, zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
        for info in entries:
            name = Path(info.filename)
            if info.is_dir() or len(name.parts) != 1 or name.name.startswith("."):
                raise PipelineError(f"{path}: unexpected entry {info.filename!r} (an adapter zip is flat)")
        unpacked = sum(info.file_size for info in entries)
        if unpacked > MAX_UNPACKED_BYTES:
            raise PipelineError(
                f"{path}: unpacks to {unpacked / 2**30:.1f} GiB, more than an adapter's {MAX_UNPACKED_BYTES // 2**30}"
                " GiB; not an adapter zip"
            )
        for info in entries:
            with archive.open(info) as source, (Path(tmp) / info.filename).open("wb") as target:
                shutil.copyfileobj(source, target, 2**20)
        yield Path(tmp)


UNKNOWN_MAKING = {  # an adapter without params.json (made elsewhere): the base from --base, the seed's format
    "model": {"revision": None, "quantization": "none", "compute_dtype": "float32", "trust_remote_code": False},
    "tokenize": {"template": "alpaca"},
}


def made_with(folder: Path, base: str | None) -> dict[str, Any]:
    """The adapter's params.json (what it was trained with, checked as params are), `--base` replacing its base."""
    if not (folder / "params.json").is_file():
        if base is None:
            raise PipelineError(f"{folder}: no params.json to name the base model; pass --base")
        settings = UNKNOWN_MAKING
    else:
        settings = read_made_with(folder / "params.json", card=False)
    return {**settings, "model": {**settings["model"], **({"name": base} if base else {})}}


def base_params(settings: dict[str, Any], trust_remote_code: bool) -> Any:
    """The base to load: checked like params.yaml's model section; remote code only on the user's own flag."""
    from stages.common.params import ModelParams, parse_section

    model = parse_section(ModelParams, settings["model"], "model", "the adapter's params.json or --base")
    if model.trust_remote_code and not trust_remote_code:
        log.warning("the adapter's params.json asks for trust_remote_code: ignored (pass --trust-remote-code to allow)")
    if trust_remote_code:
        log.warning("--trust-remote-code: %s may run code from its model folder or repository", model.name)
    return untrusted(model, trust_remote_code)


def run(args: argparse.Namespace) -> int:
    import torch

    from stages.common.models import check_adapter_files, load_finetuned, load_tokenizer

    sampling = sampling_options(args)  # a contradiction in the options is one line before any loading
    with adapter_folder(args.adapter) as folder:
        check_adapter_files(folder)
        settings = made_with(folder, args.base)
        params = base_params(settings, args.trust_remote_code)
        model = load_finetuned(params, folder)
    tokenizer = load_tokenizer(params)
    template = trained_template(settings, tokenizer)
    log.info("asking in the %s format, as the adapter was trained", template)
    add_special_tokens = template == "alpaca"  # as in training: a chat template writes its own
    positions = getattr(model.config, "max_position_embeddings", None) or 2048
    if args.max_new_tokens > positions - 16:
        raise PipelineError(
            f"--max-new-tokens {args.max_new_tokens}: the model has {positions} positions; ask for at most "
            f"{positions - 16}, so a prompt still fits"
        )
    budget = positions - args.max_new_tokens

    def answer(prompt: str, adapter: bool) -> str:
        from transformers import TextStreamer

        printer = Printer(stop=STOP if template == "alpaca" else None)

        class Stream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                printer.put(text)

        torch.manual_seed(args.seed)
        batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).to(model.device)
        context = model.disable_adapter() if not adapter else nullcontext()
        with context, torch.inference_mode():
            model.generate(
                **batch,
                **sampling,
                max_new_tokens=args.max_new_tokens,
                streamer=Stream(tokenizer, skip_prompt=True, skip_special_tokens=True),
                **({"stop_strings": [STOP], "tokenizer": tokenizer} if template == "alpaca" else {}),
                pad_token_id=tokenizer.pad_token_id,
            )
        return printer.end()

    def respond(conversation: Conversation, message: str) -> None:
        prompt = conversation.fit(
            message, lambda text: tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"], budget
        )
        if args.compare:
            print("base:", flush=True)
            answer(prompt, adapter=False)
            print("fine-tuned:", flush=True)
        conversation.turns.append((message, answer(prompt, adapter=True)))

    conversation = Conversation(tokenizer, template)
    if args.prompt is not None:
        respond(conversation, args.prompt)
        return 0
    print(f"chatting with {params.name} + {args.adapter}; /reset forgets the conversation, /exit ends it", flush=True)
    return converse(conversation, respond)


def converse(conversation: Conversation, respond: Callable[[Conversation, str], None], read: Callable = input) -> int:
    """The conversation on the terminal: each message answered with the turns before it, `/reset` starting afresh,
    `/exit` (or Ctrl-D) ending it."""
    while True:
        try:
            message = read("you> ").strip()
        except EOFError:
            print()
            return 0
        if message in ("/exit", "/quit"):
            return 0
        if message == "/reset":
            conversation = Conversation(conversation.tokenizer, conversation.template)
        elif message:
            respond(conversation, message)
