"""Using and shipping what the pipeline trained, through the real CLI on the tiny model: the merged model (plain
transformers, no peft) against base + adapter, the model cards' load snippets run as written, and `lora-dvc chat`
(one prompt, a conversation, --compare, a zip, and one line for each kind of broken adapter)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from tests.dvc_project import TINY_MODEL, copy_project, env, run, set_params

pytestmark = pytest.mark.slow
PROMPT = "### Instruction:\nName three colours.\n\n### Response:\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_project):
    """A copy of the trained tiny project: its run already merged (float16) and exported (f16 GGUF), the defaults."""
    return copy_project(trained_project[0], tmp_path_factory.mktemp("ship") / "project")


def logits_of(project, code: str) -> list[float]:
    """Last-position logits of PROMPT from `code` (which sets `model` and `tokenizer`), run in a fresh process where
    `import peft` fails unless the code does not need it."""
    script = "\n".join(
        [
            "import sys, json, torch",
            *(["sys.modules['peft'] = None  # no peft in this process"] if "peft" not in code else []),
            code,
            f"ids = tokenizer({PROMPT!r}, return_tensors='pt')",
            "with torch.no_grad():",
            "    print(json.dumps(model(**ids).logits[0, -1].float().tolist()))",
        ]
    )
    return json.loads(run(project, sys.executable, "-c", script).stdout.strip().splitlines()[-1])


BASE_PLUS_ADAPTER = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{TINY_MODEL}"), "models/adapter")
tokenizer = AutoTokenizer.from_pretrained("{TINY_MODEL}")
"""
MERGED = """
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("models/merged")
tokenizer = AutoTokenizer.from_pretrained("models/merged")
"""


def largest_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


GREEDY = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, gguf_file = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
extra = {"gguf_file": gguf_file} if gguf_file else {}
model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", **extra)
tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
ids = tokenizer(PROMPT, return_tensors="pt")
answer = model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=None)[0, ids["input_ids"].shape[1]:]
print(json.dumps(answer.tolist()))
""".replace("PROMPT", repr(PROMPT))


def greedy(project, folder: str, gguf_file: str | None = None) -> list[int]:
    """Sixteen greedy tokens (no stopping) from a folder or a GGUF file, read with plain transformers."""
    out = run(project, sys.executable, "-c", GREEDY, folder, *([gguf_file] if gguf_file else [])).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_gguf_export_reads_back_with_the_merged_models_greedy_answer(project):
    """f16 holds the float16 merged weights exactly: the same sixteen greedy tokens; q8_0 is about half the size and
    within its rounding: the same first eight tokens (this random model's next-token scores are so close together that
    8-bit rounding flips a later one). The Modelfile points at the file and stops where an answer ends."""
    expected = greedy(project, "models/merged")  # the defaults: float16 merged weights, an f16 GGUF
    assert greedy(project, "models/gguf", "model.gguf") == expected
    assert json.loads((project / "models/gguf/round_trip.json").read_text())["same_greedy_answer"] is True
    f16_size = (project / "models/gguf/model.gguf").stat().st_size
    modelfile = (project / "models/gguf/Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "### Instruction:"' in modelfile
    set_params(project, {"export.gguf_type": "q8_0"})
    ran = run(project, "dvc", "repro", "export_gguf")
    assert "Running stage 'merge'" not in ran.stdout  # only the export depends on the GGUF type
    assert (project / "models/gguf/model.gguf").stat().st_size < 0.7 * f16_size
    quantized = greedy(project, "models/gguf", "model.gguf")
    assert quantized[:8] == expected[:8]


def test_a_merged_model_the_converter_cannot_read_is_one_line_and_keeps_the_last_export(project):
    before = (project / "models/gguf/model.gguf").read_bytes()
    config = project / "models/merged/config.json"
    original = config.read_text()
    config.write_text(json.dumps(json.loads(original) | {"architectures": ["NoSuchModelForCausalLM"]}))
    try:
        result = run(project, sys.executable, "-m", "stages.export_gguf", check=False)
    finally:
        config.write_text(original)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "llama.cpp's converter failed" in errors[0] and "NoSuchModelForCausalLM" in errors[0], errors
    assert (project / "models/gguf/model.gguf").read_bytes() == before
    assert not list((project / "models").glob(".gguf.*.tmp"))


def test_the_merge_adds_the_update_in_float32_then_rounds_to_the_export_dtype(project):
    """The default float16 export holds exactly (base + update in float32) rounded once; folding in float16 would
    round twice and give other bits on some weights (checked here, so the test can tell the two apart)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def merged_in(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        base = AutoModelForCausalLM.from_pretrained(project / TINY_MODEL, dtype=dtype)
        model = PeftModel.from_pretrained(base, project / "models/adapter").merge_and_unload()
        return {name: tensor.to(torch.float16) for name, tensor in model.state_dict().items()}

    saved = load_file(str(project / "models/merged/model.safetensors"))
    in_float32, in_float16 = merged_in(torch.float32), merged_in(torch.float16)
    updated = [name for name in saved if name.endswith(("q_proj.weight", "v_proj.weight"))]
    assert updated and all(torch.equal(saved[name], in_float32[name]) for name in updated)
    assert any(not torch.equal(in_float16[name], in_float32[name]) for name in updated)


def test_the_merged_model_needs_no_peft_and_gives_base_plus_adapter_logits(project):
    reference = logits_of(project, BASE_PLUS_ADAPTER)
    # what the adapter changes at all: the base alone against base + adapter (the scale the tolerances are set by)
    adapter_effect = largest_gap(logits_of(project, MERGED.replace('"models/merged"', f'"{TINY_MODEL}"')), reference)
    # the default export.dtype: float16 weights, within half precision's rounding, far below the adapter's effect
    float16_gap = largest_gap(logits_of(project, MERGED), reference)
    assert float16_gap < adapter_effect / 10, (float16_gap, adapter_effect)
    set_params(project, {"export.dtype": "float32"})
    run(project, "dvc", "repro", "merge")
    float32_gap = largest_gap(logits_of(project, MERGED), reference)
    assert float32_gap < 1e-5 < adapter_effect / 100, (float32_gap, adapter_effect)  # float32 weights: rounding only


def card_parts(text: str) -> tuple[dict, list[str]]:
    front = yaml.safe_load(text.split("---\n")[1])
    return front, re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("where", ["models/merged/README.md", "models/adapter.zip:README.md", "models/gguf/README.md"])
def test_each_model_card_has_front_matter_figures_and_a_snippet_that_runs_as_written(project, where):
    if ":" in where:
        archive, member = where.split(":")
        text = zipfile.ZipFile(project / archive).read(member).decode()
    else:
        text = (project / where).read_text()
    front, snippets = card_parts(text)
    assert front["pipeline_tag"] == "text-generation" and front["library_name"] in ("peft", "transformers", "gguf")
    perplexity = json.loads((project / "metrics/perplexity.json").read_text())
    base, tuned = (perplexity[model]["response"] for model in ("base", "finetuned"))
    assert f"| perplexity, answer tokens only | {base:.3f} | {tuned:.3f} |" in text.splitlines()  # in its own row
    assert TINY_MODEL in text and "r=4" in text
    [snippet] = snippets
    answer = run(project, sys.executable, "-c", snippet).stdout
    assert answer.startswith("### Instruction:")  # it generated from the card's prompt


def chat(project, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = ["lora-dvc", "chat", "--max-new-tokens", "12", *args]  # sampled with the default seed: repeatable
    return subprocess.run(command, cwd=project, env=env(), capture_output=True, text=True, input=stdin, timeout=600)


def test_chat_answers_once_from_the_folder_and_from_the_zip_and_compares(project):
    once = chat(project, "--prompt", "Name three colours.")
    assert once.returncode == 0 and once.stdout.strip(), once.stderr
    from_zip = chat(project, "--adapter", "models/adapter.zip", "--prompt", "Name three colours.")
    assert from_zip.stdout == once.stdout  # same adapter, same seed: the same answer
    compared = chat(project, "--compare", "--prompt", "Name three colours.")
    lines = compared.stdout.splitlines()
    assert lines[0] == "base:" and "fine-tuned:" in lines


def test_chat_keeps_a_conversation_until_exit(project):
    result = chat(project, stdin="Name three colours.\nAnd two more.\n/reset\nHello\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("you> ") == 5  # three messages answered, /reset, then /exit


def broken_adapters(project, tmp_path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(project / "models/adapter", corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rank = tmp_path / "rank"
    shutil.copytree(project / "models/adapter", rank)
    config = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    other = project / "models/base/other"
    if not other.exists():
        shutil.copytree(project / TINY_MODEL, other)
        settings = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps(settings | {"hidden_size": 32, "intermediate_size": 64}))
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    non_finite = tmp_path / "non-finite"
    shutil.copytree(project / "models/adapter", non_finite)
    poison_first_tensor(non_finite / "adapter_model.safetensors")
    return {
        "missing": (["--adapter", str(tmp_path / "nothing")], r"no trained adapter \(adapter_config.json missing\)"),
        "non-finite": (["--adapter", str(non_finite)], r"adapter_model.safetensors: tensor \S+ holds NaN or infinite"),
        "corrupt": (["--adapter", str(corrupt)], r"adapter_model.safetensors: not a readable safetensors file"),
        "rank file": (["--adapter", str(rank)], r"does not fit base model 'models/base/tiny': size mismatch"),
        "wrong base": (["--base", "models/base/other"], r"does not fit base model 'models/base/other': size mismatch"),
    }


def test_a_broken_or_mismatched_adapter_is_one_line(project, tmp_path):
    for case, (args, message) in broken_adapters(project, tmp_path).items():
        result = chat(project, *args, "--prompt", "hi")
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and re.search(message, errors[0]), (case, result.stderr)
        assert "Traceback" not in result.stderr, case


def poison_first_tensor(weights) -> None:
    """A NaN in the first tensor of a safetensors file, as a damaged download or a tampered file would have."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(weights))


def one_error(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def test_non_finite_weights_stop_evaluation_and_export_and_keep_the_last_outputs(project, tmp_path):
    for weights, stage, kept in [
        ("models/adapter/adapter_model.safetensors", "evaluate_ppl", "metrics/perplexity.json"),
        ("models/merged/model.safetensors", "export_gguf", "models/gguf/round_trip.json"),
    ]:
        saved, before = (project / weights).read_bytes(), (project / kept).read_bytes()
        poison_first_tensor(project / weights)
        try:
            error = one_error(run(project, sys.executable, "-m", f"stages.{stage}", check=False))
        finally:
            (project / weights).write_bytes(saved)
        assert f"{weights}: tensor" in error and "NaN or infinite" in error, error
        assert (project / kept).read_bytes() == before


def test_a_gguf_that_answers_differently_fails_the_round_trip(project, tmp_path):
    """The export's own check against a GGUF whose output norm was flipped: a lossless type must answer the same."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from stages.common.errors import PipelineError
    from stages.export_gguf import round_trip, verify_round_trip

    tampered = tmp_path / "model.gguf"
    shutil.copy(project / "models/gguf/model.gguf", tampered)
    reader = GGUFReader(tampered, "r+")
    norm = next(tensor for tensor in reader.tensors if tensor.name == "output_norm.weight")
    norm.data[:] = -norm.data
    reader.data.flush()
    merged = project / "models/merged"
    check = round_trip(merged, AutoTokenizer.from_pretrained(merged), tampered, PROMPT, False)
    assert check["checked"] and not check["same_greedy_answer"], check
    with pytest.raises(PipelineError, match="the f16 GGUF answers differently"):
        verify_round_trip(check, "f16", "float16")


EVIL_CODE = """import pathlib
pathlib.Path(MARKER).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def test_a_shared_zip_cannot_turn_on_code_from_a_model_folder(project, tmp_path):
    """A zip's params.json names a local model folder with code and switches trust_remote_code on: chat ignores it
    and says so; only the user's --trust-remote-code runs that code (which shows the folder's code would run)."""
    evil = project / "models/base/evil"
    shutil.copytree(project / TINY_MODEL, evil)
    marker = tmp_path / "pwned"
    (evil / "evil.py").write_text(EVIL_CODE.replace("MARKER", repr(str(marker))))
    config = json.loads((evil / "config.json").read_text())
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config | {"auto_map": auto_map}))
    shared = tmp_path / "shared.zip"
    with zipfile.ZipFile(project / "models/adapter.zip") as source, zipfile.ZipFile(shared, "w") as out:
        for name in source.namelist():
            data = source.read(name)
            if name == "params.json":
                settings = json.loads(data)
                settings["model"] |= {"name": "models/base/evil", "trust_remote_code": True}
                data = json.dumps(settings).encode()
            out.writestr(name, data)
    modules = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = ["lora-dvc", "chat", "--max-new-tokens", "4", "--adapter", str(shared), "--prompt", "hi"]
    ignored = subprocess.run(command, cwd=project, env=env() | modules, capture_output=True, text=True, timeout=600)
    assert not marker.exists(), ignored.stderr[-2000:]
    assert "params.json asks for trust_remote_code: ignored" in ignored.stderr
    trusted = [*command, "--trust-remote-code"]
    subprocess.run(trusted, cwd=project, env=env() | modules, capture_output=True, text=True, timeout=600)
    assert marker.read_text() == "ran"


def test_chat_refuses_more_new_tokens_than_the_model_has_positions(project):
    error = one_error(chat(project, "--max-new-tokens", "100000000", "--prompt", "hi"))
    assert "--max-new-tokens 100000000: the model has 512 positions" in error


def test_a_second_finetune_in_the_same_checkout_stops_in_one_line(project):
    from stages.common.errors import one_at_a_time

    with one_at_a_time(project / "stages/finetune.py", "finetune"):
        result = run(project, sys.executable, "-m", "stages.finetune", check=False)
    assert "another finetune is running in this checkout" in one_error(result)
