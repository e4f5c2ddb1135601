"""Start the finetune stage as one torch.distributed job of `train.processes` processes on this machine.

dvc.yaml runs `python -m stages.finetune` with no param in its command line (a value pasted into a shell command is
one `dvc exp run -S` away from running anything); the stage reads `train.processes` through the typed params and,
when it is above 1, starts the processes itself with the environment `torchrun` / `accelerate launch` would give
them. Rank 0 talks to the console; the others write to a log that is shown only when one of them fails, so a failed
run prints one `error:` line, not one per process plus a launcher's traceback. Already inside a launched job (the
user ran `accelerate launch` or `torchrun` themselves, e.g. across machines), nothing is started.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages.common.errors import PipelineError

ERROR_EXIT = 2  # run_stage's exit code for an error it already printed as one line


def inside_launched_job() -> bool:
    return "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_env(rank: int, processes: int, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(processes),
        "LOCAL_WORLD_SIZE": str(processes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _last_error(log: Path) -> str | None:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else None)


def run_processes(processes: int, module: str, gpus: int | None = None) -> int:
    """Run `python -m module` in `processes` processes, one per GPU when there are GPUs (`gpus`: how many; counted
    when not given); when one fails the others are stopped. Returns the exit code."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if gpus and processes > gpus:
        raise PipelineError(f"train.processes is {processes} but this machine has {gpus} GPU(s)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="finetune-ranks-") as logs:
        children, logs_of = [], {}
        for rank in range(processes):
            log = Path(logs) / f"rank{rank}.log"
            logs_of[rank] = log
            stream = None if rank == 0 else log.open("w")
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", module], env=_rank_env(rank, processes, port), stdout=stream, stderr=stream
                )
            )
        failed = _wait_for_all_or_a_failure(children)
        if failed is None:
            return 0
        if children[0].returncode == ERROR_EXIT:
            return ERROR_EXIT  # rank 0 printed its one line
        code = children[failed].returncode
        detail = _last_error(logs_of[failed]) if failed else None
        message = detail if detail and detail.startswith("error: ") else f"error: finetune process {failed} failed"
        if detail and not detail.startswith("error: "):
            message += f" (exit {code}): {detail}"
        print(message, file=sys.stderr)
        return ERROR_EXIT


def _wait_for_all_or_a_failure(children: list[subprocess.Popen], grace_s: float = 5.0) -> int | None:
    """Wait until every process has ended or one has failed; then give the rest `grace_s` to end on their own (a
    failure seen by all, such as a non-finite loss, ends each with its own message) before stopping them.
    Returns the rank of the first failed process, or None when all succeeded."""
    while True:
        codes = [child.poll() for child in children]
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None or all(code == 0 for code in codes):
            break
        time.sleep(0.2)
    if failed is None:
        return None
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(child.poll() is None for child in children):
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        child.wait()
    return failed
