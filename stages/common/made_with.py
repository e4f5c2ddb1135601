"""An adapter's params.json (what it was trained with) is input from outside: a zip someone shared, a folder `dvc pull`
fetched. It is read through the params schema, and nothing in it can turn on code execution: `trust_remote_code`
comes from the user (params.yaml, or `lora-dvc chat --trust-remote-code`), never from an artifact."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from stages.common.errors import PipelineError
from stages.common.io import read_json
from stages.common.params import ModelParams, TokenizeParams, parse_section

TEMPLATES = typing.get_args(typing.get_type_hints(TokenizeParams)["template"])
CARD_SECTIONS = ("data", "lora", "train")  # read by the model cards (stages/common/model_card.py)


def read_made_with(path: Path, *, card: bool = True) -> dict[str, Any]:
    """params.json with its model section checked as params.yaml's is and its template one the code knows; `card`:
    the sections a model card reads must be there too."""
    settings = read_json(path)
    if not isinstance(settings, dict):
        raise PipelineError(f"{path}: must be a JSON object of params sections")
    model = parse_section(ModelParams, settings.get("model"), "model", str(path))
    tokenize = settings.get("tokenize", {})
    template = tokenize.get("template", "alpaca") if isinstance(tokenize, dict) else None
    if template not in TEMPLATES:
        raise PipelineError(f"{path}: tokenize.template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    missing = [name for name in CARD_SECTIONS if card and not isinstance(settings.get(name), dict)]
    if missing:
        raise PipelineError(f"{path}: no {', '.join(missing)} section (not written by this pipeline's finetune)")
    return {**settings, "model": dataclasses.asdict(model), "tokenize": {**tokenize, "template": template}}


def untrusted(model: ModelParams, trust_remote_code: bool) -> ModelParams:
    """The base an artifact names, loaded with remote code only when the user asked on the command line."""
    return dataclasses.replace(model, trust_remote_code=trust_remote_code)
