"""One exception type for bad input, and the wrapper that turns it into one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("pipeline")


class PipelineError(Exception):
    """Bad input or a missing resource; the message names the file:line or the params key."""


def check_finite_figures(figures: dict[str, float], what: str) -> None:
    """A NaN or infinite figure is an error, never a metric: it means the model or the data is broken."""
    broken = {kind: value for kind, value in figures.items() if not math.isfinite(value)}
    if broken:
        raise PipelineError(f"{what} is not finite ({broken}); the model's outputs are NaN or infinite")


def _stamp_elapsed(record: logging.LogRecord) -> bool:
    record.elapsed = f"{record.relativeCreated / 1000:.1f}s"  # since the logging module loaded: the stage's start
    return True


def _fail(line: str, code: int) -> None:
    """Print the one error line on a line of its own (progress bars still open would have it follow their last
    update on the same line) and exit with `code`."""
    from stages.common.fragile import close_progress_bars

    close_progress_bars()
    print(line, file=sys.stderr)
    sys.exit(code)


def setup_console(name: str) -> None:
    """Log lines as `[name seconds] message` on stderr: seconds since the process started, so where the time goes
    (imports included) is readable."""
    logging.basicConfig(level=logging.INFO, format=f"[{name} %(elapsed)s] %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_stamp_elapsed)
    # peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning on every
    # run that no user can act on (tests/test_e2e_dvc.py checks a whole run prints no warning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    for logger, start in UNACTIONABLE_NOTICES:
        logging.getLogger(logger).addFilter(lambda record, start=start: not record.getMessage().startswith(start))


# Library log lines that read like errors and that no user can act on, each dropped by its logger and opening words.
# bitsandbytes (the test extra), imported on a CPU with AVX-512 BF16, fetches a 4-bit CPU kernel from the hub
# (kernels-community/quantization-bitsandbytes) for every model load; offline the fetch logs both lines below and
# bitsandbytes keeps its own kernel, and no stage computes in 4-bit on a CPU.
UNACTIONABLE_NOTICES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"),
)


PARAMS_FILE = Path("params.yaml")


def _params_bytes() -> bytes | None:
    try:
        return PARAMS_FILE.read_bytes()
    except OSError:
        return None  # the stage's own load_params says what is wrong


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main(): log its duration, map bad input and a failed write (a full disk, a read-only folder) to
    `error: ...` (exit 2) and Ctrl-C to exit 130. A params.yaml that changed while the stage ran (a second `dvc exp
    run` in this checkout) fails it: DVC would record the new values beside outputs made with the old ones."""
    setup_console(name)
    started = time.perf_counter()
    params_at_start = _params_bytes()
    try:
        from stages.common.io import remove_stale_temporaries  # io needs this module's PipelineError

        remove_stale_temporaries()
        main()
        if _params_bytes() != params_at_start:
            raise PipelineError(
                f"{PARAMS_FILE} changed while {name} ran (another `dvc exp run` in this checkout?), so its outputs "
                "match neither version; run experiments one at a time, or queue them: dvc exp run --queue, then "
                "dvc queue start"
            )
    except PipelineError as err:
        _fail(f"error: {err}", 2)
    except KeyboardInterrupt:
        _fail(f"error: {name} interrupted; no output was written", 130)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        _fail(f"error: {err.filename or name}: {err.strerror}; no output was written", 2)
    log.info("done in %.1f s", time.perf_counter() - started)
    # The interpreter's last collections walk every object that torch, transformers and peft created (1.3-1.6 s
    # after a GPU stage on an H200, 0.3 s frozen): nothing is left to collect, files are closed, atexit still runs.
    gc.freeze()
    gc.disable()


WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}  # the disk's, not the code's


@contextlib.contextmanager
def one_at_a_time(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (an existing file, only locked, never written) while `what` runs: a second
    one started in the same checkout stops with one line instead of writing the same outputs at once. The kernel
    drops the lock when the process ends, killed or not, so nothing is left behind."""
    import fcntl

    with lock_file.open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"another {what} is running in this checkout; wait for it to end (or queue experiments: "
                "dvc exp run --queue)"
            ) from None
        yield
