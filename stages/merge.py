"""Fold the trained adapter into its base: one folder of full-precision safetensors with the tokenizer, the config and
a model card, loadable with plain `AutoModelForCausalLM.from_pretrained(folder)`, no peft needed.

    python -m stages.merge

Reads models/adapter/ and the evaluation metrics (for the card); writes models/merged/. A 4-bit base
(`model.quantization` nf4/fp4) is loaded unquantized for the merge: the LoRA update is added to the base's
full-precision weights, not to the 4-bit weights it was trained against, and the card says so. `export.dtype` is the
dtype of the saved weights (the merge itself is done in float32)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers

from stages.common.errors import run_stage
from stages.common.fragile import rename_base
from stages.common.io import atomic_path, read_json, write_json
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
    notes = [
        f"weights: {params.export.dtype}, base and LoRA update added in float32",
        f"made with transformers {transformers.__version__}; its config also gives RoPE the transformers 4.x way "
        "(`rope_theta`), so 4.x (checked: 4.57.1) reads the same positions",
    ]
    if params.model.quantization != "none":
        notes.append(
            f"merged into the unquantized base weights: the adapter was trained against the {params.model.quantization}"
            " 4-bit base, so this model's outputs differ slightly from the evaluated 4-bit base + adapter"
        )
    card = model_card(made_with, params.package.name, "merged", str(MERGED_DIR), evaluation_figures(), tuple(notes))
    with atomic_path(MERGED_DIR, directory=True) as tmp, torch.no_grad():
        merged.save_pretrained(tmp, safe_serialization=True)
        add_legacy_rope_keys(tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        write_json(tmp / "params.json", made_with)
    log.info("base + adapter merged into %s weights", params.export.dtype)


def add_legacy_rope_keys(config_file: Path) -> None:
    """Also write RoPE the way transformers 4.x reads it. transformers 5 saves it as `rope_parameters` only; 4.57 then
    loads the folder without a word but with its default `rope_theta` (10,000 for Llama, where SmolLM2 has 100,000)
    and answers differently. With `rope_theta` (and `rope_scaling` for a scaled type) beside it, both read the same
    RoPE; transformers 5 takes the copy as the same parameters (tests/test_ship.py)."""
    config = read_json(config_file)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return
    config["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    write_json(config_file, config)


if __name__ == "__main__":
    run_stage("merge", main)
