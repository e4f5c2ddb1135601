"""The README's sweep block, run through the real CLI on the tiny model: queue two experiments, run them with two
workers, compare them with `lora-dvc compare` (table of what differs, plots page of both)."""

from __future__ import annotations

import json
import time

import pytest

from tests.doc_blocks import run_block
from tests.dvc_project import TINY_MODEL, commit, make_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = make_project(tmp_path_factory.mktemp("sweep"), tiny_model_dir)
    run(root, "dvc", "add", TINY_MODEL)  # queued experiments run in a fresh copy: the local base must be in DVC
    commit(root, "track the local base model")
    run(root, "dvc", "repro", "finetune")  # a sweep's figures here are finetune's: the rest is the same for each run
    commit(root, "baseline run")
    return root


def wait_for_queue(root, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = run(root, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(3)


def test_two_queued_experiments_run_on_two_workers_and_compare(project):
    statuses = []
    queued, _, compared = run_block(
        project, "README.md", "sweep", after={"dvc queue start": lambda root: statuses.append(wait_for_queue(root))}
    )
    assert queued.count("Queued experiment") == 2
    assert statuses[0].count("Success") == 2, statuses[0]

    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    runs = {
        exp["name"]: exp["data"]
        for baseline in shown
        for experiment in baseline.get("experiments") or []
        for exp in experiment["revs"]
    }
    assert len(runs) == 2
    by_rank = {
        data["params"]["params.yaml"]["data"]["lora"]["r"]: data["metrics"]["dvclive/metrics.json"]["data"]
        for data in runs.values()
    }
    assert by_rank[8]["trainable_params"] == 4 * by_rank[2]["trainable_params"]  # each ran with its own rank

    table = [line for line in compared.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert "lora.r" in header and "trainable_params" in header
    assert not [column for column in header if "/" in column and ":" not in column]  # no dep or out hash columns
    assert len(table) == 2 + 3  # header, rule, the baseline and the two experiments
    page = (project / "compared" / "index.html").read_text()
    assert all(name in page for name in runs)  # both experiments' curves on one page


def test_compare_without_finished_experiments_says_so_in_one_line(tmp_path_factory, tiny_model_dir):
    root = make_project(tmp_path_factory.mktemp("no-sweep"), tiny_model_dir)
    result = run(root, "lora-dvc", "compare", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no finished experiment on this commit: `dvc queue status` shows queued and failed ones"
    ]
