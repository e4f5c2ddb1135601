"""The pipeline's seven stages; each module runs as `python -m stages.<name>`."""

import os
import sys

# CPU kernel paths pinned to what every x86-64 CPU of the last decade has, so a run gives the same bytes on another
# processor (docs: reproducibility). ATen's vectorized kernels (softmax, norms, attention) otherwise take the widest
# instructions the CPU has: AVX-512 and AVX2 give figures 1e-5 apart. MKL's matrix products otherwise take its
# AVX-512 branch on Intel and its AVX2 branch on AMD. Measured on a 2-core AMD EPYC: evaluate_ppl 26.0 s either way.
# Set before torch is imported (this package is); a value the user set wins.
CPU_KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
for _name, _value in CPU_KERNEL_PINS.items():
    os.environ.setdefault(_name, _value)


def _announce_stage() -> None:
    """A stage imports torch, transformers and friends before its main() can log anything: 10-20 s of silence on a
    CPU. Run as `python -m stages.<name>`, this package is imported first, so it says what the pause is."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1].startswith("stages."):
        stage = argv[argv.index("-m") + 1].removeprefix("stages.")
        print(f"[{stage}] starting: importing libraries ...", file=sys.stderr, flush=True)


_announce_stage()
