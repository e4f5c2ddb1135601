"""finetune: same inputs give the same adapter bytes; a killed run resumes from its last checkpoint; two processes
(DDP over gloo on CPU, or the base sharded over them with FSDP) write the outputs once and agree with one process."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file, save_file

from tests.dvc_project import env, make_project, run, set_params

pytestmark = pytest.mark.slow
ADAPTER = "models/adapter/adapter_model.safetensors"
# Without length grouping, one process (accumulation 2) and two (one micro-batch each) see the same 16 rows in every
# optimizer step, so their runs can be compared value by value.
LONGER = {
    "data.train_size": 160,
    "tokenize.max_length": 128,
    "train.epochs": 2,
    "train.logging_steps": 5,
    "train.group_by_length": False,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = make_project(tmp_path_factory.mktemp("recovery"), tiny_model_dir, LONGER)
    run(root, "python", "-m", "stages.prepare_subset")
    run(root, "python", "-m", "stages.tokenize")
    return root


def curve_files(root) -> list:
    return sorted((root / "dvclive/plots/metrics").rglob("*.tsv"))


def curve_rows(path) -> list[tuple[int, str]]:
    return [(int(line.split("\t")[0]), line.split("\t")[1]) for line in path.read_text().splitlines()[1:]]


def clear_training_outputs(root) -> None:
    for out in ("models/adapter", "models/checkpoints"):
        shutil.rmtree(root / out, ignore_errors=True)


def fresh_finetune(root, processes: int = 1) -> subprocess.CompletedProcess:
    """dvc.yaml's command on a clean models/ folder; with train.processes > 1 the stage starts its processes itself
    (on CPU they talk over gloo)."""
    clear_training_outputs(root)
    set_params(root, {"train.processes": processes})
    return run(root, "python", "-m", "stages.finetune")


def assert_same_training(expected: dict, got: dict) -> None:
    """The same adapter trained another way. Not bit for bit: each process draws its own LoRA dropout masks, which
    moves the updates by ~10% (the losses agree to 1e-4). But every trained (lora_B, zero at start) tensor lies far
    closer to the one-process run's than an untrained, another seed's or a swapped tensor would (all >= 100%)."""
    assert {k: v.shape for k, v in expected.items()} == {k: v.shape for k, v in got.items()}
    trained = [name for name in expected if "lora_B" in name]
    assert trained
    for name in trained:
        gap = (got[name] - expected[name]).norm() / expected[name].norm()
        assert expected[name].norm() > 0 and gap < 0.5, (name, gap.item())


@pytest.fixture(scope="module")
def reference(project, tmp_path_factory):
    """An uninterrupted run's adapter and metrics."""
    fresh_finetune(project)
    keep = tmp_path_factory.mktemp("reference")
    shutil.copy(project / ADAPTER, keep / "adapter.safetensors")
    shutil.copytree(project / "dvclive", keep / "dvclive")
    shutil.copy(project / "reports/train_run.json", keep / "train_run.json")
    return keep


def test_same_params_data_and_seed_give_the_same_adapter_bytes(project, reference):
    fresh_finetune(project)
    assert (project / ADAPTER).read_bytes() == (reference / "adapter.safetensors").read_bytes()


def test_killed_run_resumes_from_its_last_checkpoint(project, reference):
    clear_training_outputs(project)
    process = subprocess.Popen(
        ["python", "-m", "stages.finetune"],
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list((project / "models/checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (project / "models/adapter").exists()  # nothing half-finished looks like a result

    interrupted = project.parent / "interrupted-checkpoints"
    shutil.copytree(project / "models/checkpoints", interrupted)

    resumed = run(project, "python", "-m", "stages.finetune")
    assert "resuming from models/checkpoints/checkpoint-" in resumed.stderr
    expected, got = load_file(reference / "adapter.safetensors"), load_file(project / ADAPTER)
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] - got[name]).abs().max().item() < 1e-6, name
    # dvclive's summary and curves: losses within float noise are equal here; the curves continue from the
    # checkpoint with neither a gap nor a repeated step
    assert (project / "dvclive/metrics.json").read_text() == (reference / "dvclive/metrics.json").read_text()
    assert [p.relative_to(project) for p in curve_files(project)] == [
        p.relative_to(reference) for p in curve_files(reference)
    ]
    resumed_at = json.loads((project / "reports/train_run.json").read_text())["resumed_from_step"]
    for curve, reference_curve in zip(curve_files(project), curve_files(reference), strict=True):
        got_rows, expected_rows = curve_rows(curve), curve_rows(reference_curve)
        assert [step for step, _ in got_rows] == [step for step, _ in expected_rows], curve
        # the first train log after the resume averages only the steps since the resume (the Trainer restarts its
        # running loss there); every other point is the uninterrupted run's
        first_after = min((step for step, _ in got_rows if step > resumed_at), default=None)
        for (step, value), (_, want) in zip(got_rows, expected_rows, strict=True):
            if not (curve.parent.name == "train" and curve.name == "loss.tsv" and step == first_after):
                assert value == want, (curve, step)
    run_report = json.loads((project / "reports/train_run.json").read_text())
    assert 0 < run_report["resumed_from_step"] < json.loads((project / "dvclive/metrics.json").read_text())["step"]

    # Proof the run continued from the checkpoint's state, not from scratch (which gives the same adapter as an
    # uninterrupted run): the same interrupted checkpoints with their LoRA weights moved give another adapter.
    shutil.rmtree(project / "models/checkpoints")
    shutil.copytree(interrupted, project / "models/checkpoints")
    for saved in (project / "models/checkpoints").glob("checkpoint-*/adapter_model.safetensors"):
        save_file({k: v + 0.5 for k, v in load_file(saved).items()}, saved, metadata={"format": "pt"})
    run(project, "python", "-m", "stages.finetune")
    moved = load_file(project / ADAPTER)
    assert max((moved[name] - expected[name]).abs().max().item() for name in expected) > 0.1


def test_two_processes_write_once_and_agree_with_one(project, reference):
    result = fresh_finetune(project, processes=2)
    log = result.stdout + result.stderr
    assert log.count("wrote models/adapter") == 1 and log.count("wrote dvclive/metrics.json") == 1
    two, one = (json.loads((root / "dvclive/metrics.json").read_text()) for root in (project, reference))
    # only the main process logs: every step once in every curve
    for curve in curve_files(project):
        steps = [line.split("\t")[0] for line in curve.read_text().splitlines()[1:]]
        assert len(steps) == len(set(steps)) and steps, curve
    two_run, one_run = (
        json.loads(p.read_text()) for p in (project / "reports/train_run.json", reference / "train_run.json")
    )
    assert (two_run["processes"], one_run["processes"]) == (2, 1)
    assert two["step"] == one["step"]  # same effective batch: 16 rows per optimizer step either way
    assert two_run["gradient_accumulation_steps"] * 2 == one_run["gradient_accumulation_steps"]
    # eval loss is token-weighted over the whole split: the same figure whatever the process count
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-4)
    assert_same_training(load_file(reference / "adapter.safetensors"), load_file(project / ADAPTER))


def test_a_base_sharded_over_two_processes_trains_as_one(project, reference):
    """train.parallelism fsdp: transformers loads each process's share of the base and shards it with FSDP2 (gloo on
    CPU), the Trainer wraps nothing in DDP, and the run's losses are those of one process."""
    import re

    clear_training_outputs(project)
    set_params(project, {"train.processes": 2, "train.parallelism": "fsdp"})
    try:
        result = run(project, "python", "-m", "stages.finetune")
    finally:
        set_params(project, {"train.parallelism": "ddp"})
    output = result.stdout + result.stderr
    held = re.search(r"sharded over 2 processes; this one holds ([0-9.]+)M of ([0-9.]+)M params", output)
    assert held and float(held[1]) < 0.6 * float(held[2]), output[-3000:]
    assert output.count("wrote models/adapter") == 1
    two, one = (json.loads((root / "dvclive/metrics.json").read_text()) for root in (project, reference))
    assert two["step"] == one["step"]
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-4)
    assert_same_training(load_file(reference / "adapter.safetensors"), load_file(project / ADAPTER))


def test_two_processes_report_the_run_loss_of_one_when_no_step_logs(tmp_path_factory, tiny_model_dir):
    # A run shorter than logging_steps reports its mean loss; each process's own figure is off by its token share.
    root = make_project(
        tmp_path_factory.mktemp("unlogged"), tiny_model_dir, LONGER | {"train.logging_steps": 1000, "train.epochs": 1}
    )
    run(root, "python", "-m", "stages.prepare_subset")
    run(root, "python", "-m", "stages.tokenize")
    losses = {}
    for processes in (1, 2):
        fresh_finetune(root, processes)
        losses[processes] = json.loads((root / "dvclive/metrics.json").read_text())["train"]["loss"]
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)


def test_two_machines_on_loopback_train_as_one(project, reference):
    """configs/accelerate-two-machines.yaml as two "machines" on this one (README, Several GPUs): each its own
    `accelerate launch --machine_rank`, one process each, gloo; machine 0 writes the outputs once, machine 1 nothing,
    and the run's losses are those of one process."""
    from stages.finetuning.launch import _free_port

    clear_training_outputs(project)
    set_params(project, {"train.processes": 2})
    port = str(_free_port())
    config = str(project / "configs/accelerate-two-machines.yaml")
    machines = [
        subprocess.Popen(
            ["accelerate", "launch", "--config_file", config, "--machine_rank", str(rank)]
            + ["--main_process_ip", "127.0.0.1", "--main_process_port", port, "-m", "stages.finetune"],
            cwd=project,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [machine.communicate(timeout=900)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], logs
    assert logs[0].count("wrote models/adapter") == 1 and "wrote " not in logs[1]
    two, one = (json.loads((root / "dvclive/metrics.json").read_text()) for root in (project, reference))
    assert json.loads((project / "reports/train_run.json").read_text())["processes"] == 2
    assert two["step"] == one["step"]
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=1e-5)
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], rel=1e-4)
