"""The README's results section is the pipeline's own reports/results.md, not figures typed by hand."""

import re

from tests.conftest import REPO


def test_readme_results_are_the_pipelines_report():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"<!-- results:start -->\n(.*?)<!-- results:end -->", readme, re.S)
    assert section, "README.md has no results section"
    assert section.group(1) == (REPO / "reports/results.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_pipeline_command_then_its_test_command():
    ci = (REPO / ".ci/run").read_text()
    assert "for name in pipeline-command test-command" in ci
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = {
        name: re.search(rf"<!-- {name}:start -->\n```bash\n(.*?)\n```\n<!-- {name}:end -->", readme, re.S)
        for name in ("pipeline-command", "test-command")
    }
    assert blocks["pipeline-command"] and blocks["pipeline-command"].group(1).endswith("&& dvc repro")
    assert blocks["test-command"] and "pytest" in blocks["test-command"].group(1)
    assert readme.index("pipeline-command:start") < readme.index("test-command:start")
