"""Bad input through the real stage commands: one line naming the file:line or key, exit code 2, and no output
written. Each row of the README's bad-input table points here or to the unit test that covers it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.dvc_project import env, make_project, run, set_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    root = make_project(tmp_path_factory.mktemp("bad-input"), tiny_model_dir)
    run(root, "python", "-m", "stages.prepare_subset")
    run(root, "python", "-m", "stages.tokenize")
    return root


@pytest.fixture
def project(prepared, tmp_path):
    target = tmp_path / "project"
    shutil.copytree(prepared, target)
    return target


def stage_fails(root, stage: str, expected: str, absent: str) -> None:
    result = subprocess.run(["python", "-m", f"stages.{stage}"], cwd=root, env=env(), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (root / absent).exists(), f"{absent} was written"


def test_malformed_json_line(project):
    (project / "data/raw/bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    set_params(project, {"data.source": "data/raw/bad.jsonl"})
    shutil.rmtree(project / "data/subset")
    stage_fails(project, "prepare_subset", "data/raw/bad.jsonl:2: malformed JSON", "data/subset")


def test_non_utf8_text(project):
    (project / "data/raw/bad.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "b"}\n')
    set_params(project, {"data.source": "data/raw/bad.jsonl"})
    shutil.rmtree(project / "data/subset")
    stage_fails(project, "prepare_subset", "data/raw/bad.jsonl:1: not UTF-8 text", "data/subset")


def test_eval_size_above_the_data(project):
    set_params(project, {"data.eval_size": 500})
    shutil.rmtree(project / "data/subset")
    stage_fails(project, "prepare_subset", "data.eval_size = 24 + 500 = 524 is more than the 175", "data/subset")


def test_unknown_param_key(project):
    set_params(project, {"lora.rank": 8})
    stage_fails(project, "finetune", "params.yaml: lora.rank is not a known key", "models/adapter")


def test_zero_learning_rate(project):
    set_params(project, {"train.learning_rate": 0})
    stage_fails(project, "finetune", "train.learning_rate must be in (0, 1], got 0", "models/adapter")


def test_four_bit_without_a_gpu(project):
    set_params(project, {"model.quantization": "nf4", "model.compute_dtype": "bfloat16"})
    stage_fails(project, "finetune", "model.quantization 'nf4' needs a CUDA GPU", "models/adapter")


def test_missing_model(project):
    set_params(project, {"model.name": "nobody/no-such-model"})
    shutil.rmtree(project / "data/tokenized")
    stage_fails(
        project, "tokenize", "model.name 'nobody/no-such-model': could not load the tokenizer", "data/tokenized"
    )


def test_missing_adapter_for_evaluation(project):
    (project / "metrics/perplexity.json").unlink()  # committed metrics: dvc removes an out before its stage runs
    stage_fails(project, "evaluate_ppl", "models/adapter: no trained adapter", "metrics/perplexity.json")


def test_empty_prompt_list(project):
    set_params(project, {"eval.generate.prompts": [], "eval.generate.held_out_prompts": 0})
    (project / "metrics/cosine.json").unlink()
    stage_fails(project, "evaluate_cosine", "eval.generate.prompts is empty", "metrics/cosine.json")
