"""Scale bench on CPU: how the data path holds up at 10k, 100k and 1M instruction records.

    python bench/scale.py                          # 10k, 100k and 1M records; bench/results/scale_<machine>_<date>.json
    python bench/scale.py --records 10000 --out /tmp/scale.json     # one size, anywhere
    python bench/scale.py --records 4000000 --stages 1 --out bench/results/source_2gib.json   # a 2 GiB source

For each size, a scratch project (this repository's stages, the default params.yaml) gets a synthetic Alpaca-shaped
source: the bundled Self-Instruct seed tasks, each with a numbered suffix so that none is a duplicate, cycled up to
the size. Then, each in its own process, as `dvc repro` runs them: prepare_subset (every record but 100 to train,
`data.train_size: all`), tokenize, the finetune stage's data load (the memory-mapped splits opened, their digest for
resuming, the length-grouped sampler's lengths), and the finetune stage itself up to its first optimizer step
(`train.epochs` set so that the run is one step). Each row: wall seconds and the process's peak resident memory.
Bytes per token: the tokenized train split on disk, and the data load's resident growth, over the split's tokens.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.common.params import with_overrides  # noqa: E402

SEED_TASKS = REPO / "data/raw/seed_tasks_alpaca.jsonl"
EVAL_RECORDS = 100
STAGES = ("prepare_subset", "tokenize", "finetune data load", "finetune to step 1")  # each needs those before it
DATA_LOAD = """
import json, resource, time
import pyarrow  # imported before the first reading: its own ~40 MB are not the data's
from stages.finetuning.loop import TrainingData
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
data = TrainingData.load()
data.digest()
lengths = data.train.lengths.tolist()
print(json.dumps({"seconds": time.perf_counter() - started, "tokens": data.train.tokens(),
                  "grown_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


def write_source(path: Path, records: int) -> None:
    """`records` Alpaca records: the seed tasks with a numbered suffix, so that no two have the same content."""
    seeds = [json.loads(line) for line in SEED_TASKS.read_text().splitlines() if line.strip()]
    with path.open("w") as out:
        for number, seed in zip(range(records), itertools.cycle(seeds), strict=False):
            out.write(json.dumps({**seed, "instruction": f"{seed['instruction']} (variant {number})"}) + "\n")


def scratch_project(root: Path, records: int) -> None:
    root.mkdir(parents=True)
    os.symlink(REPO / "stages", root / "stages")
    (root / "data/raw").mkdir(parents=True)
    write_source(root / "data/raw/scale.jsonl", records)
    train_rows = records - EVAL_RECORDS
    params = with_overrides(
        yaml.safe_load((REPO / "params.yaml").read_text()),
        {
            "data.source": "data/raw/scale.jsonl",
            "data.train_size": "all",
            "data.eval_size": EVAL_RECORDS,
            # one optimizer step: the effective batch's share of an epoch
            "train.epochs": 16 / train_rows * 0.99,
            "train.logging_steps": 1,
        },
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def measured(root: Path, argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak resident GiB, stdout) of one process run in `root`, alone in a fresh parent, so that the
    children's peak is its own."""
    probe = (
        "import resource, subprocess, sys, time; started = time.perf_counter(); "
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "seconds = time.perf_counter() - started; "
        "sys.stderr.write(done.stderr); sys.stdout.write(done.stdout); "
        "print(f'@@ {seconds} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {done.returncode}')"
    )
    done = subprocess.run([sys.executable, "-c", probe, *argv], cwd=root, capture_output=True, text=True)
    *output, last = done.stdout.rstrip("\n").split("\n")
    _, seconds, kib, code = last.split()
    if code != "0":
        raise SystemExit(f"{' '.join(argv)} failed in {root}:\n{done.stderr[-3000:]}")
    return float(seconds), int(kib) / 2**20, "\n".join(output)


def run_size(records: int, work: Path, stages: tuple[str, ...] = STAGES) -> tuple[list[dict], dict]:
    root = work / f"records_{records}"
    scratch_project(root, records)
    print(f"{records:>9,} source {(root / 'data/raw/scale.jsonl').stat().st_size / 2**30:.2f} GiB", flush=True)
    rows, figures, load = [], {}, None
    for stage in stages:
        if stage == "finetune data load":
            _, peak, output = measured(root, [sys.executable, "-c", DATA_LOAD])
            load = json.loads(output.splitlines()[-1])
            seconds = load["seconds"]
        else:
            module = "finetune" if stage == "finetune to step 1" else stage
            seconds, peak, _ = measured(root, [sys.executable, "-m", f"stages.{module}"])
        rows.append({"records": records, "stage": stage, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 3)})
        print(f"{records:>9,} {stage:<18} {seconds:8.1f} s {peak:6.2f} GiB", flush=True)
    if load:
        train_file = root / "data/tokenized/train.arrow"
        figures = {
            "tokens": load["tokens"],
            "bytes_per_token_disk": train_file.stat().st_size / load["tokens"],
            "bytes_per_token_memory": load["grown_kib"] * 1024 / load["tokens"],
        }
    shutil.rmtree(root)
    return rows, figures


def machine() -> dict:
    with open("/proc/meminfo") as meminfo:
        total_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {"cores": os.cpu_count(), "memory_gib": round(total_kib / 2**20, 1), "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", type=Path, help="default: bench/results/scale_cpu<cores>_<date>.json")
    parser.add_argument("--stages", type=int, default=len(STAGES), help=f"the first N of {STAGES} (default: all)")
    args = parser.parse_args()
    device = machine()
    out = args.out or REPO / f"bench/results/scale_cpu{device['cores']}_{datetime.date.today()}.json"
    runs, per_size = [], {}
    print(f"{'records':>9} {'stage':<18} {'wall':>10} {'peak RSS':>10}")
    with tempfile.TemporaryDirectory(prefix="scale-") as work:
        for records in args.records:
            rows, figures = run_size(records, Path(work), STAGES[: args.stages])
            runs += rows
            per_size[records] = figures
    result = {"device": device, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}
    largest = per_size[max(per_size)]
    if largest:  # the data load ran
        result |= {
            "bytes_per_token_disk": round(largest["bytes_per_token_disk"], 3),
            "bytes_per_token_memory": round(largest["bytes_per_token_memory"], 3),
            "per_size": {str(k): {key: round(v, 3) for key, v in f.items()} for k, f in per_size.items()},
        }
        print(
            f"bytes per token: {result['bytes_per_token_disk']} on disk, {result['bytes_per_token_memory']} in memory"
        )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
