"""bench/finetune_speed.py: every row of every part runs the stage with params the stage accepts. The parts only run
on a GPU machine, so a profile change that breaks a row's overrides (as turning CUDA graphs on in the seed profile
once broke every eager row) would otherwise show only there."""

from __future__ import annotations

import functools
import importlib.util
import json
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


@pytest.mark.parametrize("name", [*sorted(BENCH.EXECUTIONS), *(f"{n}@bf16" for n in sorted(BENCH.EXECUTIONS))])
def test_every_wholerun_execution_has_valid_params(name, tmp_path):
    pipe = BENCH.Pipeline(tmp_path / "pipeline", tmp_path / "random-phi2", smoke=False, profile={})
    levers = BENCH.execution(name)
    params = parse_params(pipe.params(levers), f"wholerun lever {name!r}")
    for dotted, value in levers.items():  # each lever reaches the params the stage reads
        assert functools.reduce(getattr, dotted.split("."), params) == value, dotted


def test_the_wholerun_table_divides_by_the_faster_seed_reading_and_the_matching_peer():
    row = {"epoch_s": 10.0, "s_per_step": 0.1, "peak_gib": 1.0, "eval_loss": 1.0, "warm_up_s": 1.0}
    report = {
        "baselines": {
            "seed_literal": {"epoch_s": 600.0, "s_per_step": 2.0, "peak_gib": 4.0, "epoch_s_is_estimate": True},
            "seed_kbit_prep": {"epoch_s": 1000.0, "s_per_step": 3.0, "peak_gib": 3.0, "epoch_s_is_estimate": True},
            "trl_qlora": {"epoch_s": 100.0, "s_per_step": 0.3, "peak_gib": 17.0, "epoch_s_is_estimate": True},
            "trl_bf16_liger": {"epoch_s": 50.0, "s_per_step": 0.2, "peak_gib": 19.0, "epoch_s_is_estimate": True},
        },
        "pipeline_4bit": row,
        "pipeline_bf16": row | {"epoch_s": 20.0},
        "levers": [],
    }
    lines = {line.split()[0]: line.split() for line in BENCH.wholerun_table(report).splitlines()[1:]}
    assert lines["pipeline_4bit"][-2:] == ["60.0x", "10.00x"]  # 600 / 10 (the literal seed is faster), 100 / 10
    assert lines["pipeline_bf16"][-2:] == ["30.0x", "2.50x"]  # 600 / 20, TRL bf16's 50 / 20


@pytest.mark.parametrize(
    ("name", "count", "device"),
    [("NVIDIA H100 80GB HBM3", 1, "h100"), ("NVIDIA H200", 2, "2xh200"), ("NVIDIA A100-SXM4-80GB", 1, "a100sxm480gb")],
)
def test_a_result_file_is_named_after_the_gpu_model(name, count, device, monkeypatch):
    """The file's device part is the card's model, not the last word of its name (an H100's is HBM3)."""
    monkeypatch.setattr(BENCH.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(BENCH.torch.cuda, "get_device_name", lambda index=0: name)
    monkeypatch.setattr(BENCH.torch.cuda, "device_count", lambda: count)
    assert BENCH.result_stem("long_context").split("_")[:3] == ["long", "context", device]


def load_long_context(monkeypatch) -> Any:
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("long_context", REPO / "bench/long_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_long_context_pipeline_try_has_valid_params(tmp_path, monkeypatch):
    """The profile's rows only run on a GPU: a fallback the params refuse (checkpointing under the seed profile's
    CUDA graphs) would show only there, as a row that never ran."""
    long_context = load_long_context(monkeypatch)
    pipe = BENCH.Pipeline(
        tmp_path / "pipeline", tmp_path / "random-llama", smoke=False, profile=long_context.PROFILE,
        model_link=long_context.MODEL_LINK,
    )  # fmt: skip
    tries = [*long_context.PIPELINE_TRIES, *long_context.FLOAT32_TRIES]
    for label, overrides in tries:
        params = parse_params(pipe.params(overrides), f"long_context try {label!r}")
        for dotted, value in overrides.items():
            assert functools.reduce(getattr, dotted.split("."), params) == value, dotted
    assert len(tries) == 3


def test_the_long_context_seed_table_averages_each_row_against_trl(tmp_path, monkeypatch):
    long_context = load_long_context(monkeypatch)
    files = []
    losses = {42: (11.0, 10.5, 10.0), 43: (12.0, 12.5, 12.5), 44: (13.0, None, 12.0)}  # pipeline, fp32, TRL
    devices = {42: "NVIDIA H100 80GB HBM3", 43: "NVIDIA H100 80GB HBM3", 44: "NVIDIA H200"}
    for seed, (pipeline_loss, fp32_loss, trl_loss) in losses.items():
        rows = {
            "pipeline": {"epoch_s": 10.0, "eval_loss": pipeline_loss},
            "pipeline_fp32": {"epoch_s": 12.0, "eval_loss": fp32_loss},
            "trl": {"epoch_s": 30.0, "eval_loss": trl_loss},
        }
        if fp32_loss is None:  # a row that ran at some seeds only
            del rows["pipeline_fp32"]
        run = {"command": f"python bench/long_context.py --seed {seed}", "profile": {"base_eval_loss": 14.0}}
        run["device"] = devices[seed]
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(run | {"rows": rows}))
    lines = long_context.seed_summary(files).splitlines()
    assert [line.split()[:3] for line in lines[1:6]] == [
        ["42", "H100", "pipeline"], ["42", "H100", "pipeline_fp32"], ["43", "H100", "pipeline"],
        ["43", "H100", "pipeline_fp32"], ["44", "H200", "pipeline"],
    ]  # fmt: skip
    assert [line.split()[-1] for line in lines[1:6]] == ["+1.0000", "+0.5000", "-0.5000", "+0.0000", "+1.0000"]
    assert lines[2].split()[5] == "2.50x"  # TRL's 30 s over the row's 12
    # pipeline: mean gap (1.0 - 0.5 + 1.0) / 3; drops 14 - 12.0 = 2.0 against 14 - 11.5 = 2.5
    assert "gap +0.5000 (standard error 0.5000)" in lines[6] and "2.0000 against TRL's 2.5000 (0.800x)" in lines[6]
    # pipeline_fp32: against TRL at its own two seeds only (11.25), not at all three
    assert lines[7] == (
        "pipeline_fp32, mean over 2: speedup 2.50x, eval loss gap +0.2500 (standard error 0.2500); "
        "loss drop from the base 2.5000 against TRL's 2.7500 (0.909x)"
    )
    assert lines[8] == "pipeline_fp32 minus pipeline, same seeds: -0.5000 +0.5000; mean +0.0000"


def test_the_long_context_seed_table_shows_a_small_loss_drop_to_its_significant_digits(tmp_path, monkeypatch):
    """The CPU float32 check moves the loss by 0.004: its gaps (1e-5) must not print as +0.0000."""
    long_context = load_long_context(monkeypatch)
    rows = {"pipeline": {"epoch_s": 10.0, "eval_loss": 11.769375}, "trl": {"epoch_s": 30.0, "eval_loss": 11.769397}}
    run = {"command": "python bench/long_context.py --smoke --seed 1", "profile": {"base_eval_loss": 11.772646}}
    run["device"] = "cpu"
    (tmp_path / "seed1.json").write_text(json.dumps(run | {"rows": rows}))
    lines = long_context.seed_summary([tmp_path / "seed1.json"]).splitlines()
    assert lines[1].split()[-1] == "-0.000022"
    assert "loss drop from the base 0.003271 against TRL's 0.003249" in lines[2]


def test_the_bench_loads_its_peers_without_hub_kernels_as_the_stages_load_theirs(tiny_model_dir, monkeypatch):
    """transformers 5.2x, where `kernels` is installed (transformers requires it), swaps layers for kernels fetched
    from the hub at load: offline on a GPU the fetch fails (a Llama's rotary embedding), and online the peers would
    train and be scored with other layers than the stage's. The stage's own load is the reference."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from peers import peer_model

    from stages.common.models import load_base_model
    from stages.common.params import ModelParams

    _, peer = peer_model(tiny_model_dir, quantized=False, smoke=True)
    stage = load_base_model(ModelParams(str(tiny_model_dir), None, "none", "float32", False))
    assert (peer.use_kernels, stage.use_kernels) == (False, False)
