"""Canaries for stages/common/fragile.py: each private or version-fragile call still does what the pipeline relies
on. A library upgrade that changes one fails here, by name, before it silently changes a run."""

import json

import torch

from stages.common.fragile import limit_trainer_to_one_gpu, mark_static_address, unlabel_dequantized_gguf
from tests.conftest import SMOLLM2


def test_trainer_gpu_count_is_what_limit_trainer_to_one_gpu_sets(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args._n_gpu = 2  # what the Trainer computes on a 2-GPU machine for a single process
    assert args.n_gpu == 2
    limit_trainer_to_one_gpu(args)
    assert args.n_gpu == 1


def test_a_gguf_base_is_trainable(tmp_path):
    """transformers labels a model loaded from GGUF as quantized, and the Trainer refuses to train such a model."""
    import pytest
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from stages.common.models import resolve_model

    source = resolve_model(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match="quantized"):
        Trainer(model=get_peft_model(model, lora), args=args)
    assert model.config.to_dict()["quantization_config"]["quant_method"] == "gguf"
    unlabel_dequantized_gguf(model)
    Trainer(model=get_peft_model(model, lora), args=args)
    # saved, the model must read back as plain weights (and llama.cpp's converter must accept its config)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved/config.json").read_text())


def test_static_address_marking_exists():
    tensor = torch.ones(4)
    assert getattr(tensor, "_dynamo_static_input_type", None) is None
    mark_static_address(tensor)  # fails if torch drops or renames the private API
    assert tensor._dynamo_static_input_type == "unguarded"  # what dynamo reads to keep the address out of the graph


def test_library_notices_no_user_can_act_on_are_dropped_and_nothing_else(caplog):
    import logging

    from stages.common.errors import setup_console
    from stages.common.gguf_converter import shown

    setup_console("test")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: offline. Please make sure ..."
    )
    logging.getLogger("kernels._internals.hf_hub").warning(
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because ..."
    )
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a notice of another kind")
    err = caplog.text
    assert "gemm_4bit_forward" not in err and "publisher trust" not in err and "a notice of another kind" in err
    assert not shown("INFO:hf-to-gguf:blk.0.attn_q.weight, torch.float16 --> F16, shape = {64, 64}\n")
    assert not shown("WARNING:hf-to-gguf:Unknown RoPE type: default\n")
    assert shown("WARNING:hf-to-gguf:Unknown RoPE type: dynamic-ntk\n")
    assert shown("INFO:hf-to-gguf:Model successfully exported to models/gguf/model.gguf\n")
