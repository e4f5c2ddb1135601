"""Checkpoints and resume: a killed run resumes from its last complete checkpoint, but only a run with the same
params, data and training code (its fingerprint); any other run's checkpoints are removed, a finished run's kept
and never resumed."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from stages.common.params import Params

STAGES = Path(__file__).resolve().parents[1]
# The code a run's result depends on: a checkpoint written by other code is not resumed.
CODE_FILES = [
    STAGES / "__init__.py",  # the CPU kernel pins
    STAGES / "finetune.py",
    *sorted(STAGES.glob("common/*.py")),
    *sorted(STAGES.glob("finetuning/*.py")),
]

log = logging.getLogger("pipeline")


def fingerprint(params: Params, files: list[Path], data_digest: bytes = b"") -> str:
    """Identity of a training run: its params, its data and the training code. Checkpoints resume only on a match."""
    digest = hashlib.sha256()
    # the tokenize and data params are in the data (its digest): only this stage's own params here
    digest.update(json.dumps(params.sections("model", "lora", "train"), sort_keys=True).encode())
    digest.update(data_digest)
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(params: Params, data_digest: bytes) -> str:
    return fingerprint(params, CODE_FILES, data_digest)


def checkpoint_to_resume(checkpoints: Path, run_id: str) -> str | None:
    """The last complete checkpoint of the same run, if any. Checkpoints of any other run, and one cut short
    while being written (no trainer_state.json yet), are removed."""
    stamp = checkpoints / "fingerprint.txt"
    if checkpoints.is_dir() and (not stamp.is_file() or stamp.read_text() != run_id):
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    stamp.write_text(run_id)
    saved = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
    complete = [p for p in saved if (p / "trainer_state.json").is_file()]
    for partial in set(saved) - set(complete):
        shutil.rmtree(partial)
    if complete:
        log.info("resuming from %s", complete[-1])
        return str(complete[-1])
    return None


def mark_complete(checkpoints: Path) -> None:
    """A finished run's checkpoints are kept (and pushed) but never resumed: a forced rerun trains again."""
    (checkpoints / "fingerprint.txt").write_text("complete")
