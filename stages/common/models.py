"""Where base models come from and how they are loaded: hub id, local folder, or a file inside an installed package.

The base model is never a DVC out: `model.name` and `model.revision` are params, so changing them reruns what
depends on them, and the weights stay in the Hugging Face cache or in site-packages.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.common.errors import PipelineError
from stages.common.fragile import unlabel_dequantized_gguf
from stages.common.params import ModelParams
from stages.common.paths import BASE_MODELS_DIR, EMBEDDERS_DIR, inside_repository

log = logging.getLogger("pipeline")

PACKAGE_PREFIX = "pkg:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype; fp32: none


def autocast(precision: str, device_type: str) -> torch.autocast:
    """The autocast that `train.precision` trains under (the Trainer's): off for fp32."""
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES)


@dataclass(frozen=True)
class ModelSource:
    """Arguments for `from_pretrained`: a hub id or folder, plus a GGUF file name inside it when there is one."""

    path: str
    gguf_file: str | None = None

    def kwargs(self, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if revision and not Path(self.path).is_dir():
            kwargs["revision"] = revision
        return kwargs


def package_path(spec: str, key: str) -> Path:
    """'pkg:<package>/<relative path>' -> the file or folder inside the installed package (without importing it)."""
    package, _, relative = spec[len(PACKAGE_PREFIX) :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise PipelineError(f"{key} '{spec}': package '{package}' is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.exists():
        raise PipelineError(f"{key} '{spec}': '{relative}' not found in package '{package}'")
    return path


def resolve_model(name: str, key: str = "model.name") -> ModelSource:
    if name.startswith(PACKAGE_PREFIX):
        path = package_path(name, key)
        if path.suffix == ".gguf":
            return ModelSource(str(path.parent), path.name)
        return ModelSource(str(path))
    local = Path(name)
    tracked = any(local.is_relative_to(folder) for folder in (BASE_MODELS_DIR, EMBEDDERS_DIR))
    if tracked and local.exists():
        inside_repository(local, key)
    if not local.is_absolute() and local.exists() and not tracked:
        # transformers loads a local folder before a hub id of the same name, and DVC does not watch that folder
        raise PipelineError(
            f"{key} '{name}' is a local folder outside {BASE_MODELS_DIR}/ and {EMBEDDERS_DIR}/: move it there so DVC "
            "reruns what depends on it when it changes"
        )
    return ModelSource(name)


def _load(loader: Any, params: ModelParams, what: str, **extra: Any) -> Any:
    source = resolve_model(params.name)
    try:
        return loader.from_pretrained(source.path, **source.kwargs(params.revision, params.trust_remote_code), **extra)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"model.name '{params.name}': could not load the {what}: {first}") from None


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(params: ModelParams) -> int | None:
    """Tokens the base model can attend over (from its config), or None when its config does not say."""
    from transformers import AutoConfig

    config = _load(AutoConfig, params, "config")
    config = getattr(config, "text_config", None) or config
    return next((int(getattr(config, key)) for key in CONTEXT_KEYS if getattr(config, key, None)), None)


def check_token_budget(params: ModelParams, tokens: int, what: str) -> None:
    """One line naming the params that ask for more tokens than the model has positions for."""
    limit = context_length(params)
    if limit is not None and tokens > limit:
        raise PipelineError(f"{what} = {tokens} tokens, more than the {limit} positions of model.name '{params.name}'")


def load_tokenizer(params: ModelParams) -> Any:
    """The base model's tokenizer, with padding on the right and pad = eos when the model has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, params, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(params: ModelParams) -> Any:
    if params.quantization == "none":
        return None
    if not torch.cuda.is_available():
        raise PipelineError(
            f"model.quantization '{params.quantization}' needs a CUDA GPU (bitsandbytes); use 'none' here"
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise PipelineError(
            f"model.quantization '{params.quantization}' needs bitsandbytes: pip install bitsandbytes"
        ) from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=params.quantization,
        bnb_4bit_compute_dtype=DTYPES[params.compute_dtype],
    )


def fuse_activations(model: Any) -> int:
    """Swap the tanh GELU written out in Python (`gelu_new`: Phi-2, GPT-2) for torch's fused kernel of the same
    function: one kernel instead of seven, and backward keeps one tensor instead of six (GiBs at batch 16)."""
    from transformers.activations import NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


# For every base load (the stages' and the bench's peers'): transformers 5.2x, where the `kernels` package is
# installed (transformers requires it), swaps layers (on a GPU, a Llama's rotary embedding) for compiled kernels it
# downloads from the hub at load: code nobody pinned, an error offline, and other layers than the ones measured.
WITHOUT_HUB_KERNELS: dict[str, Any] = {"use_kernels": False}


def load_base_model(params: ModelParams, shard_over: int = 1) -> Any:
    """The frozen base model on the GPU when there is one, 4-bit when `model.quantization` says so. `shard_over` > 1
    (a process of that many): transformers loads each process's share of the weights only and shards them with
    FSDP2 (`DistributedConfig`); the Trainer then neither wraps it in DDP nor shards it again."""
    from transformers import AutoModelForCausalLM

    quantization = quantization_config(params)
    extra: dict[str, Any] = {"dtype": DTYPES[params.compute_dtype]} | WITHOUT_HUB_KERNELS
    if quantization is not None:
        extra["quantization_config"] = quantization
    if shard_over > 1:  # transformers places each process's shard on its device itself
        from transformers.distributed.configuration_utils import DistributedConfig

        extra["distributed_config"] = DistributedConfig(fsdp_size=shard_over)
    elif torch.cuda.is_available():
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one GPU per process under DDP
    from_gguf = resolve_model(params.name).gguf_file is not None
    if not from_gguf:
        extra["use_safetensors"] = True  # never unpickle weights: a .bin checkpoint can run code when loaded
    log.info("loading %s ...", params.name)
    started = time.perf_counter()
    model = _load(AutoModelForCausalLM, params, "model", **extra)
    if from_gguf:
        unlabel_dequantized_gguf(model)
    model.config.use_cache = False
    fuse_activations(model)
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s (%s, %.1fM params, %s) in %.1f s",
        params.name,
        params.quantization,
        total / 1e6,
        model.device,
        time.perf_counter() - started,
    )
    return model


def load_finetuned(params: ModelParams, adapter_dir: Path) -> Any:
    """Base model with the trained adapter attached; `with model.disable_adapter():` gives the base back. An adapter
    that is missing, unreadable or made for another base fails with one line instead of loading half-applied."""
    from peft import PeftModel

    check_adapter_files(adapter_dir)
    base = load_base_model(params)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(base, adapter_dir)
        except (RuntimeError, ValueError, KeyError) as err:
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), None)
            first = detail or str(err).strip().splitlines()[0]
            raise PipelineError(f"{adapter_dir}: does not fit base model '{params.name}': {first}") from None
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if missing:  # peft loads what matches and only warns: the rest of the adapter would silently do nothing
        raise PipelineError(f"{adapter_dir}: does not fit base model '{params.name}': {missing[0][:200]}")
    model.eval()
    log.info("loaded adapter %s in %.1f s", adapter_dir, time.perf_counter() - started)
    return model


def check_adapter_files(adapter_dir: Path) -> None:
    """The two files peft needs, present and readable (a truncated download or a corrupted copy is named here)."""
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise PipelineError(f"{adapter_dir}: no trained adapter ({name} missing); run finetune or dvc pull first")
    check_finite_weights(adapter_dir / "adapter_model.safetensors")
    try:
        json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(f"{adapter_dir / 'adapter_config.json'}: not valid JSON: {err}") from None


def check_finite_weights(weights: Path) -> None:
    """Every tensor of a safetensors file readable and finite, one tensor in memory at a time: a damaged or tampered
    file (or a diverged run's) is named here, before it is evaluated, merged, exported or chatted with."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise PipelineError(f"{weights}: tensor {key} holds NaN or infinite values (damaged weights)")
    except PipelineError:
        raise
    except Exception as err:  # safetensors raises its own error types for a damaged header or file
        raise PipelineError(f"{weights}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def check_finite_model(model: Any, what: str) -> None:
    """A model in memory (a merge's result) holds only finite weights, or the stage stops before saving it."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise PipelineError(f"{what}: weight {name} holds NaN or infinite values; nothing was written")
