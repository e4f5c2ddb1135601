"""bitsandbytes' 4-bit linear layers written as plain torch operations, for torch.compile.

bitsandbytes runs every 4-bit layer through its own operator: opaque to the compiler, and about 0.1 ms of Python on
the host per call, forward and backward. Phi-2 has 192 such layers, so that is ~35 ms of host time per training
step on an H100 whose GPU needs ~70 ms for the whole step. Written as a table lookup and a scale, dequantisation
compiles into one fused kernel inside the block's graph and costs no extra host time.

The 16-entry lookup table is read from bitsandbytes' own kernel on the device, and `inline_4bit_layers` checks the
result against bitsandbytes once per model, so the weights the compiled model multiplies by are bit-identical.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from stages.common.fragile import mark_static_address, swap_class

log = logging.getLogger("pipeline")


@functools.cache
def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The float32 value of each 4-bit code, as bitsandbytes' dequantisation kernel on `device` produces it."""
    codes = torch.arange(16, dtype=torch.uint8, device=device)
    packed = torch.cat([codes * 17, torch.zeros(16, dtype=torch.uint8, device=device)])  # both nibbles = code
    values = torch.ops.bitsandbytes.dequantize_4bit.default(
        packed.view(-1, 1), torch.ones(1, device=device), 64, quant_type, (64,), torch.float32
    )
    return values.reshape(-1)[:32:2].clone()


def dequantize(packed: torch.Tensor, state: Any, table: torch.Tensor) -> torch.Tensor:
    """Unpack two codes per byte (high nibble first), look them up, scale each block by its absmax."""
    data = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack([data >> 4, data & 15], dim=-1).reshape(-1).long()
    values = table[codes].view(-1, state.blocksize) * state.absmax.view(-1, 1)
    return values.view(state.shape).to(state.dtype)


def _torch_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """What bnb.nn.Linear4bit.forward computes: compute-dtype matmul, output in the input's dtype. Run eagerly
    (evaluation), bitsandbytes' own kernels do it: unfused, the torch version would be slower."""
    if not torch.compiler.is_compiling():
        return self.bitsandbytes_forward(x)
    dtype = self.compute_dtype or x.dtype
    state = self.weight.quant_state
    # Recomputed in backward, not kept: keeping them would hold every layer's weights in 16 bits (+5 GB for Phi-2).
    weight = checkpoint(
        lambda packed: dequantize(packed, state, self.code_table).to(dtype), self.weight, use_reentrant=False
    )
    bias = None if self.bias is None else self.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def _eligible(module: Any, linear_4bit: type) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return (
        isinstance(module, linear_4bit)
        and type(module).forward is not _torch_forward  # not swapped already
        and state is not None
        and not state.nested  # double quantisation: absmax is itself quantised
        and not getattr(state, "packing_format_for_cpu", False)  # bitsandbytes' CPU inference layout
    )


@functools.cache
def _torch_class(linear_4bit: type) -> type:
    """A subclass whose forward is `_torch_forward`: one class for every layer, so torch.compile guards on the class
    and compiles one graph for all the blocks (a per-layer forward would compile once per layer)."""
    return type(
        "TorchLinear4bit", (linear_4bit,), {"forward": _torch_forward, "bitsandbytes_forward": linear_4bit.forward}
    )


def inline_4bit_layers(model: Any) -> int:
    """Make every bitsandbytes 4-bit layer (plain, not double-quantised) run `_torch_forward`; returns how many.
    If the torch dequantisation does not reproduce bitsandbytes' bits exactly, nothing is changed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if _eligible(m, bnb.nn.Linear4bit)]
    if not layers:
        return 0
    first = layers[0]
    state = first.weight.quant_state
    expected = bnb.functional.dequantize_4bit(first.weight.data, state)
    if not torch.equal(dequantize(first.weight, state, code_table(state.quant_type, expected.device)), expected):
        log.warning("4-bit layers left to bitsandbytes: the torch dequantisation does not match it")
        return 0
    for layer in layers:
        state = layer.weight.quant_state
        layer.register_buffer("code_table", code_table(state.quant_type, layer.weight.device), persistent=False)
        mark_static_address(state.absmax)  # a plain attribute that never moves: see stages/common/fragile.py
        swap_class(layer, _torch_class(type(layer)))
    return len(layers)
