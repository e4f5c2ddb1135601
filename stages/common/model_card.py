"""The model card (README.md) that travels with the adapter folder and its zip: how it was made and how to load it.

Written from the resolved params only, so the same run gives the same bytes wherever it ran (peft's own card
records the absolute path of the base model, i.e. of the virtual environment)."""

from __future__ import annotations

from typing import Any


def model_card(params: dict[str, Any], title: str = "LoRA adapter") -> str:
    model, lora, train, data = params["model"], params["lora"], params["train"], params["data"]
    return "\n".join(
        [
            f"# {title} for {model['name']}",
            "",
            f"- base model: `{model['name']}` (revision {model['revision'] or 'latest'}, "
            f"quantization {model['quantization']}, compute {model['compute_dtype']})",
            f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
            f"target modules {lora['target_modules'] or 'peft default'}",
            f"- training: {train['epochs']} epoch(s), effective batch {train['effective_batch_size']}, "
            f"lr {train['learning_rate']}, weight decay {train['weight_decay']}, {train['precision']}",
            f"- data: `{data['source']}`, {data['train_size']} train / {data['eval_size']} eval rows, "
            f"seed {data['seed']}",
            "",
            "Load: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base>), <this folder>)`.",
            "Every setting is in `params.json`.",
            "",
        ]
    )
