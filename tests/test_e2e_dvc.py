"""End to end: the real `dvc` CLI runs the real stages in a temporary git repo, on a tiny random model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow
ALL_STAGES = {"prepare_subset", "tokenize", "finetune", "evaluate_ppl", "evaluate_cosine", "plot", "package_zip"}
BIN = Path(sys.executable).parent


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", result.stdout + result.stderr))


def set_params(root: Path, **changes) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = params
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def commit(root: Path, message: str) -> None:
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", message)


def copy_project(target: Path) -> None:
    listed = run(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    for name in listed:
        if (REPO / name).is_file() and name != "dvc.lock":
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)


TINY = {
    "data__train_size": 24, "data__eval_size": 8, "tokenize__max_length": 64,
    "train__epochs": 1, "train__micro_batch_size": 8, "train__logging_steps": 1,
    "eval__ppl__batch_size": 8, "eval__generate__max_new_tokens": 8, "eval__generate__held_out_prompts": 2,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("project")
    copy_project(root)
    run(root, "git", "init", "-q")
    set_params(root, model__name=str(tiny_model_dir), **TINY)
    commit(root, "pipeline on a tiny model")
    return root


def test_first_repro_runs_all_seven_stages(project):
    result = run(project, "dvc", "repro")
    assert stages_run(result) == ALL_STAGES
    for out in ("models/adapter/adapter_model.safetensors", "metrics/perplexity.json", "metrics/cosine.json",
                "metrics/train.json", "plots/perplexity.png", "reports/generations.md", "models/adapter.zip"):
        assert (project / out).is_file(), out
    commit(project, "first run")


def test_second_repro_runs_nothing(project):
    assert stages_run(run(project, "dvc", "repro")) == set()
    assert "up to date" in run(project, "dvc", "status").stdout.lower()


def test_eval_only_param_reruns_only_evaluation_and_plot(project):
    set_params(project, eval__generate__max_new_tokens=12, eval__ppl__batch_size=4)
    ran = stages_run(run(project, "dvc", "repro"))
    assert {"evaluate_ppl", "evaluate_cosine"} <= ran <= {"evaluate_ppl", "evaluate_cosine", "plot"}
    commit(project, "longer generations")


def test_lora_rank_reruns_finetune_and_what_follows(project):
    set_params(project, lora__r=8)
    ran = stages_run(run(project, "dvc", "repro"))
    assert ran == ALL_STAGES - {"prepare_subset", "tokenize"}


def test_metrics_diff_shows_the_changed_metrics(project):
    diff = json.loads(run(project, "dvc", "metrics", "diff", "--json").stdout)
    assert "metrics/perplexity.json" in diff and "metrics/train.json" in diff
    changed = diff["metrics/perplexity.json"]["finetuned.response"]
    assert changed["old"] != changed["new"]


def test_plots_show_writes_html_with_the_perplexity_plot(project, tmp_path):
    run(project, "dvc", "plots", "show", "-o", str(tmp_path / "html"))
    html = (tmp_path / "html" / "index.html").read_text()
    assert "Perplexity on the eval split" in html and "Train and eval loss" in html


def test_zip_holds_a_loadable_adapter(project, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zipfile.ZipFile(project / "models/adapter.zip").extractall(tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    assert model.peft_config["default"].r == 8
    assert json.loads((tmp_path / "adapter/params.json").read_text())["lora"]["r"] == 8
