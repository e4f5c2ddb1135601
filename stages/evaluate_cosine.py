"""Generations of the base and the fine-tuned model, side by side, compared with a sentence embedder.

    python -m stages.evaluate_cosine

Reads models/adapter/, data/subset/eval.jsonl (held-out instructions and their reference answers) and the
embedder `eval.generate.embedder`; writes metrics/cosine.json and reports/generations.md.
Generation is greedy (deterministic), KV-cached and batched (both models in one batch), in the trained prompt format
(data/tokenized/meta.json's template). Besides the base-vs-fine-tuned cosine it reports each model's cosine to the
reference answer, answer length in words, and the outputs that run on past the answer, by the rule that caught each
(`run_on_rule`: token limit, a template heading or role label echoed, a new turn's special token, a repeated
paragraph or phrase).
"""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from stages.common.decode import can_replay, greedy
from stages.common.errors import PipelineError, run_stage
from stages.common.io import atomic_path, read_jsonl, write_json
from stages.common.models import check_token_budget, load_finetuned, load_tokenizer, resolve_model
from stages.common.params import Params, load_params
from stages.common.paths import ADAPTER_DIR, COSINE_METRICS, GENERATIONS_REPORT, SUBSET_DIR
from stages.common.records import check_record
from stages.common.templates import generation_prompt, render_chat
from stages.common.tokenized import load_meta

log = logging.getLogger("pipeline")

REPEAT_NGRAM = 6  # words; an n-gram seen three times counts as repeated text


@dataclass(frozen=True)
class Prompt:
    text: str  # the instruction shown in reports
    model_input: str  # the formatted prompt the model sees
    reference: str | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    hit_limit: bool
    turn_marker: bool = False  # a special token of the template (a new turn) inside the answer


def build_prompts(params: Params, tokenizer: Any, template: str) -> list[Prompt]:
    """Configured prompts first (each checked), then held-out eval records whose prompt fits max_length: each asked
    in the trained format (`template`), a conversation with its earlier turns, its last answer the reference."""
    limit = params.tokenize.max_length

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=template == "alpaca")["input_ids"])

    prompts = []
    for i, text in enumerate(params.eval.generate.prompts):
        if not text.strip():
            raise PipelineError(f"eval.generate.prompts[{i}] is empty")
        formatted = render_chat([{"role": "user", "content": text}], tokenizer, template)
        if length(formatted) > limit:
            raise PipelineError(
                f"eval.generate.prompts[{i}] is {length(formatted)} tokens, longer than tokenize.max_length ({limit})"
            )
        prompts.append(Prompt(text, formatted))
    wanted = params.eval.generate.held_out_prompts
    for _, raw in read_jsonl(SUBSET_DIR / "eval.jsonl"):
        if wanted == 0:
            break
        record = check_record(raw, "eval record")
        formatted, reference = generation_prompt(record, template, tokenizer)
        if length(formatted) <= limit:
            prompts.append(Prompt(shown_question(record), formatted, reference))
            wanted -= 1
    if not prompts:
        raise PipelineError(
            "eval.generate.prompts is empty and eval.generate.held_out_prompts is 0: nothing to compare"
        )
    longest = max(length(p.model_input) for p in prompts)
    check_token_budget(
        params.model, longest + params.eval.generate.max_new_tokens, "longest prompt + eval.generate.max_new_tokens"
    )
    return prompts


def shown_question(record: dict[str, Any]) -> str:
    """What the report shows as the question: the instruction (and input), or a conversation's last user turn."""
    if "messages" in record:
        return record["messages"][-2]["content"]
    return record["instruction"] + (f"\n\nInput: {record['input']}" if record["input"] else "")


BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
# Attention kernels for decoding, cuDNN's left out: it builds an execution plan for every new key length, i.e. every
# generated token. On an H100 the first 128-token loop took 20 s and the same loop again 5 s.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def replayed_answers(model: Any, batch: Any, max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
    """The fine-tuned model's answers, then the base model's (adapter off), each decoded on its own graph."""
    answers = []
    for adapter_off in (False, True):
        with model.disable_adapter() if adapter_off else contextlib.nullcontext():
            tokens = greedy(
                model, batch["input_ids"], batch["attention_mask"], max_new_tokens, eos_token_id, replay=True
            )
        answers += tokens.tolist()
    return answers


@torch.no_grad()
def generate_both(
    model: Any, tokenizer: Any, prompts: list[Prompt], max_new_tokens: int, batch_size: int, template: str
) -> tuple[list[Generation], list[Generation]]:
    """Greedy, left-padded, KV-cached generations of the fine-tuned and the base model: (fine-tuned, base).

    On a GPU each model decodes its batch over a static cache with every token replayed from one CUDA graph
    (`stages.common.decode`). Elsewhere `generate` runs each batch's prompts twice, once with the adapter and once
    without (peft's mixed-adapter batches), so both models decode in one loop of 2n rows for about the cost of n."""
    tokenizer.padding_side = "left"
    add_special_tokens = template == "alpaca"  # a chat template writes its own
    markers = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id, tokenizer.pad_token_id}
    replay = can_replay(model)
    tuned, base = [], []
    started = time.perf_counter()
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate fine-tuned + base"):
        chunk = [p.model_input for p in prompts[start : start + batch_size]]
        rows = chunk if replay else chunk + chunk
        batch = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(
            model.device
        )
        with sdpa_kernel(DECODE_ATTENTION):
            if replay:
                answers = replayed_answers(model, batch, max_new_tokens, tokenizer.eos_token_id)
            else:
                answers = model.generate(
                    **batch,
                    adapter_names=["default"] * len(chunk) + [BASE] * len(chunk),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )[:, batch["input_ids"].shape[1] :].tolist()
        outputs = []
        for ids in answers:
            ended = tokenizer.eos_token_id in ids
            answer = ids[: ids.index(tokenizer.eos_token_id)] if ended else ids
            text = tokenizer.decode(answer, skip_special_tokens=True).strip()
            outputs.append(Generation(text, not ended, any(i in markers for i in answer)))
        tuned += outputs[: len(chunk)]
        base += outputs[len(chunk) :]
    tokenizer.padding_side = "right"
    how = "each token replayed from a CUDA graph" if replay else "generate, both models in one batch"
    log.info("generated %d answers per model in %.1f s (%s)", len(prompts), time.perf_counter() - started, how)
    return tuned, base


HEADING = re.compile(  # a template heading or role label at the start of a line: "### Output:", "User:"
    r"^\s*#{1,6}\s*\w[\w ]{0,30}:?\s*$|^\s*(instruction|input|response|output|user|assistant|system)\s*:",
    re.MULTILINE | re.IGNORECASE,
)
PARAGRAPH_MIN = 40  # characters; a paragraph at least this long seen twice is repeated text
RUN_ON_RULES = ("token_limit", "heading_echo", "turn_marker", "repeated_paragraph", "repeated_phrase")


def run_on_rule(generation: Generation) -> str | None:
    """Which rule says the output did not stop at its answer (None: it did). In order: it hit the token limit; it
    echoes a template heading or role label; it starts a new turn (a special token of the template inside the answer);
    it repeats a paragraph; it repeats a 6-word phrase three times."""
    if generation.hit_limit:
        return "token_limit"
    if HEADING.search(generation.text):
        return "heading_echo"
    if generation.turn_marker:
        return "turn_marker"
    paragraphs = [" ".join(p.split()).casefold() for p in re.split(r"\n\s*\n", generation.text)]
    long = [p for p in paragraphs if len(p) >= PARAGRAPH_MIN]
    if len(set(long)) < len(long):
        return "repeated_paragraph"
    words = re.findall(r"\w+", generation.text.lower())
    ngrams = [tuple(words[i : i + REPEAT_NGRAM]) for i in range(len(words) - REPEAT_NGRAM + 1)]
    if any(ngrams.count(g) >= 3 for g in set(ngrams)):
        return "repeated_phrase"
    return None


def word_count(text: str) -> int:
    return len(re.findall(r"\w+", text))


def load_embedder(spec: str) -> Any:
    from sentence_transformers import SentenceTransformer

    source = resolve_model(spec, "eval.generate.embedder").path
    try:
        # safetensors only: a pickled checkpoint (pytorch_model.bin) can run code when loaded
        return SentenceTransformer(
            source, device="cpu", trust_remote_code=False, model_kwargs={"use_safetensors": True}
        )
    except (OSError, ValueError) as err:
        raise PipelineError(f"eval.generate.embedder '{spec}': could not load: {str(err).splitlines()[0]}") from None


def cosine(embedder: Any, a: list[str], b: list[str]) -> list[float]:
    ea = embedder.encode(a, convert_to_tensor=True, normalize_embeddings=True)
    eb = embedder.encode(b, convert_to_tensor=True, normalize_embeddings=True)
    return (ea * eb).sum(dim=1).tolist()


def compare(prompts: list[Prompt], base: list[Generation], tuned: list[Generation], embedder: Any) -> dict[str, Any]:
    between = cosine(embedder, [g.text for g in base], [g.text for g in tuned])
    with_ref = [i for i, p in enumerate(prompts) if p.reference]
    refs = [prompts[i].reference for i in with_ref]

    def to_reference(outputs: list[Generation]) -> dict[int, float]:
        if not with_ref:
            return {}
        return dict(zip(with_ref, cosine(embedder, [outputs[i].text for i in with_ref], refs), strict=True))

    base_ref, tuned_ref = to_reference(base), to_reference(tuned)
    per_prompt = [
        {
            "prompt": p.text,
            "cosine": round(between[i], 4),
            "base_to_reference": round(base_ref[i], 4) if i in base_ref else None,
            "finetuned_to_reference": round(tuned_ref[i], 4) if i in tuned_ref else None,
            "base_words": word_count(base[i].text),
            "finetuned_words": word_count(tuned[i].text),
            "base_run_on_rule": run_on_rule(base[i]),
            "finetuned_run_on_rule": run_on_rule(tuned[i]),
        }
        for i, p in enumerate(prompts)
    ]
    summary = {
        "mean": round(statistics.fmean(between), 4),
        "prompts": len(prompts),
        "words": {
            "base": statistics.fmean(r["base_words"] for r in per_prompt),
            "finetuned": statistics.fmean(r["finetuned_words"] for r in per_prompt),
        },
        "runs_on_share": {
            model: statistics.fmean(r[f"{model}_run_on_rule"] is not None for r in per_prompt)
            for model in ("base", "finetuned")
        },
        "run_on_rules": {
            model: {rule: sum(r[f"{model}_run_on_rule"] == rule for r in per_prompt) for rule in RUN_ON_RULES}
            for model in ("base", "finetuned")
        },
    }
    if with_ref:
        summary["to_reference"] = {
            "base": round(statistics.fmean(base_ref.values()), 4),
            "finetuned": round(statistics.fmean(tuned_ref.values()), 4),
        }
    return {**summary, "per_prompt": per_prompt}


REFERENCE_CHARS = 2000  # a reference answer quoted in the git-tracked report: enough to judge the generations by


def shortened(text: str, limit: int = REFERENCE_CHARS) -> str:
    """`text`, or its first `limit` characters and a note of how many more there were."""
    return text if len(text) <= limit else f"{text[:limit]} ... ({len(text) - limit} more characters)"


def markdown_report(
    prompts: list[Prompt], base: list[Generation], tuned: list[Generation], metrics: dict[str, Any]
) -> str:
    lines = [
        "# Generations: base vs fine-tuned",
        "",
        f"Greedy decoding. Mean cosine (base vs fine-tuned): **{metrics['mean']}**.",
        "",
    ]
    for i, (p, row) in enumerate(zip(prompts, metrics["per_prompt"], strict=True), start=1):
        rules = f"run-on: base {row['base_run_on_rule'] or 'no'}, fine-tuned {row['finetuned_run_on_rule'] or 'no'}"
        lines += [f"## {i}. {p.text.splitlines()[0]}", "", f"cosine {row['cosine']}; {rules}", ""]
        lines += ["| base | fine-tuned |", "|---|---|"]
        cell = lambda g: g.text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"  # noqa: E731
        lines += [f"| {cell(base[i - 1])} | {cell(tuned[i - 1])} |", ""]
        if p.reference:
            quoted = "\n".join(f"> {line}" for line in shortened(p.reference.strip()).splitlines())
            lines += ["Reference answer:", "", quoted, ""]
    return "\n".join(lines)


def main() -> None:
    params = load_params()
    settings = params.eval.generate
    tokenizer = load_tokenizer(params.model)
    template = load_meta().template
    prompts = build_prompts(params, tokenizer, template)
    embedder = load_embedder(settings.embedder)
    model = load_finetuned(params.model, ADAPTER_DIR)
    tuned, base = generate_both(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size, template)
    metrics = compare(prompts, base, tuned, embedder)
    log.info(
        "mean cosine %.3f over %d prompts; words base %.0f -> fine-tuned %.0f; run-on %.2f -> %.2f",
        metrics["mean"],
        len(prompts),
        metrics["words"]["base"],
        metrics["words"]["finetuned"],
        metrics["runs_on_share"]["base"],
        metrics["runs_on_share"]["finetuned"],
    )
    with atomic_path(GENERATIONS_REPORT) as tmp:
        tmp.write_text(markdown_report(prompts, base, tuned, metrics), encoding="utf-8")
    write_json(COSINE_METRICS, metrics)


if __name__ == "__main__":
    run_stage("evaluate_cosine", main)
