"""Every path a stage reads or writes, in one place; dvc.yaml lists the same paths as deps and outs."""

from pathlib import Path

from stages.common.errors import PipelineError

RAW_DIR = Path("data/raw")
SUBSET_DIR = Path("data/subset")
SUBSET_SOURCE = SUBSET_DIR / "source.json"  # the data params the subset was drawn with
TOKENIZED_DIR = Path("data/tokenized")
PROVENANCE = TOKENIZED_DIR / "provenance.json"  # data and tokenize params behind the tokenized rows
ADAPTER_DIR = Path("models/adapter")
CHECKPOINT_DIR = Path("models/checkpoints")
BASE_MODELS_DIR = Path("models/base")  # local base models (a DVC dep)
EMBEDDERS_DIR = Path("models/embedder")  # local sentence embedders (a DVC dep)
LIVE_DIR = Path("dvclive")  # dvclive's folder: metrics.json (the summary) and plots/metrics/<name>.tsv
CURVES_DIR = LIVE_DIR / "plots/metrics"  # train/loss.tsv, train/learning_rate.tsv, train/grad_norm.tsv, eval/loss.tsv
PLOTS_DIR = Path("plots")
DATA_METRICS = Path("metrics/data.json")
TRAIN_METRICS = LIVE_DIR / "metrics.json"  # model figures only: two runs of the same inputs give the same file
TRAIN_REPORT = Path("reports/train_run.json")  # timings, throughput, memory, resume: neither a metric nor an out
PERPLEXITY_METRICS = Path("metrics/perplexity.json")
COSINE_METRICS = Path("metrics/cosine.json")
HARNESS_METRICS = Path("metrics/harness.json")  # lm-evaluation-harness tasks, base vs fine-tuned
TASKS_DIR = Path("tasks")  # local lm-evaluation-harness task YAMLs (a DVC dep)
GENERATIONS_REPORT = Path("reports/generations.md")
RESULTS_REPORT = Path("reports/results.md")

MERGED_DIR = Path("models/merged")  # base + adapter folded into plain weights
GGUF_DIR = Path("models/gguf")  # the merged model for llama.cpp and Ollama
ADAPTER_ZIP = Path("models/adapter.zip")  # fixed: no param is ever part of an out path (dvc.yaml says why)


def inside_repository(path: Path, key: str) -> None:
    """A local data file or model folder (each file in it too) lies inside the repository: a link out of it would
    have a stage read what DVC does not track as the project's, from anywhere on the machine. Params name these
    relative to the repository (the schema refuses others); an absolute path comes from code (tests, the bench)."""
    if path.is_absolute():
        return
    root = Path.cwd().resolve()
    for item in [path, *(sorted(path.rglob("*")) if path.is_dir() else [])]:
        if not item.resolve().is_relative_to(root):
            raise PipelineError(f"{key} '{path}': {item} links outside the repository; copy the file in instead")
