"""Training metrics as they happen, through dvclive: train loss, learning rate and grad norm per logging step, eval
loss per epoch, written to dvclive/ (declared in dvc.yaml), so `dvc exp show` shows the latest step while
`dvc exp run` still trains and `dvc plots show` draws the curves. Only the main process logs.

Why `Live` behind this small callback and not transformers' `DVCLiveCallback` (report_to="dvclive"): that callback
numbers points by how many logs came before (train and eval points of one optimizer step land on different steps),
logs every TrainingArguments field as a param (about a hundred more `dvc exp show` columns) and the run's timings as
metrics (`dvc metrics diff` would never be quiet), and starts a resumed run's curves over from step 0. dvclive's own
resume (`Live(resume=True)`) continues after the last *logged* step, which a killed run wrote past its last
checkpoint (dvclive 3.49: the resumed run logs those steps twice), and needs the folder DVC removes before it runs
the stage. Here every point sits at its optimizer step, and a resumed run first replays the history its checkpoint
holds, so the curves have neither a gap nor a repeated step."""

from __future__ import annotations

import logging
import math
from typing import Any

from stages.common.fragile import dvclive_never_inits_a_repo
from stages.common.paths import LIVE_DIR

log = logging.getLogger("pipeline")

# the Trainer's log keys -> dvclive metric names (files dvclive/plots/metrics/<name>.tsv, keys of metrics.json)
LOGGED = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "eval_loss": "eval/loss",
}


def short_run_callback() -> Any:
    """Trainer callback (every process: logging gathers the loss across them). A run shorter than `logging_steps`
    logs its train loss at its last step, so every run has the train curves `plot` reads; a run of one optimizer step
    (`train.epochs` far below one epoch) says so in one line."""
    from transformers import TrainerCallback

    class _ShortRun(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.max_steps == 1 and state.is_world_process_zero:
                log.warning(
                    "train.epochs %g makes a single optimizer step: the adapter barely moves", args.num_train_epochs
                )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == state.max_steps and not any("loss" in entry for entry in state.log_history):
                control.should_log = True

    return _ShortRun()


def live_metrics() -> Any:
    """A Trainer callback writing to dvclive/; the folder is emptied first, so a stale run's points never mix in."""
    from dvclive import Live
    from transformers import TrainerCallback

    class LiveMetrics(TrainerCallback):
        def __init__(self) -> None:
            with dvclive_never_inits_a_repo():
                self.live = Live(dir=str(LIVE_DIR), dvcyaml=None, save_dvc_exp=False, report=None)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            for entry in state.log_history:  # a resumed run: what its checkpoint logged, at the same steps
                self.log(entry, entry["step"])

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            self.log(logs or {}, state.global_step)

        def log(self, entry: dict[str, Any], step: int) -> None:
            values = {name: entry[key] for key, name in LOGGED.items() if isinstance(entry.get(key), int | float)}
            if not values:
                return
            self.live.step = step
            for name, value in values.items():
                self.live.log_metric(name, value)
            self.live.next_step()  # writes metrics.json and tells a running `dvc exp` a step is done

        def finish(self, figures: dict[str, Any], run_loss: float) -> None:
            """The run's model figures join the summary; a run shorter than `logging_steps` logged no train loss,
            so its mean loss over all processes stands in."""
            if "loss" not in self.live.summary.get("train", {}) and math.isfinite(run_loss):
                self.live.summary.setdefault("train", {})["loss"] = run_loss
            self.live.summary.update(figures)
            self.live.end()

    return LiveMetrics()
