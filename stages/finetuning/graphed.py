"""CUDA graphs over the transformer blocks as they are, without torch.compile (`train.cuda_graphs: true` with
`train.compile: false`).

A training step of a 4-bit Phi-2 launches thousands of small kernels; launched one by one from Python the GPU waits on
the host. torch.compile's reduce-overhead mode fixes that but first compiles for tens of seconds on a cold cache.
Here each block's forward and backward are recorded once as CUDA graphs (torch.cuda.make_graphed_callables, a few
seconds for all blocks) and replayed every step: bitsandbytes' own kernels, cuBLAS and SDPA run unchanged, the host
launches one graph per block and pass.

The graphs are recorded for one batch shape, in training mode, under the run's autocast (its cast cache off, so no
cast made outside a graph is baked into one). Any other call (evaluation, another shape) runs the block eagerly. The
attention mask and rotary tables are the same for every block of a pass: they are copied once per pass into tensors
all the graphs read.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from stages.common.models import AUTOCAST_DTYPES

log = logging.getLogger("pipeline")


class _BlockCall(torch.nn.Module):
    """One block as a function of tensors only, what make_graphed_callables records."""

    def __init__(self, block: torch.nn.Module, forward: Any):
        super().__init__()
        self.block, self.eager_forward = block, forward

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.eager_forward(hidden, attention_mask=mask, position_embeddings=(cos, sin))


class _SharedInputs:
    """The mask and rotary tables every block's graph reads, refreshed once per forward pass. `causal` stands in
    for the mask transformers leaves out (None) when a batch has no padding."""

    def __init__(self, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        rows, _, width, _ = mask.shape
        self.causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril().expand(rows, 1, -1, -1)
        self.static = (mask.clone(), cos.clone(), sin.clone())
        self.seen: tuple[Any, ...] = (None, None, None)

    def fits(self, mask: torch.Tensor, cos: torch.Tensor) -> bool:
        static_mask, static_cos, _ = self.static
        return mask.shape == static_mask.shape and mask.dtype == static_mask.dtype and cos.shape == static_cos.shape

    def refresh(self, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        incoming = (mask, cos, sin)
        for static, new, old in zip(self.static, incoming, self.seen, strict=True):
            if new is not old:
                static.copy_(new)
        self.seen = incoming
        return self.static


def _decoder_blocks(model: Any) -> list[torch.nn.Module]:
    """The longest list of same-typed modules: the transformer blocks."""
    return max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len({type(c) for c in m}) == 1),
        key=len,
        default=[],
    )


def _record_block_inputs(model: Any, batch: dict[str, torch.Tensor], precision: str) -> list[tuple]:
    """Each block's (hidden states, mask, cos, sin) from one eager forward of `batch`."""
    seen: list[tuple] = []

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        cos, sin = kwargs["position_embeddings"]
        seen.append((hidden.detach(), mask, cos.detach(), sin.detach()))

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in _decoder_blocks(model)]
    try:
        with torch.no_grad(), _autocast(precision):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _autocast(precision: str) -> Any:
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False, enabled=dtype is not None)


def graph_blocks(model: Any, batch: dict[str, torch.Tensor], precision: str) -> int:
    """Record every transformer block's forward and backward for batches shaped like `batch` (on the model's
    device); returns the number of blocks."""
    started = time.perf_counter()
    blocks = _decoder_blocks(model)
    inputs = _record_block_inputs(model, batch, precision)
    hidden, mask, cos, sin = inputs[0]
    if mask is None:
        rows, width = hidden.shape[:2]
        mask = torch.ones(width, width, dtype=torch.bool, device=hidden.device).tril().expand(rows, 1, -1, -1)
    shared = _SharedInputs(mask, cos, sin)
    calls = [_BlockCall(block, block.forward) for block in blocks]
    samples = tuple((h.clone().requires_grad_(True), *shared.static) for h, *_ in inputs)
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
        cos, sin = kwargs["position_embeddings"]
        mask = shared.causal if attention_mask is None else attention_mask
        if block.training and torch.is_grad_enabled() and shared.fits(mask, cos):
            return call(hidden_states, *shared.refresh(mask, cos, sin))
        return eager(hidden_states, attention_mask=attention_mask, **kwargs)

    return forward
