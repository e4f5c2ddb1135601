"""The one typed schema for params.yaml.

Every stage calls `load_params()` first: unknown keys, wrong types and impossible values are all gathered and
reported in one line naming each dotted key, before any model or data is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from stages.common.errors import PipelineError
from stages.common.paths import BASE_MODELS_DIR, EMBEDDERS_DIR, RAW_DIR

PARAMS_FILE = Path("params.yaml")


def _check(predicate, message: str) -> dict:
    return {"check": (predicate, message)}


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def between(low: float, high: float) -> dict:
    return _check(lambda v: low <= v <= high, f"must be in [{_show(low)}, {_show(high)}]")


def above(low: float, high: float) -> dict:
    return _check(lambda v: low < v <= high, f"must be in ({_show(low)}, {_show(high)}]")


def _is_relative_under(value: str, folder: Path) -> bool:
    """`value` names something strictly inside `folder` (a repo-relative folder), with no way out of it."""
    path = PurePosixPath(value)
    return (
        not path.is_absolute()
        and "\\" not in value
        and ".." not in path.parts
        and path.parts[: len(folder.parts)] == folder.parts
        and len(path.parts) > len(folder.parts)
    )


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
PACKAGE_SPEC = re.compile(r"^pkg:[A-Za-z_]\w*/[\w./-]+$")
SEED = between(0, 2**32 - 1)  # numpy's and the Trainer's seed range
BATCH = between(1, 65536)
NOT_EMPTY = _check(lambda v: len(v) > 0, "must not be empty")
PROBABILITY = _check(lambda v: 0 <= v < 1, "must be in [0, 1)")
SLUG = _check(
    lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v) is not None,
    "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
)


def model_location(folder: Path) -> dict:
    """A hub id, a file or folder inside an installed package, or a folder under `folder` (which DVC tracks as a
    dependency, so editing a local model reruns what uses it). Nothing outside the repository."""
    return _check(
        lambda v: (
            v.startswith("pkg:")
            and PACKAGE_SPEC.match(v)
            and ".." not in v.split("/")
            or (not v.startswith("pkg:") and (_is_relative_under(v, folder) or (HUB_ID.match(v) and ".." not in v)))
        ),
        f"must be a hub id (owner/name), pkg:<package>/<path>, or a folder under {folder.as_posix()}/ (DVC tracks it)",
    )


DATA_LOCATION = _check(
    lambda v: (
        (v.startswith("hub:") and HUB_ID.match(v[4:]) is not None and ".." not in v)
        or (not v.startswith("hub:") and _is_relative_under(v, RAW_DIR))
    ),
    f"must be hub:<dataset id> or a file under {RAW_DIR.as_posix()}/ (DVC tracks that folder)",
)


@dataclass(frozen=True)
class DataParams:
    source: str = field(metadata=DATA_LOCATION)  # a file under data/raw/, or "hub:<dataset id>"
    format: Literal["auto", "alpaca", "messages", "sharegpt"]  # stages/common/records.py
    revision: str | None
    split: str = field(metadata=NOT_EMPTY)
    train_size: int | Literal["all"] = field(metadata=between(1, 100_000_000))  # all: what eval leaves
    eval_size: int | Literal["all"] = field(metadata=between(1, 100_000_000))
    seed: int = field(metadata=SEED)


@dataclass(frozen=True)
class ModelParams:
    name: str = field(metadata=model_location(BASE_MODELS_DIR))
    revision: str | None
    quantization: Literal["none", "nf4", "fp4"]
    compute_dtype: Literal["float32", "float16", "bfloat16"]
    trust_remote_code: bool


@dataclass(frozen=True)
class TokenizeParams:
    max_length: int = field(metadata=between(8, 1_048_576))  # and at most the model's context (tokenize checks)
    template: Literal["auto", "alpaca", "chat"]  # stages/common/templates.py
    loss_mask: Literal["full", "completion"]
    padding: Literal["max_length", "longest", "packed"]


@dataclass(frozen=True)
class LoraParams:
    r: int = field(metadata=between(1, 4096))
    alpha: float = field(metadata=above(0, 1e6))
    dropout: float = field(metadata=PROBABILITY)
    target_modules: list[str] | None = field(
        metadata=_check(lambda v: len(v) > 0 and all(m.strip() for m in v), "must be a non-empty list of names")
    )


@dataclass(frozen=True)
class TrainParams:
    epochs: float = field(metadata=above(0, 1000))
    effective_batch_size: int = field(metadata=BATCH)
    micro_batch_size: int | Literal["auto"] = field(metadata=BATCH)
    learning_rate: float = field(metadata=above(0, 1))
    weight_decay: float = field(metadata=between(0, 1))
    warmup_ratio: float = field(metadata=PROBABILITY)
    precision: Literal["fp32", "fp16", "bf16"]
    gradient_checkpointing: bool
    group_by_length: bool
    compile: bool
    cuda_graphs: bool
    packed_attention: Literal["per_example", "whole_row"]  # stages/finetuning/packed_attention.py
    processes: int = field(metadata=between(1, 1024))
    parallelism: Literal["ddp", "fsdp"]  # fsdp: the base's weights sharded over the processes (FSDP2)
    gpu_memory_gib: float | None = field(metadata=above(0, 1_000_000))  # per-process budget; None = the whole card
    logging_steps: int = field(metadata=between(1, 1_000_000))
    seed: int = field(metadata=SEED)


@dataclass(frozen=True)
class PerplexityParams:
    batch_size: int = field(metadata=BATCH)
    seed_way: bool  # also the seed's figure (rows padded to max_length); off: the answer figure only, far cheaper


@dataclass(frozen=True)
class GenerateParams:
    prompts: list[str]
    held_out_prompts: int = field(metadata=between(0, 10_000))  # eval-split instructions added to `prompts`
    max_new_tokens: int = field(metadata=between(1, 1_048_576))  # and prompt + this within the model's context
    batch_size: int = field(metadata=BATCH)
    embedder: str = field(metadata=model_location(EMBEDDERS_DIR))


TASK_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,127}$")


@dataclass(frozen=True)
class HarnessParams:
    """lm-evaluation-harness tasks run on the base and on the fine-tune (stages/evaluate_harness.py)."""

    tasks: list[str] = field(  # lm-eval task names, or the `task:` of a YAML under tasks/
        metadata=_check(
            lambda v: 0 < len(v) <= 64 and len(set(v)) == len(v) and all(TASK_NAME.match(t) for t in v),
            "must be 1-64 distinct task names (letters, digits, '_', '.', '-')",
        )
    )
    limit: int | None = field(metadata=between(1, 10_000_000))  # documents per task; null = all
    num_fewshot: int | None = field(metadata=between(0, 64))  # null = each task's own default
    batch_size: int = field(metadata=BATCH)


@dataclass(frozen=True)
class EvalParams:
    ppl: PerplexityParams
    generate: GenerateParams
    harness: HarnessParams


@dataclass(frozen=True)
class PlotParams:
    dpi: int = field(metadata=between(20, 1200))


@dataclass(frozen=True)
class PackageParams:
    name: str = field(metadata=SLUG)  # the model's name in its card; the zip is always models/adapter.zip


@dataclass(frozen=True)
class ExportParams:
    dtype: Literal["float16", "bfloat16", "float32"]  # weights of the merged model (merged in float32 first)
    gguf_type: Literal["f16", "bf16", "q8_0", "f32"]  # the GGUF export: converter types needing no llama.cpp build


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    tokenize: TokenizeParams
    lora: LoraParams
    train: TrainParams
    eval: EvalParams
    plot: PlotParams
    package: PackageParams
    export: ExportParams

    def sections(self, *names: str) -> dict[str, Any]:
        """The named sections as plain dicts: what a stage records of its own params (only those it declares in
        dvc.yaml, so an edit elsewhere neither reruns it nor leaves its record stale)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in names}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _numeric_arms(hint: Any) -> set[type]:
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return {arm for arm in arms if arm in (int, float)}


def _as_number(value: Any, hint: Any) -> Any:
    """Numbers written as strings ("3e-4", which YAML 1.1 reads as a string, "16", "inf") become numbers the same way
    for every numeric field: parsed as a float, then made an int where the field is an int and the value is whole.
    Whatever is not finite is left as a float for the finiteness check to refuse; other strings stay strings."""
    arms = _numeric_arms(hint)
    if not arms or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            return value
    if isinstance(value, float) and int in arms and float not in arms and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint)).replace("list", "a list")


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `raw`, appending every problem found (with its dotted key) to `problems`."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'params'} must be a mapping")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw.keys() - fields.keys():
        problems.append(f"{prefix}{key} is not a known key")
    values = {}
    for name, fld in fields.items():
        key, hint = f"{prefix}{name}", hints[name]
        if name not in raw:
            problems.append(f"{key} is missing")
            continue
        value = raw[name]
        if dataclasses.is_dataclass(hint):
            section = _build(hint, value, f"{key}.", problems)
            if section is not None:
                values[name] = section
            continue
        value = _as_number(value, hint)
        if isinstance(value, float) and not math.isfinite(value) and _numeric_arms(hint):
            problems.append(f"{key} must be a finite number, got {value!r}")
            continue
        if not _type_ok(value, hint):
            problems.append(f"{key} must be {_describe(hint)}, got {value!r}")
            continue
        if "check" in fld.metadata and value not in (None, "auto", "all"):
            predicate, message = fld.metadata["check"]
            if not predicate(value):
                problems.append(f"{key} {message}, got {value!r}")
                continue
        values[name] = value
    if len(values) < len(fields):
        return None
    return cls(**values)


def _cross_field_problems(params: Params) -> list[str]:
    problems = []
    train = params.train
    rows_per_pass = train.processes * (1 if train.micro_batch_size == "auto" else train.micro_batch_size)
    if train.effective_batch_size % rows_per_pass:
        problems.append(
            f"train.effective_batch_size ({train.effective_batch_size}) must be a multiple of train.micro_batch_size"
            f" x train.processes ({train.micro_batch_size} x {train.processes})"
        )
    if params.data.train_size == params.data.eval_size == "all":
        problems.append("data.train_size and data.eval_size cannot both be all: give one of them a number")
    padding = params.tokenize.padding
    eager_blocks_graphed = train.cuda_graphs and not train.compile  # stages/finetuning/graphed.py
    if eager_blocks_graphed and padding == "longest":
        problems.append(
            "train.cuda_graphs without train.compile needs one batch shape: tokenize.padding max_length or packed"
        )
    if eager_blocks_graphed and train.processes > 1:
        problems.append(
            "train.cuda_graphs without train.compile runs on one process (not yet measured under DDP): "
            "set train.processes: 1 or train.compile: true"
        )
    if eager_blocks_graphed and train.gradient_checkpointing:
        problems.append(
            "train.gradient_checkpointing saves no memory under train.cuda_graphs without train.compile (each block's "
            "graph keeps its activations until its backward) and recomputes every block: set one of them false"
        )
    if train.parallelism == "fsdp":
        problems += _sharding_problems(params)
    if padding == "packed" and train.group_by_length:
        problems.append("train.group_by_length must be false with tokenize.padding packed (packs are length-balanced)")
    if params.model.quantization != "none" and params.model.compute_dtype == "float32":
        problems.append("model.compute_dtype must be float16 or bfloat16 when model.quantization is nf4 or fp4")
    return problems


def _sharding_problems(params: Params) -> list[str]:
    """What `train.parallelism: fsdp` does not run with (stages/finetuning/model.py shards the base as it loads)."""
    train, problems = params.train, []
    if train.processes < 2:
        problems.append("train.parallelism fsdp shards the base over processes: set train.processes to 2 or more")
    if train.compile or train.cuda_graphs:
        problems.append("train.parallelism fsdp runs the blocks eagerly: set train.compile and train.cuda_graphs false")
    if params.model.quantization != "none":
        problems.append(
            "train.parallelism fsdp needs model.quantization none: peft's 4-bit layers need bitsandbytes' own "
            "parameters, which sharding replaces (README: Several GPUs)"
        )
    if train.micro_batch_size == "auto":
        problems.append(
            "train.parallelism fsdp needs a numeric train.micro_batch_size: the auto probe stops at the first batch "
            "that runs out of memory, which would leave the other processes waiting"
        )
    return problems


def with_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """A deep copy of a params tree with each dotted key (`train.learning_rate`, as `dvc exp run -S` names them) set
    to its value: the one helper the bench and the tests use to vary params."""
    tree = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def parse_section(cls: type, raw: Any, key: str, origin: str) -> Any:
    """One section (`model` of an adapter's params.json, say) through the same checks as params.yaml's."""
    problems: list[str] = []
    section = _build(cls, raw, f"{key}.", problems)
    if problems:
        raise PipelineError(f"{origin}: " + "; ".join(sorted(problems)))
    return section


def parse_params(raw: Any, origin: str = str(PARAMS_FILE)) -> Params:
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    if params is not None:
        problems += _cross_field_problems(params)
    if problems:
        raise PipelineError(f"{origin}: " + "; ".join(sorted(problems)))
    return params


def read_yaml(path: Path) -> Any:
    """Parse a YAML file exactly as DVC does (ruamel.yaml's safe loader, YAML 1.2: `010` is 10, `yes` a string), so
    the value a stage trains with is the one dvc.lock and `dvc params diff` show; a syntax error or a key written
    twice is one line naming file:line:column."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run from the repository root)") from None
    except UnicodeDecodeError:
        raise PipelineError(f"{path}: not UTF-8 text") from None
    try:
        return YAML(typ="safe").load(text)  # dvc.utils.serialize.parse_yaml's reading
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = (err.problem or err.context or "not valid YAML").split("\n")[0]
        duplicate = re.match(r'found duplicate key "(.*?)" with value', problem)
        if duplicate:
            problem = f"duplicate key '{duplicate[1]}'"
        raise PipelineError(f"{where}: {problem}") from None
    except (YAMLError, RecursionError) as err:
        raise PipelineError(f"{path}: not valid YAML: {(str(err) or type(err).__name__).splitlines()[0]}") from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    return parse_params(read_yaml(path), str(path))
