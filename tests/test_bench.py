"""bench/finetune_speed.py: every row of every part runs the stage with params the stage accepts. The parts only run
on a GPU machine, so a profile change that breaks a row's overrides (as turning CUDA graphs on in the seed profile
once broke every eager row) would otherwise show only there."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from stages.common.params import parse_params
from tests.conftest import REPO


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_speed", REPO / "bench/finetune_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = load_bench()


@pytest.mark.parametrize("part", sorted(BENCH.PARTS))
def test_every_row_of_the_part_has_valid_params(part, tmp_path, monkeypatch):
    pipe = BENCH.Pipeline(tmp_path / "pipeline", tmp_path / "random-phi2", smoke=False, profile={})
    pipe.epoch_rows = BENCH.EPOCH_ROWS
    rows = []

    def finetune(label: str, overrides: dict[str, Any], memory_gib: float | None = None, profile: bool = True):
        parse_params(pipe.params(overrides), f"{part} row {label!r}")  # a one-line error naming the key if invalid
        rows.append(label)
        return {"stage_s": 0.0, "load_s": 0.0}

    monkeypatch.setattr(pipe, "finetune", finetune)
    monkeypatch.setattr(pipe, "stage_times", lambda stage, overrides: {"wall_s": 0.0, "load_s": 0.0})
    monkeypatch.setattr(pipe, "response_loss", lambda overrides: 0.0)
    BENCH.PARTS[part](pipe, lambda row: None, 8, 16)
    assert rows
