"""dvc.yaml must list exactly what each stage reads: its modules (by import closure) and existing param keys."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO, load_yaml
from tests.dvc_project import STAGE_ORDER as STAGES

DVC = load_yaml(REPO / "dvc.yaml")
PARAMS = load_yaml(REPO / "params.yaml")


def module_closure(module: str, seen: set[str]) -> set[str]:
    path = module.replace(".", "/") + ".py"
    if path not in seen:
        seen.add(path)
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages."):
                module_closure(node.module, seen)
    return seen


def test_the_stages_in_order():
    assert list(DVC["stages"]) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_the_import_closure(stage):
    spec = DVC["stages"][stage]
    assert spec["cmd"].startswith(("python -m", "accelerate launch")) and spec["cmd"].endswith(f"-m stages.{stage}")
    code_deps = {d for d in spec["deps"] if d.startswith("stages/")}
    assert code_deps == module_closure(f"stages.{stage}", {"stages/__init__.py"})  # the package's CPU kernel pins


@pytest.mark.parametrize("stage", STAGES)
def test_declared_params_exist(stage):
    for key in DVC["stages"][stage]["params"]:
        node = PARAMS
        for part in key.split("."):
            assert part in node, f"{stage}: {key}"
            node = node[part]


def test_data_deps_and_outs_exist_in_paths_module():
    from stages.common import paths

    declared = {str(v) for v in vars(paths).values() if isinstance(v, Path)}
    for stage in STAGES:
        for out in DVC["stages"][stage].get("outs", []) + DVC["stages"][stage].get("metrics", []):
            name = out if isinstance(out, str) else next(iter(out))
            assert name in declared or name.startswith("plots/") or "${" in name, name


@pytest.mark.parametrize("stage", STAGES)
def test_sections_a_stage_records_as_provenance_are_declared_whole(stage):
    """A stage that records whole params sections (`params.sections("model", "lora", "train")` into the adapter's
    params.json) reads every key of them: dvc.yaml must declare each whole, or an edit there would not rerun it. The
    quick twin of tests/test_declared_params.py, which runs every stage."""
    recorded = set()
    for path in module_closure(f"stages.{stage}", set()):
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "sections":
                recorded |= {arg.value for arg in node.args if isinstance(arg, ast.Constant)}
    assert recorded <= set(DVC["stages"][stage]["params"]), (stage, recorded)
