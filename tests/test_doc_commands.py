"""Every shell block of README.md and docs/ is run by a test on the tiny model, or says what it needs that a test
machine lacks (tests/doc_blocks.py); this module checks that, and runs the README's everyday and chat blocks in a
trained project."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO
from tests.doc_blocks import CI_MARKERS, MARKER, NEEDS, PAGES, blocks, run_block
from tests.dvc_project import copy_project

EVERY_BLOCK = [block for page in PAGES for block in blocks(page)]


def test_the_pages_have_shell_blocks_to_check():
    assert len(EVERY_BLOCK) >= 10 and {b.page.name for b in EVERY_BLOCK} >= {"README.md", "gpu-speed.md"}


@pytest.mark.parametrize("block", EVERY_BLOCK, ids=[b.where for b in EVERY_BLOCK])
def test_every_shell_block_is_run_by_a_test_or_says_what_it_needs(block):
    if block.marker in CI_MARKERS:
        return  # .ci/run runs it (tests/test_readme.py checks that)
    match = MARKER.match(block.marker)
    assert match, f"{block.where}: a shell block needs a '<!-- command: ... -->' line above it (tests/doc_blocks.py)"
    if match["needs"]:
        assert set(match["needs"].split()) <= NEEDS, f"{block.where}: needs one of {sorted(NEEDS)}"
        return
    test = REPO / match["test"]
    assert test.is_file(), f"{block.where}: {match['test']} does not exist"
    page = str(block.page.relative_to(REPO))
    source = test.read_text(encoding="utf-8")
    assert "run_block(" in source and f'"{page}", "{match["label"]}"' in source, (
        f"{block.where}: {match['test']} never runs run_block(..., {page!r}, {match['label']!r})"
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_project):
    return copy_project(trained_project[0], tmp_path_factory.mktemp("doc-commands") / "project")


def test_the_everyday_commands_run_and_the_table_keeps_every_param_and_metric(project):
    outputs = run_block(project, "README.md", "everyday")
    assert "Data and pipelines are up to date" in outputs[0] or "didn't change" in outputs[0]
    assert "perplexity" in outputs[1]
    assert (project / "dvc_plots/index.html").is_file()
    header = [cell.strip() for cell in outputs[4].splitlines()[0].strip("|").split("|")]
    assert {"lora.r", "dvclive/metrics.json:train.learning_rate", "eval.loss"} <= set(header)  # params and metrics
    assert not [column for column in header if "/" in column and ":" not in column], header  # no dependency hashes


def test_the_chat_commands_answer_from_the_adapter_and_its_zip(project):
    outputs = run_block(project, "README.md", "chat")
    assert all(output.strip() for output in outputs)
    params = json.loads((project / "models/adapter/params.json").read_text())
    assert params["tokenize"]["template"]  # the chat ran against the adapter the pipeline trained


def test_every_row_of_the_bad_input_table_names_the_tests_that_cover_it():
    """docs/bad-input.md: each row's last column names test modules that exist (a renamed or deleted test leaves a
    row pointing nowhere)."""
    lines = (REPO / "docs/bad-input.md").read_text(encoding="utf-8").splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| bad input", "|---"))]
    assert len(rows) > 50
    for row in rows:
        names = re.findall(r"\btest_\w+", row.rstrip(" |").rpartition("|")[2])
        assert names, f"no test named in: {row[:80]}"
        for name in names:
            assert (REPO / "tests" / f"{name}.py").is_file(), f"{name} (in: {row[:60]}...) is not a test module"
