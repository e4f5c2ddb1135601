"""Every path a stage reads or writes, in one place; dvc.yaml lists the same paths as deps and outs."""

from pathlib import Path

RAW_DIR = Path("data/raw")
SUBSET_DIR = Path("data/subset")
TOKENIZED_DIR = Path("data/tokenized")
ADAPTER_DIR = Path("models/adapter")
CHECKPOINT_DIR = Path("models/checkpoints")
CURVES_DIR = Path("plots/curves")
PLOTS_DIR = Path("plots")
TRAIN_METRICS = Path("metrics/train.json")
PERPLEXITY_METRICS = Path("metrics/perplexity.json")
COSINE_METRICS = Path("metrics/cosine.json")
GENERATIONS_REPORT = Path("reports/generations.md")
RESULTS_REPORT = Path("reports/results.md")


def package_zip(name: str) -> Path:
    return Path("models") / f"{name}.zip"
