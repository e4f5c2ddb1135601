"""The merged model as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile and a model card.

    python -m stages.export_gguf

Reads models/merged/ (the merge stage's plain weights) and the evaluation metrics (for the card); writes
models/gguf/: model.gguf (`export.gguf_type`: f16, bf16, q8_0 or f32, written by llama.cpp's converter,
stages/common/gguf_converter.py says how it is installed), Modelfile, README.md and round_trip.json: the GGUF read
back with transformers (`gguf_file=`) must give the merged folder's greedy answer to the first generation prompt,
token for token; where transformers cannot read the architecture (Phi-2) the file says the check was skipped."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from stages.common.errors import PipelineError, run_stage
from stages.common.gguf_converter import convert
from stages.common.io import atomic_path, write_json
from stages.common.made_with import read_made_with
from stages.common.model_card import evaluation_figures, model_card
from stages.common.models import check_finite_weights
from stages.common.params import load_params
from stages.common.paths import ADAPTER_DIR, GGUF_DIR, MERGED_DIR
from stages.common.templates import modelfile, render_chat, trained_template

log = logging.getLogger("pipeline")

GGUF_FILE = "model.gguf"
ROUND_TRIP_TOKENS = 32


@torch.no_grad()
def greedy_answer(model: Any, ids: torch.Tensor, eos_token_id: int) -> list[int]:
    out = model.generate(ids, max_new_tokens=ROUND_TRIP_TOKENS, do_sample=False, eos_token_id=eos_token_id)
    return out[0, ids.shape[1] :].tolist()


def round_trip(merged: Path, tokenizer: Any, gguf: Path, prompt: str, add_special_tokens: bool) -> dict[str, Any]:
    """Greedy answers of the merged folder and of the GGUF read back, both in float32 on CPU, and the largest
    difference of their next-token logits over the prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        exported = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        exported_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, NotImplementedError) as err:  # transformers reads a fixed list of architectures
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        log.warning("round trip not checked: transformers cannot read this GGUF back (%s)", reason)
        return {"checked": False, "reason": reason}
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"]
    exported_ids = exported_tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"]
    same_tokens = exported_ids.tolist() == ids.tolist()
    with torch.no_grad():
        logit_gap = (reference(ids).logits - exported(ids).logits).abs().max().item()
    expected = greedy_answer(reference, ids, tokenizer.eos_token_id)
    answer = greedy_answer(exported, ids, tokenizer.eos_token_id)
    return {
        "checked": True,
        "prompt": prompt,
        "same_prompt_tokens": same_tokens,
        "same_greedy_answer": answer == expected,
        "answer_tokens": len(expected),
        "max_logit_difference": round(logit_gap, 4),
        "answer": tokenizer.decode(answer, skip_special_tokens=True),
    }


def round_trip_note(check: dict[str, Any], gguf_type: str) -> str:
    if not check["checked"]:
        return f"round trip not checked: transformers cannot read this architecture's GGUF ({check['reason']})"
    verdict = "the same" if check["same_greedy_answer"] else "NOT the same"
    return (
        f"round trip: read back with transformers, this {gguf_type} GGUF gives {verdict} greedy answer as the merged "
        f"folder ({check['answer_tokens']} tokens; largest logit difference {check['max_logit_difference']})"
    )


def verify_round_trip(check: dict[str, Any], gguf_type: str, merged_dtype: str) -> None:
    """A GGUF whose logits are not finite, or a lossless one that answers differently, is a broken export."""
    if not check["checked"]:
        return
    gap = check["max_logit_difference"]
    if not math.isfinite(gap):
        raise PipelineError(f"{GGUF_DIR / GGUF_FILE}: read back, its logits are not finite; the export is not written")
    if not check["same_greedy_answer"] and lossless(gguf_type, merged_dtype):
        raise PipelineError(
            f"{GGUF_DIR / GGUF_FILE}: read back, the {gguf_type} GGUF answers differently from {MERGED_DIR} "
            f"(largest logit difference {gap}); the export is not written"
        )


def lossless(gguf_type: str, merged_dtype: str) -> bool:
    """Whether the GGUF holds the merged weights exactly, so that any other answer is a broken export."""
    return gguf_type == "f32" or (gguf_type, merged_dtype) in {("f16", "float16"), ("bf16", "bfloat16")}


def main() -> None:
    from transformers import AutoTokenizer

    params = load_params()
    if not (MERGED_DIR / "config.json").is_file():
        raise PipelineError(f"{MERGED_DIR}: no merged model (config.json missing); run the merge stage first")
    for weights in sorted(MERGED_DIR.glob("*.safetensors")):
        check_finite_weights(weights)
    gguf_type, name = params.export.gguf_type, params.package.name
    made_with = read_made_with(ADAPTER_DIR / "params.json")
    tokenizer = AutoTokenizer.from_pretrained(MERGED_DIR)
    template = trained_template(made_with, tokenizer)
    prompt = render_chat([{"role": "user", "content": params.eval.generate.prompts[0]}], tokenizer, template)
    with atomic_path(GGUF_DIR, directory=True) as tmp:
        convert(MERGED_DIR, tmp / GGUF_FILE, gguf_type, name)
        check = round_trip(MERGED_DIR, tokenizer, tmp / GGUF_FILE, prompt, template == "alpaca")
        verify_round_trip(check, gguf_type, params.export.dtype)
        write_json(tmp / "round_trip.json", check)
        (tmp / "Modelfile").write_text(modelfile(GGUF_FILE, template, tokenizer.eos_token), encoding="utf-8")
        notes = (
            f"GGUF type {gguf_type}, converted from the merged model ({params.export.dtype}) by llama.cpp's converter",
            round_trip_note(check, gguf_type),
        )
        card = model_card(made_with, name, "gguf", str(GGUF_DIR), evaluation_figures(), notes)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_json(tmp / "params.json", made_with)
    log.info("%s -> %s (%.1f MiB)", MERGED_DIR, GGUF_DIR / GGUF_FILE, (GGUF_DIR / GGUF_FILE).stat().st_size / 2**20)


if __name__ == "__main__":
    run_stage("export_gguf", main)
