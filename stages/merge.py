"""Fold the trained adapter into its base: one folder of full-precision safetensors with the tokenizer, the config and
a model card, loadable with plain `AutoModelForCausalLM.from_pretrained(folder)`, no peft needed.

    python -m stages.merge

Reads models/adapter/ and the evaluation metrics (for the card); writes models/merged/. A 4-bit base
(`model.quantization` nf4/fp4) is loaded unquantized for the merge: the LoRA update is added to the base's
full-precision weights, not to the 4-bit weights it was trained against, and the card says so. `export.dtype` is the
dtype of the saved weights (the merge itself is done in float32)."""

from __future__ import annotations

import logging

import torch

from stages.common.errors import run_stage
from stages.common.fragile import rename_base
from stages.common.io import atomic_path, write_json
from stages.common.made_with import read_made_with
from stages.common.model_card import evaluation_figures, model_card
from stages.common.models import DTYPES, check_finite_model, load_finetuned, load_tokenizer
from stages.common.params import ModelParams, load_params
from stages.common.paths import ADAPTER_DIR, MERGED_DIR
from stages.common.templates import ALPACA_JINJA, trained_template

log = logging.getLogger("pipeline")


def main() -> None:
    params = load_params()
    base = params.model
    unquantized = ModelParams(base.name, base.revision, "none", "float32", base.trust_remote_code)
    model = load_finetuned(unquantized, ADAPTER_DIR)
    merged = model.merge_and_unload().to(DTYPES[params.export.dtype])
    check_finite_model(merged, f"{MERGED_DIR} ({params.export.dtype})")
    rename_base(merged, params.model.name)
    tokenizer = load_tokenizer(params.model)
    made_with = read_made_with(ADAPTER_DIR / "params.json")
    if trained_template(made_with, tokenizer) == "alpaca":  # the trained format, for apply_chat_template and the GGUF
        tokenizer.chat_template = ALPACA_JINJA
    notes = [f"weights: {params.export.dtype}, base and LoRA update added in float32"]
    if params.model.quantization != "none":
        notes.append(
            f"merged into the unquantized base weights: the adapter was trained against the {params.model.quantization}"
            " 4-bit base, so this model's outputs differ slightly from the evaluated 4-bit base + adapter"
        )
    card = model_card(made_with, params.package.name, "merged", str(MERGED_DIR), evaluation_figures(), tuple(notes))
    with atomic_path(MERGED_DIR, directory=True) as tmp, torch.no_grad():
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_json(tmp / "params.json", made_with)
    log.info("base + adapter merged into %s weights", params.export.dtype)


if __name__ == "__main__":
    run_stage("merge", main)
