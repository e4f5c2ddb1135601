"""The default run's micro-batch on a CPU: peak memory of the finetune stage against its time, one epoch each.

    python bench/cpu_micro_batch.py                 # micro-batches 8, 4, 2 and 8 with activation checkpointing
    python bench/cpu_micro_batch.py --epochs 0.2    # a quick look

A scratch project (this repository's stages and params.yaml, the bundled seed tasks) is prepared and tokenized once;
then the finetune stage runs `--epochs` of the default's data in its own process for each setting, 16 rows per
optimizer step in every one. Each row: the process's peak resident memory, the Trainer's training seconds and their
ratio to the first row's (the default before it took the seed's micro-batch of 2), all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scale import measured  # noqa: E402

from stages.common.params import with_overrides  # noqa: E402

SETTINGS = {
    "micro-batch 8": {"train.micro_batch_size": 8},
    "micro-batch 4": {"train.micro_batch_size": 4},
    "micro-batch 2": {"train.micro_batch_size": 2},
    "micro-batch 8, activation checkpointing": {"train.micro_batch_size": 8, "train.gradient_checkpointing": True},
}


def write_params(root: Path, overrides: dict) -> None:
    params = with_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="micro-") as work:
        root = Path(work)
        os.symlink(REPO / "stages", root / "stages")
        shutil.copytree(REPO / "data/raw", root / "data/raw")
        write_params(root, {})
        for stage in ("prepare_subset", "tokenize"):
            measured(root, [sys.executable, "-m", f"stages.{stage}"])
        for label, overrides in SETTINGS.items():
            write_params(root, overrides | {"train.epochs": args.epochs})
            shutil.rmtree(root / "models/checkpoints", ignore_errors=True)  # time training, not resuming
            _, peak, _ = measured(root, [sys.executable, "-m", "stages.finetune"])
            report = json.loads((root / "reports/train_run.json").read_text())
            rows.append((label, peak, report["train_seconds"]))
            print(f"{label}: {peak:.2f} GiB, {report['train_seconds']:.1f} s", flush=True)
    first = rows[0][2]
    print(f"\n{'setting':42} {'peak GiB':>8} {'train s':>8} {'vs first':>8}")
    for label, peak, seconds in rows:
        print(f"{label:42} {peak:>8.2f} {seconds:>8.1f} {seconds / first:>7.2f}x")


if __name__ == "__main__":
    main()
