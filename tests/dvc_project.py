"""Helpers for tests that drive the real `dvc` CLI in a copy of this repo, on a tiny model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from stages.common.params import with_overrides
from tests.conftest import REPO

BIN = Path(sys.executable).parent
STAGE_ORDER = [  # dvc.yaml's stages in order (tests/test_dvc_yaml.py checks it)
    *("prepare_subset", "tokenize", "finetune", "evaluate_ppl", "evaluate_cosine", "evaluate_harness", "plot"),
    "package_zip",
    "merge",  # after the seven: base + adapter folded into plain weights
    "export_gguf",  # and that as GGUF for llama.cpp and Ollama
]
ALL_STAGES = set(STAGE_ORDER)
TINY = {
    "data.train_size": 24,
    "data.eval_size": 8,
    "tokenize.max_length": 64,
    "train.epochs": 1,
    "train.micro_batch_size": 8,
    "train.logging_steps": 1,
    "eval.ppl.batch_size": 8,
    "eval.generate.max_new_tokens": 8,
    "eval.generate.held_out_prompts": 2,
}


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", result.stdout + result.stderr))


def set_params(root: Path, changes: dict) -> None:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(with_overrides(yaml.safe_load(path.read_text()), changes), sort_keys=False))


def commit(root: Path, message: str) -> None:
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", message)


TINY_MODEL = "models/base/tiny"  # where make_project puts the tiny model: local models live under models/base/


def make_project(target: Path, model_dir: Path, changes: dict | None = None) -> Path:
    """A git repo holding this repo's files (no dvc.lock, no outputs of a run here), the tiny model copied into its
    models/base/ and params switched to it, committed."""
    listed = run(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard").stdout.split()
    for name in listed:
        if (REPO / name).is_file() and name != "dvc.lock":
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    shutil.copytree(model_dir, target / TINY_MODEL)
    run(target, "git", "init", "-q")
    set_params(target, {"model.name": TINY_MODEL, **TINY, **(changes or {})})
    commit(target, "pipeline on a tiny model")
    return target


def copy_project(project: Path, target: Path) -> Path:
    """A copy of a project, git history, DVC cache and outputs included, that a test may change freely."""
    shutil.copytree(project, target, symlinks=True)
    return target
