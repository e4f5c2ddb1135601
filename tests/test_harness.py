"""The lm-evaluation-harness stage on the tiny model through `dvc repro`: tasks whose score is known whatever the
model (the shorter of two answers is always the likelier under a random model), base and fine-tuned rows, the same
bytes on a second run, and one line for an unknown task or a malformed task file."""

from __future__ import annotations

import json

import pytest

from tests.dvc_project import copy_project, run, set_params

pytestmark = pytest.mark.slow

LONG = " ".join(["and then the story went on"] * 8)  # ~48 tokens: far less likely than one token under any model
KNOWN = [{"question": f"Question {i}: say something.", "choices": ["Yes", LONG], "gold": 0} for i in range(6)]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: tasks/known.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: {target}
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_project):
    return copy_project(trained_project[0], tmp_path_factory.mktemp("harness") / "project")


def one_error_line(result) -> str:
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0]


def test_the_default_run_scores_the_bundled_task_for_base_and_fine_tuned(project):
    table = json.loads((project / "metrics/harness.json").read_text())
    row = table["held_out_answers"]
    assert row["documents"] == 8  # the tiny project's eval split
    assert set(row["acc"]) == {"base", "finetuned", "difference", "base_stderr", "finetuned_stderr"}
    assert row["acc"]["difference"] == pytest.approx(row["acc"]["finetuned"] - row["acc"]["base"])
    assert "harness: held_out_answers acc |" in (project / "reports/results.md").read_text()
    assert "| harness: held_out_answers acc |" in (project / "models/merged/README.md").read_text()


def test_tasks_with_a_known_score_score_it_and_a_second_run_gives_the_same_bytes(project):
    (project / "tasks/known.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in KNOWN))
    (project / "tasks/right.yaml").write_text(TASK.format(name="short_answer_right", target="gold"))
    (project / "tasks/wrong.yaml").write_text(TASK.format(name="short_answer_wrong", target="1"))
    set_params(project, {"eval.harness.tasks": ["short_answer_right", "short_answer_wrong"]})
    ran = run(project, "dvc", "repro")
    assert "Running stage 'evaluate_harness'" in ran.stdout and "Running stage 'finetune'" not in ran.stdout
    table = json.loads((project / "metrics/harness.json").read_text())
    for task, score in (("short_answer_right", 1.0), ("short_answer_wrong", 0.0)):
        assert table[task]["documents"] == len(KNOWN)
        assert (table[task]["acc"]["base"], table[task]["acc"]["finetuned"]) == (score, score), table
    first = (project / "metrics/harness.json").read_bytes()
    run(project, "dvc", "repro", "-f", "-s", "evaluate_harness")
    assert (project / "metrics/harness.json").read_bytes() == first


def test_an_unknown_task_is_one_line_naming_it(project):
    set_params(project, {"eval.harness.tasks": ["no_such_task_anywhere"]})
    error = one_error_line(run(project, "dvc", "repro", "evaluate_harness", check=False))
    assert "eval.harness.tasks 'no_such_task_anywhere': no such lm-eval task" in error


def test_a_malformed_task_file_is_one_line(project):
    (project / "tasks/broken.yaml").write_text("task: [broken\n")
    try:
        error = one_error_line(run(project, "dvc", "repro", "evaluate_harness", check=False))
    finally:
        (project / "tasks/broken.yaml").unlink()
    assert "tasks/broken.yaml: a task file does not load" in error


def test_a_hub_task_offline_is_one_line_naming_it(project):
    set_params(project, {"eval.harness.tasks": ["arc_easy"]})  # the tests run with HF_HUB_OFFLINE=1
    error = one_error_line(run(project, "dvc", "repro", "evaluate_harness", check=False))
    assert "eval.harness.tasks 'arc_easy': its documents could not be loaded" in error
