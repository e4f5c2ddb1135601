"""Each stage declares in dvc.yaml exactly the param keys it reads: a key read but not declared would leave the
stage up to date (stale) after that key changes; a key declared but not read reruns it for nothing. The keys read
are recorded while each stage's real main() runs on a tiny project."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import yaml

from stages.common.params import Params, load_params
from tests.dvc_project import STAGE_ORDER as ORDER
from tests.dvc_project import make_project

pytestmark = pytest.mark.slow


class Recorder:
    """Stands in for Params (or a section of it): every leaf key read is noted with its dotted name."""

    def __init__(self, node, prefix: str, seen: set[str]) -> None:
        self._node, self._prefix, self._seen = node, prefix, seen

    def __getattr__(self, name: str):
        value = getattr(self._node, name)
        if callable(value):
            return value
        key = f"{self._prefix}{name}"
        if dataclasses.is_dataclass(value):
            return Recorder(value, f"{key}.", self._seen)
        self._seen.add(key)
        return value

    def sections(self, *names: str) -> dict:
        for name in names:
            self._seen.update(f"{name}.{field.name}" for field in dataclasses.fields(getattr(self._node, name)))
        return self._node.sections(*names)


def leaves(node, prefix: str) -> set[str]:
    if not dataclasses.is_dataclass(node):
        return {prefix}
    return set().union(*(leaves(getattr(node, f.name), f"{prefix}.{f.name}") for f in dataclasses.fields(node)))


def leaf_keys(params: Params, declared: list[str]) -> set[str]:
    """dvc.yaml's entries (a section or a dotted key) as the leaf keys they cover."""
    covered: set[str] = set()
    for entry in declared:
        node = params
        for part in entry.split("."):
            node = getattr(node, part)
        covered |= leaves(node, entry)
    return covered


@pytest.fixture(scope="module")
def read_by_stage(tmp_path_factory, tiny_model_dir):
    import os

    root = make_project(tmp_path_factory.mktemp("declared"), tiny_model_dir)
    previous = os.getcwd()
    os.chdir(root)
    seen: dict[str, set[str]] = {}
    try:
        for stage in ORDER:
            module = importlib.import_module(f"stages.{stage}")
            seen[stage] = set()
            real = load_params()
            module.load_params = lambda real=real, keys=seen[stage]: Recorder(real, "", keys)
            try:
                module.main()
            finally:
                module.load_params = load_params
        declared = yaml.safe_load(open("dvc.yaml"))["stages"]
        params = load_params()
    finally:
        os.chdir(previous)
    return seen, {stage: leaf_keys(params, declared[stage].get("params", [])) for stage in ORDER}, params


@pytest.mark.parametrize("stage", ORDER)
def test_a_stage_declares_exactly_the_params_it_reads(read_by_stage, stage):
    seen, declared, _ = read_by_stage
    assert seen[stage], f"{stage} read no param: the recorder missed its load_params"
    assert seen[stage] - declared[stage] == set(), f"{stage} reads undeclared params"
    assert declared[stage] - seen[stage] == set(), f"{stage} declares params it does not read"
