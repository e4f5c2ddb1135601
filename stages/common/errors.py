"""One exception type for bad input, and the wrapper that turns it into one line and a non-zero exit."""

from __future__ import annotations

import gc
import logging
import sys
import time
import warnings
from collections.abc import Callable

log = logging.getLogger("pipeline")


class PipelineError(Exception):
    """Bad input or a missing resource; the message names the file:line or the params key."""


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


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main(): log its duration, map bad input to `error: ...` (exit 2) and Ctrl-C to exit 130."""
    setup_console(name)
    started = time.perf_counter()
    try:
        main()
    except PipelineError as err:
        _fail(f"error: {err}", 2)
    except KeyboardInterrupt:
        _fail(f"error: {name} interrupted; no output was written", 130)
    log.info("done in %.1f s", time.perf_counter() - started)
    # The interpreter's last collections walk every object that torch, transformers and peft created (1.3-1.6 s
    # after a GPU stage on an H200, 0.3 s frozen): nothing is left to collect, files are closed, atexit still runs.
    gc.freeze()
    gc.disable()
