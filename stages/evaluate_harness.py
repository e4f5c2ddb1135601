"""Standard benchmarks beside the pipeline's own figures: EleutherAI's lm-evaluation-harness on the base and on the
fine-tune, the same tasks, the same documents.

    python -m stages.evaluate_harness

Reads models/adapter/, the base, tasks/ (local task YAMLs; the bundled `held_out_answers` also reads
data/subset/eval.jsonl); writes metrics/harness.json: per task, each metric for base and fine-tuned, their difference
and the harness's standard errors. One model is loaded and handed to lm-eval's own Hugging Face class (`HFLM`): the
fine-tuned figures run with the adapter enabled, the base's with it disabled, so both see the same weights, dtype
and device as every other stage. A task named in `eval.harness.tasks` is an lm-eval task or the `task:` of a YAML
under tasks/; one whose dataset is on the hub needs the network once (offline it is one line naming it).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from stages.common.errors import PipelineError, check_finite_figures, run_stage
from stages.common.harness_table import harness_rows
from stages.common.io import write_json
from stages.common.models import load_finetuned, load_tokenizer
from stages.common.params import HarnessParams, load_params
from stages.common.paths import ADAPTER_DIR, HARNESS_METRICS, TASKS_DIR

log = logging.getLogger("pipeline")

BOOTSTRAP_ITERS = 1000  # for the metrics whose standard error the harness bootstraps (lm-eval's default: 100,000)
SEED = 1234  # every seed lm-eval takes: the same documents, few-shot examples and bootstrap on every run


def task_manager(names: list[str]) -> Any:
    """lm-eval's task index with the local YAMLs under tasks/, once every named task was loaded alone, so a name
    lm-eval does not know, a malformed task file or a dataset it cannot load is one line naming it."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in sorted(TASKS_DIR.rglob("*.yaml")):  # lm-eval's index would skip a broken one without a word
        try:
            load_yaml(path, resolve_func=False)
        except Exception as err:  # yaml's errors, and lm-eval's for a file that is no mapping
            raise PipelineError(f"{path}: a task file does not load: {first_line(err)}") from None
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=True)
    for name in names:
        if name not in manager.all_tasks:
            raise PipelineError(f"eval.harness.tasks '{name}': no such lm-eval task, nor a task: in {TASKS_DIR}/*.yaml")
        try:
            manager.load([name])
        except Exception as err:  # datasets raises many types: offline, a missing file, a bad config
            raise PipelineError(
                f"eval.harness.tasks '{name}': its documents could not be loaded ({first_line(err)}); a hub task "
                "needs the network once, then its dataset is cached"
            ) from None
    return manager


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def evaluate(lm: Any, manager: Any, harness: HarnessParams) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=lm,
        tasks=harness.tasks,
        task_manager=manager,
        num_fewshot=harness.num_fewshot,
        limit=harness.limit,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
        random_seed=SEED,
        numpy_random_seed=SEED,
        torch_random_seed=SEED,
        fewshot_random_seed=SEED,
    )["results"]


def figures(base: dict[str, Any], finetuned: dict[str, Any]) -> dict[str, Any]:
    """{task: {documents, metric: {base, finetuned, difference, base_stderr, finetuned_stderr}}} from lm-eval's
    results, whose keys read `metric,filter` (`acc,none`) and `metric_stderr,filter`."""
    table: dict[str, Any] = {}
    for task, results in finetuned.items():
        table[task] = {"documents": results.get("sample_len")}
        for key, value in results.items():
            metric, _, kind = key.partition(",")
            if metric.endswith("_stderr") or not kind or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name = metric if kind in ("", "none") else f"{metric} ({kind})"
            before = base[task][key]
            check_finite_figures({"base": before, "fine-tuned": value}, f"harness task '{task}': {name}")
            table[task][name] = {
                "base": before,
                "finetuned": value,
                "difference": round(value - before, 6),
                "base_stderr": stderr(base[task].get(f"{metric}_stderr,{kind}")),
                "finetuned_stderr": stderr(results.get(f"{metric}_stderr,{kind}")),
            }
    return table


def stderr(value: Any) -> float | None:
    return value if isinstance(value, int | float) and math.isfinite(value) else None  # "N/A" for some metrics


def main() -> None:
    params = load_params()
    harness = params.eval.harness
    logging.getLogger("lm-eval").setLevel(logging.ERROR)  # its notes on a model passed in, not loaded by it
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(harness.tasks)
    model = load_finetuned(params.model, ADAPTER_DIR)
    lm = HFLM(pretrained=model, tokenizer=load_tokenizer(params.model), batch_size=harness.batch_size)
    finetuned = evaluate(lm, manager, harness)
    with model.disable_adapter():
        base = evaluate(lm, manager, harness)
    table = figures(base, finetuned)
    for label, before, after in harness_rows(table):
        log.info("%s: base %.4f -> fine-tuned %.4f", label, before, after)
    write_json(HARNESS_METRICS, table)


if __name__ == "__main__":
    run_stage("evaluate_harness", main)
