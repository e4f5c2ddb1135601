"""Zip the trained adapter (weights, tokenizer, resolved params, a model card) into one shareable file.

    python -m stages.package_zip

Reads models/adapter/ and the evaluation metrics (for the card); writes models/adapter.zip. Only what a user needs
goes in: the adapter's safetensors and configs, the tokenizer, params.json and the model card. Never a pickle (.bin,
.pt, .pkl: loading one can run code), never a link (a symlink or a hard link could carry a file from outside the
folder), never a subfolder. Entries get fixed timestamps, so the same adapter gives the same zip bytes.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from stages.common.errors import PipelineError, run_stage
from stages.common.io import atomic_path
from stages.common.made_with import read_made_with
from stages.common.model_card import evaluation_figures, model_card
from stages.common.models import check_adapter_files
from stages.common.params import load_params
from stages.common.paths import ADAPTER_DIR, ADAPTER_ZIP

log = logging.getLogger("pipeline")

FIXED_TIME = (1980, 1, 1, 0, 0, 0)
MODEL_CARD = "README.md"  # written anew with the package name as its title
SHIPPED_SUFFIXES = {".safetensors", ".json", ".jinja", ".txt", ".model"}  # weights, configs, tokenizer files
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")


def adapter_files(folder: Path) -> list[Path]:
    """The regular, unlinked files directly in `folder` whose type is shipped; everything else is left out, said so."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.name == MODEL_CARD and path.is_file() and not path.is_symlink():
            continue  # written anew into the zip
        if path.is_symlink() or not path.is_file():
            log.warning("not packaged: %s is a link or a folder", path)
        elif path.stat().st_nlink > 1:
            log.warning("not packaged: %s is a hard link (its content may live outside the adapter)", path)
        elif path.suffix.lower() not in SHIPPED_SUFFIXES:
            log.warning("not packaged: %s (only safetensors, configs and tokenizer files; no pickles)", path)
        else:
            files.append(path)
    return files


def write_zip(folder: Path, target: Path, name: str = "adapter", metrics: dict | None = None) -> int:
    files = adapter_files(folder)
    for required in REQUIRED:
        if not any(f.name == required for f in files):
            raise PipelineError(f"{folder}: no trained adapter ({required} missing); run finetune first")
    check_adapter_files(folder)
    card = model_card(read_made_with(folder / "params.json"), title=name, metrics=metrics)
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            info = zipfile.ZipInfo(path.name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16  # the same mode whoever zips it
            archive.writestr(info, path.read_bytes())
        info = zipfile.ZipInfo(MODEL_CARD, FIXED_TIME)
        info.external_attr = 0o644 << 16
        archive.writestr(info, card)
    return len(archive.namelist())


def main() -> None:
    params = load_params().package
    count = write_zip(ADAPTER_DIR, ADAPTER_ZIP, params.name, evaluation_figures())
    log.info("%d files from %s -> %s (%.1f MiB)", count, ADAPTER_DIR, ADAPTER_ZIP, ADAPTER_ZIP.stat().st_size / 2**20)


if __name__ == "__main__":
    run_stage("package_zip", main)
