"""The one typed schema for params.yaml.

Every stage calls `load_params()` first: unknown keys, wrong types and impossible values are all gathered and
reported in one line naming each dotted key, before any model or data is touched.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stages.common.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


def _check(predicate, message: str) -> dict:
    return {"check": (predicate, message)}


POSITIVE = _check(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0")
PROBABILITY = _check(lambda v: 0 <= v < 1, "must be in [0, 1)")
NOT_EMPTY = _check(lambda v: len(v) > 0, "must not be empty")


@dataclass(frozen=True)
class DataParams:
    source: str = field(metadata=NOT_EMPTY)  # local .jsonl/.json/.parquet file, or "hub:<dataset id>"
    revision: str | None
    split: str
    train_size: int = field(metadata=POSITIVE)
    eval_size: int = field(metadata=POSITIVE)
    seed: int


@dataclass(frozen=True)
class ModelParams:
    name: str = field(metadata=NOT_EMPTY)  # hub id, local folder, or "pkg:<package>/<file or folder>"
    revision: str | None
    quantization: Literal["none", "nf4", "fp4"]
    compute_dtype: Literal["float32", "float16", "bfloat16"]
    trust_remote_code: bool


@dataclass(frozen=True)
class TokenizeParams:
    max_length: int = field(metadata=POSITIVE)
    loss_mask: Literal["full", "completion"]
    padding: Literal["max_length", "longest"]


@dataclass(frozen=True)
class LoraParams:
    r: int = field(metadata=POSITIVE)
    alpha: float = field(metadata=POSITIVE)
    dropout: float = field(metadata=PROBABILITY)
    target_modules: list[str] | None


@dataclass(frozen=True)
class TrainParams:
    epochs: float = field(metadata=POSITIVE)
    effective_batch_size: int = field(metadata=POSITIVE)
    micro_batch_size: int | Literal["auto"]
    learning_rate: float = field(metadata=POSITIVE)
    weight_decay: float = field(metadata=NON_NEGATIVE)
    warmup_ratio: float = field(metadata=PROBABILITY)
    precision: Literal["fp32", "fp16", "bf16"]
    gradient_checkpointing: bool
    group_by_length: bool
    compile: bool
    cuda_graphs: bool
    processes: int = field(metadata=POSITIVE)
    logging_steps: int = field(metadata=POSITIVE)
    seed: int


@dataclass(frozen=True)
class PerplexityParams:
    batch_size: int = field(metadata=POSITIVE)


@dataclass(frozen=True)
class GenerateParams:
    prompts: list[str]
    held_out_prompts: int = field(metadata=NON_NEGATIVE)  # eval-split instructions added to `prompts`
    max_new_tokens: int = field(metadata=POSITIVE)
    batch_size: int = field(metadata=POSITIVE)
    embedder: str = field(metadata=NOT_EMPTY)


@dataclass(frozen=True)
class EvalParams:
    ppl: PerplexityParams
    generate: GenerateParams


@dataclass(frozen=True)
class PlotParams:
    dpi: int = field(metadata=POSITIVE)


@dataclass(frozen=True)
class PackageParams:
    name: str = field(metadata=_check(lambda v: v and "/" not in v and not v.startswith("."), "must be a file stem"))


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        if hint is float and isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, hint):
            problems.append(f"{key} must be {_describe(hint)}, got {value!r}")
            continue
        if "check" in fld.metadata and value not in (None, "auto"):
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
    micro, effective = params.train.micro_batch_size, params.train.effective_batch_size
    if micro != "auto" and effective % micro:
        problems.append(
            f"train.effective_batch_size ({effective}) must be a multiple of train.micro_batch_size ({micro})"
        )
    if params.train.cuda_graphs and not params.train.compile:
        problems.append("train.cuda_graphs needs train.compile: true (the graphs replay the compiled blocks)")
    if params.model.quantization != "none" and params.model.compute_dtype == "float32":
        problems.append("model.compute_dtype must be float16 or bfloat16 when model.quantization is nf4 or fp4")
    return problems


def parse_params(raw: Any, origin: str = str(PARAMS_FILE)) -> Params:
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    if params is not None:
        problems += _cross_field_problems(params)
    if problems:
        raise PipelineError(f"{origin}: " + "; ".join(sorted(problems)))
    return params


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_params(raw, str(path))
