"""Hostile params and failures through the real dvc CLI: nothing outside the repository is touched, every failure
is one `error:` line with no traceback, a failed stage's previous outputs come back with one command, and DVC sees
a local data file or model folder change."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.doc_blocks import run_block
from tests.dvc_project import TINY_MODEL, copy_project, run, set_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_project):
    """A project whose whole pipeline ran once and was committed, beside a folder that must survive everything."""
    parent = tmp_path_factory.mktemp("trust")
    victim = parent / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return copy_project(trained_project[0], parent / "project")


@pytest.fixture
def project(trained, tmp_path):
    """A copy of the trained project (git, dvc cache and all) that a test may break."""
    target = tmp_path / "nest" / "project"
    shutil.copytree(trained, target)
    (tmp_path / "nest" / "victim").mkdir()
    (tmp_path / "nest" / "victim" / "precious.txt").write_text("keep me")
    return target


def one_error_line(result) -> str:
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.returncode != 0, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("package.name=../../victim", "package.name must be 1-64 letters"),
        ("package.name=../victim/precious", "package.name must be 1-64 letters"),
        ("train.processes='1; touch pwned'", "train.processes must be int"),
        ("train.processes='$(touch pwned)'", "train.processes must be int"),
        ("data.source=../victim/precious.txt", "data.source must be hub:<dataset id> or a file under data/raw/"),
        ("model.name=../victim", "model.name must be a hub id"),
    ],
)
def test_hostile_params_through_exp_run_touch_nothing_outside(project, setting, message):
    result = run(project, "dvc", "exp", "run", "-S", setting, check=False)
    assert message in one_error_line(result)
    assert (project.parent / "victim" / "precious.txt").read_text() == "keep me"
    assert not list(project.parent.rglob("pwned")) and not list(project.rglob("pwned"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train.learning_rate": ".inf"}, "train.learning_rate must be"),
        ({"train.learning_rate": "1e400"}, "train.learning_rate must be a finite number"),
        ({"lora.alpha": float("inf")}, "lora.alpha must be a finite number"),
        ({"train.micro_batch_size": 0}, "train.micro_batch_size must be in [1, 65536]"),
        ({"train.seed": 2**40}, "train.seed must be in [0, 4294967295]"),
        ({"plot.dpi": 100000}, "plot.dpi must be in [20, 1200]"),
        ({"tokenize.max_length": 100000}, "tokenize.max_length = 100000 tokens, more than the 512 positions"),
        ({"eval.generate.max_new_tokens": 100000}, "longest prompt + eval.generate.max_new_tokens ="),
        ({"train.processes": 2, "train.micro_batch_size": 16}, "must be a multiple of train.micro_batch_size x"),
    ],
)
def test_a_failed_stage_under_repro_says_one_line(project, changes, message):
    set_params(project, changes)
    assert message in one_error_line(run(project, "dvc", "repro", check=False))


def test_a_key_written_twice_is_refused_under_repro_naming_its_line(project):
    """DVC reads params.yaml itself before any stage (and refuses duplicate keys, naming line and column); run alone,
    a stage says the same in one line (tests/test_params.py)."""
    params = project / "params.yaml"
    text = params.read_text()
    first = text[: text.index("  r: 4\n")].count("\n") + 1  # the line of the first "r:"
    params.write_text(text.replace("  r: 4\n", "  r: 4\n  r: 8\n"))
    result = run(project, "dvc", "repro", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert 'found duplicate key "r"' in output and f"line {first}, column 3" in output


def corrupt_base_model(project) -> None:
    """A NaN in one frozen weight of the local base model: every loss is NaN from the first step."""
    from safetensors.torch import load_file, save_file

    weights_file = project / TINY_MODEL / "model.safetensors"
    weights = load_file(weights_file)
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, weights_file, metadata={"format": "pt"})


def test_a_diverging_run_stops_with_one_line_and_saves_no_adapter(project):
    zip_before = (project / "models/adapter.zip").read_bytes()
    corrupt_base_model(project)
    line = one_error_line(run(project, "dvc", "repro", check=False))
    assert "training diverged: loss nan at optimizer step 1; no adapter was saved" in line
    assert not (project / "models/adapter").exists()
    assert not (project / "dvclive/metrics.json").exists()
    assert (project / "models/adapter.zip").read_bytes() == zip_before  # nothing after finetune ran


def test_a_failed_stages_previous_outputs_come_back_with_checkout(project):
    """DVC removes a stage's outs before running it, so a failed finetune leaves none; undoing the change and the
    recovery page's block (git for the lock and the outs that live in git, `dvc checkout --force`) bring the last
    committed run back, byte for byte."""
    before = (project / "models/adapter/adapter_model.safetensors").read_bytes()
    model_before = (project / TINY_MODEL / "model.safetensors").read_bytes()
    corrupt_base_model(project)
    run(project, "dvc", "repro", check=False)
    assert not (project / "models/adapter").exists()
    (project / TINY_MODEL / "model.safetensors").write_bytes(model_before)  # undo the change
    *_, status = run_block(project, "docs/recovery-and-safety.md", "failed-stage")  # git and dvc checkout, status
    assert (project / "models/adapter/adapter_model.safetensors").read_bytes() == before
    assert "up to date" in status.lower()


def status(root) -> set[str]:
    return set(json.loads(run(root, "dvc", "status", "--json").stdout))


def test_a_changed_data_file_makes_prepare_subset_stale(project):
    raw = project / "data/raw/seed_tasks_alpaca.jsonl"
    raw.write_text(raw.read_text().replace("a", "b", 1))
    assert status(project) == {"prepare_subset"}


def test_a_changed_local_base_model_makes_exactly_its_users_stale(project):
    config = project / TINY_MODEL / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert status(project) == {"tokenize", "finetune", "evaluate_ppl", "evaluate_cosine", "evaluate_harness", "merge"}


def test_a_changed_local_embedder_makes_only_evaluate_cosine_stale(project):
    (project / "models/embedder/mine").mkdir()
    (project / "models/embedder/mine/config.json").write_text("{}")
    assert status(project) == {"evaluate_cosine"}


def test_a_model_folder_outside_the_tracked_folders_is_refused(project):
    shutil.copytree(project / TINY_MODEL, project / "other/tiny")
    set_params(project, {"model.name": "other/tiny"})  # looks like a hub id, but exists here: DVC cannot see it
    line = one_error_line(run(project, "dvc", "repro", "tokenize", check=False))
    assert "model.name 'other/tiny' is a local folder outside models/base/" in line
