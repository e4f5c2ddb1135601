"""Artifacts are input from outside, and a stage's guards hold: non-finite weights, a params.json that asks for remote
code, a zip too big to be an adapter, chat options out of range, a second run in the same checkout, params.yaml
rewritten under a running stage, a full disk. Each is one line; the CLI-level cases are in tests/test_ship.py."""

from __future__ import annotations

import errno
import json
import logging
import re
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from stages.common.errors import PipelineError, one_at_a_time, run_stage
from stages.common.made_with import read_made_with
from stages.common.models import check_finite_model, check_finite_weights
from stages.common.params import parse_params
from tests.conftest import REPO, load_yaml

DEFAULT = parse_params(load_yaml(REPO / "params.yaml"))


def test_a_non_finite_tensor_is_named_and_a_finite_file_passes(tmp_path):
    weights = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.ones(3), "steps": torch.arange(3)}, str(weights))
    check_finite_weights(weights)
    for bad in (float("nan"), float("inf")):
        save_file({"a": torch.ones(3), "b": torch.tensor([1.0, bad])}, str(weights))
        with pytest.raises(PipelineError, match=r"adapter_model.safetensors: tensor b holds NaN or infinite values"):
            check_finite_weights(weights)


def test_a_merged_model_with_a_non_finite_weight_is_not_saved():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    check_finite_model(model, "models/merged")
    with torch.no_grad():
        model[0].weight[1, 0] = float("nan")
    with pytest.raises(PipelineError, match=r"^models/merged: weight 0.weight holds NaN"):
        check_finite_model(model, "models/merged")


def made_with(tmp_path, **changes) -> dict:
    settings = {
        **DEFAULT.sections("data", "tokenize", "lora", "train"),
        "model": {**DEFAULT.sections("model")["model"], "trust_remote_code": True},
    }
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        settings[section][key] = value
    path = tmp_path / "params.json"
    path.write_text(json.dumps(settings))
    return path


def test_an_adapters_params_json_never_turns_on_remote_code(tmp_path, caplog):
    from lora_dvc.chat import base_params

    settings = read_made_with(made_with(tmp_path), card=False)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert base_params(settings, trust_remote_code=False).trust_remote_code is False
    assert "asks for trust_remote_code: ignored" in caplog.text
    assert base_params(settings, trust_remote_code=True).trust_remote_code is True  # the user's own flag


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model.name": "../outside"}, r"params.json: model.name must be a hub id"),
        ({"model.quantization": "int3"}, r"params.json: model.quantization must be one of"),
        ({"tokenize.template": "{{ evil }}"}, r"params.json: tokenize.template must be one of auto, alpaca, chat"),
    ],
)
def test_an_adapters_params_json_is_checked_like_params(tmp_path, change, message):
    with pytest.raises(PipelineError, match=message):
        read_made_with(made_with(tmp_path, **change))


def test_a_lossless_gguf_that_answers_differently_or_a_non_finite_one_is_refused():
    from stages.export_gguf import verify_round_trip

    same = {"checked": True, "same_greedy_answer": True, "max_logit_difference": 0.01}
    verify_round_trip(same, "f16", "float16")
    verify_round_trip({**same, "same_greedy_answer": False}, "q8_0", "float16")  # lossy: may differ
    with pytest.raises(PipelineError, match="answers differently"):
        verify_round_trip({**same, "same_greedy_answer": False}, "f16", "float16")
    with pytest.raises(PipelineError, match="its logits are not finite"):
        verify_round_trip({**same, "max_logit_difference": float("nan")}, "q8_0", "float16")
    verify_round_trip({"checked": False, "reason": "phi2"}, "f16", "float16")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-new-tokens", "-1", "must be at least 1, got -1"),
        ("--temperature", "0", "must be above 0, got 0"),
        ("--temperature", "nan", "must be a finite number, got 'nan'"),
        ("--top-p", "5", r"must be in \(0, 1\], got 5"),
        ("--repetition-penalty", "inf", "must be a finite number"),
    ],
)
def test_chat_options_out_of_range_are_one_line(capsys, option, value, message):
    from lora_dvc.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["chat", option, value])
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and option in errors[0], errors
    assert re.search(message, errors[0]), errors


def test_a_zip_that_would_unpack_past_the_cap_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from lora_dvc import chat

    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("adapter_model.safetensors", b"\0" * 4096)
    monkeypatch.setattr(chat, "MAX_UNPACKED_BYTES", 4095)
    monkeypatch.setattr(chat.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(PipelineError, match=r"big.zip: unpacks to 0.0 GiB, more than an adapter's"):
        with chat.adapter_folder(archive):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.zip"]
    monkeypatch.setattr(chat, "MAX_UNPACKED_BYTES", 4096)
    with chat.adapter_folder(archive) as folder:
        assert (folder / "adapter_model.safetensors").stat().st_size == 4096


def test_a_second_run_in_the_same_checkout_stops_while_the_first_holds_the_lock(tmp_path):
    lock = tmp_path / "finetune.py"
    lock.write_text("")
    with one_at_a_time(lock, "finetune"):
        with pytest.raises(PipelineError, match="another finetune is running in this checkout"):
            with one_at_a_time(lock, "finetune"):
                pass
    with one_at_a_time(lock, "finetune"):  # released when the first ended
        pass
    assert lock.read_text() == ""


def exit_of(name, main, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exited:
        run_stage(name, main)
    return exited.value.code, capsys.readouterr().err.splitlines()


def test_params_yaml_rewritten_while_a_stage_runs_fails_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("lora:\n  r: 4\n")
    code, lines = exit_of("finetune", lambda: (tmp_path / "params.yaml").write_text("lora:\n  r: 8\n"), capsys)
    assert code == 2 and lines[-1].startswith("error: params.yaml changed while finetune ran")
    run_stage("finetune", lambda: None)  # unchanged: the stage ends normally


def test_a_full_disk_is_one_line_and_other_os_errors_stay_tracebacks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def write(code: int) -> None:
        raise OSError(code, "No space left on device" if code == errno.ENOSPC else "boom", "models/adapter")

    code, lines = exit_of("merge", lambda: write(errno.ENOSPC), capsys)
    assert code == 2 and lines[-1] == "error: models/adapter: No space left on device; no output was written"
    with pytest.raises(OSError, match="boom"):
        run_stage("merge", lambda: write(errno.EIO))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"instruction": "\\ud800", "output": "b"}', r"data.jsonl:1: text holds a lone surrogate escape"),
        ("[" * 100_000 + "]" * 100_000, r"data.jsonl:1: JSON nested too deeply"),
        ('{"instruction": "a", "output": ' + "9" * 5000 + "}", r"data.jsonl:1: unreadable JSON value \(Exceeds"),
    ],
)
def test_json_that_python_cannot_hold_is_one_line_naming_file_and_line(tmp_path, line, message):
    from stages.common.io import read_jsonl

    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PipelineError, match=message):
        list(read_jsonl(path))


def test_a_long_reference_answer_is_shortened_in_the_tracked_report():
    from stages.evaluate_cosine import shortened

    assert shortened("short") == "short"
    long = "x" * 1_000_000
    assert shortened(long) == "x" * 2000 + " ... (998000 more characters)"


def test_a_data_file_or_model_file_linked_from_outside_the_repository_is_one_line(tmp_path, monkeypatch):
    from stages.common.models import resolve_model
    from stages.common.records import iter_records

    outside, repo = tmp_path / "outside", tmp_path / "repo"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (repo / "data/raw").mkdir(parents=True)
    (repo / "models/base/mine").mkdir(parents=True)
    monkeypatch.chdir(repo)
    (repo / "data/raw/mine.jsonl").symlink_to(outside / "secret.jsonl")
    with pytest.raises(PipelineError, match=r"data.source 'data/raw/mine.jsonl': .* links outside the repository"):
        list(iter_records("data/raw/mine.jsonl"))
    (repo / "models/base/mine/config.json").write_text("{}")
    assert resolve_model("models/base/mine").path == "models/base/mine"  # inside: fine
    (repo / "models/base/mine/model.safetensors").symlink_to(outside / "secret.jsonl")
    with pytest.raises(PipelineError, match=r"model.name 'models/base/mine': .*model.safetensors links outside"):
        resolve_model("models/base/mine")


def test_a_killed_run_whose_data_changed_starts_afresh_instead_of_resuming(tmp_path):
    from stages.finetuning.checkpoints import checkpoint_to_resume, run_fingerprint

    checkpoints = tmp_path / "checkpoints"
    old_data, new_data = run_fingerprint(DEFAULT, b"rows before"), run_fingerprint(DEFAULT, b"rows after")
    assert checkpoint_to_resume(checkpoints, old_data) is None
    (checkpoints / "checkpoint-9").mkdir()
    (checkpoints / "checkpoint-9" / "trainer_state.json").write_text("{}")
    assert checkpoint_to_resume(checkpoints, old_data) == str(checkpoints / "checkpoint-9")  # same run: resumes
    assert checkpoint_to_resume(checkpoints, new_data) is None  # the data changed meanwhile: afresh
    assert not (checkpoints / "checkpoint-9").exists()


def test_a_stage_process_runs_the_pinned_cpu_kernels_whatever_the_processor_offers():
    """The claim the README makes for another processor: ATen's AVX2 kernels and MKL's AVX2 branch, set before
    torch loads, unless the user set them (on this AVX-512 machine ATen would otherwise pick AVX-512)."""
    import os
    import subprocess
    import sys

    from stages import CPU_KERNEL_PINS

    code = "import stages, os, torch; print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'])"
    clean = {name: value for name, value in os.environ.items() if name not in CPU_KERNEL_PINS}
    pinned = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert pinned.stdout.split() == ["AVX2", "AVX2"]
    chosen = subprocess.run(
        [sys.executable, "-c", code], env=clean | {"ATEN_CPU_CAPABILITY": "default"}, capture_output=True, text=True
    )
    assert chosen.stdout.split() == ["DEFAULT", "AVX2"]  # a value the user set wins


def test_a_short_run_logs_its_loss_at_its_last_step_and_a_single_step_run_says_so(caplog):
    from types import SimpleNamespace

    from stages.finetuning.live import short_run_callback

    callback = short_run_callback()
    state = SimpleNamespace(max_steps=1, global_step=0, log_history=[], is_world_process_zero=True)
    args, control = SimpleNamespace(num_train_epochs=0.01), SimpleNamespace(should_log=False)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        callback.on_train_begin(args, state, control)
    assert "train.epochs 0.01 makes a single optimizer step" in caplog.text
    state.global_step = 1
    callback.on_step_end(args, state, control)
    assert control.should_log  # nothing logged yet at the last step: log now
    state.log_history, control.should_log = [{"loss": 2.0, "step": 1}], False
    callback.on_step_end(args, state, control)
    assert not control.should_log  # a loss was logged already: the logging interval decides


def test_harness_results_become_base_fine_tuned_and_difference_per_task_and_metric():
    from stages.evaluate_harness import figures

    base = {
        "t": {
            "alias": "t",
            "sample_len": 4,
            "acc,none": 0.25,
            "acc_stderr,none": 0.2,
            "f1,strict": 0.5,
            "f1_stderr,strict": "N/A",
        }
    }
    tuned = {
        "t": {
            "alias": "t",
            "sample_len": 4,
            "acc,none": 0.75,
            "acc_stderr,none": 0.25,
            "f1,strict": 0.5,
            "f1_stderr,strict": "N/A",
        }
    }
    assert figures(base, tuned) == {
        "t": {
            "documents": 4,
            "acc": {"base": 0.25, "finetuned": 0.75, "difference": 0.5, "base_stderr": 0.2, "finetuned_stderr": 0.25},
            "f1 (strict)": {
                "base": 0.5,
                "finetuned": 0.5,
                "difference": 0.0,
                "base_stderr": None,
                "finetuned_stderr": None,
            },
        }
    }
    with pytest.raises(PipelineError, match="harness task 't': acc is not finite"):
        figures(base, {"t": {**tuned["t"], "acc,none": float("nan")}})
