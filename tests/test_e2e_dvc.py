"""End to end: the real `dvc` CLI runs the real stages in a temporary git repo, on a tiny random model."""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.doc_blocks import run_block
from tests.dvc_project import ALL_STAGES, commit, copy_project, make_project, run, set_params, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_project):
    return copy_project(trained_project[0], tmp_path_factory.mktemp("e2e") / "project")


def test_first_repro_runs_every_stage_quietly(project, trained_project):
    result = trained_project[1]  # the first `dvc repro` of the project this one is a copy of
    assert stages_run(result) == ALL_STAGES
    # a quiet console: no library warning a user cannot act on, and every stage says what its first pause is
    output = result.stdout + result.stderr
    assert not re.search(r"Warning|warnings\.warn|Failed to load|publisher trust|Unknown RoPE", output), output
    assert all(f"[{stage}] starting: importing libraries" in output for stage in ALL_STAGES)
    for out in (
        "models/adapter/adapter_model.safetensors",
        "metrics/perplexity.json",
        "metrics/cosine.json",
        "dvclive/metrics.json",
        "dvclive/plots/metrics/train/loss.tsv",
        "plots/perplexity.png",
        "reports/generations.md",
        "models/adapter.zip",
    ):
        assert (project / out).is_file(), out


def out_hashes(root) -> dict[str, str]:
    """Every out's and metric's hash in dvc.lock, by path."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_two_clones_in_different_folders_give_the_same_bytes_for_every_out(project, tmp_path_factory, tiny_model_dir):
    """Same params, data, code and seed on CPU: the same dvc.lock hash for every out (adapter folder, checkpoints,
    zip, tokenized data, curves, plots, reports, metrics) but the run report, whose timings differ; `dvc metrics
    diff` of the two runs prints nothing; and no out holds the path of the clone or of the virtual environment."""
    other = make_project(tmp_path_factory.mktemp("elsewhere") / "a" / "deeper" / "clone", tiny_model_dir)
    run(other, "dvc", "repro")
    first, second = out_hashes(project), out_hashes(other)
    assert first.keys() == second.keys() and "models/checkpoints" in first and "models/adapter.zip" in first
    differing = {path for path in first if first[path] != second[path]}
    assert differing <= {"reports/train_run.json"}, differing
    metric_files = [*(project / "metrics").iterdir(), project / "dvclive/metrics.json"]
    for metrics in metric_files:  # the other run's metrics in this workspace, against HEAD
        shutil.copy(other / metrics.relative_to(project), metrics)
    assert run(project, "dvc", "metrics", "diff").stdout.strip() == ""
    assert json.loads(run(project, "dvc", "metrics", "diff", "--json").stdout) == {}
    run(project, "git", "checkout", "--", "metrics", "dvclive")
    for root in (project, other):
        for path in first:
            files = [root / path] if (root / path).is_file() else sorted((root / path).rglob("*"))
            for file in (f for f in files if f.is_file()):
                content = file.read_bytes()
                for absolute in (str(root), str(tiny_model_dir), sys.prefix, str(Path.home())):
                    assert absolute.encode() not in content, f"{file} holds {absolute}"


def test_second_repro_runs_nothing(project):
    assert stages_run(run(project, "dvc", "repro")) == set()
    assert "up to date" in run(project, "dvc", "status").stdout.lower()


def test_eval_only_param_reruns_only_evaluation_and_what_shows_its_figures(project):
    set_params(project, {"eval.generate.max_new_tokens": 12, "eval.ppl.batch_size": 4})
    ran = stages_run(run(project, "dvc", "repro"))
    # plot, and the zip and merged model whose cards carry the figures, follow only if the figures changed
    assert (
        {"evaluate_ppl", "evaluate_cosine"}
        <= ran
        <= {"evaluate_ppl", "evaluate_cosine", "plot", "package_zip", "merge", "export_gguf"}
    )
    assert "finetune" not in ran and "tokenize" not in ran
    commit(project, "longer generations")


def test_the_readme_experiment_reruns_finetune_and_what_follows_and_names_both_runs(project):
    """The README's compare block: `dvc exp run -n rank8 -S lora.r=8` reruns finetune and every stage after it, not
    the data stages; exp show, metrics diff and plots diff name both runs, and the fine-tune's figure changed."""
    ran, shown, diff, _ = run_block(project, "README.md", "compare")
    assert set(re.findall(r"Running stage '(\w+)'", ran)) == ALL_STAGES - {"prepare_subset", "tokenize"}
    assert "rank8" in shown and "lora.r" in shown
    assert re.search(r"metrics/perplexity\.json\s+finetuned\.response", diff), diff
    html = (project / "dvc_plots/index.html").read_text()
    assert "rank8" in html and "HEAD" in html and "Perplexity on the eval split" in html


def test_metrics_diff_shows_the_changed_metrics(project):
    diff = json.loads(run(project, "dvc", "metrics", "diff", "--json").stdout)
    assert "metrics/perplexity.json" in diff and "dvclive/metrics.json" in diff
    changed = diff["metrics/perplexity.json"]["finetuned.response"]
    assert changed["old"] != changed["new"]


def test_plots_show_writes_html_with_the_perplexity_plot(project, tmp_path):
    run(project, "dvc", "plots", "show", "-o", str(tmp_path / "html"))
    html = (tmp_path / "html" / "index.html").read_text()
    assert "Perplexity on the eval split" in html and "Train and eval loss" in html


def test_zip_holds_a_loadable_adapter(project, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zipfile.ZipFile(project / "models/adapter.zip").extractall(tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    assert model.peft_config["default"].r == 8
    assert json.loads((tmp_path / "adapter/params.json").read_text())["lora"]["r"] == 8
    commit(project, "rank 8")
