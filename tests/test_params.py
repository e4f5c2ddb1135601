import copy

import pytest

from stages.common.errors import PipelineError
from stages.common.params import parse_params
from tests.conftest import REPO, load_yaml

DEFAULT = load_yaml(REPO / "params.yaml")


def with_change(path: str, value) -> dict:
    raw = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


PROFILES = ["params.yaml", "profiles/seed.yaml", "profiles/seed-exact.yaml"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_shipped_params_file_validates(profile):
    params = parse_params(load_yaml(REPO / profile), profile)
    assert params.lora.r > 0


@pytest.mark.parametrize("profile", ["profiles/seed.yaml", "profiles/seed-exact.yaml"])
def test_seed_profiles_keep_the_seed_recipe(profile):
    seed = parse_params(load_yaml(REPO / profile))
    assert seed.model.name == "microsoft/phi-2"
    assert seed.model.quantization == "fp4"  # BitsAndBytesConfig(load_in_4bit=True) defaults to fp4
    assert (seed.lora.r, seed.lora.alpha, seed.lora.dropout, seed.lora.target_modules) == (4, 8, 0.05, None)
    assert seed.data.source == "hub:tatsu-lab/alpaca"
    assert (seed.data.train_size, seed.data.eval_size) == (5000, 500)
    assert seed.tokenize.max_length == 128
    assert seed.train.effective_batch_size == 16
    assert (seed.train.learning_rate, seed.train.weight_decay, seed.train.warmup_ratio) == (3e-4, 0.01, 0.0)
    assert (seed.train.epochs, seed.train.logging_steps) == (1, 10)
    assert seed.eval.generate.prompts[0] == "Tell me a story about a brave warrior."
    assert seed.eval.generate.embedder == "sentence-transformers/all-MiniLM-L6-v2"


def test_seed_exact_profile_is_the_seed_verbatim():
    seed = parse_params(load_yaml(REPO / "profiles/seed-exact.yaml"))
    assert seed.model.compute_dtype == "float16"
    assert (seed.tokenize.loss_mask, seed.tokenize.padding) == ("full", "max_length")
    assert (seed.train.micro_batch_size, seed.train.precision, seed.train.gradient_checkpointing) == (2, "fp16", True)
    assert seed.train.group_by_length is False


def test_seed_profiles_differ_only_in_how_they_run():
    fast, exact = (load_yaml(REPO / p) for p in ("profiles/seed.yaml", "profiles/seed-exact.yaml"))
    changed = {
        f"{section}.{key}" for section in fast for key in fast[section] if fast[section][key] != exact[section][key]
    }
    assert changed == {
        "model.compute_dtype",
        "tokenize.loss_mask",
        "train.micro_batch_size",
        "train.precision",
        "train.gradient_checkpointing",
        "train.compile",
        "train.cuda_graphs",
        "eval.ppl",  # batch size: how many rows one forward pass scores, not what is scored
    }


def test_default_keeps_seed_hyperparameters():
    params = parse_params(DEFAULT)
    assert (params.lora.r, params.lora.alpha, params.lora.dropout) == (4, 8, 0.05)
    assert (params.train.learning_rate, params.train.weight_decay) == (3e-4, 0.01)
    assert (params.train.effective_batch_size, params.tokenize.max_length, params.train.logging_steps) == (16, 128, 10)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("lora.rank", 4, "lora.rank is not a known key"),
        ("lora.r", "four", "lora.r must be int"),
        ("lora.r", 0, "lora.r must be > 0"),
        ("train.learning_rate", -1e-4, "train.learning_rate must be > 0"),
        ("train.learning_rate", 0, "train.learning_rate must be > 0"),
        ("model.quantization", "int3", "model.quantization must be one of 'none', 'nf4', 'fp4'"),
        ("train.micro_batch_size", 5, "train.effective_batch_size (16) must be a multiple of train.micro_batch_size"),
        ("train.cuda_graphs", True, "train.cuda_graphs needs train.compile: true"),
        ("data.eval_size", KeyError, "data.eval_size is missing"),
        ("lora.dropout", 1.5, "lora.dropout must be in [0, 1)"),
        ("train.epochs", True, "train.epochs must be float"),
    ],
)
def test_bad_value_is_one_line_naming_the_key(path, value, message):
    with pytest.raises(PipelineError) as err:
        parse_params(with_change(path, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_all_problems_are_reported_at_once():
    raw = with_change("lora.r", 0)
    raw["train"]["precision"] = "fp8"
    with pytest.raises(PipelineError) as err:
        parse_params(raw)
    assert "lora.r" in str(err.value) and "train.precision" in str(err.value)


def test_quantized_base_needs_half_precision_compute():
    raw = with_change("model.quantization", "nf4")
    raw["model"]["compute_dtype"] = "float32"
    with pytest.raises(PipelineError, match="model.compute_dtype must be float16 or bfloat16"):
        parse_params(raw)


def test_scientific_notation_string_is_read_as_float():
    assert parse_params(with_change("train.learning_rate", "3e-4")).train.learning_rate == 3e-4
