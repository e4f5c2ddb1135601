"""The model a run trains: the base (4-bit through bitsandbytes when `model.quantization` says so) with a LoRA adapter
attached, its blocks compiled when `train.compile` is on."""

from __future__ import annotations

import functools
import logging
from typing import Any

from stages.common.errors import PipelineError
from stages.common.fragile import rename_base
from stages.common.models import AUTOCAST_DTYPES, load_base_model, load_tokenizer
from stages.common.params import Params
from stages.finetuning.compiled import compile_layers
from stages.finetuning.runtime import Runtime

log = logging.getLogger("pipeline")


def build_model(params: Params, runtime: Runtime) -> tuple[Any, Any]:
    """(model with LoRA attached, tokenizer). The seed is set first: the adapter's A matrices are drawn from it."""
    from transformers import set_seed

    if params.train.precision == "fp16" and not runtime.cuda:
        raise PipelineError("train.precision 'fp16' needs a CUDA GPU; use fp32 or bf16 on CPU")
    set_seed(params.train.seed)
    tokenizer = load_tokenizer(params.model)
    sharded = runtime.shards_base(params.train.parallelism)
    base = load_base_model(params.model, shard_over=runtime.world_size if sharded else 1)
    if sharded:
        describe_shard(base, runtime)
    model = attach_lora(base, params)
    if params.train.compile:  # before the micro-batch probe: compiled blocks need less memory than eager ones
        blocks = compile_layers(model, cuda_graphs=params.train.cuda_graphs)
        graphs = ", replayed as CUDA graphs" if params.train.cuda_graphs else ""
        log.info("torch.compile: %d transformer blocks compiled in place%s", blocks, graphs)
    return model, tokenizer


def describe_shard(model: Any, runtime: Runtime) -> None:
    """Log how much of the base this process holds: its share of every sharded weight."""
    local = sum(getattr(p.data, "_local_tensor", p.data).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    log.info(
        "FSDP: the base's weights sharded over %d processes; this one holds %.1fM of %.1fM params",
        runtime.world_size,
        local / 1e6,
        total / 1e6,
    )


def attach_lora(model: Any, params: Params) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = params.train.gradient_checkpointing
    if params.model.quantization != "none" and params.train.precision == "fp16":
        # peft's QLoRA preparation: every weight that is not 4-bit (norms, embeddings, head, biases) goes to fp32,
        # which fp16 needs for stability. bf16 does not, and fp32 copies make every activation between the layers
        # fp32 too (more memory and traffic): with bf16 the weights stay as loaded and peft freezes them.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise PipelineError(f"lora.target_modules: {str(err).splitlines()[0]}") from None
    if params.train.precision in AUTOCAST_DTYPES:
        keep_adapter_inputs_as_they_come(model)
    describe_base(model, params)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %.2fM trainable of %.1fM params (%.3f%%)", trainable / 1e6, total / 1e6, 100 * trainable / total)
    return model


def keep_adapter_inputs_as_they_come(model: Any) -> None:
    """Under autocast (bf16/fp16 training) peft's LoRA layers would cast each input to the float32 of the adapter
    weights, only for autocast to cast it back to 16 bits for the matmul: two full copies of the activations per
    adapted layer and pass (fc2's are 4x the hidden size). Switched off, the adapter computes the same products and
    the weights stay float32 for the optimizer. 4-bit layers already skip the cast under autocast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def describe_base(model: Any, params: Params) -> None:
    """What the adapter folder and every checkpoint's adapter_config.json and model card say about the base: the
    params' own name (not the resolved path, which holds the virtual environment's absolute path) and the target
    modules in sorted order (peft keeps them as a set, which JSON writes in a different order per process)."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = params.model.name
    config.revision = params.model.revision
    config.target_modules = sorted(config.target_modules)
    rename_base(model.get_base_model(), params.model.name)
    # No run here resizes the vocabulary, so no save needs peft's "auto" check of it, which looks the base name up
    # on the hub (a request per checkpoint, and a warning when offline or for a pkg: name): every save skips it.
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
