"""End to end: the real `dvc` CLI runs the real stages in a temporary git repo, on a tiny random model."""

from __future__ import annotations

import json
import zipfile

import pytest

from tests.dvc_project import ALL_STAGES, commit, make_project, run, set_params, stages_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    return make_project(tmp_path_factory.mktemp("project"), tiny_model_dir)


def test_first_repro_runs_all_seven_stages(project):
    result = run(project, "dvc", "repro")
    assert stages_run(result) == ALL_STAGES
    for out in (
        "models/adapter/adapter_model.safetensors",
        "metrics/perplexity.json",
        "metrics/cosine.json",
        "metrics/train.json",
        "plots/perplexity.png",
        "reports/generations.md",
        "models/adapter.zip",
    ):
        assert (project / out).is_file(), out
    commit(project, "first run")


def test_second_repro_runs_nothing(project):
    assert stages_run(run(project, "dvc", "repro")) == set()
    assert "up to date" in run(project, "dvc", "status").stdout.lower()


def test_eval_only_param_reruns_only_evaluation_and_plot(project):
    set_params(project, {"eval.generate.max_new_tokens": 12, "eval.ppl.batch_size": 4})
    ran = stages_run(run(project, "dvc", "repro"))
    assert {"evaluate_ppl", "evaluate_cosine"} <= ran <= {"evaluate_ppl", "evaluate_cosine", "plot"}
    commit(project, "longer generations")


def test_lora_rank_reruns_finetune_and_what_follows(project):
    set_params(project, {"lora.r": 8})
    ran = stages_run(run(project, "dvc", "repro"))
    assert ran == ALL_STAGES - {"prepare_subset", "tokenize"}


def test_metrics_diff_shows_the_changed_metrics(project):
    diff = json.loads(run(project, "dvc", "metrics", "diff", "--json").stdout)
    assert "metrics/perplexity.json" in diff and "metrics/train.json" in diff
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


def test_experiment_walkthrough_names_both_runs(project, tmp_path):
    """The README's walk-through: dvc exp run -S, then exp show, metrics diff and plots diff name both runs."""
    run(project, "dvc", "exp", "run", "-n", "rank16", "-S", "lora.r=16")
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    names = json.dumps(shown)
    head = run(project, "git", "rev-parse", "HEAD").stdout.strip()
    assert "rank16" in names and head in names
    diff = json.loads(run(project, "dvc", "metrics", "diff", "HEAD", "rank16", "--json").stdout)
    assert (
        diff["metrics/perplexity.json"]["finetuned.response"]["old"]
        != diff["metrics/perplexity.json"]["finetuned.response"]["new"]
    )
    run(project, "dvc", "plots", "diff", "HEAD", "rank16", "-o", str(tmp_path / "diff"))
    html = (tmp_path / "diff" / "index.html").read_text()
    assert "rank16" in html and "HEAD" in html and "Perplexity on the eval split" in html
