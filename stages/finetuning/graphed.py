"""CUDA graphs over the transformer blocks as they are, without torch.compile (`train.cuda_graphs: true` with
`train.compile: false`).

A training step of a 4-bit Phi-2 launches thousands of small kernels; launched one by one from Python the GPU waits on
the host. torch.compile's reduce-overhead mode fixes that but first compiles for tens of seconds on a cold cache.
Here each block's forward and backward are recorded once as CUDA graphs (torch.cuda.make_graphed_callables, a few
seconds for all blocks) and replayed every step: bitsandbytes' own kernels, cuBLAS and SDPA run unchanged, the host
launches one graph per block and pass.

The graphs are recorded for one batch shape, in training mode, under the run's autocast (its cast cache off, so no
cast made outside a graph is baked into one). Any other call (evaluation, another shape) runs the block eagerly. The
attention mask, the rotary tables and packed rows' example bounds are the same for every block of a pass: they are
copied once per pass into tensors all the graphs read.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from stages.common.models import AUTOCAST_DTYPES
from stages.common.output_head import without_labels
from stages.finetuning.compiled import transformer_blocks
from stages.finetuning.packed_attention import BOUND_LENGTHS, BOUND_TENSORS

log = logging.getLogger("pipeline")


class _BlockCall(torch.nn.Module):
    """One block as a function of tensors only, what make_graphed_callables records: the hidden states, then the
    shared inputs in `names` order; `constants` (the longest packed segment) are fixed at recording."""

    def __init__(self, block: torch.nn.Module, forward: Any, names: tuple[str, ...], constants: dict[str, Any]):
        super().__init__()
        self.block, self.eager_forward, self.names, self.constants = block, forward, names, constants

    def forward(self, hidden: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, tensors, strict=True))
        cos, sin = kwargs.pop("cos"), kwargs.pop("sin")
        return self.eager_forward(hidden, position_embeddings=(cos, sin), **kwargs, **self.constants)


def _graph_inputs(attention_mask: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, constants) of a block call that its graph reads: the attention mask, the rotary tables and, for
    packed rows, the examples' bounds and the longest a segment can be (stages/finetuning/packed_attention.py)."""
    cos, sin = kwargs["position_embeddings"]
    tensors = {"attention_mask": attention_mask, "cos": cos, "sin": sin}
    tensors |= {name: kwargs[name] for name in BOUND_TENSORS if kwargs.get(name) is not None}
    return tensors, {name: kwargs[name] for name in BOUND_LENGTHS if kwargs.get(name) is not None}


class _SharedInputs:
    """The inputs every block's graph reads besides its hidden states, refreshed once per forward pass. A causal mask
    stands in for the one transformers leaves out (None) when a batch has no padding."""

    def __init__(self, hidden: torch.Tensor, tensors: dict[str, Any], constants: dict[str, Any]):
        rows, width = hidden.shape[:2]
        self.causal = torch.ones(width, width, dtype=torch.bool, device=hidden.device).tril().expand(rows, 1, -1, -1)
        tensors = self._with_mask(tensors)
        self.names, self.constants = tuple(tensors), constants
        self.static = tuple(tensor.clone() for tensor in tensors.values())
        self.seen: tuple[Any, ...] = (None,) * len(self.static)

    def _with_mask(self, tensors: dict[str, Any]) -> dict[str, Any]:
        mask = tensors["attention_mask"]
        return tensors | {"attention_mask": self.causal if mask is None else mask}

    def fits(self, tensors: dict[str, Any], constants: dict[str, Any]) -> bool:
        """Whether a call's inputs have the recorded names, shapes and constants (its graph replays on them)."""
        tensors = self._with_mask(tensors)
        if tuple(tensors) != self.names or constants != self.constants:
            return False
        pairs = zip(tensors.values(), self.static, strict=True)
        return all(new.shape == static.shape and new.dtype == static.dtype for new, static in pairs)

    def refresh(self, tensors: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        incoming = tuple(self._with_mask(tensors).values())
        for static, new, old in zip(self.static, incoming, self.seen, strict=True):
            if new is not old:
                static.copy_(new)
        self.seen = incoming
        return self.static


def _record_block_inputs(model: Any, batch: dict[str, Any], precision: str) -> list[tuple]:
    """Each block's (hidden states, graph tensors, graph constants) from one eager forward of `batch`."""
    seen: list[tuple] = []

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        tensors, constants = _graph_inputs(kwargs.get("attention_mask"), kwargs)
        seen.append((hidden.detach(), {k: v.detach() if v is not None else v for k, v in tensors.items()}, constants))

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in transformer_blocks(model)]
    try:
        with torch.no_grad(), _autocast(precision):
            model(**without_labels(batch))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _autocast(precision: str) -> Any:
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False, enabled=dtype is not None)


def graph_blocks(model: Any, batch: dict[str, Any], precision: str) -> int:
    """Record every transformer block's forward and backward for batches shaped like `batch` (on the model's
    device); returns the number of blocks."""
    started = time.perf_counter()
    blocks = transformer_blocks(model)
    inputs = _record_block_inputs(model, batch, precision)
    shared = _SharedInputs(*inputs[0])
    calls = [_BlockCall(block, block.forward, shared.names, shared.constants) for block in blocks]
    samples = tuple((hidden.clone().requires_grad_(True), *shared.static) for hidden, *_ in inputs)
    with _autocast(precision):
        graphed = torch.cuda.make_graphed_callables(tuple(calls), samples)
    for block, call in zip(blocks, graphed, strict=True):
        block.forward = _replaying_forward(block, call, shared)
    torch.cuda.synchronize()
    log.info("CUDA graphs: %d blocks recorded in %.1f s", len(blocks), time.perf_counter() - started)
    return len(blocks)


def _replaying_forward(block: torch.nn.Module, call: _BlockCall, shared: _SharedInputs) -> Any:
    """The block's forward: its graphs in training at the recorded shape, its own code otherwise."""
    eager = call.eager_forward

    def forward(hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any) -> torch.Tensor:
        tensors, constants = _graph_inputs(attention_mask, kwargs)
        if block.training and torch.is_grad_enabled() and shared.fits(tensors, constants):
            return call(hidden_states, *shared.refresh(tensors))
        return eager(hidden_states, attention_mask=attention_mask, **kwargs)

    return forward
