"""Charts and a results table of what the fine-tune changed.

    python -m stages.plot

Reads metrics/{perplexity,cosine,harness}.json and dvclive's summary and loss curves (dvclive/metrics.json,
dvclive/plots/metrics/{train,eval}/loss.tsv); writes plots/perplexity.png (base
blue, fine-tuned orange, both perplexity kinds, values on the bars), plots/loss.png, plots/perplexity.csv (the
table behind `dvc plots show` / `dvc plots diff`, declared in dvc.yaml) and reports/results.md (the README's
results section is a copy of it; tests/test_readme.py keeps them equal).
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from stages.common.errors import PipelineError, run_stage  # noqa: E402
from stages.common.harness_table import harness_rows  # noqa: E402
from stages.common.io import atomic_path, read_json  # noqa: E402
from stages.common.params import load_params  # noqa: E402
from stages.common.paths import (  # noqa: E402
    COSINE_METRICS,
    CURVES_DIR,
    HARNESS_METRICS,
    PERPLEXITY_METRICS,
    PLOTS_DIR,
    RESULTS_REPORT,
    TRAIN_METRICS,
)

MODELS = {"base": ("base", "tab:blue"), "finetuned": ("fine-tuned", "tab:orange")}
# each perplexity metrics/perplexity.json may hold (seed: unless eval.ppl.seed_way is off), in the chart's order
KIND_LABELS = {"seed": "seed-comparable\n(all positions, padding included)", "response": "response only\n(honest)"}


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found; run finetune first") from None
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def save_figure(fig: plt.Figure, target: Path, dpi: int) -> None:
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def measured_kinds(metrics: dict) -> list[str]:
    return [kind for kind in KIND_LABELS if kind in metrics["base"]]


def perplexity_chart(metrics: dict, target: Path, dpi: int) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.38
    kinds = measured_kinds(metrics)
    for offset, (model, (label, color)) in zip((-width / 2, width / 2), MODELS.items(), strict=True):
        values = [metrics[model][kind] for kind in kinds]
        bars = ax.bar([i + offset for i in range(len(kinds))], values, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=2)
    ax.set_xticks(range(len(kinds)), [KIND_LABELS[k] for k in kinds])
    ax.set_ylabel("perplexity on the eval split (lower is better)")
    ax.set_title(f"Perplexity, base vs fine-tuned ({metrics['rows']} held-out rows)")
    ax.margins(y=0.15)
    ax.legend()
    save_figure(fig, target, dpi)


def loss_chart(target: Path, dpi: int) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, style in (("train", "-"), ("eval", "o--")):
        steps, losses = read_curve(CURVES_DIR / name / "loss.tsv")
        ax.plot(steps, losses, style, label=f"{name} loss")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title("Training curves")
    ax.legend()
    save_figure(fig, target, dpi)


def perplexity_table(metrics: dict, target: Path) -> None:
    """One row per (kind, model): the table `dvc plots` renders as horizontal bars."""
    with atomic_path(target) as tmp, tmp.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["bar", "model", "kind", "perplexity"])
        for kind in measured_kinds(metrics):
            for model, (label, _) in MODELS.items():
                writer.writerow([f"{kind}: {label}", label, kind, round(metrics[model][kind], 4)])


def results_markdown(perplexity: dict, cosine: dict, train: dict, harness: dict) -> str:
    """The figures a reader checks first, as a Markdown table, straight from the metrics files. No timings: the
    README holds a copy that tests compare with a fresh run, which any machine must reproduce."""
    rows = [("perplexity, response only (honest)", perplexity["base"]["response"], perplexity["finetuned"]["response"])]
    if "seed" in perplexity["base"]:  # unless eval.ppl.seed_way was off
        rows.append(
            ("perplexity, seed way (padding included)", perplexity["base"]["seed"], perplexity["finetuned"]["seed"])
        )
    rows += [
        ("answer length, words (mean)", cosine["words"]["base"], cosine["words"]["finetuned"]),
        ("outputs running on past the answer", cosine["runs_on_share"]["base"], cosine["runs_on_share"]["finetuned"]),
    ]
    if "to_reference" in cosine:
        rows.append(
            ("cosine to the reference answer", cosine["to_reference"]["base"], cosine["to_reference"]["finetuned"])
        )
    rows += harness_rows(harness)
    lines = ["| figure | base | fine-tuned |", "|---|---|---|"]
    lines += [f"| {name} | {base:.3f} | {tuned:.3f} |" for name, base, tuned in rows]
    rules = cosine["run_on_rules"]
    fired = [rule for rule in rules["base"] if rules["base"][rule] or rules["finetuned"][rule]]
    lines += [
        f"| run on by rule: {rule} (outputs) | {rules['base'][rule]} | {rules['finetuned'][rule]} |" for rule in fired
    ]
    lines += [
        "",
        f"Mean cosine similarity of base vs fine-tuned generations: **{cosine['mean']:.3f}** over "
        f"{cosine['prompts']} prompts. Perplexity over {perplexity['rows']} held-out rows "
        f"({perplexity['tokens']['response']} answer tokens). Training: {train['step']} optimizer steps, "
        f"final train loss {train['train']['loss']:.3f}, eval loss {train['eval']['loss']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    params = load_params().plot
    metrics = read_json(PERPLEXITY_METRICS)
    perplexity_chart(metrics, PLOTS_DIR / "perplexity.png", params.dpi)
    loss_chart(PLOTS_DIR / "loss.png", params.dpi)
    perplexity_table(metrics, PLOTS_DIR / "perplexity.csv")
    with atomic_path(RESULTS_REPORT) as tmp:
        report = results_markdown(
            metrics, read_json(COSINE_METRICS), read_json(TRAIN_METRICS), read_json(HARNESS_METRICS)
        )
        tmp.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    run_stage("plot", main)
