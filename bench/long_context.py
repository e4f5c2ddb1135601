"""Long-context GPU profile: a Llama-3-8B-shaped base, 4-bit, rows of 2,048 tokens, the pipeline against TRL.

    python bench/finetune_speed.py --save-tokenizer .bench/tokenizer        # here; carry it to the GPU machine
    python bench/long_context.py --tokenizer .bench/tokenizer --peers-site /tmp/peers   # one GPU
    python bench/long_context.py --smoke       # CPU check of the script itself: tiny Llama, a few records
    python bench/long_context.py --smoke --records 200,50 --seed N   # the float32 recipe check (docs/gpu-speed.md)

The base is Llama-3-8B's configuration (meta-llama/Meta-Llama-3-8B's config.json: 32 layers of 4,096, 8 key/value
heads for 32 query heads, MLP 14,336, vocabulary 128,256, rope theta 500,000) with random weights, saved once as a
bf16 folder and loaded in 4-bit (nf4, bf16 compute) by both rows. SmolLM2's tokenizer stands in for Llama 3's (the
hub is out of reach); its ids all fall inside the vocabulary.

The data: 2,000 training and 200 evaluation records, Alpaca-shaped. Each answer's length in words is drawn from a
log-normal distribution (median 120 words, sigma 1.2, seeded), so most answers are a few hundred tokens and about 3 in
100 run past the 2,048-token row and are cut. The words are the bundled seed tasks' answers, read in a cycle.

Rows, each a whole epoch in the same process tree on the same GPU, from the same 4-bit weights (nf4 without double
quantization, bf16 compute):
- the pipeline: the finetune stage with profiles/seed.yaml and `model.quantization: nf4`, `tokenize.max_length:
  2048`, 16 packed rows per optimizer step, the micro-batch picked under a 24 GiB budget (`train.gpu_memory_gib`).
  Should the seed profile not fit, the row runs again with activation checkpointing on.
- TRL (bench/peers.py trl_packed_epoch): SFTTrainer with its own packing and its defaults, the same LoRA, optimizer
  and 16 rows per step.
- with `--float32-frozen`, `pipeline_fp32`: the pipeline row again, its norms and input embeddings made float32 before
  LoRA is attached, as TRL's QLoRA preparation makes them (the stage keeps them bf16 under bf16 training).
Every eval loss (the untrained base's, each row's) comes from one scorer, finetune_speed.response_eval_loss, on one
base loaded afresh with each row's saved adapter: token-weighted over the answer tokens of the pipeline's tokenized
eval split, each record padded apart, as evaluate_ppl scores. The stage's own eval loss (packed rows) is kept as
`eval_loss_stage`. `--seed` sets every row's training seed (LoRA init, dropout, data order);
`--summarize FILE...` prints the pipeline-against-TRL table of several such runs (a seed each) and their means.
Writes bench/results/long_context_<gpu>_<date>.json: `device`, `profile`, `rows`, and the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune_speed import Pipeline, card_name, free_gpu_memory, response_eval_loss, result_stem  # noqa: E402

from stages.common.tokenized import load_meta, load_split  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    tie_word_embeddings=False,
)
SMOKE_SHAPE = LLAMA3_8B | dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
BASE_SMOKE = "Llama-3-8B's vocabulary and heads at 2 layers of 64, random weights, float32, no quantization"
MAX_LENGTH, ROWS_PER_STEP, GPU_BUDGET_GIB = 2048, 16, 24
TRAIN_RECORDS, EVAL_RECORDS, SMOKE_RECORDS = 2000, 200, (24, 6)
MEDIAN_WORDS, SIGMA = 120, 1.2
MODEL_LINK = "models/base/random-llama3-8b"
PROFILE = {
    "data.source": "data/raw/long.jsonl",
    "data.format": "alpaca",
    "model.quantization": "nf4",
    "tokenize.max_length": MAX_LENGTH,
    "train.effective_batch_size": ROWS_PER_STEP,
    "train.gpu_memory_gib": GPU_BUDGET_GIB,
}
# checkpointing frees nothing under the seed profile's CUDA graphs (stages/common/params.py): those go off
CHECKPOINTING = {"train.gradient_checkpointing": True, "train.cuda_graphs": False}
PIPELINE_TRIES = (("pipeline, seed profile", {}), ("pipeline, activation checkpointing", CHECKPOINTING))
# --float32-frozen's row: before LoRA is attached, the norms and input embeddings become float32, as peft's
# prepare_model_for_kbit_training (which TRL runs on a 4-bit base) makes them, so the residual stream between the
# layers is float32; the stage does that under fp16 only (stages/finetuning/model.py). The output head stays bf16:
# autocast runs its matmul in bf16 either way, and a float32 head would be cast afresh for each of the loss's chunks.
# With a float32 stream bitsandbytes returns each 4-bit layer's output in float32 too (the MLP's 14,336-wide ones
# included): the seed profile's probe found not even 1 row a pass fitting 24 GiB on an H100, so the row runs with
# activation checkpointing and 2 rows per pass, as TRL's row checkpoints (the rows of 2026-12-05 ran with the CUDA
# graphs still on: docs/gpu-speed.md). An experiment, so no param: it asks whether the residual stream's precision
# explains the eval-loss gap.
FLOAT32_TRIES = (("pipeline, float32 stream", CHECKPOINTING | {"train.micro_batch_size": 2}),)
FLOAT32_FROZEN = """
import stages.finetuning.model as chosen
attach_lora = chosen.attach_lora
def float32_then_attach(model, params):
    head = model.get_output_embeddings().weight
    made = [w for w in model.parameters() if w.dtype in (torch.float16, torch.bfloat16) and w is not head]
    for weight in made:  # 4-bit weights are uint8
        weight.data = weight.data.float()
    print(f"float32-frozen: {len(made)} weights, {sum(w.numel() for w in made) / 1e6:.1f}M params", flush=True)
    return attach_lora(model, params)
chosen.attach_lora = float32_then_attach
"""


def build_random_llama(folder: Path, tokenizer_dir: Path, smoke: bool) -> None:
    """Llama-3-8B's configuration with random weights, saved in bf16 (float32 for the smoke run)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlamaConfig(**(SMOKE_SHAPE if smoke else LLAMA3_8B), **special)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.float32 if smoke else torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    free_gpu_memory()


def long_tailed_records(count: int, seed: int) -> list[dict[str, str]]:
    """`count` Alpaca records whose answers are log-normally long (module docstring), each instruction numbered."""
    tasks = [json.loads(line) for line in (REPO / "data/raw/seed_tasks_alpaca.jsonl").read_text().splitlines()]
    words = " ".join(task["output"] for task in tasks).split()
    rng = random.Random(seed)
    records = []
    for number in range(count):
        task = tasks[number % len(tasks)]
        length = max(1, round(rng.lognormvariate(math.log(MEDIAN_WORDS), SIGMA)))
        start = rng.randrange(len(words))
        answer = " ".join(words[(start + i) % len(words)] for i in range(length))
        records.append({"instruction": f"{task['instruction']} ({number})", "input": task["input"], "output": answer})
    return records


def pipeline_row(pipe: Pipeline, train_records: int, prelude: str = "", tries=PIPELINE_TRIES) -> dict[str, Any]:
    """The finetune stage's whole epoch under the first of `tries` that fits the budget: by default the seed profile,
    then activation checkpointing."""
    for label, overrides in tries:
        try:
            row = pipe.finetune(label, overrides, profile=False, prelude=prelude)
        except SystemExit as err:
            print(f"{label} failed: {err}", flush=True)
            continue
        row["records"] = train_records
        return row
    raise SystemExit("no pipeline row ran")


def scored_adapters(model_dir: Path, adapters: dict[str, Path], eval_split: Any, max_length: int, smoke: bool) -> dict:
    """The eval loss of the untrained base ("base") and of each row's saved adapter, every one scored by
    finetune_speed.response_eval_loss on one base loaded as both rows load it: the figures differ by training only."""
    from peers import peer_model
    from peft import PeftModel

    tokenizer, base = peer_model(model_dir, quantized=True, smoke=smoke, double_quant=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scoring = (list(eval_split), pad, None if smoke else torch.bfloat16, max_length, 4)  # 4 rows per pass
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    with model.disable_adapter():
        losses = {"base": response_eval_loss(model, *scoring, "base eval loss")}
    for name in names:
        model.set_adapter(name)
        losses[name] = response_eval_loss(model, *scoring, f"{name} eval loss")
    del model, base
    free_gpu_memory()
    return losses


def summary(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [f"{'row':40} {'epoch s':>8} {'steps':>5} {'s/step':>7} {'peak GiB':>8} {'eval loss':>9} {'tokens/s':>8}"]
    for name, row in rows.items():
        lines.append(
            f"{name:40} {row['epoch_s']:>8.1f} {row['steps']:>5} {row['s_per_step']:>7.2f} {row['peak_gib']:>8.2f} "
            f"{row['eval_loss']:>9.4f} {report['profile']['train_tokens'] / row['epoch_s']:>8.0f}"
        )
    if "base_eval_loss" in report["profile"]:
        lines.append(f"untrained base: eval loss {report['profile']['base_eval_loss']:.4f}")
    if {"pipeline", "trl"} <= rows.keys():
        lines.append(
            f"pipeline vs TRL: epoch {report['speedup_vs_trl']:.2f}x, peak memory {report['peak_vs_trl']:.2f}x, "
            f"eval loss {report['eval_loss_difference']:+.4f}"
        )
    return "\n".join(lines)


def seed_summary(files: list[Path]) -> str:
    """Each run (a seed each) against TRL, and the means: one seed's eval-loss gap is within the seed-to-seed spread.
    Runs may come from different devices: each speedup is a ratio within one run, so the column names the device.
    A line per run and row that is not TRL's (`pipeline`, and `pipeline_fp32` where it ran); a row beside the pipeline's
    is also set against the pipeline's at the same seeds (same data order and LoRA init: a tighter comparison)."""
    runs = [json.loads(file.read_text()) for file in files]
    base = float(np.mean([run["profile"]["base_eval_loss"] for run in runs]))
    digits = loss_digits(base - float(np.mean([run["rows"]["trl"]["eval_loss"] for run in runs])))
    lines = [
        f"{'seed':>4} {'device':6} {'row':14} {'epoch s':>7} {'TRL s':>7} {'speedup':>7} "
        f"{'eval loss':>9} {'TRL':>8} {'gap':>8}"
    ]
    gaps: dict[str, list[float]] = {}
    speedups: dict[str, list[float]] = {}
    trl_losses: dict[str, list[float]] = {}  # TRL's at the seeds where the row ran
    against_pipeline: dict[str, list[float]] = {}
    for run in runs:
        seed = run["command"].split("--seed ")[1].split()[0] if "--seed " in run["command"] else "42"
        device = card_name(run["device"])
        trl = run["rows"]["trl"]
        for name, row in run["rows"].items():
            if name == "trl":
                continue
            gaps.setdefault(name, []).append(row["eval_loss"] - trl["eval_loss"])
            trl_losses.setdefault(name, []).append(trl["eval_loss"])
            speedups.setdefault(name, []).append(trl["epoch_s"] / row["epoch_s"])
            if name != "pipeline" and "pipeline" in run["rows"]:
                against_pipeline.setdefault(name, []).append(row["eval_loss"] - run["rows"]["pipeline"]["eval_loss"])
            lines.append(
                f"{seed:>4} {device:6} {name:14} {row['epoch_s']:>7.1f} {trl['epoch_s']:>7.1f} "
                f"{speedups[name][-1]:>6.2f}x {row['eval_loss']:>9.{digits}f} {trl['eval_loss']:>8.{digits}f} "
                f"{gaps[name][-1]:>+8.{digits}f}"
            )
    for name, gap in gaps.items():
        error = float(np.std(gap, ddof=1) / math.sqrt(len(gap))) if len(gap) > 1 else float("nan")
        trl_loss = float(np.mean(trl_losses[name]))
        drop = base - (trl_loss + float(np.mean(gap)))
        lines.append(
            f"{name}, mean over {len(gap)}: speedup {np.mean(speedups[name]):.2f}x, eval loss gap "
            f"{np.mean(gap):+.{digits}f} (standard error {error:.{digits}f}); loss drop from the base "
            f"{drop:.{digits}f} against TRL's {base - trl_loss:.{digits}f} ({drop / (base - trl_loss):.3f}x)"
        )
    for name, differences in against_pipeline.items():
        each = " ".join(f"{difference:+.{digits}f}" for difference in differences)
        lines.append(f"{name} minus pipeline, same seeds: {each}; mean {np.mean(differences):+.{digits}f}")
    return "\n".join(lines)


def loss_digits(drop: float) -> int:
    """Decimals that show a loss drop of `drop` to 4 significant digits, at least 4: a CPU run's drop of 0.004
    (the float32 check) needs 6, the GPU profile's 0.7 needs 4."""
    return max(4, 3 - math.floor(math.log10(abs(drop)))) if drop else 4


def record_counts(text: str) -> tuple[int, int]:
    """`--records TRAIN,EVAL`: two positive counts."""
    try:
        train, evaluation = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give TRAIN,EVAL, two whole numbers") from None
    if min(train, evaluation) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both counts must be at least 1")
    return train, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=REPO / ".bench/tokenizer", help="a saved tokenizer folder")
    parser.add_argument("--peers-site", type=Path, help="folder holding TRL and datasets installed apart")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/long")
    parser.add_argument("--out", type=Path, help="default: bench/results/long_context_<gpu>_<date>.json")
    parser.add_argument("--skip", default="", help="rows to leave out: pipeline, trl")
    parser.add_argument("--smoke", action="store_true", help="tiny Llama on CPU: checks the script, not speed")
    parser.add_argument("--seed", type=int, default=42, help="both rows' training seed (LoRA init, dropout, order)")
    parser.add_argument(
        "--records", help="TRAIN,EVAL records instead of the profile's 2000,200 (--smoke: 24,6)", type=record_counts
    )
    parser.add_argument(
        "--float32-frozen",
        action="store_true",
        help="add a pipeline row whose norms and input embeddings are float32, as TRL's QLoRA preparation makes them",
    )
    parser.add_argument(
        "--summarize", type=Path, nargs="+", help="print the seed table of these result files, run none"
    )
    args = parser.parse_args()
    if args.summarize:
        print(seed_summary(args.summarize))
        return
    skip = set(filter(None, args.skip.split(",")))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out = args.out or REPO / f"bench/results/{result_stem('long_context', args.smoke)}.json"

    model_dir = args.work / ("random-llama3-smoke" if args.smoke else "random-llama3-8b")
    started = time.perf_counter()
    build_random_llama(model_dir, args.tokenizer, args.smoke)
    print(f"model ready in {time.perf_counter() - started:.0f} s", flush=True)

    train_count, eval_count = args.records or (SMOKE_RECORDS if args.smoke else (TRAIN_RECORDS, EVAL_RECORDS))
    profile = PROFILE | {"data.train_size": train_count, "data.eval_size": eval_count, "train.seed": args.seed}
    if args.smoke:  # TRL's own micro-batch (its row keeps that default) a step: neither row accumulates
        from transformers import TrainingArguments

        trl_micro = TrainingArguments.per_device_train_batch_size
        profile |= {"tokenize.max_length": 256, "train.effective_batch_size": trl_micro, "model.quantization": "none"}
    pipe = Pipeline(args.work / "pipeline", model_dir, args.smoke, profile, model_link=MODEL_LINK)
    raw = pipe.root / "data/raw/long.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps(r) + "\n" for r in long_tailed_records(train_count + eval_count, seed=7)))
    pipe.run("prepare_subset", {})
    pipe.run("tokenize", {})
    pipe.tokenized_with = json.dumps({})  # the rows below train on these splits as they are
    meta = load_meta(pipe.root / "data/tokenized")
    train_split = load_split("train", meta, pipe.root / "data/tokenized")
    eval_split = load_split("eval", meta, pipe.root / "data/tokenized")
    lengths = np.sort(train_split.lengths)
    max_length = pipe.params({})["tokenize"]["max_length"]
    report: dict[str, Any] = {
        "device": device,
        "command": "python bench/long_context.py " + " ".join(sys.argv[1:]),
        "profile": {
            "base": BASE_SMOKE if args.smoke else "Llama-3-8B configuration, random weights, nf4 4-bit, bf16 compute",
            "max_length": max_length,
            "records": {"train": len(train_split), "eval": len(eval_split)},
            "answer_words": f"log-normal, median {MEDIAN_WORDS}, sigma {SIGMA}, seed 7",
            "train_tokens": int(lengths.sum()),
            "example_tokens": {
                "median": int(lengths[len(lengths) // 2]),
                "p95": int(lengths[int(len(lengths) * 0.95)]),
                "max": int(lengths[-1]),
                "cut_at_max_length": int((lengths >= max_length).sum()),
            },
            "rows_per_step": profile["train.effective_batch_size"],
            "lora": "r 4, alpha 8, dropout 0.05, peft's default targets (q_proj, v_proj)",
        },
        "rows": {},
    }

    def save() -> None:
        rows = report["rows"]
        if {"pipeline", "trl"} <= rows.keys():
            report["speedup_vs_trl"] = rows["trl"]["epoch_s"] / rows["pipeline"]["epoch_s"]
            report["peak_vs_trl"] = rows["pipeline"]["peak_gib"] / max(rows["trl"]["peak_gib"], 1e-9)
            report["eval_loss_difference"] = rows["pipeline"]["eval_loss"] - rows["trl"]["eval_loss"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\ndevice: {device}\n{summary(report)}", flush=True)

    adapters = {}
    pipeline_rows = {"pipeline": ("", PIPELINE_TRIES)}
    if args.float32_frozen:
        pipeline_rows["pipeline_fp32"] = (FLOAT32_FROZEN, FLOAT32_TRIES)
    for name, (prelude, tries) in pipeline_rows.items():
        if name in skip:
            continue
        row = pipeline_row(pipe, len(train_split), prelude, tries)
        keep = ("variant", "epoch_s", "steps", "s_per_step", "first_step_s", "probe_s", "graphs_s", "eval_s",
                "micro_batch_size", "peak_gib", "train_loss", "load_s")  # fmt: skip
        report["rows"][name] = {key: row[key] for key in keep} | {"eval_loss_stage": row["eval_loss"]}
        adapters[name] = args.work / f"{name}-adapter"  # the next row's run replaces models/adapter
        shutil.rmtree(adapters[name], ignore_errors=True)
        shutil.copytree(pipe.root / "models/adapter", adapters[name])
    if "trl" not in skip:
        if args.peers_site:  # TRL's packages for this process only: the stage imports what a user's would
            sys.path.insert(0, str(args.peers_site))
        from peers import trl_packed_epoch

        subset = pipe.root / "data/subset/train.jsonl"
        train = [json.loads(line) for line in subset.open()]
        adapters["trl"] = args.work / "trl-adapter"
        report["rows"]["trl"] = trl_packed_epoch(
            model_dir, train, adapters["trl"], max_length, profile["train.effective_batch_size"], args.smoke,
            args.seed,
        )  # fmt: skip
    if adapters:
        losses = scored_adapters(model_dir, adapters, eval_split, max_length, args.smoke)
        report["profile"]["base_eval_loss"] = losses.pop("base")
        for name, loss in losses.items():
            report["rows"][name]["eval_loss"] = loss
        save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
