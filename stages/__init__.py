"""The pipeline's seven stages; each module runs as `python -m stages.<name>`."""

import sys


def _announce_stage() -> None:
    """A stage imports torch, transformers and friends before its main() can log anything: 10-20 s of silence on a
    CPU. Run as `python -m stages.<name>`, this package is imported first, so it says what the pause is."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("stages."):
        stage = argv[argv.index("-m") + 1].removeprefix("stages.")
        print(f"[{stage}] starting: importing libraries ...", file=sys.stderr, flush=True)


_announce_stage()
