"""finetune's dvclive logging (stages/finetuning/live.py): every point at its optimizer step, the summary rewritten
at every logged step (what `dvc exp show` reads during a run), a resumed run's curves whole."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest

from stages.common.paths import CURVES_DIR, LIVE_DIR
from stages.finetuning.live import live_metrics


def rows(name: str) -> list[tuple[int, float]]:
    lines = (CURVES_DIR / f"{name}.tsv").read_text().splitlines()
    assert lines[0].split("\t")[0] == "step"
    return [(int(step), float(value)) for step, value in (line.split("\t") for line in lines[1:])]


def summary() -> dict:
    return json.loads((LIVE_DIR / "metrics.json").read_text())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def state(step: int, history: list | None = None) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, log_history=history or [])


def test_points_sit_at_their_optimizer_step_and_the_summary_follows_each_one(workdir):
    live = live_metrics()
    live.on_train_begin(None, state(0), None)
    live.on_log(None, state(10), None, logs={"loss": 2.5, "grad_norm": 0.4, "learning_rate": 3e-4, "epoch": 0.5})
    assert summary() == {"step": 10, "train": {"loss": 2.5, "grad_norm": 0.4, "learning_rate": 3e-4}}
    live.on_log(None, state(18), None, logs={"eval_loss": 2.1, "eval_runtime": 1.7, "epoch": 1.0})
    live.on_log(None, state(20), None, logs={"loss": 2.25, "grad_norm": 0.3, "learning_rate": 1e-4})
    live.on_log(None, state(20), None, logs={"train_runtime": 9.0, "train_loss": 2.4})  # the Trainer's last log
    assert rows("train/loss") == [(10, 2.5), (20, 2.25)]
    assert rows("eval/loss") == [(18, 2.1)]  # train and eval points of one run share the step axis
    live.finish({"epochs": 1, "trainable_params": 8, "total_params": 100}, run_loss=2.4)
    got = summary()
    assert got["step"] == 20 and got["train"]["loss"] == 2.25 and got["eval"] == {"loss": 2.1}
    assert got["trainable_params"] == 8 and "train_runtime" not in json.dumps(got)  # no timing among the metrics


def test_a_run_too_short_to_log_reports_its_mean_loss(workdir):
    live = live_metrics()
    live.on_log(None, state(3), None, logs={"eval_loss": 2.0})
    live.finish({"epochs": 1}, run_loss=2.7)
    assert summary()["train"] == {"loss": 2.7}


def test_a_resumed_run_replays_its_checkpoint_history_and_drops_what_came_after(workdir):
    """A killed run logged steps 10, 20, 30; its last checkpoint is at step 20. Resuming from it, the Trainer's
    restored history holds steps 10 and 20: the curves show those, then the resumed run's own 30, once."""
    first = live_metrics()
    for step in (10, 20, 30):
        first.on_log(None, state(step), None, logs={"loss": 3.0 - step / 100})
    checkpoint_history = [{"loss": 2.9, "step": 10}, {"loss": 2.8, "step": 20}, {"eval_loss": 2.5, "step": 20}]
    resumed = live_metrics()
    resumed.on_train_begin(None, state(20, checkpoint_history), None)
    resumed.on_log(None, state(30), None, logs={"loss": 2.69})
    assert rows("train/loss") == [(10, 2.9), (20, 2.8), (30, 2.69)]
    assert rows("eval/loss") == [(20, 2.5)]


def test_live_outside_a_dvc_repo_creates_none(workdir):
    """A stage run by hand in a git checkout without DVC writes only dvclive/: no `dvc init` behind the user's back
    (the guard in stages/common/fragile.py)."""
    subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty"]
    subprocess.run(git, cwd=workdir, check=True)
    live_metrics().on_log(None, state(1), None, logs={"loss": 1.0})
    assert sorted(p.name for p in workdir.iterdir()) == [".git", "dvclive"]
