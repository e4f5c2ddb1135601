"""Zip the trained adapter (weights, tokenizer, resolved params, a model card) into one shareable file.

    python -m stages.package_zip

Reads models/adapter/; writes models/<package.name>.zip. Only regular files inside the adapter folder go in
(symlinks are skipped, never followed), with fixed timestamps so the same adapter gives the same zip bytes.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from stages.common.errors import PipelineError, run_stage
from stages.common.io import atomic_path, read_json
from stages.common.params import load_params
from stages.common.paths import ADAPTER_DIR, package_zip

log = logging.getLogger("pipeline")

FIXED_TIME = (1980, 1, 1, 0, 0, 0)
MODEL_CARD = "README.md"  # replaces the blank template peft writes


def adapter_files(folder: Path) -> list[Path]:
    """Regular files under `folder`, symlinks skipped: nothing outside the folder can end up in the zip."""
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            log.warning("skipping symlink %s", path)
        elif path.is_file():
            files.append(path)
    return files


def model_card(folder: Path) -> str:
    params = read_json(folder / "params.json")
    model, lora, train, data = params["model"], params["lora"], params["train"], params["data"]
    return "\n".join(
        [
            f"# LoRA adapter for {model['name']}",
            "",
            f"- base model: `{model['name']}` (revision {model['revision'] or 'latest'}, "
            f"quantization {model['quantization']}, compute {model['compute_dtype']})",
            f"- LoRA: r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
            f"target modules {lora['target_modules'] or 'peft default'}",
            f"- training: {train['epochs']} epoch(s), effective batch {train['effective_batch_size']}, "
            f"lr {train['learning_rate']}, weight decay {train['weight_decay']}, {train['precision']}",
            f"- data: `{data['source']}`, {data['train_size']} train / {data['eval_size']} eval rows, "
            f"seed {data['seed']}",
            "",
            "Load: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base>), <this folder>)`.",
            "Every setting is in `params.json`.",
            "",
        ]
    )


def write_zip(folder: Path, target: Path) -> int:
    files = adapter_files(folder)
    if not any(f.name == "adapter_config.json" for f in files):
        raise PipelineError(f"{folder}: no trained adapter (adapter_config.json missing); run finetune first")
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            if path.relative_to(folder).as_posix() == MODEL_CARD:
                continue
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
        archive.writestr(zipfile.ZipInfo(MODEL_CARD, FIXED_TIME), model_card(folder))
    return len(archive.namelist())


def main() -> None:
    params = load_params().package
    target = package_zip(params.name)
    count = write_zip(ADAPTER_DIR, target)
    log.info("%d files from %s -> %s (%.1f MiB)", count, ADAPTER_DIR, target, target.stat().st_size / 2**20)


if __name__ == "__main__":
    run_stage("package_zip", main)
