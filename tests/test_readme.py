"""The README's results section is the pipeline's own reports/results.md, not figures typed by hand."""

import re

from tests.conftest import REPO


def test_readme_results_are_the_pipelines_report():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"<!-- results:start -->\n(.*?)<!-- results:end -->", readme, re.S)
    assert section, "README.md has no results section"
    assert section.group(1) == (REPO / "reports/results.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci/run").read_text()
    assert "test-command:start" in ci and "test-command:end" in ci
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- test-command:start -->\n```bash\n(.*?)\n```\n<!-- test-command:end -->", readme, re.S)
    assert block and "pip install torch==2.13.0" in block.group(1) and "pytest" in block.group(1)
