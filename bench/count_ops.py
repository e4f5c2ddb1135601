"""How many operator calls one training micro-step makes: the GPU step of the seed profile is bound by launching
them, not by arithmetic, so this count is what torch.compile or CUDA graphs must shrink.

    python bench/count_ops.py        # CPU, seconds; Phi-2's 32 layers and LoRA, narrow widths (the count does not
                                     # depend on width), unquantized (4-bit adds a dequantisation per linear layer)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.common.models import fuse_activations  # noqa: E402


class OperatorCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count(fused_gelu: bool, rows: int = 16, length: int = 128) -> tuple[int, int]:
    """(forward, forward + backward) operator calls of one micro-step with LoRA as the seed attaches it."""
    from peft import LoraConfig, get_peft_model
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(
        hidden_size=64,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=256,
        vocab_size=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
    )
    model = PhiForCausalLM(config)
    if fused_gelu:
        fuse_activations(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, task_type="CAUSAL_LM"))
    model.train()
    ids = torch.randint(0, config.vocab_size, (rows, length))
    with OperatorCount() as counter:
        loss = model(input_ids=ids, labels=ids).loss
        forward = counter.calls
        loss.backward()
    return forward, counter.calls


def main() -> None:
    print(f"{'activation':22} {'forward':>8} {'fwd+bwd':>8}")
    for fused in (False, True):
        forward, total = count(fused)
        print(f"{'fused tanh GELU' if fused else 'gelu_new (Python)':22} {forward:>8} {total:>8}")


if __name__ == "__main__":
    main()
